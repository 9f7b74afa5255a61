"""Careless use must not cost data or a silent wrong answer: explicit data wins over the demo
data, one run per workdir, unusable workdirs, checkpoints of another configuration or of
another program, a single flipped value, and a full disk. Each runs the real launcher."""

import contextlib
import json
import os
import shutil
import socket
import subprocess

import numpy as np
import pytest

from launch import events, train
from launch.status import ExitStatus
from tests import helpers

pytestmark = pytest.mark.slow
STEPS = 8


@pytest.fixture(scope="module")
def finished(tiny_finished):
    """A finished 8-step run (checkpoints at 4 and 8) to copy and damage."""
    return tiny_finished


def _copy(finished, tmp_path) -> str:
    workdir = str(tmp_path / "w")
    shutil.copytree(finished, workdir)
    os.remove(os.path.join(workdir, train.FINISHED_MARKER))  # make it want to train again
    return workdir


def _listing(workdir):
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@contextlib.contextmanager
def _tmpfs(path, options):
    """A real small (or read-only) file system; needs root, as CI and this machine have."""
    os.makedirs(path, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", path])
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root?)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def test_explicit_data_wins_over_the_embedded_demo_data(data, tmp_path):
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*data, workdir, **{"data.embedded": "mnist", "train.num_steps": 2})
    run = helpers.launch(args)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not on the embedded 'mnist' dataset" in run.stderr
    finished = json.load(open(os.path.join(workdir, train.FINISHED_MARKER)))
    assert finished["data"]["train"] == {"path": data[0], "examples": 200, "classes": 10}
    assert finished["data"]["eval"] == {"path": data[1], "examples": 37, "classes": 10}
    assert finished["eval"]["eval/count"] == 37
    assert not os.path.exists(os.path.join(workdir, "data"))  # the demo data was never made


def test_a_second_launcher_on_a_workdir_is_refused(data, tmp_path):
    args = helpers.tiny_run_args(*data, str(tmp_path / "w"), **{"train.num_steps": 400})
    first = helpers.start(args)
    seen = []
    try:
        assert helpers.wait_for_line(first, "step 2/400", seen), "".join(seen)[-3000:]
        second = helpers.launch(args, timeout=120)
        assert second.returncode == ExitStatus.BAD_INPUT, second.stderr[-3000:]
        assert f"in use by another run: process {first.pid} on {socket.gethostname()}" in (
            second.stderr
        )
        assert "Traceback" not in second.stderr
    finally:
        first.terminate()
        seen += first.stdout.readlines()
        first.wait(timeout=120)
    assert first.returncode == ExitStatus.PREEMPTED, "".join(seen)[-3000:]  # undisturbed


def test_a_stale_lock_of_a_dead_process_is_taken_over(data, finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    dead = subprocess.Popen(["true"])
    dead.wait()
    record = {"host": socket.gethostname(), "pid": dead.pid, "pid_start": "1", "refreshed": 0}
    with open(os.path.join(workdir, "LOCK"), "w") as f:
        json.dump(record, f)
    run = helpers.launch(helpers.tiny_run_args(*data, workdir))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Taking over {workdir}/LOCK" in run.stderr
    assert not os.path.exists(os.path.join(workdir, "LOCK"))  # released at the end


def test_unusable_workdirs_are_one_line_errors(data, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("not a directory")
    run = helpers.launch(helpers.tiny_run_args(*data, str(a_file)), timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT
    assert "exists and is not a directory" in run.stderr and "Traceback" not in run.stderr
    with _tmpfs(str(tmp_path / "ro"), "ro,size=1m") as read_only:
        run = helpers.launch(helpers.tiny_run_args(*data, read_only + "/w"), timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT
    assert "is not writable" in run.stderr and "Traceback" not in run.stderr


def test_a_config_change_of_parameter_shapes_is_refused_untouched(data, finished, tmp_path):
    workdir = _copy(finished, tmp_path)
    before = _listing(workdir)
    rgb_train = helpers.rgb_copy(data[0], tmp_path)
    args = helpers.tiny_run_args(rgb_train, "", workdir)
    args += ["--config.data.mean=(33.3,33.3,33.3)", "--config.data.std=(78.6,78.6,78.6)"]
    run = helpers.launch(args, timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert "incompatible run" in run.stderr and "input_channels: checkpoint has 1" in run.stderr
    assert _listing(workdir) == before  # nothing renamed as damaged
    again = helpers.launch(helpers.tiny_run_args(*data, workdir))  # the original config
    assert again.returncode == 0, again.stderr[-3000:]
    assert events.latest(workdir, "resumed")["step"] == 8


@pytest.mark.parametrize("alien", ["plain folder", "orbax checkpoint"])
def test_folders_we_did_not_write_are_named_and_left_alone(data, finished, tmp_path, alien):
    workdir = _copy(finished, tmp_path)
    path = os.path.join(workdir, "checkpoints", "2024")
    if alien == "plain folder":
        os.makedirs(path)
        open(os.path.join(path, "notes.txt"), "w").write("mine")
    else:
        import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

        with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
            manager.save(
                2024, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.ones(3)}))
            )
    before = _listing(workdir)
    run = helpers.launch(helpers.tiny_run_args(*data, workdir), timeout=120)
    assert run.returncode == ExitStatus.BAD_INPUT, run.stderr[-3000:]
    assert "holds ['2024'], which this project did not write" in run.stderr
    assert _listing(workdir) == before and "Traceback" not in run.stderr


def test_one_changed_value_in_a_checkpoint_is_caught(data, finished, tmp_path):
    """A float32 sum per array would let this through; the exact digest does not."""
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

    workdir = _copy(finished, tmp_path)
    state = helpers.load_state(workdir, STEPS)
    kernel = state["params"]["stem_conv"]["kernel"]["value"]
    kernel.flat[0] = np.nextafter(kernel.flat[0], np.float32(np.inf))  # one ulp, one value
    item = os.path.join(workdir, "checkpoints", str(STEPS), "state")
    shutil.rmtree(item)
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save(item, state)
    run = helpers.launch(helpers.tiny_run_args(*data, workdir))
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"Checkpoint step {STEPS} is not usable (its arrays do not match their digest)" in (
        run.stderr
    )
    assert events.latest(workdir, "resumed")["step"] == 4
    assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{STEPS}.rejected-digest-mismatch"))


def test_a_full_disk_exits_4_with_the_original_error(data, tmp_path):
    # ~2.3 MB per checkpoint of ResNet-20: the first fits, a later one does not.
    with _tmpfs(str(tmp_path / "small"), "size=5m") as small:
        settings = {"train.num_steps": 40, "model.name": "resnet20"}
        args = helpers.tiny_run_args(*data, small + "/w", **settings)
        run = helpers.launch(args)
    assert run.returncode == ExitStatus.SAVE_FAILED, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "No space left on device" in errors[0], errors
    # Orbax's cancelled writes may print "Event loop is closed" tracebacks from their own
    # threads; none may run through the launcher's code.
    assert 'File "' + helpers.REPO + "/launch/" not in run.stderr
