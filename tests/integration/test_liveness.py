"""Never hang: the stall watchdog, signals from process start, the deadline after SIGTERM, and
`launch.local_cluster`'s own deadline. The multi-host cases run the real launcher in two
processes and freeze one of them with SIGSTOP: alive, so no heartbeat can notice."""

import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from launch import events
from launch.status import ExitStatus
from tests import helpers

pytestmark = pytest.mark.slow


def _run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=helpers.REPO,
        env=helpers.child_env(1),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_watchdog_dumps_every_stack_and_exits_5():
    start = time.monotonic()
    run = _run_python(
        """
        import threading, time
        from launch import liveness
        watchdog = liveness.Watchdog(floor_seconds=2)
        watchdog.start()
        watchdog.beat()
        threading.Thread(target=time.sleep, args=(60,), name="a-worker").start()
        time.sleep(60)  # no beat: a stall
        """
    )
    assert run.returncode == ExitStatus.STALLED, run.stderr[-3000:]
    assert time.monotonic() - start < 30
    assert "stalled: no training step or eval batch completed" in run.stderr
    assert run.stderr.count("Thread 0x") >= 2  # every thread's stack, not just one


def test_watchdog_timeout_follows_the_median_step_time():
    run = _run_python(
        """
        from launch import liveness
        watchdog = liveness.Watchdog(floor_seconds=1)
        watchdog._intervals.extend([0.1] * 10 + [4.0])  # 50 x median 0.1 s = 5 s
        print(watchdog.timeout())
        """
    )
    assert float(run.stdout.strip()) == pytest.approx(5.0)


def test_a_signal_during_start_up_exits_75_without_a_traceback(data, tmp_path):
    proc = helpers.start(helpers.tiny_run_args(*data, str(tmp_path / "w")))
    seen = []
    assert helpers.wait_for_line(proc, "Train data:", seen), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGTERM)  # while the run restores and compiles
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    log = "".join(seen)
    assert proc.returncode == ExitStatus.PREEMPTED, log[-3000:]
    assert "Traceback" not in log and "step 1/" not in log


def _barrier(
    late_seconds: float, timeout_seconds: float, *probe_flags: str, processes: int = 2
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "launch.local_cluster", f"--num_processes={processes}",
        "--devices_per_process=1", "--module=tests.barrier_probe", "--",
        f"--late_seconds={late_seconds}", f"--timeout_seconds={timeout_seconds}", *probe_flags,
    ]  # fmt: skip
    return subprocess.run(
        cmd, cwd=helpers.REPO, env=helpers.child_env(1), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def test_hosts_meet_before_training_and_a_missing_host_has_a_deadline():
    """The barrier before the first step (launch/train.py): a host that is late (a compile
    where the others hit the cache) is waited for; one that never comes ends it, named."""
    late = _barrier(late_seconds=3, timeout_seconds=60)
    assert late.returncode == 0, late.stdout[-3000:]
    assert re.search(r"\[p0\] process 0: all hosts ready after [3-9]\.\d+s", late.stdout)
    missing = _barrier(late_seconds=6, timeout_seconds=2)
    assert missing.returncode == ExitStatus.STALLED, missing.stdout[-3000:]
    assert "process 0: not every host reached 'probe' within 2s" in missing.stdout


def test_hosts_agree_through_the_coordination_service_and_a_missing_host_has_a_deadline():
    """distributed.any_host (the workdir lock's and the restore's agreements): True on every
    host where any one says True, each call on its own, across real processes; one host that
    never comes ends it, named, instead of hanging the others."""
    agree = _barrier(1, 60, "--says_true=2,-1,0", processes=3)
    assert agree.returncode == 0, agree.stdout[-3000:]
    for process in range(3):
        assert f"process {process}: agreed [True, False, True]" in agree.stdout, agree.stdout
    missing = _barrier(6, 2, "--says_true=-1")
    assert missing.returncode == ExitStatus.STALLED, missing.stdout[-3000:]
    assert "process 0: not every host reached 'launch/any_host/0' within 2s" in missing.stdout


def _freeze_one_host_mid_run(args, workdir, seen):
    """Two hosts training; host 1 frozen (SIGSTOP) once host 0 has seen a checkpoint commit.
    A save commits only with both hosts, so a freeze before that would leave nothing to
    resume from, however early the save started."""
    hosts = helpers.start_hosts(args, processes=2, devices=2)
    for line in hosts[0].stdout:
        seen.append(line)
        if any(r["event"] == "save_committed" for r in events.read(workdir) if r["process"] == 0):
            break
    else:
        raise AssertionError("".join(seen)[-3000:])
    hosts[1].send_signal(signal.SIGSTOP)
    return hosts


def _drain(proc, seen, timeout=120):
    start = time.monotonic()
    seen += proc.stdout.readlines()
    proc.wait(timeout=timeout)
    return time.monotonic() - start


def test_a_stalled_peer_ends_the_run_with_stacks_and_the_rerun_resumes(data, tmp_path):
    workdir = str(tmp_path / "w")
    overrides = {
        "train.num_steps": 60,
        "train.stall_timeout_seconds": 10,
        "distributed.heartbeat_timeout_seconds": 120,  # alive but frozen: no heartbeat fires
    }
    args = helpers.tiny_run_args(*data, workdir, **overrides)
    seen = []
    hosts = _freeze_one_host_mid_run(args, workdir, seen)
    try:
        took = _drain(hosts[0], seen)
    finally:
        hosts[1].kill()
        hosts[1].wait()
    log = "".join(seen)
    assert hosts[0].returncode == ExitStatus.STALLED, log[-3000:]
    assert took < 60, took
    assert "stalled: no training step or eval batch completed" in log
    assert "Thread 0x" in log and "launch/train.py" in log  # the stacks, down to the loop
    # The rerun only needs to resume and take a few steps: it ends at step 12, not 60.
    rerun = helpers.launch(args + ["--config.train.num_steps=12"], processes=2, devices=2)
    assert rerun.returncode == 0, rerun.stdout[-3000:]
    assert events.latest(workdir, "resumed")["step"] in (4, 8), rerun.stdout[-3000:]


def test_the_agreed_save_has_a_deadline_after_sigterm(data, tmp_path):
    overrides = {
        "train.num_steps": 400,
        "train.stall_timeout_seconds": 0,  # off: only the SIGTERM deadline is left
        "distributed.preemption_grace_seconds": 8,
        "distributed.heartbeat_timeout_seconds": 120,
    }
    seen, workdir = [], str(tmp_path / "w")
    hosts = _freeze_one_host_mid_run(
        helpers.tiny_run_args(*data, workdir, **overrides), workdir, seen
    )
    try:
        hosts[0].send_signal(signal.SIGTERM)  # its peer can never agree on a step now
        took = _drain(hosts[0], seen)
    finally:
        hosts[1].kill()
        hosts[1].wait()
    log = "".join(seen)
    assert hosts[0].returncode == ExitStatus.STALLED, log[-3000:]
    assert took < 45, took
    assert "SIGTERM caught 8s ago and the agreed checkpoint has not committed" in log
    assert "Thread 0x" in log


def test_local_cluster_kills_what_outlives_its_grace_after_a_signal(data, tmp_path):
    overrides = {
        "train.num_steps": 400,
        "train.stall_timeout_seconds": 0,
        "distributed.preemption_grace_seconds": 5,  # host 0 gives up on its frozen peer
    }
    args = helpers.tiny_run_args(*data, str(tmp_path / "w"), **overrides)
    proc = helpers.start(args, processes=2, devices=2, cluster_flags=("--grace_seconds=8",))
    seen = []
    assert helpers.wait_for_line(proc, "step 4/400", seen), "".join(seen)[-3000:]
    frozen = helpers.host_pid(str(tmp_path / "w"), 1)
    os.kill(frozen, signal.SIGSTOP)
    proc.send_signal(signal.SIGTERM)
    took = _drain(proc, seen)
    log = "".join(seen)
    assert took < 5 + 8 + 30, took
    assert f"(pid {frozen}) still running" in log, log[-3000:]
    assert proc.returncode != 0


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie left for a reaper that never comes does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def cluster_cache(tmp_path_factory) -> str:
    """One compilation cache for the local_cluster runs below: only the first compiles."""
    return str(tmp_path_factory.mktemp("cluster-xla-cache"))


def _cluster_mid_run(data, tmp_path, cache: str, grace_seconds: float):
    """local_cluster with 2 launchers, training (400 steps: it does not end by itself)."""
    workdir = str(tmp_path / "w")
    overrides = {
        "train.num_steps": 400,
        "distributed.preemption_grace_seconds": 20,
        "train.compilation_cache_dir": cache,
    }
    args = helpers.tiny_run_args(*data, workdir, **overrides)
    proc = helpers.start(
        args, processes=2, devices=2, cluster_flags=(f"--grace_seconds={grace_seconds}",)
    )
    seen = []
    assert helpers.wait_for_line(proc, "step 4/400", seen), "".join(seen)[-3000:]
    return proc, seen, [helpers.host_pid(workdir, i) for i in range(2)]


def test_local_cluster_stops_the_others_when_process_1_dies_and_keeps_its_status(
    data, tmp_path, cluster_cache
):
    grace = 8
    proc, seen, pids = _cluster_mid_run(data, tmp_path, cluster_cache, grace)
    os.kill(pids[1], signal.SIGKILL)
    took = _drain(proc, seen)
    log = "".join(seen)
    assert proc.returncode == 128 + signal.SIGKILL, log[-3000:]  # 137: the first failure
    assert took < grace + 10, took
    assert f"error: process 1 (pid {pids[1]}) failed first, with status 137 (killed by" in log
    assert not [pid for pid in pids if _alive(pid)]


def test_local_cluster_forwards_sighup_and_leaves_no_process_behind(data, tmp_path, cluster_cache):
    proc, seen, pids = _cluster_mid_run(data, tmp_path, cluster_cache, grace_seconds=60)
    proc.send_signal(signal.SIGHUP)  # the terminal closed
    _drain(proc, seen)
    log = "".join(seen)
    assert proc.returncode == ExitStatus.PREEMPTED, log[-3000:]
    assert "exit statuses [75, 75]" in log and "Traceback" not in log
    assert not [pid for pid in pids if _alive(pid)]


def test_launchers_die_with_a_killed_local_cluster(data, tmp_path, cluster_cache):
    proc, _, pids = _cluster_mid_run(data, tmp_path, cluster_cache, grace_seconds=60)
    proc.kill()  # no handler runs: only the parent-death signal can reach the launchers
    proc.wait()
    deadline = time.monotonic() + 60  # SIGTERM: they agree on a step and save (or give up)
    while [pid for pid in pids if _alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not [pid for pid in pids if _alive(pid)], pids


def test_local_cluster_refuses_zero_processes():
    run = subprocess.run(
        [sys.executable, "-m", "launch.local_cluster", "--num_processes=0", "--", "--workdir=x"],
        cwd=helpers.REPO,
        env=helpers.child_env(1),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == ExitStatus.BAD_INPUT
    assert "--num_processes" in run.stderr and "Traceback" not in run.stderr
