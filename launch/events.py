"""Structured events: what each process of a run did and when, as JSON lines in the workdir.

Every launcher process appends to `WORKDIR/events/p<process>.jsonl` (local workdirs; on
object stores, which cannot append, each attempt keeps its own file, rewritten whole as it
grows). Each line is one event:

    {"t": 1796414400.12, "event": "save_started", "process": 0, "attempt": "...", "step": 50, ...}

`t` is wall-clock time (time.time()), `attempt` identifies one launcher start (the same on
every process of it), and the other fields depend on the event:

| event              | fields                                                              |
|--------------------|---------------------------------------------------------------------|
| `attempt_started`  | `topology` ("PxD"), `pid`, `process_start` (wall time the process   |
|                    | began: start-up counts from there)                                  |
| `phase_ended`      | `phase` (distributed, data, restore or init, compile_wait,          |
|                    | host_wait), `seconds`                                               |
| `startup`          | `figures` ({"startup/..._s": seconds}): every host is training;     |
|                    | `programs`: [name, how it came] per compiled program ("compiled",   |
|                    | "read ahead", "loaded", "from process N"; launch.executables)       |
| `resumed`          | `step` (0 for a fresh start), `from_topology` or null               |
| `progress`         | `step`: the loop completed this step (at log intervals)             |
| `save_started`     | `step`, `blocked_s`: how long the loop waited for the save to start |
| `save_committed`   | `step`, `seconds`: from start to commit (as the loop first saw it)  |
| `interval`         | `step`, `steps` (the automatic checkpoint interval from here),      |
|                    | `seconds`, `optimum_s`, `bounds_s` and its inputs (`launch.interval`)|
| `stop_agreed`      | `step`, `reason`: this host's stop request ("SIGTERM caught"), or   |
|                    | "another host"                                                      |
| `eval`             | `step` and the eval figures (`eval/loss`, `eval/top1`, ...)         |
| `checkpoint_rejected` | `step`, `reason` (checkpointing.REASONS): moved aside at restore |
| `fault`            | `kind` (sigterm, sigint, ...) when the process learns of one        |
| `attempt_ended`    | `status` (an ExitStatus value), `outcome` (its name)                |

Nothing is written before the run is sure to train (after the restore): a refused start
leaves the workdir as it was, and the start-up phases so far are emitted then. An attempt
with no `attempt_ended` on some process was killed (SIGKILL, a lost host, a stall or a
preemption deadline, which exit at once): its last event bounds when. These files are the
contract between the launcher and the tools that measure it (goodput, benchmarks, tests);
the log's wording is free to change.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from absl import logging
from etils import epath

FOLDER = "events"


def new_attempt_id() -> str:
    """One id for a launcher start; process 0 makes it and the others receive it."""
    return f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"


class EventLog:
    """Appends this process's events; safe to call from any thread."""

    def __init__(self, workdir: str, process: int, attempt: str):
        self._folder = epath.Path(workdir) / FOLDER
        self._process = process
        self._attempt = attempt
        self._lock = threading.Lock()
        self._local = "://" not in workdir
        name = f"p{process}.jsonl" if self._local else f"p{process}-{attempt}.jsonl"
        self.path = self._folder / name
        self._lines: list[str] = []  # object stores: the whole file, rewritten
        self.records: list[dict[str, Any]] = []  # this process's events of this attempt

    def emit(self, event: str, **fields: Any) -> None:
        record = {"t": time.time(), "event": event, "process": self._process}
        record["attempt"] = self._attempt
        record.update(fields)
        line = json.dumps(record, sort_keys=True) + "\n"
        with self._lock:
            self.records.append(record)
            try:
                self._write(line)
            except OSError as e:  # events are not worth a run; a full disk stops the next save
                logging.error("Could not write %s: %s", self.path, e)

    def _write(self, line: str) -> None:
        self._folder.mkdir(parents=True, exist_ok=True)
        if self._local:
            with open(self.path, "a") as f:
                f.write(line)
        else:
            self._lines.append(line)
            self.path.write_text("".join(self._lines))


class NullLog:
    """Records nothing: for callers with no workdir (benchmarks, in-process tests)."""

    path = None
    records: list[dict[str, Any]] = []

    def emit(self, event: str, **fields: Any) -> None:
        del event, fields


def read(workdir: str) -> list[dict[str, Any]]:
    """Every event of every process and attempt in `workdir`, in time order.

    A torn last line (a process killed mid-write) is skipped.
    """
    folder = epath.Path(workdir) / FOLDER
    if not folder.exists():
        return []
    records = [r for path in sorted(folder.glob("p*.jsonl")) for r in _lines(path)]
    return sorted(records, key=lambda r: (r["t"], r["process"]))


def _lines(path: epath.Path) -> Iterator[dict[str, Any]]:
    for line in path.read_bytes().decode(errors="replace").splitlines():
        record = _record(line)
        if record is not None:
            yield record


def _record(line: str) -> dict[str, Any] | None:
    """The event on `line`; None for a torn, damaged or foreign line (skipped, not an error)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("event"), str)
    timed = ok and isinstance(record.get("t"), (int, float)) and not isinstance(record["t"], bool)
    return record if timed and isinstance(record.get("process"), int) else None


def attempts(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Events grouped by attempt, attempts in the order they started."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(record.get("attempt", ""), []).append(record)
    return grouped


def local_path(workdir: str, process: int) -> str:
    return os.path.join(workdir, FOLDER, f"p{process}.jsonl")


def process_start_time() -> float:
    """Wall time at which this process started (Linux: from /proc), else now."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return time.time()


class Tail:
    """The events appended to a local workdir's files since the previous call: for a watcher
    (tools.faults.storm) that acts on them as they happen. Only whole lines are returned."""

    def __init__(self, workdir: str):
        self._folder = os.path.join(workdir, FOLDER)
        self._offsets: dict[str, int] = {}

    def read(self) -> list[dict[str, Any]]:
        if not os.path.isdir(self._folder):
            return []
        records: list[dict[str, Any]] = []
        for name in sorted(os.listdir(self._folder)):
            if name.startswith("p") and name.endswith(".jsonl"):
                records.extend(self._new(os.path.join(self._folder, name)))
        return sorted(records, key=lambda r: (r["t"], r["process"]))

    def _new(self, path: str) -> Iterator[dict[str, Any]]:
        with open(path, "rb") as f:
            f.seek(self._offsets.get(path, 0))
            data = f.read()
        whole = data[: data.rfind(b"\n") + 1]
        self._offsets[path] = self._offsets.get(path, 0) + len(whole)
        for line in whole.decode(errors="replace").splitlines():
            record = _record(line)
            if record is not None:
                yield record


def agree_attempt_id(timeout_s: float) -> str:
    """Process 0's new attempt id, on every process (through the coordination service)."""
    from launch import distributed  # pylint: disable=g-import-not-at-top  # readers need no jax

    return distributed.from_process_0(
        "resnet_multihost/attempt_id", new_attempt_id, "this start's attempt id", timeout_s
    )


_current: EventLog | NullLog = NullLog()


def start(log: EventLog) -> EventLog:
    """Makes `log` this process's: `current()` returns it (the exit path emits through it)."""
    global _current
    _current = log
    return log


def current() -> EventLog | NullLog:
    """This process's event log, once the run has started one; else a NullLog."""
    return _current


def begin_attempt(workdir: str, topology: str, timeout_s: float):
    """This process's log for a new attempt (`attempt_started` emitted), and on process 0 the
    workdir's earlier events (what the live goodput and the fault rate start from)."""
    import jax  # pylint: disable=g-import-not-at-top

    attempt = agree_attempt_id(timeout_s)
    # Another process may have begun this attempt already: its events are not earlier ones.
    past = read(workdir) if jax.process_index() == 0 else []
    past = [r for r in past if r.get("attempt") != attempt]
    log = start(EventLog(workdir, jax.process_index(), attempt))
    log.emit(
        "attempt_started", topology=topology, pid=os.getpid(), process_start=process_start_time()
    )
    return log, past


def latest(workdir: str, event: str, process: int = 0) -> dict[str, Any] | None:
    """The newest `event` that `process` recorded in `workdir`, or None."""
    found = [r for r in read(workdir) if r["event"] == event and r["process"] == process]
    return found[-1] if found else None
