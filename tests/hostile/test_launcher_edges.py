"""The hostile suite, launcher side: checkpoint options, the paths a run writes, resuming on
other data, and what "no checkpoint" says.

Each table row runs the real launcher code: in-process through `launch.main`'s mapping of
errors to exit statuses where no subprocess is needed (fast tier), as a real launcher
process where the case needs a finished run (slow). Every row asserts the exit status, the
one `error:` line, and that the user's files are unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import jax
import jax.numpy as jnp
import pytest

from launch import checkpointing, events, setup, train
from launch import main as launcher
from launch import workdir as workdir_lib
from launch.status import ExitStatus
from pipeline import fingerprint
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest


def _launch_in_process(config, workdir: str, capfd) -> tuple[int, str]:
    """train_and_evaluate through the launcher's one mapping of errors to exit statuses."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        launcher.exit_with_status(lambda: train.train_and_evaluate(config, workdir))
    return int(exited.value.code), capfd.readouterr().err


def _user_workdir(root) -> str:
    """A workdir holding what a user's would: a checkpoint folder, metrics, FINISHED."""
    workdir = str(root / "w")
    os.makedirs(os.path.join(workdir, "checkpoints", "8"))
    with open(os.path.join(workdir, "checkpoints", "8", "commit_success.txt"), "w") as f:
        f.write("ok")
    with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
        f.write('{"step": 8, "kind": "train"}\n')
    with open(os.path.join(workdir, train.FINISHED_MARKER), "w") as f:
        json.dump({"step": 8}, f)
    return workdir


# --- 1. checkpoint and other config values, refused before anything runs ------------------

HUGE = 2**40
CONFIG_CASES = [
    # (overrides, the start of the error line)
    ({"checkpoint.max_to_keep": 0}, "config.checkpoint.max_to_keep=0: must be a whole number >= 1"),
    ({"checkpoint.max_to_keep": -2}, "config.checkpoint.max_to_keep=-2: must be"),
    ({"checkpoint.max_to_keep": HUGE}, f"config.checkpoint.max_to_keep={HUGE}: must be"),
    ({"checkpoint.every_steps": -4}, "config.checkpoint.every_steps=-4: must be"),
    ({"checkpoint.every_steps": HUGE}, f"config.checkpoint.every_steps={HUGE}: must be"),
    ({"checkpoint.every_epochs": float("nan")}, "config.checkpoint.every_epochs=nan: must be"),
    ({"checkpoint.every_epochs": float("inf")}, "config.checkpoint.every_epochs=inf: must be"),
    ({"checkpoint.every_epochs": -1.0}, "config.checkpoint.every_epochs=-1.0: must be"),
    ({"checkpoint.barrier_timeout_seconds": 0}, "config.checkpoint.barrier_timeout_seconds=0:"),
    ({"train.num_steps": 0}, "config.train.num_steps=0: must be a whole number >= 1"),
    ({"train.num_steps": HUGE}, f"config.train.num_steps={HUGE}: must be"),
    ({"train.seed": -1}, "config.train.seed=-1: must be"),
    ({"train.log_every_steps": 0}, "config.train.log_every_steps=0: must be"),
    ({"train.momentum": 1.0}, "config.train.momentum=1.0: must be a number >= 0 and < 1"),
    ({"train.label_smoothing": -0.1}, "config.train.label_smoothing=-0.1: must be"),
    ({"train.base_learning_rate": float("nan")}, "config.train.base_learning_rate=nan: must be"),
    ({"train.global_batch_size": 0}, "config.train.global_batch_size=0: must be"),
    ({"eval.global_batch_size": 0}, "config.eval.global_batch_size=0: must be"),
    ({"eval.every_epochs": float("inf")}, "config.eval.every_epochs=inf: must be"),
    ({"data.crop_scale": (0.9, 0.1)}, "config.data.crop_scale=(0.9, 0.1): give (low, high)"),
    ({"data.std": (0.0,)}, "config.data.std=(0.0,): give one of positive numbers"),
    ({"data.eval_crop_fraction": 0.0}, "config.data.eval_crop_fraction=0.0: must be"),
    ({"data.num_threads": 0}, "config.data.num_threads=0: must be"),
    ({"data.prefetch": 0}, "config.data.prefetch=0: must be"),
    ({"distributed.preemption_grace_seconds": 0.0}, "config.distributed.preemption_grace"),
]


@pytest.mark.parametrize(
    "overrides, message", CONFIG_CASES, ids=[next(iter(c[0])) for c in CONFIG_CASES]
)
def test_bad_config_values_are_refused_before_anything_runs(
    data, tmp_path, capfd, overrides, message
):
    workdir = _user_workdir(tmp_path)
    before = tree_digest(workdir)
    status, stderr = _launch_in_process(helpers.tiny_config(*data, **overrides), workdir, capfd)
    assert status == ExitStatus.BAD_INPUT
    assert assert_one_clear_line(stderr, message).startswith(f"error: {message}")
    assert tree_digest(workdir) == before


PLAN_CASES = [
    # (overrides, the start of the error line): values wrong only for this data
    ({"train.profile_steps": (2, 99)}, "config.train.profile_steps=(2, 99): the run has only 8"),
    (
        {"train.num_steps": -1, "train.num_epochs": 1e12},
        "config.train.num_epochs=1000000000000.0: 12000000000000 steps of 12 per epoch",
    ),
    ({"checkpoint.every_steps": 0, "checkpoint.every_epochs": 1e12}, "config.checkpoint.every_e"),
]


@pytest.mark.parametrize("overrides, message", PLAN_CASES, ids=[str(c[0]) for c in PLAN_CASES])
def test_values_wrong_for_the_data_are_refused_before_the_compile(
    data, tmp_path, capfd, overrides, message
):
    workdir = _user_workdir(tmp_path)
    before = tree_digest(workdir)
    status, stderr = _launch_in_process(helpers.tiny_config(*data, **overrides), workdir, capfd)
    assert status == ExitStatus.BAD_INPUT
    assert assert_one_clear_line(stderr, message).startswith(f"error: {message}")
    assert tree_digest(workdir) == before


# --- 2. every path the run writes, checked before the compile -----------------------------


def _file(path: str) -> None:
    with open(path, "w") as f:
        f.write("in the way")


PATH_CASES = [
    # (name, what to put in the way under the workdir, words of the error line)
    ("checkpoints is a file", lambda w: _file(f"{w}/checkpoints"), ["/checkpoints", "(a file)"]),
    ("tensorboard is a file", lambda w: _file(f"{w}/tensorboard"), ["/tensorboard", "TensorBoard"]),
    (
        "metrics is a folder",
        lambda w: os.makedirs(f"{w}/metrics.jsonl"),
        ["metrics.jsonl", "a folder"],
    ),
    ("events is a file", lambda w: _file(f"{w}/events"), ["/events (the structured events)"]),
    ("LOCK is a folder", lambda w: os.makedirs(f"{w}/LOCK"), ["/LOCK", "the workdir lock"]),
    ("FINISHED is a folder", lambda w: os.makedirs(f"{w}/FINISHED"), ["/FINISHED", "a folder"]),
    ("FINISHED is garbage", lambda w: _file(f"{w}/FINISHED"), ["/FINISHED", "not the record"]),
    (
        "FINISHED is a broken link",
        lambda w: os.symlink(f"{w}/gone", f"{w}/FINISHED"),
        ["broken link"],
    ),
]


@pytest.mark.parametrize("case, put, words", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_paths_in_the_way_are_refused_before_the_compile(data, tmp_path, capfd, case, put, words):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    put(workdir)
    before = tree_digest(str(tmp_path))
    status, stderr = _launch_in_process(helpers.tiny_config(*data), workdir, capfd)
    assert status == ExitStatus.BAD_INPUT, stderr[-2000:]
    assert_one_clear_line(stderr, *words)
    assert tree_digest(str(tmp_path)) == before


@pytest.mark.parametrize("where", ["a file", "a file's child", "its executables a file"])
def test_an_unusable_workdir_or_compilation_cache_is_named(data, tmp_path, capfd, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("a file")
    before = tree_digest(str(tmp_path))
    if where == "a file":
        status, stderr = _launch_in_process(helpers.tiny_config(*data), str(blocker), capfd)
        assert_one_clear_line(stderr, f"--workdir={blocker} exists and is not a directory")
    elif where == "its executables a file":
        cache = jax.config.jax_compilation_cache_dir
        (tmp_path / "xla").mkdir()
        (tmp_path / "xla" / "executables").write_text("a file")
        before = tree_digest(str(tmp_path))
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "xla"))
        try:
            status, stderr = _launch_in_process(
                helpers.tiny_config(*data), str(tmp_path / "w"), capfd
            )
        finally:
            jax.config.update("jax_compilation_cache_dir", cache)
        assert_one_clear_line(stderr, "xla/executables (the compiled steps) exists and is not")
    else:
        cache = jax.config.jax_compilation_cache_dir
        jax.config.update("jax_compilation_cache_dir", str(blocker / "xla"))
        try:
            status, stderr = _launch_in_process(
                helpers.tiny_config(*data), str(tmp_path / "w"), capfd
            )
        finally:
            jax.config.update("jax_compilation_cache_dir", cache)
        assert_one_clear_line(stderr, f"{blocker}/xla (JAX's compilation cache) cannot be created")
    assert status == ExitStatus.BAD_INPUT
    assert tree_digest(str(tmp_path)) == before


def test_an_empty_workdir_flag_is_refused(data, capfd):
    status, stderr = _launch_in_process(helpers.tiny_config(*data), "", capfd)
    assert status == ExitStatus.BAD_INPUT
    assert_one_clear_line(stderr, "--workdir is empty")


@pytest.mark.parametrize(
    "content", ['["a", "list"]', '{"host": "elsewhere", "pid": 1, "refreshed": "yesterday"}']
)
def test_a_garbled_lock_file_is_taken_over_not_a_traceback(tmp_path, content):
    (tmp_path / "LOCK").write_text(content)
    lock = workdir_lib.WorkdirLock(str(tmp_path))
    lock.acquire(wait_seconds=0)
    try:
        assert json.loads((tmp_path / "LOCK").read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert not (tmp_path / "LOCK").exists()


def test_a_read_only_checkpoints_folder_is_refused(data, tmp_path, capfd):
    workdir = str(tmp_path / "w")
    checkpoints = os.path.join(workdir, "checkpoints")
    os.makedirs(checkpoints)
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", checkpoints]
    ).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root?)")
    try:
        status, stderr = _launch_in_process(helpers.tiny_config(*data), workdir, capfd)
    finally:
        subprocess.run(["umount", "-l", checkpoints], check=False)
    assert status == ExitStatus.BAD_INPUT
    assert_one_clear_line(stderr, f"{checkpoints} (the checkpoints) is not writable")
    assert sorted(os.listdir(workdir)) == ["checkpoints"]  # no lock, no data, nothing


# --- 3. the dataset's identity --------------------------------------------------------------


def _shard(data_dir: str) -> str:
    return os.path.join(
        data_dir, json.load(open(os.path.join(data_dir, "metadata.json")))["shards"][0]
    )


def _flip_last_byte(data_dir: str) -> None:
    with open(_shard(data_dir), "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))


def _reformat_metadata(data_dir: str) -> None:
    path = os.path.join(data_dir, "metadata.json")
    metadata = json.load(open(path))
    with open(path, "w") as f:
        json.dump(metadata, f, indent=7, sort_keys=False)


FINGERPRINT_CASES = [
    # (name, change made to a copy, same identity?)
    ("moved", lambda d: None, True),
    ("metadata.json reformatted", _reformat_metadata, True),
    ("a shard's tail changed", _flip_last_byte, False),
    ("a shard grew", lambda d: open(_shard(d), "ab").write(b"\0"), False),
    ("a class renamed", lambda d: _rename_class(d), False),
]


def _rename_class(data_dir: str) -> None:
    path = os.path.join(data_dir, "metadata.json")
    metadata = json.load(open(path))
    metadata["class_names"][0] = "zero"
    json.dump(metadata, open(path, "w"))


@pytest.mark.parametrize(
    "case, change, same", FINGERPRINT_CASES, ids=[c[0] for c in FINGERPRINT_CASES]
)
def test_the_fingerprint_follows_the_content_not_the_path(data, tmp_path, case, change, same):
    copy = str(tmp_path / "elsewhere" / "train")
    shutil.copytree(data[0], copy)
    change(copy)
    assert (
        fingerprint.dataset_fingerprint(copy) == fingerprint.dataset_fingerprint(data[0])
    ) == same


def test_another_dataset_of_the_same_shape_has_another_fingerprint(data, tmp_path):
    other = helpers.make_mnist_subset(str(tmp_path / "other"), 400, 200)
    assert fingerprint.dataset_fingerprint(other) != fingerprint.dataset_fingerprint(data[0])


def _identity(train_fp, eval_fp):
    return {
        "train": {"path": "/data/train", "fingerprint": train_fp},
        "eval": eval_fp and {"path": "/data/eval", "fingerprint": eval_fp},
    }


DATA_CASES = [
    # (name, checkpoint's data, this run's data, the change named, or None)
    (
        "same data, moved",
        _identity("a1", "e1"),
        dict(_identity("a1", "e1"), train={"path": "/x", "fingerprint": "a1"}),
        None,
    ),
    (
        "other train data",
        _identity("a1", "e1"),
        _identity("b2", "e1"),
        "train: checkpoint /data/train (fingerprint a1), this run /data/train (fingerprint b2)",
    ),
    (
        "eval dropped",
        _identity("a1", "e1"),
        _identity("a1", None),
        "eval: checkpoint /data/eval (fingerprint e1), this run none",
    ),
    (
        "eval added",
        _identity("a1", None),
        _identity("a1", "e1"),
        "eval: checkpoint none, this run /data/eval",
    ),
]


@pytest.mark.parametrize("case, saved, now, change", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_a_resume_on_other_data_is_refused_unless_allowed(case, saved, now, change):
    meta = {
        "data": saved,
        "topology_history": [dict(checkpointing.topology(), from_step=0, data=saved)],
    }
    if change is None:
        assert not setup.check_same_data(meta, now, "/w/checkpoints/8", allow_change=False)
        history = checkpointing.topology_history(meta, 8, now)
        assert history == meta["topology_history"]  # nothing new to record
        return
    with pytest.raises(checkpointing.DataChanged) as refused:
        setup.check_same_data(meta, now, "/w/checkpoints/8", allow_change=False)
    assert change in str(refused.value) and "data.allow_change=True" in str(refused.value)
    assert setup.check_same_data(meta, now, "/w/checkpoints/8", allow_change=True)
    history = checkpointing.topology_history(meta, 8, now, data_changed=True)
    assert history[:-1] == meta["topology_history"]
    assert history[-1] == dict(
        checkpointing.topology(), from_step=8, data=now, data_change_allowed=True
    )


# --- retention ------------------------------------------------------------------------------


def _state(step: int) -> dict:
    return {"w": jnp.full((3,), float(step)), "step": jnp.asarray(step, jnp.int32)}


def _abstract_state():
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), _state(0)
    )


@pytest.mark.parametrize(
    "max_to_keep, kept", [(-1, [3]), (0, [3]), (1, [3]), (2, [2, 3]), (5, [1, 2, 3])]
)
def test_retention_never_deletes_the_newest_step(tmp_path, max_to_keep, kept):
    ckpt = checkpointing.Checkpointer(
        str(tmp_path / "checkpoints"),
        max_to_keep=max_to_keep,  # 0 gets past config validation only by calling this directly
        async_save=False,
        barrier_timeout_seconds=60,
    )
    try:
        for step in (1, 2, 3):
            ckpt.save(step, _state(step), {"format": checkpointing.FORMAT})
            ckpt.wait()
        assert checkpointing.committed_steps(str(tmp_path)) == kept
        state, step, _ = ckpt.restore_latest(_abstract_state(), {})
        assert step == 3 and float(state["w"][0]) == 3.0
    finally:
        ckpt.close()


# --- 4. what "no checkpoint" says --------------------------------------------------------


def _saved_run(root, steps=(4, 8)) -> str:
    ckpt = checkpointing.Checkpointer(
        str(root / "checkpoints"), max_to_keep=5, async_save=False, barrier_timeout_seconds=60
    )
    for step in steps:
        ckpt.save(step, _state(step), {})
        ckpt.wait()
    ckpt.close()
    return str(root)


def _tear(workdir: str, step: int) -> None:
    os.remove(os.path.join(workdir, "checkpoints", str(step), checkpointing.COMMIT_MARKER))


def _damage(workdir: str, step: int) -> None:
    meta = os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")
    record = json.load(open(meta))
    record["digest"]["w"] = [0, 0]
    json.dump(record, open(meta, "w"))


NO_CHECKPOINT_CASES = [
    # (name, workdir maker, step asked for, the error's words)
    ("no workdir", lambda root: str(root / "nothing"), None, ["nothing does not exist"]),
    ("no checkpoints folder", lambda root: str(root), None, ["has no checkpoints folder"]),
    (
        "empty checkpoints folder",
        lambda root: os.makedirs(root / "checkpoints") or str(root),
        None,
        ["checkpoints is empty"],
    ),
    (
        "all rejected",
        lambda root: _all_rejected(root),
        None,
        [
            "holds no trustworthy checkpoint: step 8 (never committed), "
            "step 4 (its arrays do not match their digest)"
        ],
    ),
    (
        "a step not there",
        lambda root: _saved_run(root),
        5,
        ["has no checkpoint of step 5 (its steps are 4, 8)"],
    ),
]


def _all_rejected(root) -> str:
    workdir = _saved_run(root)
    _tear(workdir, 8)
    _damage(workdir, 4)
    return workdir


@pytest.mark.parametrize(
    "case, make, step, words", NO_CHECKPOINT_CASES, ids=[c[0] for c in NO_CHECKPOINT_CASES]
)
def test_no_checkpoint_messages_say_what_is_missing(tmp_path, case, make, step, words):
    workdir = make(tmp_path)
    before = tree_digest(str(tmp_path))
    with pytest.raises(checkpointing.NoUsableCheckpoint) as refused:
        checkpointing.read_trusted(workdir, step)
    message = str(refused.value)
    assert all(w in message for w in words), message
    assert "no a " not in message and "[]" not in message
    assert tree_digest(str(tmp_path)) == before


def test_a_resume_with_every_step_rejected_names_each_reason(tmp_path, capfd):
    workdir = _all_rejected(tmp_path)
    ckpt = checkpointing.Checkpointer(
        str(tmp_path / "checkpoints"), max_to_keep=5, async_save=False, barrier_timeout_seconds=60
    )
    try:
        with pytest.raises(checkpointing.NoUsableCheckpoint) as refused:
            ckpt.restore_latest(_abstract_state(), {})
    finally:
        ckpt.close()
    reasons = "8 (never committed), 4 (its arrays do not match their digest)"
    assert f"every step found was rejected: {reasons}" in str(refused.value)
    kept = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    assert kept == ["4.rejected-digest-mismatch", "8.rejected-uncommitted"]  # moved, not deleted


# --- end to end, through the real launcher (slow) -------------------------------------------


def _finished_copy(tiny_finished, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(tiny_finished, workdir)
    return workdir


@pytest.mark.slow
def test_max_to_keep_0_on_a_finished_run_changes_nothing(data, tiny_finished, tmp_path):
    workdir = _finished_copy(tiny_finished, tmp_path)
    before = tree_digest(workdir)
    run = helpers.launch(
        helpers.tiny_run_args(*data, workdir, **{"checkpoint.max_to_keep": 0}), timeout=120
    )
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, "config.checkpoint.max_to_keep=0: must be")
    assert tree_digest(workdir) == before
    assert "Topology" not in run.stderr  # refused before the data, devices or workdir


@pytest.mark.slow
def test_checkpoints_as_a_file_is_refused_before_compiling(data, tmp_path):
    workdir = str(tmp_path / "w")
    os.makedirs(workdir)
    _file(os.path.join(workdir, "checkpoints"))
    before = tree_digest(str(tmp_path))
    run = helpers.launch(helpers.tiny_run_args(*data, workdir), timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert_one_clear_line(run.stderr, f"{workdir}/checkpoints (the checkpoints) exists and is not")
    assert tree_digest(str(tmp_path)) == before  # no compilation cache, no lock, no events
    assert "Plan:" not in run.stderr


OTHER_DATA_CASES = [
    # (name, train data: "other" or the original, eval data: the original or none)
    ("other train data", "other", "original"),
    ("eval data dropped", "original", ""),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, train_data, eval_data", OTHER_DATA_CASES, ids=[c[0] for c in OTHER_DATA_CASES]
)
def test_a_resume_on_other_data(
    data, tiny_finished, tmp_path_factory, tmp_path, case, train_data, eval_data
):
    workdir = _finished_copy(tiny_finished, tmp_path)
    other = helpers.make_mnist_subset(str(tmp_path_factory.mktemp("other") / "train"), 400, 200)
    train_dir = other if train_data == "other" else data[0]
    eval_dir = data[1] if eval_data == "original" else ""
    args = helpers.tiny_run_args(train_dir, eval_dir, workdir, **{"train.num_steps": 12})
    before = tree_digest(workdir)
    run = helpers.launch(args, timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    changed = "train" if train_data == "other" else "eval"
    old_dir = data[0] if changed == "train" else data[1]
    old_fp = fingerprint.dataset_fingerprint(old_dir)
    new_name = (
        f"{other} (fingerprint {fingerprint.dataset_fingerprint(other)})"
        if changed == "train"
        else "none"
    )
    assert_one_clear_line(
        run.stderr, f"{changed}: checkpoint {old_dir} (fingerprint {old_fp}), this run {new_name}"
    )
    assert tree_digest(workdir) == before

    allowed = helpers.launch(args + ["--config.data.allow_change=True"])
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert events.latest(workdir, "resumed")["step"] == 8
    assert "config.data.allow_change=True: resuming" in allowed.stderr
    history = json.load(open(os.path.join(workdir, train.FINISHED_MARKER)))["topology_history"]
    assert len(history) == 2 and history[-1]["from_step"] == 8
    assert history[-1]["data_change_allowed"] is True
    assert history[-1]["data"]["train"]["path"] == train_dir
    assert (history[-1]["data"]["eval"] is None) == (eval_dir == "")
    assert history[0]["data"]["train"]["fingerprint"] == fingerprint.dataset_fingerprint(data[0])
    again = helpers.launch(args, timeout=120)  # its newest checkpoint is on the new data now
    assert again.returncode == 0, again.stderr[-3000:]
    assert "The run had already finished (step 12)" in again.stderr
