"""Goodput of a run that was restarted after faults, from its attempts' logs.

`tools.faults.storm` records, for every attempt (one `launch.local_cluster` invocation), when it
was started, when it ended, the fault injected into it, and its launcher output line by line
with the time each line arrived. This module turns that into:

- events per attempt (`Events.feed`): training start, resume step, progress points, saves;
- the time accounting (`account`), in the buckets Google's ml-goodput-measurement package
  uses for disruptions: start-up (accelerator initialisation, training preparation, program
  start-up and compilation), checkpoint restore, wasted progress (steps re-done after a
  restart), and infrastructure recovery (from the fault to the restart: the dying attempt's
  shutdown and the supervisor's delay);
- the chart (`chart`): global step against wall time, each fault marked and labelled.

Times are seconds on the storm's clock (time.monotonic() when a line was read). Everything is
plain JSON-able data, so a report can be recomputed from the saved JSON.
"""

from __future__ import annotations

import bisect
import re
from typing import Any

_STEP = re.compile(r"\bstep (\d+)/(\d+)\b")
_SAVE = re.compile(r"checkpoint of step (\d+) started; the loop was blocked ([0-9.]+)s")
_RESUMED = re.compile(r"Resumed from the checkpoint of step (\d+)")
_AGREED = re.compile(r"Stop agreed by every host: saving step (\d+)")
_STARTUP = re.compile(r"Start-up: (.*)")
_FIGURE = re.compile(r"(\w+) ([0-9.]+)s\b")
_EVAL = re.compile(r"eval at step (\d+): loss ([0-9.]+)\s+top1 ([0-9.]+)")
_REJECTED = re.compile(r"Checkpoint step (\d+) is not usable \(([^)]*)\)")
_ELASTIC = re.compile(r"Resuming a (\d+)x(\d+) checkpoint on (\d+)x(\d+)")
_PROCESS = re.compile(r"^\[p(\d+)\] ")

BUCKETS = ("startup", "restore", "wasted_progress", "recovery")


def new_attempt(index: int, topology: tuple[int, int], spawn: float) -> dict[str, Any]:
    """The record of one attempt, filled in by `feed` and by the storm."""
    return {
        "index": index,
        "topology": f"{topology[0]}x{topology[1]}",
        "spawn": spawn,
        "end": None,
        "status": None,
        "startup": None,  # the launcher's "Start-up:" figures, seconds by phase
        "loop_start": None,  # when that line arrived: every host is in the training loop
        "resumed_from": 0,
        "elastic": None,  # "2x2->1x4" when the launcher logged a topology change
        "points": [],  # [time, global step]: progress lines, saves, the resume point
        "saves": [],  # [time, step, seconds the loop was blocked]
        "agreed_stop": None,  # [time, step] when the hosts agreed to stop
        "rejected": [],  # [step, reason] checkpoints the launcher moved aside
        "eval": None,
        "fault": None,
        "committed_at_spawn": [],
        "committed_at_end": [],
        "resume_next": None,  # the newest committed step when the attempt ended
        "forced_kill": False,
    }


def feed(attempt: dict[str, Any], t: float, line: str) -> dict[str, Any] | None:
    """Updates `attempt` with one output line read at time `t`; returns the save it announces
    ({"step": N}) so that the caller can act on it at once, else None."""
    match = _PROCESS.match(line)
    process = int(match.group(1)) if match else None
    if process is None:
        return None  # local_cluster's own lines carry no training events
    if m := _STEP.search(line):
        _add_point(attempt, t, int(m.group(1)))
    elif m := _SAVE.search(line):
        step = int(m.group(1))
        if not any(s[1] == step for s in attempt["saves"]):
            attempt["saves"].append([t, step, float(m.group(2))])
            _add_point(attempt, t, step)
        return {"step": step, "process": process}
    elif m := _RESUMED.search(line):
        attempt["resumed_from"] = int(m.group(1))
    elif m := _ELASTIC.search(line):
        attempt["elastic"] = f"{m.group(1)}x{m.group(2)}->{m.group(3)}x{m.group(4)}"
    elif m := _AGREED.search(line):
        if attempt["agreed_stop"] is None:
            attempt["agreed_stop"] = [t, int(m.group(1))]
            _add_point(attempt, t, int(m.group(1)))
    elif m := _STARTUP.search(line):
        if attempt["startup"] is None:
            figures = {k: float(v) for k, v in _FIGURE.findall(m.group(1))}
            attempt["startup"] = figures
            # The line comes once the loop's first few steps (launch.train.LAG + 1) have
            # completed on every host: they need every host, so this is when all are training.
            # Those steps count as start-up (their first_step_s also holds the wait for the
            # slowest host's compilation, which is not training).
            attempt["loop_start"] = t
    elif m := _EVAL.search(line):
        attempt["eval"] = {"step": int(m.group(1)), "loss": float(m.group(2))}
        attempt["eval"]["top1"] = float(m.group(3))
    elif m := _REJECTED.search(line):
        entry = [int(m.group(1)), m.group(2)]
        if entry not in attempt["rejected"]:
            attempt["rejected"].append(entry)
    return None


def training(attempt: dict[str, Any]) -> bool:
    """Whether the attempt's training loop has started (its first steps completed)."""
    return attempt["loop_start"] is not None or bool(attempt["points"])


def _add_point(attempt: dict[str, Any], t: float, step: int) -> None:
    points = attempt["points"]
    if points and step <= points[-1][1]:
        return  # the same step from another process, or a save of an already logged step
    points.append([t, step])


def progress(attempt: dict[str, Any]) -> list[list[float]]:
    """[time, step] from the loop start (at the resume step) through every progress point."""
    start = attempt["loop_start"]
    if start is None and attempt["points"]:
        start = attempt["points"][0][0]
    head = [[start, attempt["resumed_from"]]] if start is not None else []
    return head + [p for p in attempt["points"] if start is None or p[0] >= start]


def reach_time(attempt: dict[str, Any], step: int) -> float | None:
    """When the attempt reached `step` (a save's own line when there is one, else linear
    between progress points); None if it never did."""
    for t, saved, _ in attempt["saves"]:
        if saved == step:
            return t
    points = progress(attempt)
    if not points or step > points[-1][1]:
        return None
    steps = [p[1] for p in points]
    i = bisect.bisect_left(steps, step)
    if i == 0 or steps[i] == step:
        return points[i][0]
    (t0, s0), (t1, s1) = points[i - 1], points[i]
    return t0 + (t1 - t0) * (step - s0) / (s1 - s0)


def furthest_step(attempt: dict[str, Any], before: float) -> int:
    """The furthest global step the attempt logged before time `before`."""
    steps = [s for t, s in progress(attempt) if t <= before]
    return max(steps, default=attempt["resumed_from"])


def account(attempts: list[dict[str, Any]]) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Splits the wall time of a restarted run into productive time and badput buckets.

    Per attempt, on the storm's clock: start-up from its spawn to its training loop (less the
    launcher's restore phase when it restored a checkpoint: that is its own bucket); kept
    progress from the loop start until it reached the step the next attempt could resume from
    (the newest committed checkpoint when it ended); wasted progress from there to the fault;
    recovery from the fault (or from the kept step, if later, as after an agreed preemption
    save) to the next spawn: the attempt's shutdown, then the supervisor's delay. An attempt
    stopped before its loop started is all start-up, then recovery. The buckets add up to the
    wall time exactly.
    """
    names = ("kept",) + BUCKETS + ("shutdown", "supervisor")
    totals = dict.fromkeys(names, 0.0)
    rows = []
    for i, a in enumerate(attempts):
        nxt = attempts[i + 1]["spawn"] if i + 1 < len(attempts) else a["end"]
        fault_t = a["fault"]["t"] if a["fault"] else a["end"]
        stop = min(fault_t, a["end"])
        loop = a["loop_start"]
        restored = a["resumed_from"] > 0 or bool(a["rejected"])
        restore = (a["startup"] or {}).get("restore", 0.0) if restored else 0.0
        row = dict.fromkeys(names, 0.0)
        kept_until = stop
        if loop is None or loop >= stop:
            row["restore"] = min(restore, stop - a["spawn"]) if loop is not None else 0.0
            row["startup"] = stop - a["spawn"] - row["restore"]
        else:
            row["restore"] = min(restore, loop - a["spawn"])
            row["startup"] = loop - a["spawn"] - row["restore"]
            if a["status"] == 0:
                kept_until = a["end"]
            else:
                step = a["resume_next"]
                reached = reach_time(a, step) if step is not None else None
                # Never reached (an older checkpoint came back): all of this attempt is lost.
                kept_until = min(max(reached if reached is not None else loop, loop), a["end"])
            row["kept"] = kept_until - loop
            row["wasted_progress"] = max(0.0, fault_t - kept_until) if a["status"] else 0.0
        row["shutdown"] = max(0.0, a["end"] - max(stop, kept_until))
        row["supervisor"] = nxt - a["end"]
        row["recovery"] = row["shutdown"] + row["supervisor"]
        for key, value in row.items():
            totals[key] += value
        rows.append(
            {
                "attempt": a["index"],
                "topology": a["topology"],
                "status": a["status"],
                "fault": a["fault"]["kind"] if a["fault"] else None,
                "to_loop_s": (loop - a["spawn"]) if loop is not None else None,
                "resumed_from": a["resumed_from"],
                "furthest_step_logged": furthest_step(a, stop),
                "next_resumes_from": a["resume_next"],
                "kept_until": kept_until,
                **row,
            }
        )
    return totals, rows


def summarize(attempts: list[dict[str, Any]], reference: dict[str, Any]) -> dict[str, Any]:
    """Goodput against the uninterrupted reference, and the badput split (seconds, fractions).

    Productive time is what the reference needed for its steps: from its training loop to its
    exit (the loop, the final eval and the final save, which every run needs). "other" is what
    the faulted run's kept progress took beyond that: slower steps on other topologies,
    machine load; negative when they ran faster. So wall = productive + every bucket.
    """
    totals, rows = account(attempts)
    wall = attempts[-1]["end"] - attempts[0]["spawn"]
    ref_wall = reference["end"] - reference["spawn"]
    ref_loop = (
        reference["loop_start"] if reference["loop_start"] is not None else reference["spawn"]
    )
    productive = reference["end"] - ref_loop
    badput = {key: totals[key] for key in BUCKETS}
    badput["other"] = totals["kept"] - productive
    phases: dict[str, float] = {}  # the launcher's own start-up figures, summed over attempts
    for a in attempts:
        for key, value in (a["startup"] or {}).items():
            phases[key] = phases.get(key, 0.0) + value
    return {
        "goodput": productive / wall,
        "wall_s": wall,
        "productive_s": productive,
        "reference": {
            "wall_s": ref_wall,
            "startup_s": ref_loop - reference["spawn"],
            "own_goodput": productive / ref_wall,
            "launcher_startup_s": reference["startup"],
        },
        "wall_ratio": ref_wall / wall,
        "badput_s": {k: round(v, 3) for k, v in badput.items()},
        "badput_fraction": {k: round(v / wall, 4) for k, v in badput.items()},
        "recovery_split_s": {
            "shutdown_after_fault": round(totals["shutdown"], 3),
            "supervisor_delay": round(totals["supervisor"], 3),
        },
        "launcher_startup_phases_s": {k: round(v, 1) for k, v in phases.items()},
        "kept_progress_s": totals["kept"],
        "checkpoint_blocked_s": sum(s[2] for a in attempts for s in a["saves"]),
        "per_attempt": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()} for row in rows
        ],
    }


def chart(path: str, attempts, reference, rows, title: str) -> None:
    """PNG: global step against wall time, the reference dashed; start-up, wasted progress and
    recovery shaded; each fault a labelled red line."""
    import matplotlib  # pylint: disable=g-import-not-at-top  # optional: only for the chart

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

    origin = attempts[0]["spawn"]
    fig, ax = plt.subplots(figsize=(14, 6.5), dpi=110)
    ref = progress(reference)
    top = max([p[1] for a in attempts for p in progress(a)] + [p[1] for p in ref] + [1])
    if ref:
        xs = [0.0] + [p[0] - reference["spawn"] for p in ref]
        ax.plot(xs, [0] + [p[1] for p in ref], "--", color="0.5", lw=1.2,
                label="uninterrupted run (reference), on its own clock")  # fmt: skip
    shade = {"start-up": "tab:orange", "wasted progress": "tab:red", "recovery": "tab:purple"}
    for a, row in zip(attempts, rows):
        spawn, end = a["spawn"] - origin, a["end"] - origin
        loop = a["loop_start"] - origin if a["loop_start"] is not None else None
        fault = a["fault"]
        stop = fault["t"] - origin if fault else end
        ax.axvspan(spawn, min(loop if loop is not None else stop, stop), color=shade["start-up"],
                   alpha=0.15, lw=0)  # fmt: skip
        kept_until = row["kept_until"] - origin
        if row["wasted_progress"] > 0:
            ax.axvspan(kept_until, stop, color=shade["wasted progress"], alpha=0.15, lw=0)
        if row["recovery"] > 0:
            nxt = spawn + sum(row[k] for k in ("kept",) + BUCKETS)
            ax.axvspan(nxt - row["recovery"], nxt, color=shade["recovery"], alpha=0.15, lw=0)
        points = progress(a)
        if points:
            ax.plot([p[0] - origin for p in points], [p[1] for p in points], "-", lw=1.8,
                    color="tab:blue")  # fmt: skip
        if a["saves"]:
            ax.plot([s[0] - origin for s in a["saves"]], [s[1] for s in a["saves"]], "|",
                    ms=8, color="tab:green")  # fmt: skip
        ax.text(spawn, top * 1.01, f" {a['topology']}", fontsize=7, rotation=90, va="bottom")
        if fault:
            ax.axvline(stop, color="tab:red", lw=1.0)
            ax.text(stop, top * 0.03, fault["label"] + " ", fontsize=8, rotation=90,
                    color="tab:red", va="bottom", ha="right")  # fmt: skip
    ax.plot([], [], "-", color="tab:blue", lw=1.8, label="faulted run")
    ax.plot([], [], "|", color="tab:green", label="checkpoint started")
    ax.plot([], [], color="tab:red", lw=1.0, label="fault")
    for name, color in shade.items():
        ax.fill_between([], [], color=color, alpha=0.15, label=name)
    ax.set_xlabel("wall time of the faulted run (s); attempts labelled with their topology")
    ax.set_ylabel("global step")
    ax.set_xlim(left=0)
    ax.set_ylim(0, top * 1.12)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
