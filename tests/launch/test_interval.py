"""launch.interval: Daly's interval from measured figures, its bounds, and the save schedule."""

import json
import math

import pytest

from launch import interval

FIGURES = interval.Figures(step_s=0.5, stall_s=0.4, save_s=1.5, restore_s=2.0, mtbf_s=120.0)


def test_the_optimum_is_dalys_first_order_interval():
    # sqrt(2 x 0.4 x (120 + 2)) = 9.88 s: 20 steps of 0.5 s.
    decision = interval.decide(FIGURES)
    assert decision.optimum_s == pytest.approx(math.sqrt(2 * 0.4 * 122))
    assert decision.steps == 20
    assert decision.seconds == pytest.approx(decision.optimum_s)
    assert "every 20 steps" in decision.describe()
    assert decision.fields()["steps"] == 20 and decision.fields()["mtbf_s"] == 120.0


@pytest.mark.parametrize(
    "change, steps, why",
    [
        # A save that takes 30 s to commit: the next may not start before it is done.
        ({"save_s": 30.0}, 61, "lower: stall + save duration"),
        # Free saves: still at least MIN_STEPS steps apart.
        ({"stall_s": 0.0, "save_s": 0.0}, interval.MIN_STEPS, "lower: a few steps"),
        # Costly saves and frequent faults: never longer than a fault takes to come.
        ({"stall_s": 40.0, "mtbf_s": 60.0}, 120, "upper: the MTBF"),
        # Rare faults: at most MAX_SECONDS of work at risk.
        ({"stall_s": 50.0, "mtbf_s": 1e9}, int(interval.MAX_SECONDS / 0.5), "upper: the cap"),
    ],
)
def test_the_interval_is_clamped_to_its_bounds(change, steps, why):
    values = {**FIGURES.__dict__, **change}
    assert interval.decide(interval.Figures(**values)).steps == steps, why


def test_the_mtbf_is_observed_once_a_fault_is_seen_else_the_prior():
    assert interval.mtbf_seconds(0, 100.0, 3600.0) == 3600.0
    assert interval.mtbf_seconds(0, 7200.0, 3600.0) == 7200.0  # survived longer than the prior
    assert interval.mtbf_seconds(3, 360.0, 3600.0) == 120.0


def test_a_fixed_schedule_saves_at_multiples_and_never_at_the_end():
    schedule = interval.Schedule(fixed=4, start_step=0, num_steps=12)
    assert [s for s in range(1, 13) if schedule.due(s)] == [4, 8]
    assert schedule.saved(4, FIGURES) is None
    never = interval.Schedule(fixed=0, start_step=0, num_steps=12)
    assert not any(never.due(s) for s in range(1, 13))


def test_the_auto_schedule_saves_early_then_at_the_decided_interval():
    schedule = interval.Schedule(fixed=None, start_step=30, num_steps=1000)
    first = 30 + interval.FIRST_SAVE_STEPS
    assert [s for s in range(31, 100) if schedule.due(s)] == [first]
    decision = schedule.saved(first, FIGURES)
    assert decision is not None and decision.steps == 20  # a change: to be logged
    assert schedule.due(first + 20) and not schedule.due(first + 19)
    assert schedule.saved(first + 20, FIGURES) is None  # the same interval: nothing to log
    slower = interval.Figures(**{**FIGURES.__dict__, "mtbf_s": 3600.0})
    assert schedule.saved(first + 40, slower).steps > 20


def test_figures_travel_as_a_list_and_come_back_equal():
    assert interval.Figures.from_list(FIGURES.as_list()) == FIGURES


def test_the_step_clock_leaves_evals_and_stalls_out():
    clock = interval.StepClock()
    assert clock.lap(10, 100.0) is None  # not started
    clock.start(10, 100.0)
    clock.pause(3.0)  # an eval
    assert clock.lap(20, 108.0) == pytest.approx(0.5)
    assert clock.lap(20, 109.0) == pytest.approx(0.5)  # no step since: the last figure


def test_figures_are_agreed_as_they_are_on_a_single_process():
    assert interval.agree(FIGURES, step=10, timeout_s=1.0) == FIGURES


def test_the_loop_side_logs_charts_and_emits_every_change_of_interval(tmp_path):
    from launch import events, metrics  # pylint: disable=g-import-not-at-top

    log = events.EventLog(str(tmp_path), process=0, attempt="a")
    writer = metrics.Writer(str(tmp_path))
    past = [  # an earlier attempt of the workdir: its saves, and the restore it paid
        {"t": 1.0, "event": "resumed", "process": 0, "attempt": "old", "step": 40},
        {"t": 0.5, "event": "phase_ended", "process": 0, "attempt": "old", "phase": "restore",
         "seconds": 3.0},
        *[{"t": 2.0, "event": "save_started", "process": 0, "attempt": "old", "step": 50,
           "blocked_s": b} for b in (0.1, 0.1, 0.1, 9.0)],
        {"t": 3.0, "event": "save_committed", "process": 0, "attempt": "old", "step": 50,
         "seconds": 0.5},
    ]  # fmt: skip
    saves = interval.Saves(-1, 0, 10_000, restore_s=0.0, past=past, mtbf=lambda now: 120.0,
                           log=log, writer=writer, timeout_s=1.0)  # fmt: skip
    saves.training(0)
    first = interval.FIRST_SAVE_STEPS
    assert [s for s in range(1, 30) if saves.due(s)] == [first]
    saves.saved(first, blocked_s=2.0)  # a first save's one-off cost: the median holds
    second = saves.schedule.next_step
    saves.saved(second, blocked_s=0.2)
    writer.close()
    changes = [r for r in events.read(str(tmp_path)) if r["event"] == "interval"]
    assert changes[0]["step"] == first and changes[0]["steps"] == second - first
    assert changes[0]["mtbf_s"] == 120.0 and changes[0]["save_s"] == 0.5
    assert changes[0]["stall_s"] == 0.1 and changes[0]["restore_s"] == 3.0
    with open(tmp_path / "metrics.jsonl") as f:
        charted = [json.loads(line) for line in f]
    assert [r["checkpoint/interval_steps"] for r in charted] == [c["steps"] for c in changes]
    fixed = interval.Saves(4, 0, 12, restore_s=0.0, past=[], mtbf=lambda now: 1.0, log=log,
                           writer=writer, timeout_s=1.0)  # fmt: skip
    assert [s for s in range(1, 13) if fixed.due(s)] == [4, 8]
