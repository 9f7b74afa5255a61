"""Gradient accumulation through the real launcher: a preempted run with 4 micro-batches
resumes bit-identically, and a resume that would group BatchNorm differently is refused."""

import os
import signal

import numpy as np
import pytest

from launch import events
from launch.checkpointing import committed_steps
from launch.status import ExitStatus
from tests import helpers

pytestmark = pytest.mark.slow
STEPS = 16  # crosses the epoch boundary (12 steps per epoch)
MICRO = {"train.num_steps": STEPS, "checkpoint.every_steps": 4, "train.microbatches": 4}


def test_a_preempted_run_with_4_microbatches_resumes_bit_identically(data, tmp_path):
    reference = str(tmp_path / "reference")
    run = helpers.launch(helpers.tiny_run_args(*data, reference, **MICRO))
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]

    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*data, workdir, **MICRO)
    seen: list[str] = []
    proc = helpers.start(args)
    assert helpers.wait_for_line(proc, "step 6/16", seen), "".join(seen)[-3000:]
    os.kill(proc.pid, signal.SIGTERM)
    seen.extend(proc.stdout)
    proc.wait(timeout=120)
    assert proc.returncode == ExitStatus.PREEMPTED, "".join(seen)[-3000:]
    saved = committed_steps(workdir)[-1]
    assert 6 <= saved < STEPS

    resumed = helpers.launch(args)
    assert resumed.returncode == 0, resumed.stderr[-12000:]
    assert events.latest(workdir, "resumed")["step"] == saved
    want = helpers.flat_arrays(helpers.load_state(reference, STEPS))
    got = helpers.flat_arrays(helpers.load_state(workdir, STEPS))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    # Two micro-batches of 8 would put 8 examples in each BatchNorm group, not 4.
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    halves = {**MICRO, "train.microbatches": 2}
    other = helpers.launch(helpers.tiny_run_args(*data, workdir, **halves))
    assert other.returncode == ExitStatus.BAD_INPUT, other.stderr[-3000:]
    assert "model.bn_group_size: checkpoint has 4, this run has 8" in other.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
