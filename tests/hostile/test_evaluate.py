"""Hostile cases for evaluation and the embedded demo data, one row per case.

Evaluation only reads a run: a workdir that holds none is refused in one line before anything
is set up, with nothing created anywhere; a finished run's files stay as they were but for the
documented eval-step-N.json. The embedded demo data is converted into a checked cache outside
every workdir: made once, whole, and never used half made or edited.
"""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from launch import evaluate, setup, train
from launch.plan import ConfigError
from launch.status import ExitStatus
from pipeline import conversion, dataset, demo_data
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest

# --- a workdir that holds no run ------------------------------------------------------------


def _mistyped(runs):
    return runs / "resnet-demoo"


def _no_checkpoints_folder(runs):
    (runs / "w").mkdir()
    (runs / "w" / "notes.txt").write_text("the user's own file")
    return runs / "w"


def _empty_checkpoints_folder(runs):
    (runs / "w" / "checkpoints").mkdir(parents=True)
    return runs / "w"


def _a_file(runs):
    (runs / "w").write_text("not a folder")
    return runs / "w"


NO_RUN = [
    pytest.param(
        _mistyped, ("resnet-demoo does not exist", "no run was started there"), id="mistyped"
    ),
    pytest.param(
        _no_checkpoints_folder, ("has no checkpoints/ folder", "no run was started there"),
        id="no-checkpoints-folder",
    ),
    pytest.param(
        _empty_checkpoints_folder, ("checkpoints holds no checkpoint",), id="empty-checkpoints"
    ),
    pytest.param(_a_file, ("is a file, not a run's workdir",), id="a-file"),
]  # fmt: skip


@pytest.mark.parametrize("make, expected", NO_RUN)
def test_missing_run_names_what_is_missing_and_touches_nothing(tmp_path, make, expected):
    runs = tmp_path / "runs"
    runs.mkdir()
    workdir = str(make(runs))
    before = tree_digest(str(runs))
    problem = evaluate.missing_run(workdir)
    assert problem is not None and "\n" not in problem
    for text in expected:
        assert text in problem, problem
    assert tree_digest(str(runs)) == before


@pytest.mark.slow
@pytest.mark.parametrize("make, expected", NO_RUN[:3])
def test_evaluate_refuses_a_workdir_without_a_run(tmp_path, monkeypatch, make, expected):
    """The demo config with no data flags: the command that converted 8.5 MB of demo data
    into a mistyped workdir. Nothing may appear: no data, lock, events or compilation cache."""
    runs = tmp_path / "runs"
    runs.mkdir()
    cache = tmp_path / "cache"
    monkeypatch.setenv(demo_data.CACHE_ENV, str(cache))
    workdir = str(make(runs))
    before = tree_digest(str(runs))
    run = helpers.launch(
        ["--config=configs/demo.py", f"--workdir={workdir}"], module="launch.evaluate", timeout=120
    )
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, *expected)
    assert tree_digest(str(runs)) == before
    assert not cache.exists()


# --- a finished run -------------------------------------------------------------------------


@pytest.fixture
def finished_copy(tiny_finished, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(tiny_finished, workdir)
    return workdir


@pytest.mark.slow
def test_evaluate_on_another_eval_set_needs_no_training_data(finished_copy, tmp_path, monkeypatch):
    """`--config.data.eval_dir=OTHER` with the demo config, as documented: evaluates OTHER, and
    the run's files are as they were but for eval-step-8.json."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(demo_data.CACHE_ENV, str(cache))
    other = helpers.make_mnist_subset(str(tmp_path / "other"), 300, 45)
    before = tree_digest(finished_copy)
    settings = {"data.embedded": "mnist", "data.train_dir": ""}
    args = helpers.tiny_run_args("", other, finished_copy, **settings)
    run = helpers.launch(args, module="launch.evaluate", timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    line = [x for x in run.stdout.splitlines() if '"eval/loss"' in x][-1]
    figures = json.loads(line[line.index("{") :])
    assert figures["eval_dir"] == other and figures["eval/count"] == 45
    assert figures["step"] == 8
    after = tree_digest(finished_copy)
    written = after.pop("eval-step-8.json")
    assert after == before
    with open(os.path.join(finished_copy, "eval-step-8.json")) as f:
        assert json.load(f) == figures and written
    assert not cache.exists()  # explicit eval data: the demo data is not converted


def _in_a_missing_folder(tmp_path, workdir):
    return str(tmp_path / "no-such-folder" / "figures.json")


def _the_runs_finished_record(tmp_path, workdir):
    return os.path.join(workdir, train.FINISHED_MARKER)


def _a_folder(tmp_path, workdir):
    return str(tmp_path)


def _a_users_file(tmp_path, workdir):
    (tmp_path / "notes.json").write_text('{"mine": 1}')
    return str(tmp_path / "notes.json")


BAD_OUTPUTS = [
    pytest.param(_in_a_missing_folder, ("no-such-folder", "does not exist"), id="missing-folder"),
    pytest.param(
        _the_runs_finished_record, ("FINISHED exists", "not overwriting it"), id="finished-record"
    ),
    pytest.param(_a_folder, ("is a folder",), id="a-folder"),
    pytest.param(_a_users_file, ("notes.json exists", "not overwriting"), id="a-users-file"),
]


@pytest.mark.parametrize("make, expected", BAD_OUTPUTS)
def test_output_problem_names_it(tmp_path, make, expected):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / train.FINISHED_MARKER).write_text('{"step": 8}')
    problem = evaluate.output_problem(make(tmp_path, str(workdir)))
    for text in expected:
        assert text in problem, problem


def test_earlier_figures_may_be_replaced(tmp_path):
    earlier = tmp_path / "eval-step-8.json"
    earlier.write_text(json.dumps({"step": 8, "eval_dir": "/e", "eval/loss": 0.1}))
    assert evaluate.output_problem(str(earlier)) is None


@pytest.mark.slow
@pytest.mark.parametrize("make, expected", BAD_OUTPUTS[:2])
def test_evaluate_refuses_an_output_before_evaluating(
    data, finished_copy, tmp_path, make, expected
):
    """Refused before anything is restored or compiled; the run's FINISHED is never
    overwritten."""
    before = tree_digest(finished_copy)
    args = helpers.tiny_run_args(*data, finished_copy) + [
        f"--output={make(tmp_path, finished_copy)}"
    ]
    run = helpers.launch(args, module="launch.evaluate", timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, *expected)
    assert "eval of step" not in run.stderr  # refused before the evaluation, not after it
    assert tree_digest(finished_copy) == before


# --- which data evaluation and training read ------------------------------------------------


def _config(**data):
    from configs import demo  # pylint: disable=g-import-not-at-top

    config = demo.get_config()
    for key, value in data.items():
        config.data[key] = value
    return config


DATA_CHOICES = [
    pytest.param(
        dict(eval_dir="/elsewhere/eval"), False, ("", "/elsewhere/eval"), id="evaluate-other"
    ),
    pytest.param(
        dict(embedded="", eval_dir=""), False, "config.data.eval_dir is empty",
        id="evaluate-nothing",
    ),
    pytest.param(
        dict(eval_dir="/elsewhere/eval"), True,
        "config.data.eval_dir is set but config.data.train_dir is empty", id="train-eval-only",
    ),
    pytest.param(
        dict(embedded="", train_dir=""), True, "config.data.train_dir is empty: point it",
        id="train-nothing",
    ),
]  # fmt: skip


@pytest.mark.parametrize("data, need_train, expected", DATA_CHOICES)
def test_data_dirs_names_what_is_missing(tmp_path, monkeypatch, data, need_train, expected):
    cache = tmp_path / "cache"
    monkeypatch.setenv(demo_data.CACHE_ENV, str(cache))
    config = _config(**data)
    if isinstance(expected, tuple):
        assert setup.data_dirs(config, need_train=need_train) == expected
    else:
        with pytest.raises(ConfigError, match=expected):
            setup.data_dirs(config, need_train=need_train)
    assert not cache.exists()  # named data, or none: nothing converted


def _info(names: tuple[str, ...], channels: int = 1) -> dataset.DatasetInfo:
    return dataset.DatasetInfo("/other", 10, len(names), names, channels, ())


DIGITS = tuple(str(i) for i in range(10))
EVAL_DATA = [
    pytest.param(DIGITS, 1, None, id="same"),
    pytest.param(DIGITS[:5], 1, "has 5 classes, the checkpoint's training data had 10", id="fewer"),
    pytest.param(
        (*DIGITS[:3], "x", *DIGITS[4:]), 1, "class 3 is 'x' there and '3' in the checkpoint",
        id="renamed",
    ),
    pytest.param(
        DIGITS, 3, "config.data.mean has 1 values for the 3-channel images", id="rgb-images"
    ),
]  # fmt: skip


@pytest.mark.parametrize("names, channels, expected", EVAL_DATA)
def test_an_eval_set_the_model_cannot_score_is_refused(names, channels, expected):
    meta = {"class_names": list(DIGITS)}
    if expected is None:
        evaluate.check_eval_data(meta, _info(names, channels), _config())
    else:
        with pytest.raises(ConfigError, match=expected):
            evaluate.check_eval_data(meta, _info(names, channels), _config())


# --- the embedded demo data's cache ---------------------------------------------------------


def _shard(folder: str, split: str) -> str:
    return os.path.join(folder, split, "data-00000-of-00001.array_record")


def _truncate_shard(folder):
    with open(_shard(folder, "train"), "r+b") as f:
        f.truncate(os.path.getsize(_shard(folder, "train")) // 2)


def _flip_a_byte(folder):
    with open(_shard(folder, "eval"), "r+b") as f:
        f.seek(1000)
        byte = f.read(1)
        f.seek(1000)
        f.write(bytes([byte[0] ^ 1]))


def _edit_metadata(folder):
    path = os.path.join(folder, "eval", "metadata.json")
    metadata = json.load(open(path))
    metadata["class_names"][0] = "zero"
    with open(path, "w") as f:
        json.dump(metadata, f)


def _delete_eval(folder):
    shutil.rmtree(os.path.join(folder, "eval"))


def _drop_manifest(folder):
    os.remove(os.path.join(folder, demo_data.MANIFEST))


def _add_a_file(folder):
    with open(os.path.join(folder, "train", "extra.array_record"), "wb") as f:
        f.write(b"\0" * 64)


DAMAGE = [
    pytest.param(_truncate_shard, "does not match its digest", id="shard-truncated"),
    pytest.param(_flip_a_byte, "does not match its digest", id="one-byte-changed"),
    pytest.param(_edit_metadata, "does not match its digest", id="metadata-edited"),
    pytest.param(_delete_eval, "missing ['eval/", id="half-deleted"),
    pytest.param(_drop_manifest, "SHA256SUMS.json is missing", id="no-manifest"),
    pytest.param(_add_a_file, "unexpected ['train/extra", id="foreign-file"),
]


def _check_converted(train_dir: str, eval_dir: str) -> None:
    assert demo_data.problem(os.path.dirname(train_dir)) is None
    assert dataset.load_info(train_dir).num_examples == 8000
    assert dataset.load_info(eval_dir).num_examples == 2000


def test_the_cache_is_made_once_outside_the_workdir(tmp_path, monkeypatch):
    """Training and evaluation find the demo data in $RESNET_MULTIHOST_CACHE; a second use
    reads the same files without converting."""
    cache = tmp_path / "cache"
    monkeypatch.setenv(demo_data.CACHE_ENV, str(cache))
    train_dir, eval_dir = setup.data_dirs(_config())
    assert setup.data_dirs(_config(), need_train=False) == (train_dir, eval_dir)
    assert os.path.commonpath([train_dir, str(cache)]) == str(cache)
    _check_converted(train_dir, eval_dir)
    converted = tree_digest(str(cache))
    calls = []
    monkeypatch.setattr(conversion, "convert", lambda *a, **k: calls.append(a))
    assert setup.data_dirs(_config()) == (train_dir, eval_dir)
    assert calls == [] and tree_digest(str(cache)) == converted


@pytest.mark.parametrize("damage, why", DAMAGE)
def test_a_damaged_cache_is_moved_aside_and_made_again(tmp_path, damage, why, caplog):
    cache = str(tmp_path / "cache")
    train_dir, eval_dir = demo_data.prepare("mnist", cache)
    folder = os.path.dirname(train_dir)
    good = tree_digest(folder)
    damage(folder)
    damaged = tree_digest(folder)
    assert why in demo_data.problem(folder)
    assert demo_data.prepare("mnist", cache) == (train_dir, eval_dir)
    _check_converted(train_dir, eval_dir)
    assert tree_digest(folder) == good  # byte-deterministic conversion
    aside = [n for n in os.listdir(cache) if ".rejected-" in n]
    assert len(aside) == 1 and tree_digest(os.path.join(cache, aside[0])) == damaged
    assert why in caplog.text and "converting it again" in caplog.text
    assert sorted(os.listdir(cache)) == sorted([".lock", os.path.basename(folder), *aside])


def test_a_conversion_that_dies_midway_leaves_nothing_to_use(tmp_path, monkeypatch):
    """The eval split fails after the train split was written: no folder that looks like the
    cache appears, the private one is removed, and the next use converts afresh."""
    cache = str(tmp_path / "cache")
    real = conversion.convert

    def disk_full_on_eval(name, source, output, **kwargs):
        if os.path.basename(output) == "eval":
            raise OSError(28, "No space left on device")
        return real(name, source, output, **kwargs)

    monkeypatch.setattr(conversion, "convert", disk_full_on_eval)
    with pytest.raises(ValueError, match=f"No space left on device.*{demo_data.CACHE_ENV}"):
        demo_data.prepare("mnist", cache)
    assert os.listdir(cache) == [".lock"]
    monkeypatch.setattr(conversion, "convert", real)
    _check_converted(*demo_data.prepare("mnist", cache))


def test_a_killed_conversions_leftovers_are_never_read(tmp_path):
    """A private folder a killed process left behind (a train split, no eval, no manifest)
    is not the cache: the cache is converted beside it."""
    cache = tmp_path / "cache"
    train_dir, _ = demo_data.prepare("mnist", str(tmp_path / "reference"))
    name = os.path.basename(os.path.dirname(train_dir))
    leftover = cache / f".{name}.tmp-otherhost-123-abcd"
    shutil.copytree(train_dir, leftover / "train")
    left = tree_digest(str(leftover))
    got = demo_data.prepare("mnist", str(cache))
    assert os.path.dirname(got[0]) == str(cache / name)
    _check_converted(*got)
    assert tree_digest(str(leftover)) == left


def test_processes_converting_at_once_share_one_conversion(tmp_path, monkeypatch):
    """Four starts at once (threads here; each holds its own lock file descriptor, as
    processes do): one converts, the others wait and use its checked copy."""
    cache = str(tmp_path / "cache")
    real, calls = conversion.convert, []

    def counted(*args, **kwargs):
        calls.append(args[2])
        return real(*args, **kwargs)

    monkeypatch.setattr(conversion, "convert", counted)
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(demo_data.prepare("mnist", cache)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert len(calls) == 2  # train and eval, once
    _check_converted(*results[0])
    assert sorted(os.listdir(cache)) == sorted(
        [".lock", os.path.basename(os.path.dirname(results[0][0]))]
    )


CACHE_ROOTS = [
    pytest.param({demo_data.CACHE_ENV: "/c/ours", "XDG_CACHE_HOME": "/x"}, "/c/ours", id="env"),
    pytest.param({"XDG_CACHE_HOME": "/x"}, "/x/resnet-multihost", id="xdg"),
    pytest.param({"HOME": "/h"}, "/h/.cache/resnet-multihost", id="home"),
    pytest.param({demo_data.CACHE_ENV: "gs://b/c"}, "converted on local disk", id="gcs"),
]


@pytest.mark.parametrize("env, expected", CACHE_ROOTS)
def test_cache_root(monkeypatch, env, expected):
    for key in (demo_data.CACHE_ENV, "XDG_CACHE_HOME"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if expected.startswith("/"):
        assert demo_data.cache_root() == expected
    else:
        with pytest.raises(ValueError, match=expected):
            demo_data.cache_root()
