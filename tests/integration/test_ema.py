"""The moving average of the weights through the real launcher: a preempted run resumes it
bit-identically, tools.export --ema writes it, launch.evaluate evaluates it, and a run that
kept none, or a resume with another decay, is refused in one line."""

import json
import os
import shutil
import signal

import numpy as np
import pytest

import resnet.weights
from launch import train
from launch.status import ExitStatus
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest

pytestmark = pytest.mark.slow
STEPS = 16
EMA = {"train.num_steps": STEPS, "train.ema_decay": 0.9, "eval.use_ema": True}


@pytest.fixture(scope="module")
def ema_run(data, tmp_path_factory):
    """16 steps with an average, uninterrupted, on 1 process x 4 devices: checkpoints every 4
    steps, the in-training evaluation on the average. Copy it before writing into it."""
    workdir = str(tmp_path_factory.mktemp("ema") / "w")
    run = helpers.launch(helpers.tiny_run_args(*data, workdir, **EMA))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return workdir


def _copy(workdir, tmp_path) -> str:
    copy = str(tmp_path / "copy")
    shutil.copytree(workdir, copy)
    return copy


def _values(tree: dict) -> dict[str, np.ndarray]:
    """A saved collection ({... "kernel": {"value": x}}) as {"path/kernel": x}."""
    flat = resnet.weights.flatten(tree)
    return {path.removesuffix("/value"): np.asarray(v) for path, v in flat.items()}


def test_a_preempted_run_with_ema_resumes_bit_identically(data, ema_run, tmp_path):
    args = helpers.tiny_run_args(*data, str(tmp_path / "w"), **EMA)
    seen: list[str] = []
    proc = helpers.start(args)
    assert helpers.wait_for_line(proc, "step 6/16", seen), "".join(seen)[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    seen.extend(proc.stdout)
    assert proc.wait(timeout=120) == ExitStatus.PREEMPTED, "".join(seen)[-3000:]
    resumed = helpers.launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours = helpers.load_state(str(tmp_path / "w"), STEPS)
    reference = helpers.load_state(ema_run, STEPS)
    a, b = helpers.flat_arrays(ours), helpers.flat_arrays(reference)
    assert a.keys() == b.keys() and any(k.startswith("['ema']") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    average, weights = _values(ours["ema"]["params"]), _values(ours["params"])
    assert average.keys() == weights.keys()
    assert any(np.any(average[k] != weights[k]) for k in average)  # a real average


def test_the_average_leaves_the_training_as_it_was(ema_run, reference_16):
    """The same run without an average holds bit-identical weights and optimizer state."""
    with_ema = helpers.flat_arrays(helpers.load_state(ema_run, STEPS))
    without = helpers.flat_arrays(helpers.load_state(reference_16, STEPS))
    assert {k for k in with_ema if not k.startswith("['ema']")} == without.keys()
    for key in without:
        np.testing.assert_array_equal(with_ema[key], without[key], err_msg=key)


def test_export_ema_writes_the_average_of_the_checkpoint(ema_run, tmp_path):
    out = str(tmp_path / "averaged")
    run = helpers.launch(
        [f"--workdir={ema_run}", f"--output={out}", "--ema"], devices=1, module="tools.export"
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "moving average" in run.stdout
    exported = resnet.weights.load(out)
    saved = helpers.load_state(ema_run, STEPS)
    assert exported.metadata == {"source": ema_run, "step": STEPS, "ema_decay": 0.9}
    for collection in ("params", "batch_stats"):
        ours = resnet.weights.flatten(getattr(exported, collection))
        expected = _values(saved["ema"][collection])
        assert ours.keys() == expected.keys()
        for key in ours:
            np.testing.assert_array_equal(ours[key], expected[key], err_msg=key)
    weights = _values(saved["params"])
    assert any(np.any(resnet.weights.flatten(exported.params)[k] != weights[k]) for k in weights)


def _figures(run) -> dict:
    line = [x for x in run.stdout.splitlines() if '"eval/loss"' in x][-1]
    return json.loads(line[line.index("{") :])


def test_evaluate_takes_the_average_or_the_weights(data, ema_run, tmp_path):
    workdir = _copy(ema_run, tmp_path)
    averaged = helpers.launch(
        helpers.tiny_run_args(*data, workdir, **EMA) + ["--output=" + str(tmp_path / "a.json")],
        module="launch.evaluate",
    )
    assert averaged.returncode == 0, averaged.stderr[-3000:]
    reported = json.load(open(os.path.join(workdir, train.FINISHED_MARKER)))["eval"]
    figures = _figures(averaged)
    assert figures["use_ema"] is True
    for key, value in reported.items():  # the training evaluated the average too
        assert figures[key] == value, key
    # A config without train.ema_decay still restores the run's state, average included.
    plain = helpers.launch(
        helpers.tiny_run_args(*data, workdir, **{"train.num_steps": STEPS})
        + ["--output=" + str(tmp_path / "w.json")],
        module="launch.evaluate",
    )
    assert plain.returncode == 0, plain.stderr[-3000:]
    weights = _figures(plain)
    assert weights["use_ema"] is False and weights["eval/loss"] != figures["eval/loss"]


def test_a_run_without_an_average_is_refused_in_one_line(data, tiny_finished, tmp_path):
    before = tree_digest(tiny_finished)
    out = str(tmp_path / "averaged")
    export = helpers.launch(
        [f"--workdir={tiny_finished}", f"--output={out}", "--ema"],
        devices=1,
        module="tools.export",
    )
    assert export.returncode == ExitStatus.BAD_INPUT
    assert_one_clear_line(export.stderr, "--ema: step 8 of", "holds no moving average")
    assert not os.path.exists(out)
    evaluate = helpers.launch(
        helpers.tiny_run_args(*data, tiny_finished, **{"train.ema_decay": 0.9})
        + ["--config.eval.use_ema=True", "--output=" + str(tmp_path / "e.json")],
        module="launch.evaluate",
    )
    assert evaluate.returncode == ExitStatus.BAD_INPUT
    assert_one_clear_line(evaluate.stderr, "config.eval.use_ema=True: the run in", "kept no")
    assert not os.path.exists(tmp_path / "e.json")
    assert tree_digest(tiny_finished) == before


def test_resuming_with_another_decay_is_refused_untouched(data, ema_run, tmp_path):
    workdir = _copy(ema_run, tmp_path)
    before = tree_digest(workdir)
    run = helpers.launch(
        helpers.tiny_run_args(*data, workdir, **dict(EMA, **{"train.ema_decay": 0.99}))
    )
    assert run.returncode == ExitStatus.BAD_INPUT
    assert_one_clear_line(run.stderr, "train.ema_decay: checkpoint has 0.9, this run has 0.99")
    assert tree_digest(workdir) == before
