"""Checkpoints and faults: exact resume, preemption, torn and damaged saves, dead hosts,
non-finite steps and failing saves. Each test runs the real launcher."""

import os
import shutil
import signal
import time

import numpy as np
import pytest

from launch import events, train
from launch.checkpointing import committed_steps
from launch.status import ExitStatus
from tests import helpers

pytestmark = pytest.mark.slow
STEPS = 16  # crosses the epoch boundary (12 steps per epoch)
EVERY = {"train.num_steps": STEPS, "checkpoint.every_steps": 4}


@pytest.fixture(scope="module")
def reference(data, reference_16, tmp_path_factory):
    """Uninterrupted runs: one process x 4 devices (shared), and two processes x 2 devices."""
    workdir = str(tmp_path_factory.mktemp("reference") / "two")
    run = helpers.launch(helpers.tiny_run_args(*data, workdir, **EVERY), processes=2, devices=2)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    return {"one": reference_16, "two": workdir}


def assert_same_state(workdir_a, workdir_b, step=STEPS):
    a = helpers.flat_arrays(helpers.load_state(workdir_a, step))
    b = helpers.flat_arrays(helpers.load_state(workdir_b, step))
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _interrupt(proc, pid_to_signal, sig, after_line, seen):
    assert helpers.wait_for_line(proc, after_line, seen), "".join(seen)[-3000:]
    os.kill(pid_to_signal(proc), sig)
    start = time.monotonic()
    for line in proc.stdout:
        seen.append(line)
    proc.wait(timeout=120)
    return time.monotonic() - start


def test_sigterm_saves_and_resume_is_bit_identical(data, reference, tmp_path):
    args = helpers.tiny_run_args(*data, str(tmp_path / "w"), **EVERY)
    seen = []
    proc = helpers.start(args)
    took = _interrupt(proc, lambda p: p.pid, signal.SIGTERM, "step 6/16", seen)
    log = "".join(seen)
    assert proc.returncode == ExitStatus.PREEMPTED, log[-3000:]
    assert took < 30 and "Traceback" not in log
    saved = committed_steps(str(tmp_path / "w"))[-1]
    assert saved >= 6  # nothing lost: the step reached when the signal came is saved
    resumed = helpers.launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert events.latest(str(tmp_path / "w"), "resumed")["step"] == saved
    assert_same_state(reference["one"], str(tmp_path / "w"))


def test_sigterm_to_one_host_stops_all_at_one_step_and_resumes(data, reference, tmp_path):
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*data, workdir, **EVERY)
    seen = []
    proc = helpers.start(args, processes=2, devices=2)
    _interrupt(proc, lambda p: helpers.host_pid(workdir, 1), signal.SIGTERM, "step 4/16", seen)
    log = "".join(seen)
    assert proc.returncode == ExitStatus.PREEMPTED, log[-3000:]
    stops = [r for r in events.read(workdir) if r["event"] == "stop_agreed"]
    assert len(stops) == 2 and len({r["step"] for r in stops}) == 1, stops  # one agreed step
    assert "exit statuses [75, 75]" in log and "Traceback" not in log
    resumed = helpers.launch(args, processes=2, devices=2)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert_same_state(reference["two"], str(tmp_path / "w"))
    # Each host loaded the programs its first start used, read ahead of building them.
    starts = [r for r in events.read(workdir) if r["event"] == "startup"]
    again = [r for r in starts if r["attempt"] == starts[-1]["attempt"]]
    assert sorted(r["process"] for r in again) == [0, 1]
    for start in again:
        names = [name for name, _ in start["programs"]]
        assert {"train_step", "pre_save_checks"} <= set(names), start["programs"]
        assert {how for _, how in start["programs"]} == {"read ahead"}, start["programs"]


def test_sigkill_during_async_save_resumes_from_last_committed(data, reference, tmp_path):
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*data, workdir, **EVERY)
    seen = []
    proc = helpers.start(args)
    _interrupt(proc, lambda p: p.pid, signal.SIGKILL, "checkpoint of step 8 started", seen)
    assert proc.returncode == -signal.SIGKILL
    # Whatever the kill left (a tmp folder, or step 8 if it committed in time) plus a torn
    # step made by hand: a step folder whose commit never happened.
    shutil.copytree(
        os.path.join(workdir, "checkpoints", "4"), os.path.join(workdir, "checkpoints", "12")
    )
    os.remove(os.path.join(workdir, "checkpoints", "12", "commit_success.txt"))
    resumed = helpers.launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Checkpoint step 12 is not usable (never committed)" in resumed.stderr
    assert os.path.isdir(os.path.join(workdir, "checkpoints", "12.rejected-uncommitted"))
    assert 12 in committed_steps(workdir)  # saving that step again worked
    assert_same_state(reference["one"], workdir)


def _truncate_largest_array_file(step_dir):
    files = [
        os.path.join(d, f) for d, _, fs in os.walk(os.path.join(step_dir, "state")) for f in fs
    ]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def test_damaged_latest_checkpoint_falls_back_to_older(data, reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference["one"], workdir)
    os.remove(os.path.join(workdir, train.FINISHED_MARKER))
    _truncate_largest_array_file(os.path.join(workdir, "checkpoints", str(STEPS)))
    run = helpers.launch(helpers.tiny_run_args(*data, workdir, **EVERY))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Checkpoint step {STEPS} is not usable" in run.stderr
    assert events.latest(workdir, "resumed")["step"] == 12
    assert_same_state(reference["one"], workdir)  # retrained 12 -> 16, identically


def test_only_damaged_checkpoints_stop_the_run_clearly(data, reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference["one"], workdir)
    for step in committed_steps(workdir):
        if step != 12:
            shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
    _truncate_largest_array_file(os.path.join(workdir, "checkpoints", "12"))
    run = helpers.launch(helpers.tiny_run_args(*data, workdir, **EVERY))
    assert run.returncode == 2
    assert "error: no usable checkpoint" in run.stderr
    assert "launch/" not in run.stderr.split("error: no usable")[0].split("Traceback")[-1]
    rejected = [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "rejected" in n]
    assert len(rejected) == 1 and rejected[0].startswith("12.")  # kept, not deleted
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "16"))  # trained nothing
    again = helpers.launch(helpers.tiny_run_args(*data, workdir, **EVERY))
    assert again.returncode == 2  # still refuses rather than silently starting over


def test_incompatible_config_is_refused_and_checkpoints_kept(data, reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference["one"], workdir)
    before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    run = helpers.launch(
        helpers.tiny_run_args(*data, workdir, **EVERY, **{"model.name": "resnet32"})
    )
    assert run.returncode == 2, (run.stdout + run.stderr)[-3000:]
    assert "incompatible run" in run.stderr and "model.name: checkpoint has 'resnet8'" in run.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_a_dead_host_makes_the_others_exit(data, tmp_path):
    args = helpers.tiny_run_args(*data, str(tmp_path / "w"), **{"train.num_steps": 400})
    hosts = helpers.start_hosts(args, processes=2, devices=2)
    seen = []
    assert helpers.wait_for_line(hosts[0], "step 2/400", seen), "".join(seen)[-3000:]
    hosts[1].kill()
    start = time.monotonic()
    for line in hosts[0].stdout:
        seen.append(line)
    hosts[0].wait(timeout=180)
    assert hosts[0].returncode != 0
    assert time.monotonic() - start < 90  # heartbeat timeout is 10 s in these runs


def test_nonfinite_steps_are_skipped_then_stop_the_run(data, tmp_path):
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(
        *data,
        workdir,
        **{
            "train.base_learning_rate": 1e12,
            "train.num_steps": 40,
            "train.max_nonfinite_in_a_row": 3,
            "checkpoint.every_steps": 1,
        },
    )
    run = helpers.launch(args)
    assert run.returncode == 3
    assert "had a non-finite loss, gradient or update" in run.stderr
    for step in committed_steps(workdir):  # every checkpoint written holds finite values
        for key, value in helpers.flat_arrays(helpers.load_state(workdir, step)).items():
            assert np.all(np.isfinite(value)), (step, key)


def test_a_failing_save_stops_the_run(data, tmp_path):
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*data, workdir, **{"train.num_steps": 40})
    seen = []
    proc = helpers.start(args)
    assert helpers.wait_for_line(proc, "step 2/40", seen), "".join(seen)[-3000:]
    # The checkpoint directory stops being writable (as a full, lost or broken disk would).
    checkpoints = os.path.join(workdir, "checkpoints")
    os.rename(checkpoints, checkpoints + ".gone")
    open(checkpoints, "w").close()
    for line in proc.stdout:
        seen.append(line)
    proc.wait(timeout=120)
    log = "".join(seen)
    assert proc.returncode == 4, log[-3000:]
    assert "error: saving the checkpoint of step 4" in log
    assert "step 40/40" not in log  # it stopped instead of training on without checkpoints
