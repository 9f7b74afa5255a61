r"""Simulates a multi-host cluster on this machine: N launcher processes, K CPU devices each.

  python -m launch.local_cluster --num_processes=2 --devices_per_process=2 -- \
      --config=configs/demo.py --workdir=/tmp/demo2

The processes join through `jax.distributed` on a free localhost port and use gloo for
cross-process collectives, exactly as hosts of a real cluster would. Their output is shown
line by line with a `[pN]` prefix. If one fails, the others are stopped and the exit status is
the first failure's; SIGINT/SIGTERM are forwarded to every process (a SIGTERM lets the run
save a checkpoint and exit with status 75). After a failure or a forwarded signal, processes
still alive `--grace_seconds` later are killed and named: this supervisor never waits forever.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import portpicker
from absl import app, flags

from launch.status import ExitStatus

flags.DEFINE_integer("num_processes", 2, "Launcher processes to start.")
flags.DEFINE_integer("devices_per_process", 2, "Simulated CPU devices per process.")
flags.DEFINE_string("module", "launch.main", "Python module each process runs.")
flags.DEFINE_float(
    "grace_seconds",
    30,
    "After a failure or a signal, how long to wait for the processes before killing them.",
)
FLAGS = flags.FLAGS


def _child_env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    xla_flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(xla_flags + [f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _relay(index: int, stream) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"[p{index}] {line.decode(errors='replace')}")
        sys.stdout.flush()


def run(
    num_processes: int,
    devices_per_process: int,
    launcher_args: list[str],
    module: str = "launch.main",
    grace_seconds: float = 30,
) -> int:
    """Runs the cluster to completion; returns the exit status (first failure wins)."""
    address = f"localhost:{portpicker.pick_unused_port()}"
    procs, relays = [], []
    for index in range(num_processes):
        cmd = [
            sys.executable,
            "-m",
            module,
            *launcher_args,
            f"--coordinator_address={address}",
            f"--num_processes={num_processes}",
            f"--process_id={index}",
        ]
        # A session of its own: a terminal's Ctrl-C reaches only this supervisor, which turns
        # it into the SIGTERM that makes every launcher save and stop at one agreed step.
        proc = subprocess.Popen(
            cmd,
            env=_child_env(devices_per_process),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        relay = threading.Thread(target=_relay, args=(index, proc.stdout), daemon=True)
        relay.start()
        procs.append(proc)
        relays.append(relay)

    deadline = None

    def stop_all(_signum=None, _frame=None):
        nonlocal deadline
        if deadline is None:  # once: a second SIGTERM must not interrupt the checkpoint
            deadline = time.monotonic() + grace_seconds
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)

    status = 0
    while any(p.poll() is None for p in procs):
        not_done = (None, ExitStatus.FINISHED, ExitStatus.PREEMPTED)
        failed = [p.returncode for p in procs if p.returncode not in not_done]
        if failed and status == 0:
            status = failed[0]
            sys.stdout.write(
                f"[local_cluster] a process exited with status {status}; stopping the others\n"
            )
            stop_all()
        if deadline is not None and time.monotonic() > deadline:
            for index, p in enumerate(procs):
                if p.poll() is None:
                    sys.stdout.write(
                        f"[local_cluster] process {index} (pid {p.pid}) still running "
                        f"{grace_seconds:.0f}s after SIGTERM; killing it\n"
                    )
                    p.kill()
            deadline = float("inf")
        time.sleep(0.1)
    for relay in relays:
        relay.join(timeout=5)
    codes = [p.returncode for p in procs]
    if status == 0:
        status = next((c for c in codes if c != 0), 0)
    if status < 0:  # killed by a signal: report it the way a shell would
        status = 128 - status
    sys.stdout.write(f"[local_cluster] exit statuses {codes}\n")
    return status


def main(argv):
    if FLAGS.num_processes < 1 or FLAGS.devices_per_process < 1:
        print(
            "error: --num_processes and --devices_per_process must be at least 1", file=sys.stderr
        )
        sys.exit(int(ExitStatus.BAD_INPUT))
    sys.exit(
        run(
            FLAGS.num_processes,
            FLAGS.devices_per_process,
            argv[1:],
            FLAGS.module,
            FLAGS.grace_seconds,
        )
    )


if __name__ == "__main__":
    app.run(main)
