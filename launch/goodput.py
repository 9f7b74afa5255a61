"""Goodput and badput of a run across its restarts, as pure functions of its events.

The events (`launch.events`) of every attempt in a workdir are summarized per attempt
(`summarize`), and the wall time from the first attempt's start to `now` is split (`account`)
into productive time and badput, named after Google's ml-goodput-measurement badput types:

| bucket                                     | what                                             |
|--------------------------------------------|--------------------------------------------------|
| `program_startup`                          | process start to every host training: the first  |
|                                            | step dispatched (their TPU initialization,       |
|                                            | training prep and program start-up), less the    |
|                                            | restore                                          |
| `unproductive_checkpoint_restore_time`     | the restore phase                                |
| `unproductive_checkpoint_save_time`        | the loop's stall per save (`blocked_s`), in kept |
|                                            | progress                                         |
| `wasted_progress_from_disruption`          | training after the step the next attempt resumed |
|                                            | from, up to the fault: trained again             |
| `infrastructure_recovery_from_disruption`  | from the fault (or the kept save) to the next    |
|                                            | attempt's start: shutdown and the supervisor     |

Productive time is the kept training (the loop until the step the next attempt resumed from,
or until now for the last attempt; evals included) less the save stalls in it. The buckets
and the productive time add up to the wall time exactly. `launch.train` writes these live
(process 0, at log intervals); `tools.faults.storm` uses them with its own, exact, spawn and
fault times.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from typing import Any

from launch import interval
from launch.status import ExitStatus

STARTUP = "program_startup"
RESTORE = "unproductive_checkpoint_restore_time"
SAVE = "unproductive_checkpoint_save_time"
WASTED = "wasted_progress_from_disruption"
RECOVERY = "infrastructure_recovery_from_disruption"
BUCKETS = (STARTUP, RESTORE, SAVE, WASTED, RECOVERY)


@dataclasses.dataclass
class Attempt:
    """One launcher start, from the events of all its processes."""

    id: str
    start: float  # the earliest process start of the attempt
    end: float  # its last event (the storm sets the process exit)
    topology: str | None = None
    loop: float | None = None  # every host is training (the `startup` event's first dispatch)
    restore_s: float = 0.0
    resumed: int | None = None  # the step it resumed from (0: a fresh start)
    points: list[tuple[float, int]] = dataclasses.field(default_factory=list)
    saves: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
    commits: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)
    faults: list[tuple[float, str]] = dataclasses.field(default_factory=list)
    status: int | None = None  # None: some process never ended (killed)
    stop_step: int | None = None  # the step the hosts agreed to stop at
    startup_figures: dict[str, float] | None = None
    fault_t: float | None = None  # the storm's exact fault time, when it injected one

    @property
    def fault_time(self) -> float:
        """When the attempt stopped making progress for good: its fault, else its end."""
        if self.fault_t is not None:
            return min(self.fault_t, self.end)
        return min([t for t, _ in self.faults] + [self.end])

    @property
    def interrupted(self) -> bool:
        """Killed, or ended with a retriable status (preempted, stalled)."""
        if self.status is None:
            return True
        try:
            return ExitStatus(self.status).retriable
        except ValueError:
            return self.status > 128  # killed by a signal

    def furthest_step(self, before: float | None = None) -> int:
        steps = [s for t, s in self.points if before is None or t <= before]
        return max(steps, default=self.resumed or 0)


def summarize(records: list[dict[str, Any]]) -> list[Attempt]:
    """Attempts in the order they started, from every process's events (time-ordered)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in filter(_well_formed, records):
        grouped.setdefault(str(record.get("attempt", "")), []).append(record)
    attempts = [_attempt(attempt_id, rs) for attempt_id, rs in grouped.items()]
    return sorted(attempts, key=lambda a: a.start)


_NEEDS: dict[str, dict[str, Any]] = {
    "attempt_ended": {"status": int},
    "phase_ended": {"seconds": (int, float)},
    "resumed": {"step": int},
    "progress": {"step": int},
    "save_started": {"step": int, "blocked_s": (int, float)},
    "stop_agreed": {"step": int},
    "save_committed": {"step": int, "seconds": (int, float)},
}


def _well_formed(record: dict[str, Any]) -> bool:
    """A record with the fields its event needs (a hand-edited or foreign line is skipped)."""
    if not isinstance(record.get("attempt"), str) or not isinstance(record.get("process"), int):
        return False
    needs = _NEEDS.get(str(record.get("event")), {})
    fields = [record.get("t"), *(record.get(k) for k in needs)]
    kinds = [(int, float), *needs.values()]
    return all(isinstance(v, kind) and math.isfinite(v) for v, kind in zip(fields, kinds))


def _attempt(attempt_id: str, records: list[dict[str, Any]]) -> Attempt:
    starts = [r.get("process_start", r["t"]) for r in records if r["event"] == "attempt_started"]
    a = Attempt(attempt_id, min(starts or [records[0]["t"]]), max(r["t"] for r in records))
    started: set[int] = set()
    ended: dict[int, int] = {}
    for r in records:
        _apply(a, r, started, ended)
    if started and started <= set(ended):
        a.status = ended.get(0, max(ended.values()))
    if not a.resumed:
        a.restore_s = 0.0  # a fresh start restores nothing (its "init" phase is start-up)
    a.points.sort()
    return a


def _apply(a: Attempt, r: dict[str, Any], started: set, ended: dict) -> None:
    kind, t = r["event"], r["t"]
    if kind == "attempt_started":
        started.add(r["process"])
        a.topology = a.topology or r.get("topology")
    elif kind == "attempt_ended":
        ended[r["process"]] = int(r["status"])
    elif kind == "phase_ended" and r.get("phase") == "restore":
        a.restore_s = max(a.restore_s, float(r["seconds"]))
    elif kind == "resumed" and a.resumed is None:
        a.resumed = int(r["step"])
    elif kind == "startup" and a.loop is None:
        a.loop, a.startup_figures = training_began(r), r.get("figures")
    elif kind in ("progress", "save_started", "stop_agreed"):
        a.points.append((t, int(r["step"])))
        if kind == "save_started" and int(r["step"]) not in a.saves:
            a.saves[int(r["step"])] = (t, float(r.get("blocked_s", 0.0)))
        if kind == "stop_agreed" and a.stop_step is None:
            a.stop_step = int(r["step"])
    elif kind == "save_committed" and int(r["step"]) not in a.commits:
        a.commits[int(r["step"])] = (t, float(r.get("seconds", 0.0)))
    elif kind == "fault":
        a.faults.append((t, str(r.get("kind", "unknown"))))


def training_began(startup: dict[str, Any]) -> float:
    """When the attempt began training, from its `startup` event: the event comes once the
    first step is done; training began at that step's dispatch (`training_since`; every host
    dispatches it just after the same barrier). The event's own time where that is missing."""
    since, t = startup.get("training_since"), startup["t"]
    return float(since) if isinstance(since, (int, float)) and since <= t else t


def reach_time(attempt: Attempt, step: int) -> float | None:
    """When the attempt reached `step`: its save's start if it saved it, else linear between
    progress points (the loop start is the resume step); None if it never did."""
    if step in attempt.saves:
        return attempt.saves[step][0]
    points = ([(attempt.loop, attempt.resumed or 0)] if attempt.loop is not None else []) + [
        p for p in attempt.points if attempt.loop is None or p[0] >= attempt.loop
    ]
    if not points or step > max(s for _, s in points) or step < points[0][1]:
        return None
    steps = [s for _, s in points]
    i = bisect.bisect_left(steps, step)
    if steps[i] == step or i == 0:
        return points[i][0]
    (t0, s0), (t1, s1) = points[i - 1], points[i]
    return t0 + (t1 - t0) * (step - s0) / (s1 - s0)


def kept_step(attempts: list[Attempt], index: int) -> int | None:
    """The step a later attempt resumed from (the progress of attempt `index` that counted)."""
    for later in attempts[index + 1 :]:
        if later.resumed is not None:
            return later.resumed
    return None


def account(attempts: list[Attempt], now: float | None = None) -> dict[str, Any]:
    """Wall time from the first start to `now` (default: the last attempt's end) split into
    productive time and the badput buckets; per attempt rows too."""
    if not attempts:
        return {"wall_s": 0.0, "productive_s": 0.0, "badput_s": dict.fromkeys(BUCKETS, 0.0)}
    end = attempts[-1].end if now is None else now
    totals = dict.fromkeys(("productive",) + BUCKETS, 0.0)
    rows = []
    for i, a in enumerate(attempts):
        last = i + 1 == len(attempts)
        row = _split(a, attempts[i + 1].start if not last else end, kept_step(attempts, i), last)
        for key in totals:
            totals[key] += row[key]
        rows.append(row)
    wall = end - attempts[0].start
    return {
        "wall_s": wall,
        "productive_s": totals["productive"],
        "goodput": totals["productive"] / wall if wall > 0 else 0.0,
        "badput_s": {k: totals[k] for k in BUCKETS},
        "per_attempt": rows,
    }


def _split(a: Attempt, until: float, kept: int | None, last: bool) -> dict[str, Any]:
    """One attempt's time from its start to `until` (the next start, or now)."""
    row: dict[str, Any] = dict.fromkeys(("productive",) + BUCKETS, 0.0)
    row.update(attempt=a.id, topology=a.topology, status=a.status, resumed=a.resumed)
    stop = min(a.fault_time, until) if not last else until
    loop = a.loop
    if loop is None or loop >= stop:
        row[RESTORE] = min(a.restore_s, stop - a.start) if loop is not None else 0.0
        row[STARTUP] = stop - a.start - row[RESTORE]
        kept_until = stop
    else:
        row[RESTORE] = min(a.restore_s, max(loop - a.start, 0.0))
        row[STARTUP] = loop - a.start - row[RESTORE]
        kept_until = until if last else _kept_until(a, kept, loop)
        stalls = sum(b for t, b in a.saves.values() if loop <= t <= kept_until)
        row[SAVE] = min(stalls, kept_until - loop)
        row["productive"] = kept_until - loop - row[SAVE]
        row[WASTED] = max(0.0, stop - kept_until)
    row[RECOVERY] = max(0.0, until - max(stop, kept_until))
    row["kept_until"] = kept_until
    return row


def _kept_until(a: Attempt, kept: int | None, loop: float) -> float:
    """When the attempt reached the step that counted; the loop start if it never did (an
    older checkpoint came back), its end if no later attempt says."""
    if kept is None:
        return a.end
    reached = reach_time(a, kept)
    return min(max(reached if reached is not None else loop, loop), a.end)


def fractions(accounting: dict[str, Any]) -> dict[str, float]:
    """goodput/... and badput/... fractions of the wall time: the live scalars."""
    wall = accounting["wall_s"]
    if wall <= 0:
        return {}
    values = {"goodput/goodput_fraction": accounting["productive_s"] / wall}
    for key, seconds in accounting["badput_s"].items():
        values[f"goodput/badput_{key}_fraction"] = seconds / wall
    return values


def interruptions(attempts: list[Attempt], current: str | None = None) -> list[dict[str, Any]]:
    """Every fault the workdir's attempts record: killed (no attempt_ended on some process) or
    ended with a retriable status; each with its time and kind. `current` (running) is not."""
    found = []
    for a in attempts:
        if a.id == current or not a.interrupted:
            continue
        kind = a.faults[0][1] if a.faults else ("killed" if a.status is None else "stalled")
        found.append({"t": a.fault_time, "kind": kind, "attempt": a.id})
    return found


class Live:
    """Process 0's running account: the workdir's earlier attempts (read once, at start-up)
    and this attempt's own events as they are emitted (`events.EventLog.records`)."""

    def __init__(self, past_records: list[dict[str, Any]], log):
        self._past = summarize(past_records)
        self._log = log

    def attempts(self) -> list[Attempt]:
        return self._past + summarize(list(self._log.records))

    def fractions(self, now: float) -> dict[str, float]:
        return fractions(account(self.attempts(), now))

    def mtbf_seconds(self, now: float, prior_s: float) -> float:
        """The observed mean time between the workdir's faults, or the prior (launch.interval)."""
        attempts = self.attempts()
        survived = now - attempts[0].start if attempts else 0.0
        return interval.mtbf_seconds(len(interruptions(self._past)), survived, prior_s)
