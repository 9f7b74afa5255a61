"""The checkpoint interval that sets itself (`checkpoint.every_steps` or `every_epochs` = "auto").

A save costs the loop its stall δ (`save_started` `blocked_s`); a fault costs the progress since
the last save plus the restart. With faults every M seconds on average and a restart that pays
R seconds of restore, the interval that loses least is Daly's first-order optimum

    T = sqrt(2 δ (M + R))

(Young's sqrt(2 δ M) with the restart's own time, during which no save can be lost, added to
the time between faults). T is then clamped:

    lower  max(MIN_STEPS step times, δ + the save's own start-to-commit time): saves never
           queue behind one another, and the loop is never saving all the time
    upper  min(M, MAX_SECONDS): never longer than a fault is expected to take to arrive, and
           at most an hour of work at risk whatever the fault rate

and turned into steps with the loop's measured seconds per step. M is the workdir's observed
mean time between faults (`launch.goodput.interruptions`); before any fault is seen it is the
prior `checkpoint.expected_fault_interval_seconds` (or the time the run has already survived,
if longer). The first save comes FIRST_SAVE_STEPS steps after the start (or resume) so that δ
and the save's duration are measured early; the interval is decided again at every save.

Every host must save at the same steps, or the one saving alone waits in Orbax's barriers
forever. So the figures are process 0's, broadcast at each save point (all hosts are there at
the same step, having agreed on the previous interval), and the next save step is a pure
function of them: every host computes the same one.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from absl import logging

AUTO = "auto"
FIRST_SAVE_STEPS = 10  # the first save of an attempt, to measure what a save costs
MIN_STEPS = 5  # a save every few steps at most: their own time stays small against the work
MAX_SECONDS = 3600.0  # at most an hour of training at risk, however rare the faults


@dataclasses.dataclass(frozen=True)
class Figures:
    """What the interval depends on, all in seconds; identical on every host once agreed."""

    step_s: float  # wall seconds per training step, save stalls excluded
    stall_s: float  # how long a save held up the loop (the newest save's)
    save_s: float  # a save from its start to its commit (the newest known)
    restore_s: float  # the restore this attempt paid (what the next restart pays again)
    mtbf_s: float  # observed mean time between faults, or the prior

    def as_list(self) -> list[float]:
        return [self.step_s, self.stall_s, self.save_s, self.restore_s, self.mtbf_s]

    @classmethod
    def from_list(cls, values) -> Figures:
        return cls(*(float(v) for v in values))


@dataclasses.dataclass(frozen=True)
class Decision:
    steps: int
    seconds: float  # the chosen interval in wall seconds (after clamping)
    optimum_s: float  # Daly's T before clamping
    lower_s: float
    upper_s: float
    figures: Figures

    def describe(self) -> str:
        f = self.figures
        return (
            f"every {self.steps} steps ({self.seconds:.1f}s): sqrt(2 x stall {f.stall_s:.3f}s x "
            f"(MTBF {f.mtbf_s:.0f}s + restore {f.restore_s:.1f}s)) = {self.optimum_s:.1f}s, "
            f"bounds [{self.lower_s:.1f}s, {self.upper_s:.0f}s] (step {f.step_s:.3f}s, save "
            f"{f.save_s:.2f}s to commit)"
        )

    def fields(self) -> dict[str, Any]:
        """The decision and its inputs, for the `interval` event."""
        return {
            "steps": self.steps,
            "seconds": round(self.seconds, 3),
            "optimum_s": round(self.optimum_s, 3),
            "bounds_s": [round(self.lower_s, 3), round(self.upper_s, 3)],
            **{k: round(v, 4) for k, v in dataclasses.asdict(self.figures).items()},
        }


def optimum_seconds(stall_s: float, mtbf_s: float, restore_s: float) -> float:
    """Daly's first-order optimum interval (Young's rule with the restart time)."""
    return math.sqrt(2.0 * max(stall_s, 0.0) * (max(mtbf_s, 0.0) + max(restore_s, 0.0)))


def bounds_seconds(figures: Figures) -> tuple[float, float]:
    lower = max(MIN_STEPS * figures.step_s, figures.stall_s + figures.save_s)
    upper = max(min(figures.mtbf_s, MAX_SECONDS), lower)  # the lower bound is physical: it wins
    return lower, upper


def decide(figures: Figures) -> Decision:
    """The interval for these figures, in steps (at least 1)."""
    optimum = optimum_seconds(figures.stall_s, figures.mtbf_s, figures.restore_s)
    lower, upper = bounds_seconds(figures)
    seconds = min(max(optimum, lower), upper)
    steps = max(1, int(round(seconds / figures.step_s))) if figures.step_s > 0 else MIN_STEPS
    return Decision(steps, seconds, optimum, lower, upper, figures)


def mtbf_seconds(faults: int, survived_s: float, prior_s: float) -> float:
    """Mean time between faults: survived time / faults once any is seen; before that the
    prior, or the time the run has survived without one if that is longer."""
    if faults > 0:
        return survived_s / faults
    return max(prior_s, survived_s)


class Schedule:
    """Which steps save: every `fixed` steps, or (fixed=None) the automatic interval.

    `due(step)` is a pure function of the agreed state, so every host answers the same.
    """

    def __init__(self, fixed: int | None, start_step: int, num_steps: int):
        self.fixed = fixed
        self.num_steps = num_steps
        self.decision: Decision | None = None
        self.next_step = start_step + FIRST_SAVE_STEPS if fixed is None else None

    @property
    def auto(self) -> bool:
        return self.fixed is None

    def due(self, step: int) -> bool:
        if step >= self.num_steps:
            return False  # the final save is the finish's
        if self.fixed is not None:
            return self.fixed > 0 and step % self.fixed == 0
        # So close to the end, the final save comes first.
        return step == self.next_step and self.num_steps - step >= MIN_STEPS

    def saved(self, step: int, figures: Figures) -> Decision | None:
        """After the save at `step`: the next save step from the agreed figures; returns the
        decision when the interval changed (to be logged), else None."""
        if self.fixed is not None:
            return None
        decision = decide(figures)
        self.next_step = step + decision.steps
        changed = self.decision is None or decision.steps != self.decision.steps
        self.decision = decision
        return decision if changed else None


class StepClock:
    """Process 0's seconds per training step between save points, evals and save stalls out."""

    def __init__(self):
        self._mark: tuple[int, float] | None = None
        self._paused = 0.0
        self.last_s: float | None = None

    def start(self, step: int, now: float) -> None:
        self._mark, self._paused = (step, now), 0.0

    def pause(self, seconds: float) -> None:
        """Time the loop spent on something else: an eval, a save's stall."""
        self._paused += seconds

    def lap(self, step: int, now: float) -> float | None:
        """Seconds per step since the last start or lap (None before the first start)."""
        if self._mark is not None and step > self._mark[0]:
            busy = now - self._mark[1] - self._paused
            self.last_s = max(busy, 0.0) / (step - self._mark[0])
        self.start(step, now)
        return self.last_s


def agree(figures: Figures, step: int, timeout_s: float) -> Figures:
    """Process 0's figures on every host (through the coordination service, with a deadline):
    the next save step is then the same everywhere."""
    from launch import distributed  # pylint: disable=g-import-not-at-top  # the pure part needs no devices

    text = distributed.from_process_0(
        f"resnet_multihost/checkpoint_interval/{step}",
        lambda: json.dumps(figures.as_list()),
        f"the checkpoint interval at step {step}",
        timeout_s,
    )
    return Figures.from_list(json.loads(text))


class Saves:
    """The loop's save decisions, fixed (`every` > 0, or 0: at the end only) or automatic
    (`every` < 0): the step clock, the figures agreed at each save, and every change of
    interval logged with its inputs, emitted as an `interval` event and charted in
    TensorBoard (`checkpoint/interval_steps`).

    The stall and the save's duration are the medians over the workdir's saves (`past`:
    process 0's earlier events, then this attempt's): an attempt's first save, which also
    pays one-off set-up, does not set the interval alone. The restore is this attempt's, or
    the newest restore the workdir saw. `mtbf` (process 0) gives the mean time between
    faults at a given wall time; `log` is the process's `events.EventLog`, `writer` its
    `metrics.Writer`.
    """

    def __init__(self, every: int, start_step: int, num_steps: int, *, restore_s: float,
                 past: list[dict[str, Any]], mtbf: Callable[[float], float], log: Any,
                 writer: Any, timeout_s: float):  # fmt: skip
        self.schedule = Schedule(None if every < 0 else every, start_step, num_steps)
        self.clock = StepClock()
        self._mtbf, self._log, self._writer = mtbf, log, writer
        self._timeout_s = timeout_s
        ours = [r for r in past if r["process"] == 0]
        self._stalls = _figures(ours, "save_started", "blocked_s")
        self._save_s = _figures(ours, "save_committed", "seconds")
        resumed = {r.get("attempt") for r in ours if r["event"] == "resumed" and r.get("step")}
        restores = [r for r in ours if r.get("phase") == "restore" and r.get("attempt") in resumed]
        earlier = _figures(restores, "phase_ended", "seconds")
        self._restore_s = restore_s or (earlier[-1] if earlier else 0.0)

    def training(self, step: int) -> None:
        """Every host is in the loop: the step clock starts."""
        self.clock.start(step, time.perf_counter())

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def pause(self, seconds: float) -> None:
        """The loop evaluated for this long: not step time."""
        self.clock.pause(seconds)

    def committed(self, seconds: float) -> None:
        self._save_s.append(seconds)

    def saved(self, step: int, blocked_s: float) -> None:
        """After the save at `step` that `due` asked for: the next save step, agreed."""
        self.clock.pause(blocked_s)
        if not self.schedule.auto:
            return
        step_s = self.clock.lap(step, time.perf_counter()) or 0.0
        self._stalls.append(blocked_s)
        stall, save = statistics.median(self._stalls), _median(self._save_s)
        mine = Figures(step_s, stall, save, self._restore_s, self._mtbf(time.time()))
        decision = self.schedule.saved(step, agree(mine, step, self._timeout_s))
        if decision is not None:
            logging.info("Checkpoint interval from step %d: %s", step, decision.describe())
            self._log.emit("interval", step=step, **decision.fields())
            self._writer.scalars(step, {"checkpoint/interval_steps": decision.steps}, "checkpoint")


def _figures(records: list[dict[str, Any]], event: str, field: str) -> list[float]:
    """`field` of every `event` that holds a number there (a damaged line is skipped)."""
    values = [r.get(field) for r in records if r["event"] == event]
    return [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0
