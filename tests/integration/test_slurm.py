"""tools/cluster/slurm_train.sbatch and launch.distributed's Slurm support, against a real Slurm.

The `slow` tests run the real script with the real launcher (configs/demo.py on CPU) as jobs
of a real one-node Slurm 22.05 (munged, slurmctld, slurmd: tests/slurm_cluster.py), and read
what Slurm itself reports (`scontrol show job`: JobState, Restarts, ExitCode), the job's log
and the run directory. They skip where Slurm and MUNGE are not installed (apt-get install
slurm-wlm munge) or not running as root.

Real: sbatch and the #SBATCH defaults, the time-limit warning (--signal), `scancel` with and
without --signal, the exit statuses srun collects from the launchers, `scontrol requeue` and
the requeued job starting again with SLURM_RESTART_COUNT, Slurm's GPU (gres) environment.
Shortened, so that the whole module takes about 5 minutes on 2 cores:
  * the time limit is 2 minutes and the warning comes 80 s before it (--time=2
    --signal=TERM@80 on the sbatch command line; the script says 24 h and TERM@120).
    slurmctld looks at time limits every 30 s and sends the warning up to 30 s early: with
    TERM@60 it arrived 30 to 60 s after the job started, so here 10 to 40 s;
  * slurm.conf: a requeued job waits cred_expire=5 s (default 120 s) before it may start
    again, the scheduler looks at pending jobs every 2 s (default 60 s), KillWait is 10 s;
  * once a job has been requeued by the warning, the test raises its time limit (scontrol
    update TimeLimit=10) so that the resumed run is not warned again;
  * the compiled train step is shared between runs through JAX's persistent compilation
    cache (JAX_COMPILATION_CACHE_DIR), which does not change what is computed;
  * the GPUs in Slurm's bookkeeping are stand-in device nodes (copies of /dev/null): Slurm's
    allocation and environment are real, no CUDA device is behind them.
Not tested here: several nodes (one launcher per node agreeing on a stop step, the
coordinator address JAX derives from the node list: one machine is one node), real GPUs
(none here), and preemption by a higher-priority job (PreemptMode=REQUEUE: a cluster policy
this script does not set up).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from launch import distributed, events, goodput
from launch.checkpointing import committed_steps
from tests import helpers, slurm_cluster

REPO = helpers.REPO
SBATCH = os.path.join(REPO, "tools", "cluster", "slurm_train.sbatch")
# The first run of the time-limit test must still be training when the warning comes, 10 to
# 40 s after it starts: 1,800 steps take 72 s on 2 idle cores at 25 steps/s (900 steps end
# there before a warning at TERM@60 comes), 180 s at 10 steps/s.
STEPS = 1800
EVERY = 50  # periodic checkpoints: how the tests see that training is under way
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


# --------------------------------------------------------- slurm_devices (pure logic) --


def step_env(**overrides: str) -> dict[str, str]:
    """A Slurm task's environment: one task on one node, no GPUs, plus `overrides`."""
    env = {
        "SLURM_JOB_ID": "7",
        "SLURM_STEP_NODELIST": "gpu001",
        "SLURM_NTASKS": "1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_STEP_TASKS_PER_NODE": "1",
    }
    env.update(overrides)
    return env


def ids_and_expected(env):
    devices = distributed.slurm_devices(env)
    return None if devices is None else (devices.local_device_ids, devices.expected)


def test_slurm_devices_outside_a_job_step():
    assert distributed.slurm_devices({}) is None
    env = step_env()
    del env["SLURM_STEP_NODELIST"]  # a batch script, not an srun task: JAX sees no cluster
    assert distributed.slurm_devices(env) is None


def test_slurm_devices_cpu_allocation_changes_nothing():
    assert ids_and_expected(step_env()) == (None, 0)
    assert ids_and_expected(step_env(SLURM_GPUS_ON_NODE="0")) == (None, 0)


def test_slurm_devices_one_task_per_node_uses_all_its_gpus():
    gpus = "0,1,2,3,4,5,6,7"
    env = step_env(SLURM_STEP_GPUS=gpus, SLURM_GPUS_ON_NODE="8", CUDA_VISIBLE_DEVICES=gpus)
    assert ids_and_expected(env) == (list(range(8)), 8)


def test_slurm_devices_ordinals_are_positions_in_cuda_visible_devices():
    # A shared node: the job got GPUs 4-7, CUDA numbers the visible ones 0-3.
    env = step_env(
        SLURM_STEP_GPUS="4,5,6,7", SLURM_GPUS_ON_NODE="4", CUDA_VISIBLE_DEVICES="4,5,6,7"
    )
    assert ids_and_expected(env) == ([0, 1, 2, 3], 4)


def test_slurm_devices_without_cuda_visible_devices_uses_slurm_ids():
    env = step_env(SLURM_STEP_GPUS="2,3", SLURM_GPUS_ON_NODE="2")
    assert ids_and_expected(env) == ([2, 3], 2)
    assert ids_and_expected(step_env(SLURM_GPUS_ON_NODE="2")) == ([0, 1], 2)  # count only


def test_slurm_devices_tasks_bound_to_their_own_gpus():
    # --gpus-per-task=1 or --gpu-bind: Slurm narrows SLURM_STEP_GPUS and CUDA_VISIBLE_DEVICES.
    for local in range(2):
        env = step_env(
            SLURM_NTASKS="2", SLURM_PROCID=str(local), SLURM_LOCALID=str(local),
            SLURM_STEP_TASKS_PER_NODE="2", SLURM_GPUS_ON_NODE="2",
            SLURM_STEP_GPUS=str(local), CUDA_VISIBLE_DEVICES=str(local),
        )  # fmt: skip
        assert ids_and_expected(env) == ([0], 1)


def test_slurm_devices_tasks_sharing_the_node_split_its_gpus():
    def task(local, tasks, gpus):
        ids = ",".join(map(str, range(gpus)))
        return step_env(
            SLURM_NTASKS=str(tasks), SLURM_PROCID=str(local), SLURM_LOCALID=str(local),
            SLURM_STEP_TASKS_PER_NODE=str(tasks), SLURM_GPUS_ON_NODE=str(gpus),
            SLURM_STEP_GPUS=ids, CUDA_VISIBLE_DEVICES=ids,
        )  # fmt: skip

    assert [ids_and_expected(task(i, 8, 8)) for i in (0, 7)] == [([0], 1), ([7], 1)]
    assert [ids_and_expected(task(i, 2, 4)) for i in (0, 1)] == [([0, 1], 2), ([2, 3], 2)]
    with pytest.raises(distributed.ClusterError, match="does not divide"):
        distributed.slurm_devices(task(0, 3, 4))


def test_slurm_devices_reads_this_nodes_task_count():
    # Three nodes with 2 tasks, then one with 1: node 3 runs one task, alone with its GPUs.
    env = step_env(
        SLURM_STEP_TASKS_PER_NODE="2(x3),1", SLURM_NODEID="3", SLURM_GPUS_ON_NODE="2",
        SLURM_STEP_GPUS="0,1", CUDA_VISIBLE_DEVICES="0,1",
    )  # fmt: skip
    assert ids_and_expected(env) == ([0, 1], 2)
    env.update(SLURM_NODEID="0")
    assert ids_and_expected(env) == ([0], 1)
    with pytest.raises(distributed.ClusterError, match="SLURM_STEP_TASKS_PER_NODE"):
        distributed.slurm_devices(step_env(SLURM_STEP_TASKS_PER_NODE="x", SLURM_GPUS_ON_NODE="1"))


# ------------------------------------------------------------------ the real cluster --


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    local = slurm_cluster.LocalSlurm(tmp_path_factory.mktemp("slurm"), gpus=2)
    local.start()
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("jax-cache"))


def launcher_settings(data, **overrides) -> list[str]:
    """The launcher overrides of every run here: configs/demo.py, small and on the test data."""
    settings = {
        "model.name": "resnet8",
        "data.embedded": "",
        "data.train_dir": data[0],
        "data.eval_dir": data[1],
        "data.image_size": 16,
        "train.global_batch_size": 64,
        "train.num_steps": STEPS,
        "train.log_every_steps": EVERY,
        "train.num_image_summaries": 0,
        "checkpoint.every_steps": EVERY,
        "checkpoint.max_to_keep": 100,
    }
    settings.update(overrides)
    return [f"--config.{k}={v}" for k, v in settings.items()]


def job_env(cluster, workdir: str, jax_cache: str, **extra: str) -> dict[str, str]:
    """What sbatch exports to the job: the script's variables, CPU JAX, the shared cache."""
    env = helpers.child_env(1)  # JAX_PLATFORMS=cpu, one CPU device, PYTHONPATH=repository
    env.update(
        WORKDIR=workdir, CONFIG="configs/demo.py", VENV=sys.prefix,
        JAX_COMPILATION_CACHE_DIR=jax_cache,
    )  # fmt: skip
    env.update(extra)
    return cluster.env(env)


def submit(cluster, tmp_path, env, launcher_args, *sbatch_args) -> tuple[str, str]:
    """Submits the real script from the repository root; returns (job id, log path)."""
    log = str(tmp_path / "job-%j.out")
    job = cluster.sbatch(
        "--nodes=1", "--gpus-per-node=0", f"--cpus-per-task={min(2, cluster.cpus)}",
        f"--output={log}", *sbatch_args, SBATCH, *launcher_args, env=env, cwd=REPO,
    )  # fmt: skip
    return job, log.replace("%j", job)


def read(path: str) -> str:
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def wait_for(predicate, timeout: float, what: str, details=lambda: ""):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{details()}")
        time.sleep(0.5)


def final(info: dict[str, str]) -> bool:
    return info.get("JobState") in FINAL_STATES


def assert_same_final_state(workdir: str, reference: str) -> None:
    """Every array of the final checkpoint is bit-identical to the reference run's."""
    a = helpers.flat_arrays(helpers.load_state(workdir, STEPS))
    b = helpers.flat_arrays(helpers.load_state(reference, STEPS))
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert a[key].tobytes() == b[key].tobytes(), f"{key} differs from the uninterrupted run"


def run_lines(log: str) -> list[str]:
    """The log split into runs of the job: one chunk per start of the batch script."""
    return re.split(r"(?m)^(?=\S+ job \d+ \(restart \d+\))", log)[1:]


def seconds(line_prefix: str) -> float:
    return time.mktime(time.strptime(line_prefix, "%Y-%m-%dT%H:%M:%SZ"))


# -------------------------------------------------------------------- fast real tests --


@pytest.mark.slow
def test_slurm_gpu_environment_gives_each_launcher_its_gpus(cluster, tmp_path):
    """Slurm's real environment for GPU steps, run through `slurm_devices`.

    The node has 2 GPUs in Slurm's bookkeeping (stand-in device files): each task prints the
    environment slurmd gave it and the test applies the pure decision logic to it.
    """
    dump = "import json, os; print(json.dumps(dict(os.environ)))"
    python = shutil.which("python3") or sys.executable
    layouts = {
        "one task per node, all GPUs": (
            ["--ntasks-per-node=1", "--gpus-per-node=2"], [([0, 1], 2)],
        ),
        "one task per GPU, sharing": (
            ["--ntasks-per-node=2", "--gpus-per-node=2"], [([0], 1), ([1], 1)],
        ),
        "one task per GPU, bound": (
            ["--ntasks-per-node=2", "--gpus-per-task=1"], [([0], 1), ([0], 1)],
        ),
        "no GPUs": (["--ntasks-per-node=1", "--gpus-per-node=0"], [(None, 0)]),
    }  # fmt: skip
    for index, (name, (args, expected)) in enumerate(layouts.items()):
        out = tmp_path / f"layout{index}"
        out.mkdir()
        proc = cluster.run(
            "srun", "--nodes=1", "--cpus-per-task=1", f"--output={out}/%t.json", *args,
            python, "-c", dump, timeout=60,
        )  # fmt: skip
        tasks = sorted(out.iterdir(), key=lambda p: int(p.stem))
        envs = [json.loads(path.read_text()) for path in tasks]
        assert [ids_and_expected(env) for env in envs] == expected, (name, proc.stderr)


@pytest.mark.slow
def test_bad_config_fails_once_without_requeue(cluster, data, jax_cache, tmp_path):
    workdir = str(tmp_path / "run")
    env = job_env(cluster, workdir, jax_cache)
    args = launcher_settings(data, **{"model.num_classes": 7})  # the digits have 10 classes
    job, log = submit(cluster, tmp_path, env, args, "--time=5")
    info = cluster.wait_for_job(job, final, 120, "the job to end")
    text = read(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), text
    assert "num_classes" in text and "requeueing" not in text
    assert len(run_lines(text)) == 1, text


@pytest.mark.slow
def test_launcher_refuses_fewer_gpus_than_slurm_allocated(cluster, data, jax_cache, tmp_path):
    """Slurm gives the job 2 GPUs; this CPU-only JAX sees none: ClusterError, exit 2, once."""
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has NVIDIA GPUs: JAX would find real ones")
    workdir = str(tmp_path / "run")
    env = job_env(cluster, workdir, jax_cache)
    env.pop("JAX_PLATFORMS")  # let JAX look for GPUs as it would on a GPU node
    job, log = submit(
        cluster, tmp_path, env, launcher_settings(data), "--time=5", "--gpus-per-node=2"
    )
    info = cluster.wait_for_job(job, final, 120, "the job to end")
    text = read(log)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "2:0", "0"), text
    assert "Process 0 of 1: 1 local cpu device(s) (Slurm allocated 2 GPU(s)" in text, text
    assert "sees 0 GPU(s) but Slurm allocated 2" in text, text
    assert not os.path.exists(os.path.join(workdir, "checkpoints")), "it must fail before training"


SIGNAL_SRUN = """#!/bin/bash
cd "$SLURM_SUBMIT_DIR"
srun bash -c 'trap "echo task got TERM; exit 75" TERM; touch up; while :; do sleep 0.1; done' &
until [[ -e up ]]; do sleep 0.1; done
sleep 1  # the step is fully launched
kill -TERM $!
wait $!
echo "srun exited $?"
"""


@pytest.mark.slow
def test_srun_turns_sigterm_into_sigkill_for_its_tasks(cluster, tmp_path):
    """Why the script must not forward a warning to srun (the old `B:` and trap design)."""
    script = tmp_path / "signal_srun.sh"
    script.write_text(SIGNAL_SRUN)
    job = cluster.sbatch(f"--output={script}.out", str(script), env=cluster.env(), cwd=tmp_path)
    cluster.wait_for_job(job, final, 60, "the job to end")
    text = read(f"{script}.out")
    assert "srun exited 137" in text and "task 0: Killed" in text, text
    assert "task got TERM" not in text, text


# ------------------------------ plain scancel (first: it fills the compilation cache) --


def start_and_wait_for_training(cluster, data, jax_cache, tmp_path, *args, **overrides):
    """Submits a run and waits for its first checkpoint: training is under way."""
    workdir = str(tmp_path / "run")
    env = job_env(cluster, workdir, jax_cache, **overrides.pop("env", {}))
    job, log = submit(cluster, tmp_path, env, launcher_settings(data, **overrides), *args)
    wait_for(lambda: committed_steps(workdir), 400, "the first checkpoint", lambda: read(log))
    return job, log, workdir


@pytest.mark.slow
def test_plain_scancel_stops_the_launchers_but_does_not_requeue(cluster, data, jax_cache, tmp_path):
    """`scancel JOBID`: SIGTERM to the launchers and the batch script at once, SIGKILL after
    KillWait. The launchers save and exit 75, but the script is gone: no requeue."""
    job, log, workdir = start_and_wait_for_training(cluster, data, jax_cache, tmp_path, "--time=10")
    periodic = max(committed_steps(workdir))
    cluster.run("scancel", job)
    info = cluster.wait_for_job(job, final, 60, "the job to end")
    time.sleep(3)  # the launchers may still be exiting after the job is marked CANCELLED
    text = read(log)
    assert (info["JobState"], info["Restarts"]) == ("CANCELLED", "0"), text
    assert "task 0: Exited with exit code 75" in text, text  # srun saw the launcher's 75
    assert "launchers exited" not in text, text  # the batch script was killed first
    assert max(committed_steps(workdir)) > periodic, text  # the launcher's stop checkpoint
    assert cluster.job(job)["JobState"] == "CANCELLED"


# ------------------------------------------ time limit, scancel --signal=TERM, resume --


@dataclasses.dataclass
class Interrupted:
    """What one job went through: warned at its time limit, then scancel --signal=TERM."""

    job: str = ""
    workdir: str = ""
    log: str = ""
    warned: dict | None = None  # the job right after the first requeue
    steps_at_warning: list[int] = dataclasses.field(default_factory=list)
    states_after_warning: set = dataclasses.field(default_factory=set)  # (JobState, Reason)
    signalled_after: int = -1  # the newest checkpoint when scancel --signal=TERM was sent
    signalled: dict | None = None  # the job right after the second requeue (it was held)
    held: dict | None = None  # the same, once it could have started again
    steps_at_signal: list[int] = dataclasses.field(default_factory=list)
    end: dict | None = None
    reference: str = ""
    reference_output: str = ""
    error: str = ""

    def need(self, *fields: str) -> None:
        missing = [f for f in fields if not getattr(self, f)]
        if missing:
            pytest.fail(f"the job never got to {missing}: {self.error}\n{self.log[-6000:]}")


@pytest.fixture(scope="module")
def interrupted(cluster, data, jax_cache, tmp_path_factory):
    """One job, interrupted twice, then finished; and the same run uninterrupted, meanwhile.

    1. sbatch --time=2 --signal=TERM@80: the warning reaches the launchers (not the script),
       they exit 75 and the script requeues the job. Once requeued, its time limit is raised.
    2. After the resumed run has written a new checkpoint: scontrol hold, then
       scancel --signal=TERM; again 75 and a requeue, and the job stays pending (held) until
       scontrol release.
    3. The third run finishes.
    Each phase is recorded; the tests below check one part each.
    """
    tmp = tmp_path_factory.mktemp("interrupted")
    result = Interrupted(workdir=str(tmp / "run"))
    reference = str(tmp / "reference")
    ref_log = open(tmp / "reference.log", "w")  # noqa: SIM115 (closed below)
    ref_env = helpers.child_env(1)
    ref_env["JAX_COMPILATION_CACHE_DIR"] = jax_cache
    ref_proc = subprocess.Popen(
        [sys.executable, "-m", "launch.main", "--config=configs/demo.py",
         f"--workdir={reference}", *launcher_settings(data)],
        cwd=REPO, env=ref_env, stdout=ref_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        env = job_env(cluster, result.workdir, jax_cache)
        job, log = submit(
            cluster, tmp, env, launcher_settings(data), "--time=2", "--signal=TERM@80"
        )
        result.job = job
        job_info = lambda: cluster.job(job)
        tail = lambda: read(log)[-4000:]

        def requeued(times):
            info = job_info()
            if int(info.get("Restarts", 0)) >= times or final(info):
                return info
            return None

        result.warned = wait_for(lambda: requeued(1), 240, "the first requeue", tail)
        result.steps_at_warning = committed_steps(result.workdir) or [0]
        if final(result.warned):
            raise AssertionError(f"the job ended without a requeue: {result.warned}")
        cluster.run("scontrol", "update", f"JobId={job}", "TimeLimit=10")

        def progress():
            info = job_info()
            result.states_after_warning.add((info["JobState"], info["Reason"]))
            steps = committed_steps(result.workdir)
            done = max(steps, default=0)
            return info["JobState"] == "RUNNING" and done > max(result.steps_at_warning) and done

        result.signalled_after = wait_for(progress, 300, "a checkpoint after the resume", tail)
        cluster.run("scontrol", "hold", job)  # docs/operations.md: stop for good
        cluster.run("scancel", "--signal=TERM", job)
        result.signalled = wait_for(lambda: requeued(2), 120, "the second requeue", tail)
        result.steps_at_signal = committed_steps(result.workdir)
        if final(result.signalled):
            raise AssertionError(f"the job ended without a second requeue: {result.signalled}")
        time.sleep(cluster.settings["cred_expire"] + 2 * cluster.settings["sched_interval"] + 2)
        result.held = job_info()  # past its BeginTime, and still pending
        cluster.run("scontrol", "release", job)
        result.end = cluster.wait_for_job(job, final, 400, "the job to end")
        ref_proc.wait(timeout=400)
        result.reference = reference if ref_proc.returncode == 0 else ""
    except AssertionError as e:
        result.error = str(e)
        if result.job:
            cluster.run("scancel", result.job, check=False)  # free the node for the next tests
    finally:
        if ref_proc.poll() is None:
            ref_proc.kill()
            ref_proc.wait()
        ref_log.close()
        result.log = read(log) if result.job else ""
        result.reference_output = read(str(tmp / "reference.log"))
    return result


@pytest.mark.slow
def test_time_limit_warning_reaches_launchers_which_exit_75_and_requeue(interrupted):
    interrupted.need("warned")
    first = run_lines(interrupted.log)[0]
    assert "task 0: Exited with exit code 75" in first, first  # srun's report on the launcher
    assert "launchers exited with status 75" in first and "requeueing job" in first, first
    assert interrupted.warned["JobState"] != "TIMEOUT"
    # Requeued: pending until its BeginTime, then running again.
    assert ("PENDING", "BeginTime") in interrupted.states_after_warning
    # It stopped before the time limit (120 s), so the warning, not the limit, stopped it.
    stamps = re.findall(r"(?m)^(\S+Z) (?:job|launchers exited)", first)
    assert seconds(stamps[-1]) - seconds(stamps[0]) < 120, first


@pytest.mark.slow
def test_scancel_signal_term_checkpoints_exits_75_and_requeues(interrupted):
    interrupted.need("warned", "signalled")
    second = run_lines(interrupted.log)[1]
    assert "(restart 1)" in second, second
    assert "launchers exited with status 75" in second and "requeueing job" in second, second
    # The launchers saved the step they agreed on, after the newest periodic checkpoint seen.
    assert max(interrupted.steps_at_signal) > interrupted.signalled_after, second
    # Held before the signal: requeued, but it stays pending until released.
    held = interrupted.held
    assert held["JobState"] == "PENDING" and held["Reason"].startswith("JobHeld"), held


@pytest.mark.slow
def test_requeued_job_resumes_finishes_and_matches_an_uninterrupted_run(interrupted):
    interrupted.need("warned", "signalled", "end")
    end = interrupted.end
    assert (end["JobState"], end["ExitCode"], end["Restarts"]) == ("COMPLETED", "0:0", "2")
    runs = run_lines(interrupted.log)
    assert len(runs) == 3, interrupted.log
    # Each run resumed from the newest checkpoint the previous one left.
    resumed = [a.resumed for a in goodput.summarize(events.read(interrupted.workdir))]
    assert len(resumed) == 3, resumed
    left = (interrupted.steps_at_warning, interrupted.steps_at_signal)
    for step, steps in zip(resumed[1:], left):
        assert step == max(steps), (resumed, steps)
    assert "launchers exited with status 0 (finished)" in runs[2], runs[2]
    assert json.load(open(os.path.join(interrupted.workdir, "FINISHED")))["step"] == STEPS
    assert interrupted.reference, "the uninterrupted run failed:\n" + interrupted.reference_output
    assert_same_final_state(interrupted.workdir, interrupted.reference)


@pytest.mark.slow
def test_stalled_launchers_are_requeued_until_max_requeues(cluster, data, jax_cache, tmp_path):
    """Exit 5 (stalled) requeues the job like 75, up to MAX_REQUEUES.

    The launcher's real stop deadline: with distributed.preemption_grace_seconds=0.001 it
    expires as soon as SIGTERM arrives, before the agreed checkpoint commits, so the launcher
    logs its stacks and exits 5, as one whose save hangs would.
    MAX_REQUEUES=1: the first exit 5 requeues, the second gives up (the job fails with 5).
    """
    settings = {"distributed.preemption_grace_seconds": 0.001, "env": {"MAX_REQUEUES": "1"}}
    job, log, workdir = start_and_wait_for_training(
        cluster, data, jax_cache, tmp_path, "--time=10", **settings
    )
    cluster.run("scancel", "--signal=TERM", job)
    cluster.wait_for_job(job, lambda j: int(j["Restarts"]) >= 1 or final(j), 60, "a requeue")
    seen = max(committed_steps(workdir))

    def resumed_and_training():
        info = cluster.job(job)
        return final(info) or (
            info["JobState"] == "RUNNING" and max(committed_steps(workdir)) > seen
        )

    wait_for(resumed_and_training, 180, "the resumed run to train", lambda: read(log))
    cluster.run("scancel", "--signal=TERM", job)
    info = cluster.wait_for_job(job, final, 60, "the job to end")
    text = read(log)
    runs = run_lines(text)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("FAILED", "5:0", "1"), text
    assert len(runs) == 2, text
    assert "launchers exited with status 5 (stalled)" in runs[0] and "requeueing" in runs[0]
    assert goodput.summarize(events.read(workdir))[1].resumed == seen, runs[1]
    assert "already requeued 1 times (MAX_REQUEUES=1); giving up" in runs[1], runs[1]
