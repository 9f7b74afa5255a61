r"""Trains through a storm of faults and restarts, and measures goodput against a clean run.

  python -m tools.faults.storm --workdir=/tmp/storm --fault_interval=60,120 --seed=0 -- \
      --config=configs/demo.py --config.train.num_epochs=20

Everything after `--` goes to the launcher (`launch.main` through `launch.local_cluster`);
`--workdir` is this tool's own: the uninterrupted run trains in WORKDIR/reference, the faulted
run in WORKDIR/storm, and the report lands in WORKDIR/fault_storm.json and .png.

1. The reference: the same config once without faults, on the first `--topologies` entry.
2. The storm: the same command, with faults from a seeded schedule. A fault is due
   `--fault_interval` seconds (uniform in [lo, hi]) of wall time after the previous one, and
   is injected once the running attempt has reached its training loop (its `startup` event:
   every attempt trains). The storm follows the launcher through its structured events,
   tailed from the workdir as they are written; the output goes to logs/ only. The kinds,
   drawn in shuffled rounds so that every kind comes once per round:
     preempt    SIGTERM to one process: the hosts agree on a step, save it, exit 75
     host_loss  SIGKILL to one process: local_cluster stops the others (SIGTERM, then SIGKILL
                after --grace_seconds); the heartbeat (10 s here) ends the rest
     save_kill  SIGKILL to one process right after its `save_started` event (launch.events),
                the asynchronous save still in flight; the torn step must never be restored
     resize     SIGTERM to every process (a scheduler draining the job); the restart uses the
                next topology of the cycle, e.g. 2x2 -> 1x4 -> 4x1 -> 2x2
   After every fault the same command is started again until it exits 0. An attempt still
   alive `--kill_after` seconds after its fault is killed, process groups and all, and that
   time counts as recovery.
3. The report: goodput = the faulted run's productive time / its wall time, and the badput
   split, by the launcher's own accounting of its events with the storm's exact spawn, exit
   and fault times (`tools.faults.goodput`); the reference's own goodput beside it, and the
   reference's productive time / the faulted wall time (`vs_reference`, a cross-check only
   where the topology never changed); fault and restart counts; and whether the finished
   run is right: final state bit-identical to the reference when the topology never
   changed, else within the tolerances below, and the same eval figures in FINISHED.

Exit status: 0 the run finished and is right, 1 it finished but a check failed, 2 bad flags,
3 it could not finish (a non-retriable launcher status, or --max_attempts).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from absl import app, flags

from launch import checkpointing, events
from tools.faults import goodput


def _define_flags() -> None:
    """The command line's flags, defined only when run as a program: importing the module (the
    tests do) must not claim flag names such as --workdir that the launcher defines."""
    flags.DEFINE_string("workdir", None, "Root: reference/, storm/, logs/ and the report go here.")
    flags.DEFINE_list(
        "fault_interval", ["60", "120"], "lo,hi: seconds of wall time between faults."
    )
    flags.DEFINE_integer("seed", 0, "Seed of the fault schedule (intervals, kinds, targets).")
    flags.DEFINE_list("topologies", ["2x2", "1x4", "4x1"], "PxD layouts; the first is the start.")
    flags.DEFINE_list("kinds", ["preempt", "host_loss", "save_kill", "resize"], "Fault kinds.")
    flags.DEFINE_integer("max_faults", -1, "Stop injecting after this many faults (-1: never).")
    flags.DEFINE_float(
        "grace_seconds", 10, "local_cluster: kill the rest this long after a failure."
    )
    flags.DEFINE_float("kill_after", 60, "Kill an attempt still alive this long after its fault.")
    flags.DEFINE_float("restart_delay", 0, "Seconds between an attempt's end and the restart.")
    flags.DEFINE_integer("max_attempts", 100, "Give up after this many attempts.")
    # After a topology change only (see docs/measurements.md for how these were measured).
    flags.DEFINE_float("param_rtol", 0.2, "Bound on ||params - reference|| / ||reference||.")
    flags.DEFINE_float("top1_atol", 0.02, "Bound on the eval top-1 difference.")
    flags.DEFINE_float(
        "loss_rtol", 0.2, "Bound on the eval loss difference, relative to the reference's loss."
    )
    flags.DEFINE_float(
        "loss_atol", 0.005, "Absolute slack added to the loss bound (as numpy's isclose)."
    )
    flags.DEFINE_bool("show_output", False, "Echo the launcher output (it is always in logs/).")


FLAGS = flags.FLAGS

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Output that means the attempt is failing: from then on it gets --kill_after seconds to end.
_TROUBLE = ("Traceback (most recent call last)", "[local_cluster] a process exited with status")
_ERROR = re.compile(r"^\[p\d+\] (\w+\.)*\w*(Error|Exception)\b|^\[p\d+\] error: ")
KINDS = ("preempt", "host_loss", "save_kill", "resize")
# The storm's defaults for the launcher; the same field given after `--` wins.
# Every checkpoint is kept so that the two runs can be compared step by step.
LAUNCHER_DEFAULTS = (
    "--config.distributed.heartbeat_timeout_seconds=10",
    "--config.checkpoint.max_to_keep=1000000",
)


def _say(message: str) -> None:
    print(f"[fault_storm] {message}", flush=True)


# --- processes ----------------------------------------------------------------------------


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, process group, start time in clock ticks) of a live process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[1]), int(fields[2]), int(fields[19])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _process_id(pid: int) -> int | None:
    """The `--process_id=K` a launcher process was started with."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    for arg in args:
        if arg.startswith("--process_id="):
            return int(arg.split("=", 1)[1])
    return None


# --- the fault schedule -------------------------------------------------------------------


class Schedule:
    """Seeded faults: (interval, kind, target draw); kinds in shuffled rounds of all kinds."""

    def __init__(self, seed: int, interval: tuple[float, float], kinds: list[str], limit: int):
        self._rng = random.Random(seed)
        self._interval = interval
        self._kinds = kinds
        self._round: list[str] = []
        self._left = limit

    def next(self) -> dict[str, Any] | None:
        if self._left == 0:
            return None
        self._left -= 1
        if not self._round:
            self._round = list(self._kinds)
            self._rng.shuffle(self._round)
        return {
            "interval": self._rng.uniform(*self._interval),
            "kind": self._round.pop(),
            "draw": self._rng.random(),  # picks the target process, whatever the topology
        }


class Storm:
    """Shared by the attempts: the clock, the next planned fault, the topology cycle."""

    def __init__(self, schedule: Schedule | None, topologies: list[tuple[int, int]]):
        self.origin = time.time()  # wall time: the events' clock
        self.schedule = schedule
        self.topologies = topologies
        self.topology_index = 0
        self.plan = None
        self.faults: list[dict[str, Any]] = []
        if schedule is not None:
            self._plan_next(0.0)

    def clock(self) -> float:
        return time.time() - self.origin

    def _plan_next(self, after: float) -> None:
        self.plan = self.schedule.next()
        if self.plan is not None:
            self.plan["due"] = after + self.plan["interval"]

    def injected(self, fault: dict[str, Any]) -> None:
        self.faults.append(fault)
        if fault["kind"] == "resize":
            self.topology_index = (self.topology_index + 1) % len(self.topologies)
        self._plan_next(fault["t"])


# --- one attempt --------------------------------------------------------------------------


class Attempt:
    """One `launch.local_cluster` invocation: output read line by line, faults injected."""

    def __init__(
        self,
        storm: Storm,
        index: int,
        topology: tuple[int, int],
        launcher_args: list[str],
        log_path: str,
        faults: bool,
        tail: events.Tail,
    ):
        self.storm = storm
        self.processes = topology[0]
        self.record = goodput.new_attempt(index, topology, storm.clock())
        self.record.update(trouble=None, error=None)
        self.faults = faults
        self._tail = tail
        self._lock = threading.Lock()
        self._armed: dict[str, Any] | None = None  # a save_kill waiting for the next save
        self._children: dict[int, tuple[int, int]] = {}  # process id -> (pid, start time)
        self._log = open(log_path, "w")
        cmd = [
            sys.executable, "-m", "launch.local_cluster", f"--num_processes={topology[0]}",
            f"--devices_per_process={topology[1]}", f"--grace_seconds={FLAGS.grace_seconds}",
            "--", *launcher_args,
        ]  # fmt: skip
        self._log.write("$ " + " ".join(cmd) + "\n")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        # A session of its own: the storm can kill the attempt's whole process group.
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        stat = _stat(self.proc.pid)
        self._born = stat[2] if stat else 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    # Reading: every line is stamped with the storm's clock when it arrives.
    def _read(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            t = self.storm.clock()
            line = raw.decode(errors="replace").rstrip("\n")
            self._log.write(f"[{t:9.3f}] {line}\n")
            if FLAGS.show_output:
                print(line, flush=True)
            with self._lock:
                if self.record["trouble"] is None and any(m in line for m in _TROUBLE):
                    self.record["trouble"] = [t, line]  # kill_after counts from here too
                if self.record["error"] is None and _ERROR.match(line):
                    self.record["error"] = line

    def _follow_events(self) -> None:
        """Feeds the launcher's new events to the record; a save_kill fires on a save start."""
        for record in self._tail.read():
            with self._lock:
                save = goodput.feed(self.record, record["t"] - self.storm.origin, record)
                if save and self._armed and self.record["fault"] is None:
                    self._inject(self._armed, save["step"])

    def _discover(self) -> None:
        """Finds the launcher processes (children of local_cluster) by their --process_id."""
        if len(self._children) == self.processes:
            return
        for pid in _pids():
            stat = _stat(pid)
            if stat and stat[0] == self.proc.pid:
                index = _process_id(pid)
                if index is not None:
                    self._children[index] = (pid, stat[2])

    def _signal_child(self, index: int, sig: int) -> bool:
        pid, born = self._children.get(index, (None, None))
        stat = _stat(pid) if pid else None
        if stat is None or stat[2] != born:  # gone, or the pid now belongs to another process
            return False
        os.kill(pid, sig)
        return True

    def _inject(self, plan: dict[str, Any], save_step: int | None = None) -> None:
        """Sends the planned fault now (caller holds the lock)."""
        t = self.storm.clock()
        kind = plan["kind"]
        target = int(plan["draw"] * self.processes)
        if kind == "resize":
            self.proc.send_signal(signal.SIGTERM)  # local_cluster forwards it to every process
            nxt = self.storm.topologies[
                (self.storm.topology_index + 1) % len(self.storm.topologies)
            ]
            label = f"resize {self.record['topology']}->{nxt[0]}x{nxt[1]}"
            delivered, target = True, "all"
        else:
            sig = signal.SIGTERM if kind == "preempt" else signal.SIGKILL
            delivered = self._signal_child(target, sig)
            label = {"preempt": "SIGTERM", "host_loss": "SIGKILL", "save_kill": "SIGKILL"}[kind]
            label += f" p{target}"
            if save_step is not None:
                label += f" in save of {save_step}"
        fault = {
            "kind": kind,
            "t": t,
            "due": plan["due"],
            "target": target,
            "label": label,
            "delivered": delivered,
            "save_step": save_step,
            "attempt": self.record["index"],
            "step_logged": goodput.furthest_step(self.record, t),
        }
        self.record["fault"] = fault
        self._armed = None
        self.storm.injected(fault)
        _say(f"fault {len(self.storm.faults)} at {t:.1f}s: {label} (attempt {fault['attempt']})")

    def _maybe_fault(self) -> None:
        with self._lock:
            plan = self.storm.plan
            if plan is None or self.record["fault"] is not None or self._armed is not None:
                return
            if self.storm.clock() < plan["due"] or not goodput.training(self.record):
                return
            if plan["kind"] == "save_kill":
                self._armed = plan  # the reader kills on the next "checkpoint ... started"
            else:
                self._inject(plan)

    def _ours(self) -> list[int]:
        """Live processes of this attempt: in its process groups and started after it."""
        groups = {self.proc.pid} | {pid for pid, _ in self._children.values()}
        found = []
        for pid in _pids():
            stat = _stat(pid)
            if stat and stat[1] in groups and stat[2] >= self._born:
                found.append(pid)
        return found

    def kill_everything(self) -> int:
        killed = 0
        for _ in range(50):
            pids = self._ours()
            if not pids:
                break
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
                except ProcessLookupError:
                    pass
            time.sleep(0.1)
        return killed

    def run(self) -> dict[str, Any]:
        while self.proc.poll() is None:
            self._discover()
            self._follow_events()
            if self.faults:
                self._maybe_fault()
            fault, trouble = self.record["fault"], self.record["trouble"]
            since = fault["t"] if fault else (trouble[0] if trouble else None)
            if since is not None and not self.record["forced_kill"]:
                if self.storm.clock() - since > FLAGS.kill_after:
                    what = "its fault" if fault else "a failure"
                    _say(f"attempt {self.record['index']} outlived {what}; killing it")
                    self.record["forced_kill"] = True
                    self.kill_everything()
            time.sleep(0.05)
        self.record["end"] = self.storm.clock()
        leftovers = self.kill_everything()  # a launcher that outlived local_cluster
        if leftovers:
            self.record["forced_kill"] = True
        self._reader.join(timeout=30)
        self._follow_events()
        self._log.close()
        code = self.proc.returncode
        self.record["status"] = 128 - code if code < 0 else code
        return self.record


# --- checking the result ------------------------------------------------------------------


def _load_state(workdir: str, step: int) -> dict[str, Any]:
    """The saved state of `step` as {path: numpy array}, whatever topology wrote it."""
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    # Reading needs no accelerator. The environment variable is no use here: jax is already
    # imported (launch.checkpointing), and the attempts' processes must not inherit it.
    if jax.config.jax_platforms != "cpu":
        jax.config.update("jax_platforms", "cpu")

    state = checkpointing.read_numpy(os.path.join(workdir, "checkpoints", str(step), "state"))
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _relative(a: dict, b: dict, prefix: str) -> float:
    import numpy as np  # pylint: disable=g-import-not-at-top

    keys = [k for k in a if k.startswith(prefix)]
    diff = sum(float(np.sum((a[k].astype(np.float64) - b[k]) ** 2)) for k in keys)
    norm = sum(float(np.sum(a[k].astype(np.float64) ** 2)) for k in keys)
    return (diff / norm) ** 0.5 if norm else 0.0


def _compare(a: dict, b: dict) -> dict[str, Any]:
    import numpy as np  # pylint: disable=g-import-not-at-top

    if a.keys() != b.keys():
        return {"same_structure": False, "identical": False}
    params = [k for k in a if k.startswith("['params']")]
    return {
        "same_structure": True,
        "identical": all(np.array_equal(a[k], b[k]) for k in a),
        "param_rel_l2": _relative(a, b, "['params']"),
        "batch_stats_rel_l2": _relative(a, b, "['batch_stats']"),
        "param_max_abs": max((float(np.max(np.abs(a[k] - b[k]))) for k in params), default=0.0),
        "same_step": bool(np.array_equal(a["['step']"], b["['step']"])),
    }


def check(
    reference_dir: str,
    storm_dir: str,
    topology: str,
    param_rtol: float = 0.2,
    top1_atol: float = 0.02,
    loss_rtol: float = 0.2,
    loss_atol: float = 0.005,
) -> dict[str, Any]:
    """Is the faulted run's result the uninterrupted run's?

    Every checkpoint both runs kept from before the faulted run first left `topology` (the
    reference's) must be bit-identical; so must the final state and eval figures if it never
    left. After a topology change the cross-host summation order differs and small-batch
    training amplifies one-ulp differences, so the final state and eval figures must be
    within the tolerances instead (docs/measurements.md has the measurements behind them).
    """
    finished = {}
    for name, workdir in (("reference", reference_dir), ("storm", storm_dir)):
        with open(os.path.join(workdir, "FINISHED")) as f:
            finished[name] = json.load(f)
    ref, got = finished["reference"], finished["storm"]
    history = got["topology_history"]
    layouts = [f"{t['processes']}x{t['devices_per_process']}" for t in history]
    left_at = 0  # the last step trained on the reference's topology only
    if layouts[0] == topology:
        left_at = history[1]["from_step"] if len(history) > 1 else got["step"]
    # Step by step, before the first change: bit for bit.
    prefix = []
    for step in sorted(
        set(checkpointing.committed_steps(reference_dir))
        & set(checkpointing.committed_steps(storm_dir))
    ):
        if step <= left_at and step != got["step"]:
            same = _compare(_load_state(reference_dir, step), _load_state(storm_dir, step))
            prefix.append({"step": step, "identical": same["identical"]})
    final = _compare(_load_state(reference_dir, ref["step"]), _load_state(storm_dir, got["step"]))
    d_top1 = abs(ref["eval"]["eval/top1"] - got["eval"]["eval/top1"])
    # The loss as numpy's isclose compares: relative, with an absolute slack for a loss near 0
    # (0.015 against 0.018 is 20% apart, and the same model).
    d_loss_abs = abs(ref["eval"]["eval/loss"] - got["eval"]["eval/loss"])
    d_loss = d_loss_abs / ref["eval"]["eval/loss"]
    result: dict[str, Any] = {
        "steps": [ref["step"], got["step"]],
        "topologies": layouts,
        "first_topology_until_step": left_at,
        "checkpoints_before_change": prefix,
        "checkpoints_before_change_identical": all(p["identical"] for p in prefix),
        "bit_identical_state": final["identical"],
        **{k: v for k, v in final.items() if k not in ("identical", "same_step")},
        "eval_reference": ref["eval"],
        "eval_storm": got["eval"],
        "eval_identical": ref["eval"] == got["eval"],
        "eval_top1_diff": d_top1,
        "eval_loss_diff": d_loss_abs,
        "eval_loss_rel_diff": d_loss,
    }
    ok = ref["step"] == got["step"] and result["checkpoints_before_change_identical"]
    if layouts == [topology]:
        result["rule"] = "bit-identical (the topology never changed)"
        result["ok"] = bool(ok and final["identical"] and result["eval_identical"])
    else:
        result["rule"] = (
            f"bit-identical up to step {left_at} (the first topology change), then within "
            f"tolerance: param_rel_l2 <= {param_rtol}, |top1 diff| <= {top1_atol}, eval loss "
            f"diff <= {loss_atol} + {loss_rtol} x the reference's"
        )
        result["ok"] = bool(
            ok
            and final["same_structure"]
            and final["same_step"]
            and final["param_rel_l2"] <= param_rtol
            and d_top1 <= top1_atol
            and d_loss_abs <= loss_atol + loss_rtol * abs(ref["eval"]["eval/loss"])
        )
    return result


def check_resumes(attempts: list[dict[str, Any]]) -> dict[str, Any]:
    """Every attempt resumed from the newest committed checkpoint on disk when it started."""
    problems = []
    for a in attempts:
        newest = max(a["committed_at_spawn"], default=0)
        logged = a["resumed_from"]
        if not goodput.training(a) and logged == 0:
            continue  # stopped before it restored anything: nothing to check
        if logged != newest or (logged and logged not in a["committed_at_spawn"]):
            problems.append(
                f"attempt {a['index']} resumed from {logged}, newest committed was {newest}"
            )
    return {"ok": not problems, "problems": problems}


# --- the whole storm ----------------------------------------------------------------------


class LoadSampler:
    """The 1-minute load average every 15 s: how busy the machine was while we measured."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(15.0):
            self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        self._stop.set()
        values = self.samples or [os.getloadavg()[0]]
        return {"mean": round(sum(values) / len(values), 2), "max": round(max(values), 2)}


def _topology(text: str) -> tuple[int, int]:
    processes, devices = text.lower().split("x")
    return int(processes), int(devices)


def _fail(status: int, message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


def _launcher_args(argv: list[str], workdir: str) -> list[str]:
    given = {a.split("=", 1)[0] for a in argv}
    defaults = [d for d in LAUNCHER_DEFAULTS if d.split("=", 1)[0] not in given]
    config = [a for a in argv if a.startswith("--config=")]  # overrides must come after it
    rest = [a for a in argv if not a.startswith("--config=")]
    return [*config, *defaults, *rest, f"--workdir={workdir}"]


def run_until_finished(
    storm: Storm, workdir: str, args: list[str], logs: str, name: str, faults: bool
) -> list[dict[str, Any]]:
    attempts = []
    current: list[Attempt] = []

    def stop(signum, _frame):  # the storm itself is stopped: leave nothing running
        for attempt in current:
            attempt.kill_everything()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    tail = events.Tail(workdir)
    while True:
        if len(attempts) >= FLAGS.max_attempts:
            _fail(3, f"{name}: no success in {FLAGS.max_attempts} attempts")
        topology = storm.topologies[storm.topology_index]
        committed = checkpointing.committed_steps(workdir)
        index = len(attempts)
        log = os.path.join(logs, f"{name}-{index:02d}.log")
        _say(f"{name} attempt {index} on {topology[0]}x{topology[1]} (log {log})")
        attempt = Attempt(storm, index, topology, args, log, faults, tail)
        current[:] = [attempt]
        record = attempt.run()
        record["committed_at_spawn"] = committed
        record["committed_at_end"] = checkpointing.committed_steps(workdir)
        record["resume_next"] = max(record["committed_at_end"], default=0)
        attempts.append(record)
        _say(
            f"{name} attempt {index} ended at {record['end']:.1f}s with status {record['status']}"
            f" (resumed from {record['resumed_from']}, newest checkpoint {record['resume_next']})"
        )
        if record["status"] == 0:
            return attempts
        if not faults:  # the reference must run clean: its time is the baseline
            _fail(3, f"{name}: the launcher exited {record['status']} (see {log})")
        if record["fault"] is None and record["status"] in (2, 3):
            _fail(3, f"{name}: the launcher exited {record['status']}, which no retry fixes")
        time.sleep(FLAGS.restart_delay)


def _cache_in_effect(launcher_args: list[str], storm_dir: str) -> dict[str, Any]:
    """Which persistent compilation cache the runs used, as far as can be seen from outside."""
    env = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    flag = [a for a in launcher_args if a.startswith("--config.train.compilation_cache_dir=")]
    default = os.path.join(storm_dir, "compilation_cache")
    files = len(os.listdir(default)) if os.path.isdir(default) else 0
    if env:
        where = f"JAX_COMPILATION_CACHE_DIR={env}"
    elif flag:
        where = flag[-1]
    elif files:
        where = "config default (WORKDIR/compilation_cache, one per run)"
    else:
        where = None
    return {
        "env_JAX_COMPILATION_CACHE_DIR": env,
        "config_flag": flag[-1] if flag else None,
        "storm_workdir_cache_files": files,
        "in_effect": where or "none seen",
    }


def main(argv):
    launcher_argv = argv[1:]
    if not FLAGS.workdir:
        _fail(2, "--workdir is required")
    if any(a.startswith("--workdir") for a in launcher_argv):
        _fail(2, "give --workdir before `--` (the storm's root), not to the launcher")
    if not any(a.startswith("--config=") for a in launcher_argv):
        _fail(2, "give the launcher's --config=... after `--`")
    try:
        lo, hi = (float(x) for x in FLAGS.fault_interval)
        topologies = [_topology(t) for t in FLAGS.topologies]
    except ValueError:
        _fail(2, "--fault_interval=lo,hi (seconds) and --topologies=PxD,... please")
    if not 0 < lo <= hi:
        _fail(2, "--fault_interval: 0 < lo <= hi")
    if len({p * d for p, d in topologies}) != 1:
        _fail(2, f"--topologies {FLAGS.topologies}: the total device count must not change")
    kinds = [k for k in FLAGS.kinds if k != "resize" or len(topologies) > 1]
    if not kinds or any(k not in KINDS for k in kinds):
        _fail(2, f"--kinds: choose from {KINDS}")
    root = os.path.abspath(FLAGS.workdir)
    if os.path.isdir(root) and os.listdir(root):
        _fail(2, f"--workdir={root} is not empty; the storm starts from nothing")
    dirs = {name: os.path.join(root, name) for name in ("reference", "storm", "logs")}
    os.makedirs(dirs["logs"], exist_ok=True)
    load_before = os.getloadavg()
    load = LoadSampler()

    # 1. The uninterrupted run, on the first topology.
    quiet = Storm(None, topologies[:1])
    reference = run_until_finished(
        quiet, dirs["reference"], _launcher_args(launcher_argv, dirs["reference"]),
        dirs["logs"], "reference", faults=False,
    )  # fmt: skip

    load_reference = load.summary()
    load = LoadSampler()

    # 2. The same run through the storm.
    schedule = Schedule(FLAGS.seed, (lo, hi), kinds, FLAGS.max_faults)
    storm = Storm(schedule, topologies)
    attempts = run_until_finished(
        storm, dirs["storm"], _launcher_args(launcher_argv, dirs["storm"]), dirs["logs"],
        "storm", faults=True,
    )  # fmt: skip
    load_after = os.getloadavg()
    load_storm = load.summary()

    # 3. The report.
    summary = goodput.summarize(
        attempts,
        reference[0],
        goodput.on_storm_clock(events.read(dirs["storm"]), storm.origin),
        goodput.on_storm_clock(events.read(dirs["reference"]), quiet.origin),
    )
    counts = {k: sum(f["kind"] == k for f in storm.faults) for k in KINDS}
    first = f"{topologies[0][0]}x{topologies[0][1]}"
    correct = check(
        dirs["reference"],
        dirs["storm"],
        first,
        FLAGS.param_rtol,
        FLAGS.top1_atol,
        FLAGS.loss_rtol,
        FLAGS.loss_atol,
    )
    resumes = check_resumes(attempts)
    torn = [
        {"step": f["save_step"], "committed_after": f["save_step"] in a["committed_at_end"]}
        for a in attempts
        if (f := a["fault"]) and f["kind"] == "save_kill"
    ]
    report = {
        "command": " ".join([sys.executable, "-m", "tools.faults.storm", *sys.argv[1:]]),
        "launcher_args": launcher_argv,
        "seed": FLAGS.seed,
        "fault_interval_s": [lo, hi],
        "topologies": FLAGS.topologies,
        "kinds": kinds,
        "machine": {
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "load1_during_reference": load_reference,
            "load1_during_storm": load_storm,
        },
        "compilation_cache": _cache_in_effect(launcher_argv, dirs["storm"]),
        "steps": correct["steps"][0],
        "goodput": round(summary["goodput"], 4),
        **{k: v for k, v in summary.items() if k not in ("goodput", "per_attempt")},
        "faults": counts,
        "restarts": len(attempts) - 1,
        "fault_mean_interval_s": summary["wall_s"] / max(len(storm.faults), 1),
        "forced_kills": sum(a["forced_kill"] for a in attempts),
        "unplanned_failures": [
            {"attempt": a["index"], "status": a["status"], "error": a["error"]}
            for a in attempts
            if a["status"] != 0 and a["fault"] is None
        ],
        "save_kills": torn,
        "correct": correct,
        "resumes": resumes,
        "ok": bool(correct["ok"] and resumes["ok"]),
        "fault_list": storm.faults,
        "per_attempt": summary["per_attempt"],
        "attempts": attempts,
        "reference_attempt": reference[0],
    }
    report["chart"] = os.path.join(root, "fault_storm.png")
    try:
        title = (
            f"goodput {summary['goodput']:.1%}: {len(storm.faults)} faults "
            f"({', '.join(f'{v} {k}' for k, v in counts.items() if v)}), "
            f"{len(attempts) - 1} restarts; one fault every {lo:g}-{hi:g} s"
        )
        goodput.chart(report["chart"], attempts, reference[0], summary["per_attempt"], title)
    except ImportError as e:
        report["chart"] = None
        _say(f"no chart: {e} (pip install matplotlib)")
    with open(os.path.join(root, "fault_storm.json"), "w") as f:
        json.dump(report, f, indent=1)
    brief = {
        k: report[k]
        for k in (
            "goodput", "wall_s", "productive_s", "vs_reference", "badput_fraction", "faults",
            "restarts", "ok",
        )
    }  # fmt: skip
    brief["correct"] = {k: correct[k] for k in ("rule", "ok", "param_rel_l2", "eval_top1_diff")}
    _say(f"report: {os.path.join(root, 'fault_storm.json')}, chart: {report['chart']}")
    print(json.dumps(brief))
    sys.exit(0 if report["ok"] else 1)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
