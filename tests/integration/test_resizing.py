"""Progressive resizing with the real launcher: one compiled train step per size, and a run
preempted in the middle of the ramp resumes at the right size and ends bit-identical to the
run that never stopped."""

import os
import signal

import numpy as np
import pytest

from launch import events
from launch.checkpointing import committed_steps
from launch.status import ExitStatus
from tests import helpers

pytestmark = pytest.mark.slow
# 96 digits: 6 steps of 16 per epoch. Epochs 0 and 1 train at 16 px, epoch 2 at 20, epoch 3
# at 24 (steps 0-11, 12-17, 18-23); evaluation at 24 px.
RAMP = {
    "data.image_size": 24,
    "data.min_image_size": 16,
    "data.max_image_size": 24,
    "data.resize_start_epoch": 1,
    "data.resize_end_epoch": 3,
    "data.resize_multiple": 4,
    "train.num_steps": 24,
    "checkpoint.every_steps": 6,
}


@pytest.fixture(scope="module")
def digits(data, tmp_path_factory):
    train = helpers.make_mnist_subset(str(tmp_path_factory.mktemp("digits96") / "train"), 0, 96)
    return train, data[1]


@pytest.fixture(scope="module")
def uninterrupted(digits, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("ramp") / "w")
    # Its own, empty compilation cache (the session's may already hold these programs, and
    # then nothing is compiled to count): the run's default, WORKDIR/compilation_cache.
    no_shared_cache = {"JAX_COMPILATION_CACHE_DIR": ""}
    run = helpers.launch(helpers.tiny_run_args(*digits, workdir, **RAMP), env=no_shared_cache)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return workdir, run.stderr


def _compiled(workdir: str, name: str) -> list[str]:
    folder = os.path.join(workdir, "compilation_cache", "executables")
    return [f for f in os.listdir(folder) if f.startswith(f"{name}-")]


def test_each_size_is_compiled_once_and_evaluation_stays_at_its_size(uninterrupted):
    workdir, log = uninterrupted
    assert (
        "Progressive resizing: 16 px to 24 px over epochs 1 to 3, in multiples of 4: 16 px "
        "from step 0, 20 px from step 12, 24 px from step 18; evaluation at 24 px." in log
    )
    assert len(_compiled(workdir, "train_step")) == 3  # 16, 20 and 24 px
    assert len(_compiled(workdir, "eval_step")) == 1
    assert "eval at step 24:" in log


def test_a_run_preempted_mid_ramp_resumes_at_its_size_bit_identically(
    digits, uninterrupted, tmp_path
):
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*digits, workdir, **RAMP)
    proc = helpers.start(args)
    seen: list[str] = []
    assert helpers.wait_for_line(proc, "step 6/24", seen), "".join(seen)[-3000:]
    os.kill(proc.pid, signal.SIGTERM)  # batches of the next sizes may be in flight
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert proc.returncode == ExitStatus.PREEMPTED, "".join(seen)[-3000:]
    saved = committed_steps(workdir)[-1]
    assert 6 <= saved < 18, saved  # on the ramp: its last size is still ahead

    other = helpers.launch(
        helpers.tiny_run_args(*digits, workdir, **{**RAMP, "data.resize_multiple": 8})
    )
    assert other.returncode == ExitStatus.BAD_INPUT, other.stderr[-3000:]
    assert "resize_ramp: checkpoint has" in other.stderr
    assert committed_steps(workdir)[-1] == saved  # refused untouched

    resumed = helpers.launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert events.latest(workdir, "resumed")["step"] == saved
    reference = helpers.flat_arrays(helpers.load_state(uninterrupted[0], 24))
    final = helpers.flat_arrays(helpers.load_state(workdir, 24))
    assert reference.keys() == final.keys()
    for key in reference:
        np.testing.assert_array_equal(reference[key], final[key], err_msg=key)
