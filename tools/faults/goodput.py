"""Goodput of a run that was restarted after faults, from its attempts' events.

`tools.faults.storm` records, for every attempt (one `launch.local_cluster` invocation), when it
was started, when it ended and the fault injected into it, and follows the launcher's
structured events (`launch.events`, tailed from the workdir as they are written). This module:

- keeps the per-attempt record the storm acts on (`new_attempt`, `feed`): the loop start,
  the resume step, progress points, saves, the agreed stop;
- splits the wall time (`summarize`) with `launch.goodput`, the same accounting the launcher
  writes live, using the storm's exact spawn, exit and fault times: goodput = the faulted
  run's productive time / its wall time; beside it the uninterrupted reference's own figures;
- draws the chart (`chart`): global step against wall time, each fault marked and labelled.

Times are seconds on the storm's clock (time.time() less the storm's origin). Everything is
plain JSON-able data, so a report can be recomputed from the saved JSON and events.
"""

from __future__ import annotations

from typing import Any

from launch import goodput as accounting

BUCKETS = accounting.BUCKETS


def new_attempt(index: int, topology: tuple[int, int], spawn: float) -> dict[str, Any]:
    """The record of one attempt, filled in by `feed` and by the storm."""
    return {
        "index": index,
        "topology": f"{topology[0]}x{topology[1]}",
        "spawn": spawn,
        "end": None,
        "status": None,
        "ids": [],  # the launcher's attempt ids (launch.events) seen in this invocation
        "startup": None,  # the launcher's start-up figures, seconds by phase
        "loop_start": None,  # every host is training (launch.goodput.training_began)
        "resumed_from": 0,
        "elastic": None,  # "2x2->1x4" when it resumed a checkpoint of another topology
        "points": [],  # [time, global step]: progress, saves, the agreed stop
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


def feed(attempt: dict[str, Any], t: float, record: dict[str, Any]) -> dict[str, Any] | None:
    """Updates `attempt` with one event (`t` on the storm's clock); returns the save it
    announces ({"step": N, "process": P}) so that the caller can act on it at once."""
    kind, step = record["event"], record.get("step")
    if record.get("attempt") and record["attempt"] not in attempt["ids"]:
        attempt["ids"].append(record["attempt"])
    if kind == "startup" and attempt["loop_start"] is None:
        # As the accounting counts it: the first step's dispatch, on the storm's clock.
        attempt["loop_start"] = t - (record["t"] - accounting.training_began(record))
        attempt["startup"] = {k.split("/")[-1][:-2]: v for k, v in record["figures"].items()}
    elif kind == "resumed":
        attempt["resumed_from"] = int(step)
        before, now = record.get("from_topology"), attempt["topology"]
        if before and before != now:
            attempt["elastic"] = f"{before}->{now}"
    elif kind == "progress":
        _add_point(attempt, t, int(step))
    elif kind == "save_started":
        if not any(s[1] == step for s in attempt["saves"]):
            attempt["saves"].append([t, int(step), float(record["blocked_s"])])
            _add_point(attempt, t, int(step))
        return {"step": int(step), "process": record["process"]}
    elif kind == "stop_agreed" and attempt["agreed_stop"] is None:
        attempt["agreed_stop"] = [t, int(step)]
        _add_point(attempt, t, int(step))
    elif kind == "eval":
        attempt["eval"] = {k: v for k, v in record.items() if k.startswith("eval/")}
    elif kind == "checkpoint_rejected":
        entry = [int(step), record.get("reason", "")]
        if entry not in attempt["rejected"]:
            attempt["rejected"].append(entry)
    return None


def training(attempt: dict[str, Any]) -> bool:
    """Whether the attempt's training loop has started (every host is training)."""
    return attempt["loop_start"] is not None


def _add_point(attempt: dict[str, Any], t: float, step: int) -> None:
    points = attempt["points"]
    if points and step <= points[-1][1]:
        return  # the same step from another process
    points.append([t, step])


def progress(attempt: dict[str, Any]) -> list[list[float]]:
    """[time, step] from the loop start (at the resume step) through every progress point."""
    start = attempt["loop_start"]
    head = [[start, attempt["resumed_from"]]] if start is not None else []
    return head + [p for p in attempt["points"] if start is None or p[0] >= start]


def furthest_step(attempt: dict[str, Any], before: float) -> int:
    """The furthest global step the attempt reported before time `before`."""
    steps = [s for t, s in progress(attempt) if t <= before]
    return max(steps, default=attempt["resumed_from"])


def on_storm_clock(records: list[dict[str, Any]], origin: float) -> list[dict[str, Any]]:
    """Events with their wall times moved onto the storm's clock."""
    moved = []
    for r in records:
        r = dict(r, t=r["t"] - origin)
        for key in ("process_start", "training_since"):
            if isinstance(r.get(key), (int, float)):
                r[key] -= origin
        moved.append(r)
    return moved


def launcher_attempts(attempts: list[dict[str, Any]], records: list[dict[str, Any]]):
    """`launch.goodput` attempts, one per storm attempt, with the storm's exact spawn, exit
    and fault times; an attempt that died before its first event is all start-up."""
    by_id = {a.id: a for a in accounting.summarize(records)}
    result = []
    for a in attempts:
        found = [by_id[i] for i in a["ids"] if i in by_id]
        one = found[0] if found else accounting.Attempt(f"storm-{a['index']}", 0.0, 0.0)
        one.start, one.end = a["spawn"], a["end"]
        one.fault_t = a["fault"]["t"] if a["fault"] else None
        result.append(one)
    return result


def summarize(
    attempts: list[dict[str, Any]],
    reference: dict[str, Any],
    records: list[dict[str, Any]],
    reference_records: list[dict[str, Any]],
) -> dict[str, Any]:
    """Goodput and the badput split (seconds, fractions) of the faulted run, and the
    uninterrupted reference beside it.

    Goodput is the faulted run's productive time over its wall time (`launch.goodput`, the
    accounting the launcher writes live, with the storm's exact spawn, exit and fault times):
    the buckets and the productive time add up to the wall time. `vs_reference` is the
    reference's productive time (its loop to its exit, less its save stalls) over the faulted
    run's wall time, a cross-check that holds only while every attempt ran the reference's
    topology: a step on a topology that is faster on this machine would count in the faulted
    run's favour. `records` are the events on the storm's clock (`on_storm_clock`).
    """
    split = accounting.account(launcher_attempts(attempts, records))
    (ref,) = launcher_attempts([reference], reference_records)
    ref_split = accounting.account([ref])
    wall = split["wall_s"]
    badput = dict(split["badput_s"])
    phases: dict[str, float] = {}  # the launcher's own start-up figures, summed over attempts
    for a in attempts:
        for key, value in (a["startup"] or {}).items():
            phases[key] = phases.get(key, 0.0) + value
    ref_start = ref.loop if ref.loop is not None else ref.start
    return {
        "goodput": split["goodput"],
        "wall_s": wall,
        "productive_s": split["productive_s"],
        "vs_reference": ref_split["productive_s"] / wall,
        "reference": {
            "wall_s": ref_split["wall_s"],
            "productive_s": ref_split["productive_s"],
            "startup_s": ref_start - ref.start,
            "own_goodput": ref_split["goodput"],
            "launcher_startup_s": reference["startup"],
        },
        "badput_s": {k: round(v, 3) for k, v in badput.items()},
        "badput_fraction": {k: round(v / wall, 4) for k, v in badput.items()},
        "launcher_startup_phases_s": {k: round(v, 1) for k, v in phases.items()},
        "checkpoint_blocked_s": sum(s[2] for a in attempts for s in a["saves"]),
        "saves": sum(len(a["saves"]) for a in attempts),
        "per_attempt": [
            {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}
            for row in split["per_attempt"]
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
        if row[accounting.WASTED] > 0:
            ax.axvspan(kept_until, stop, color=shade["wasted progress"], alpha=0.15, lw=0)
        if row[accounting.RECOVERY] > 0:
            nxt = attempts[a["index"] + 1]["spawn"] - origin if a is not attempts[-1] else end
            ax.axvspan(nxt - row[accounting.RECOVERY], nxt, color=shade["recovery"], alpha=0.15,
                       lw=0)  # fmt: skip
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
