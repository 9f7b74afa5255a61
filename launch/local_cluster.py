r"""Simulates a multi-host cluster on this machine: N launcher processes, K CPU devices each.

  python -m launch.local_cluster --num_processes=2 --devices_per_process=2 -- \
      --config=configs/demo.py --workdir=/tmp/demo2

The processes join through `jax.distributed` on a free localhost port and use gloo for
cross-process collectives, exactly as hosts of a real cluster would. Their output is shown
line by line with a `[pN]` prefix.

Every process is watched: when any one fails (any status but 0 and 75, or a signal), the others
get SIGTERM and the exit status is that first failure's, named in one `error:` line; a death by
signal N is reported as 128 + N, the way a shell does (SIGKILL: 137). SIGINT, SIGTERM and SIGHUP
(the terminal closed) are forwarded to every process as SIGTERM, which makes the run save a
checkpoint at one agreed step and exit 75. After a failure or a forwarded signal, processes
still alive `--grace_seconds` later are killed and named: this supervisor never waits forever.
The processes die with it: each gets SIGTERM (and saves) if the supervisor itself is killed.

`--slices=N` groups consecutive processes into N simulated TPU slices (multislice): each process
is told its slice as a TPU host is, by MEGASCALE_NUM_SLICES and MEGASCALE_SLICE_ID.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import NoReturn

import portpicker
from absl import app, flags

from launch.status import ExitStatus, describe

flags.DEFINE_integer("num_processes", 2, "Launcher processes to start.")
flags.DEFINE_integer("devices_per_process", 2, "Simulated CPU devices per process.")
flags.DEFINE_string("module", "launch.main", "Python module each process runs.")
flags.DEFINE_integer("slices", 1, "Slices the processes are grouped into (simulated multislice).")
flags.DEFINE_float(
    "grace_seconds",
    30,
    "After a failure or a signal, how long to wait for the processes before killing them.",
)
FLAGS = flags.FLAGS

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _slice_env(index: int, num_processes: int, slices: int) -> dict[str, str]:
    """Process `index`'s slice, numbered as JAX numbers TPU hosts: slice by slice."""
    slice_id = index // (num_processes // slices)
    return {"MEGASCALE_NUM_SLICES": str(slices), "MEGASCALE_SLICE_ID": str(slice_id)}


def _child_env(devices: int, slice_env: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ, **slice_env)
    xla_flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _say(text: str) -> None:
    """Writes to stdout; a closed terminal or pipe must not stop the supervision."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        pass


def _relay(index: int, stream) -> None:
    # Reads to the end even when stdout is gone: a child blocked on a full pipe could not save.
    for line in iter(stream.readline, b""):
        _say(f"[p{index}] {line.decode(errors='replace')}")


def _die_with_this_process() -> Callable[[], None] | None:
    """A preexec_fn that makes the child get SIGTERM when this process dies (Linux), so that
    a supervisor killed with SIGKILL leaves no orphaned launcher behind."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here, only called in the child
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
        if os.getppid() != parent:  # the parent died before prctl: nobody to signal it now
            os._exit(int(ExitStatus.FAILED))

    return arm


def _shell_status(code: int) -> int:
    return 128 - code if code < 0 else code  # killed by signal N: 128 + N, as a shell says


def _start(
    index: int, cmd: list[str], devices: int, preexec, slice_env: dict[str, str]
) -> subprocess.Popen:
    # A session of its own: a terminal's Ctrl-C or hang-up reaches only this supervisor,
    # which turns it into the SIGTERM that makes every launcher save and stop at one step.
    # preexec_fn is safe here: no other thread runs while the processes start.
    return subprocess.Popen(
        cmd,
        env=_child_env(devices, slice_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=preexec,
    )


def run(
    num_processes: int,
    devices_per_process: int,
    launcher_args: list[str],
    module: str = "launch.main",
    grace_seconds: float = 30,
    slices: int = 1,
) -> int:
    """Runs the cluster to completion; returns the exit status (first failure wins)."""
    address = f"localhost:{portpicker.pick_unused_port()}"
    procs: list[subprocess.Popen] = []
    deadline = None

    def stop_all(signum=None, _frame=None):
        nonlocal deadline
        if signum is not None:
            _say(f"[local_cluster] {signal.Signals(signum).name}: stopping every process\n")
        if deadline is None:  # once: a second SIGTERM must not interrupt the checkpoint
            deadline = time.monotonic() + grace_seconds
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    for signum in FORWARDED_SIGNALS:
        signal.signal(signum, stop_all)
    preexec = _die_with_this_process()
    for index in range(num_processes):
        if deadline is not None:  # stopped while starting: start no more
            break
        cmd = [
            sys.executable,
            "-m",
            module,
            *launcher_args,
            f"--coordinator_address={address}",
            f"--num_processes={num_processes}",
            f"--process_id={index}",
        ]
        slice_env = _slice_env(index, num_processes, slices)
        procs.append(_start(index, cmd, devices_per_process, preexec, slice_env))

    exits: queue.Queue[tuple[int, int]] = queue.Queue()  # (index, returncode) as they end
    threads = []
    for index, proc in enumerate(procs):
        threads.append(threading.Thread(target=_relay, args=(index, proc.stdout), daemon=True))
        threads.append(
            threading.Thread(target=lambda i, p: exits.put((i, p.wait())), args=(index, proc))
        )
    for thread in threads:
        thread.start()

    first_failure = None  # (index, returncode) of the first process that failed
    running = set(range(len(procs)))
    while running:
        try:
            index, code = exits.get(timeout=0.1)
            running.discard(index)
            if first_failure is None and code not in (ExitStatus.FINISHED, ExitStatus.PREEMPTED):
                first_failure = (index, code)
                _say(
                    f"[local_cluster] process {index} (pid {procs[index].pid}) exited with "
                    f"status {describe(_shell_status(code))}; stopping the others\n"
                )
                stop_all()
        except queue.Empty:
            pass
        if deadline is not None and time.monotonic() > deadline:
            for index in sorted(running):
                _say(
                    f"[local_cluster] process {index} (pid {procs[index].pid}) still running "
                    f"{grace_seconds:.0f}s after SIGTERM; killing it\n"
                )
                procs[index].kill()
            deadline = float("inf")
    for thread in threads:
        thread.join(timeout=5)
    codes = [p.returncode for p in procs]
    _say(f"[local_cluster] exit statuses {codes}\n")
    if first_failure is None:
        return _shell_status(next((c for c in codes if c != 0), 0))
    index, code = first_failure
    status = _shell_status(code)
    _error(
        f"process {index} (pid {procs[index].pid}) failed first, with status "
        f"{describe(status)}; the others were stopped"
    )
    return status


def _error(message: str) -> None:
    try:
        print(f"error: {message}", file=sys.stderr, flush=True)
    except OSError:  # no terminal any more: the exit status still says it
        pass


def _fail(message: str) -> NoReturn:
    _error(message)
    sys.exit(int(ExitStatus.BAD_INPUT))


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag as one line and exit status 2."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        _fail(str(e))


def main(argv):
    if FLAGS.num_processes < 1 or FLAGS.devices_per_process < 1:
        _fail("--num_processes and --devices_per_process must be at least 1")
    if FLAGS.grace_seconds < 0:
        _fail(f"--grace_seconds={FLAGS.grace_seconds:g} must be 0 or more")
    if FLAGS.slices < 1 or FLAGS.num_processes % FLAGS.slices:
        _fail(
            f"--slices={FLAGS.slices} must divide --num_processes={FLAGS.num_processes}: "
            "every slice has the same number of processes"
        )
    sys.exit(
        run(
            FLAGS.num_processes,
            FLAGS.devices_per_process,
            argv[1:],
            FLAGS.module,
            FLAGS.grace_seconds,
            FLAGS.slices,
        )
    )


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
