r"""Restart time after a preemption, cold against warm compilation cache, in one invocation.

    python -m tools.bench.restart [--processes=2 --devices=2 --preempt_at=14 --repeats=1] \
        [-- EXTRA_LAUNCHER_FLAGS...]

Runs the real launcher on the demo config through `launch.local_cluster`: a first run (no
cache) is preempted with SIGTERM at `--preempt_at`; then, `--repeats` times, a restart with an
empty compilation cache (cold) and a restart with the cache that the cold one filled (warm),
each stopped with SIGTERM once every host is training (the launcher's `startup` event,
launch.events). The figure is the wall time from starting the processes to the end of the
first step, which that event records, with the launcher's own start-up breakdown (the event's
figures) and how its programs came (compiled, read ahead, loaded; the first process to report).
The last line printed is JSON.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from launch import events

flags.DEFINE_integer("processes", 2, "Launcher processes.")
flags.DEFINE_integer("devices", 2, "CPU devices per process.")
flags.DEFINE_integer("preempt_at", 14, "Step at which the first run is preempted.")
flags.DEFINE_integer("repeats", 1, "Cold/warm restart pairs.")
flags.DEFINE_string("config", "configs/demo.py", "Launcher config.")
FLAGS = flags.FLAGS


def _start(workdir: str, cache: str, extra: list[str], output) -> subprocess.Popen:
    cmd = [
        sys.executable, "-m", "launch.local_cluster", f"--num_processes={FLAGS.processes}",
        f"--devices_per_process={FLAGS.devices}", "--", f"--config={FLAGS.config}",
        f"--workdir={workdir}", f"--config.train.compilation_cache_dir={cache}",
        "--config.train.log_every_steps=1", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    return subprocess.Popen(
        cmd, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )  # fmt: skip


def _run_until(workdir: str, cache: str, extra: list[str], until) -> tuple[float, dict]:
    """Starts a run, SIGTERMs it at the first event for which `until` is true; (seconds from
    the start to that event (for `startup`: to the first step's end, which it records), the
    event)."""
    tail = events.Tail(workdir)
    tail.read()  # the events of earlier runs
    start = time.time()
    with tempfile.TemporaryFile() as output:
        proc = _start(workdir, cache, extra, output)
        seen = None
        while proc.poll() is None:
            if seen is None:
                seen = next((r for r in tail.read() if until(r)), None)
                if seen is not None:
                    proc.send_signal(signal.SIGTERM)  # local_cluster forwards it: save, exit 75
            time.sleep(0.05)
        output.seek(0)
        log = output.read().decode(errors="replace")
    if seen is None or proc.returncode != 75:
        sys.exit(f"run ended with status {proc.returncode} first:\n{log[-3000:]}")
    return seen.get("first_step_done", seen["t"]) - start, seen


def _is_step(step: int):
    return lambda r: r["event"] == "progress" and r["step"] >= step


def _is_startup(record: dict) -> bool:
    return record["event"] == "startup"


def main(argv):
    extra = argv[1:]
    results = {"cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as root:
        workdir = os.path.join(root, "run")
        _run_until(workdir, "", extra, _is_step(FLAGS.preempt_at))
        for repeat in range(FLAGS.repeats):
            cache = os.path.join(root, f"cache-{repeat}")
            for kind in ("cold", "warm"):
                seconds, event = _run_until(workdir, cache, extra, _is_startup)
                startup = {k.split("/")[1]: round(v, 2) for k, v in event["figures"].items()}
                how = collections.Counter(how for _, how in event.get("programs", []))
                results[kind].append(
                    {"seconds": round(seconds, 2), "startup": startup, "programs": dict(how)}
                )
                print(f"{kind} restart: first step after {seconds:.1f}s  {results[kind][-1]}")
    cold = sorted(r["seconds"] for r in results["cold"])[len(results["cold"]) // 2]
    warm = sorted(r["seconds"] for r in results["warm"])[len(results["warm"]) // 2]
    print(f"warm / cold = {warm / cold:.2f} (median of {FLAGS.repeats})")
    print(json.dumps({"cold_s": cold, "warm_s": warm, "ratio": warm / cold, **results}))


if __name__ == "__main__":
    app.run(main)
