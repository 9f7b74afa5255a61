"""launch.goodput: the time accounting of a restarted run, from its events alone."""

import pytest

from launch import events, goodput


def _event(t, event, process=0, attempt="a", **fields):
    return {"t": t, "event": event, "process": process, "attempt": attempt, **fields}


def _storm_like_run():
    """Attempt a: starts at 0, trains from 10, saves 10 at 12, is SIGKILLed after step 20 (no
    attempt_ended). Attempt b: starts at 17, restores 2 s, resumes from 10, trains from 25, is
    preempted (SIGTERM at 27, stop agreed at 22 and saved), exits 75. Attempt c: finishes."""
    a = [
        _event(0.5, "attempt_started", process_start=0.0, topology="2x2"),
        _event(0.6, "attempt_started", process=1, process_start=0.1, topology="2x2"),
        _event(3.0, "phase_ended", phase="restore", seconds=0.5),
        _event(4.0, "resumed", step=0),
        _event(10.0, "startup", figures={"startup/total_s": 10.0}),
        _event(11.0, "progress", step=5),
        _event(12.0, "save_started", step=10, blocked_s=0.25),
        _event(12.1, "save_started", process=1, step=10, blocked_s=0.3),
        _event(13.0, "save_committed", step=10, seconds=1.0),
        _event(14.0, "progress", step=20),
        _event(15.5, "fault", process=1, kind="sigterm"),  # local_cluster stops the survivor
        _event(16.0, "attempt_ended", process=1, status=75, outcome="preempted"),
    ]
    b = [
        _event(18.0, "attempt_started", attempt="b", process_start=17.0, topology="1x4"),
        _event(21.0, "phase_ended", attempt="b", phase="restore", seconds=2.0),
        _event(21.5, "resumed", attempt="b", step=10),
        _event(25.0, "startup", attempt="b", figures={}),
        _event(27.0, "fault", attempt="b", kind="sigterm"),
        _event(27.5, "stop_agreed", attempt="b", step=22, reason="preemption"),
        _event(27.6, "save_started", attempt="b", step=22, blocked_s=0.1),
        _event(28.5, "save_committed", attempt="b", step=22, seconds=0.9),
        _event(29.0, "attempt_ended", attempt="b", status=75, outcome="preempted"),
    ]
    c = [
        _event(30.5, "attempt_started", attempt="c", process_start=30.0, topology="1x4"),
        _event(31.0, "resumed", attempt="c", step=22),
        _event(33.0, "startup", attempt="c", figures={}),
        _event(40.0, "attempt_ended", attempt="c", status=0, outcome="finished"),
    ]
    return sorted(a + b + c, key=lambda r: r["t"])


def test_attempts_are_summarized_from_every_process():
    a, b, c = goodput.summarize(_storm_like_run())
    assert (a.start, a.loop, a.resumed, a.topology) == (0.0, 10.0, 0, "2x2")
    assert a.status is None and a.interrupted  # process 0 never ended: killed
    assert a.saves[10] == (12.0, 0.25) and a.furthest_step() == 20
    assert (b.status, b.stop_step, b.restore_s, b.interrupted) == (75, 22, 2.0, True)
    assert c.status == 0 and not c.interrupted


def test_the_buckets_and_the_productive_time_add_up_to_the_wall_time():
    accounting = goodput.account(goodput.summarize(_storm_like_run()))
    a, b, c = accounting["per_attempt"]
    # a: start-up 10 (a fresh start: its restore phase built the initial state); kept until
    # step 10 (12.0) less its 0.25 s stall; wasted from 12 to the first fault anyone saw
    # (15.5); recovery until b's process started (17).
    assert a[goodput.STARTUP] == pytest.approx(10.0) and a[goodput.RESTORE] == 0.0
    assert a["productive"] == pytest.approx(1.75) and a[goodput.SAVE] == 0.25
    assert a[goodput.WASTED] == pytest.approx(3.5) and a[goodput.RECOVERY] == pytest.approx(1.5)
    # b: its agreed stop was saved, so nothing is wasted; recovery from that save to c.
    assert b[goodput.RESTORE] == 2.0 and b[goodput.STARTUP] == pytest.approx(6.0)
    assert b[goodput.WASTED] == 0.0 and b[goodput.RECOVERY] == pytest.approx(2.4)
    assert c["productive"] == pytest.approx(7.0) and c[goodput.RECOVERY] == 0.0
    total = accounting["productive_s"] + sum(accounting["badput_s"].values())
    assert total == pytest.approx(accounting["wall_s"]) and accounting["wall_s"] == 40.0
    assert accounting["goodput"] == pytest.approx(accounting["productive_s"] / 40.0)
    fractions = goodput.fractions(accounting)
    assert sum(fractions.values()) == pytest.approx(1.0)
    assert "goodput/badput_wasted_progress_from_disruption_fraction" in fractions


def test_training_counts_from_the_first_steps_dispatch_not_from_the_startup_event():
    """The `startup` event comes when the first step is done, with more queued behind it;
    those steps are kept progress, so productive time starts at the first dispatch."""
    records = [
        _event(0.5, "attempt_started", process_start=0.0, topology="1x4"),
        _event(1.0, "resumed", step=0),
        _event(9.0, "startup", figures={}, training_since=8.0),
        _event(20.0, "attempt_ended", status=0, outcome="finished"),
    ]
    (attempt,) = goodput.summarize(records)
    assert attempt.loop == 8.0
    (row,) = goodput.account([attempt])["per_attempt"]
    assert row[goodput.STARTUP] == pytest.approx(8.0) and row["productive"] == pytest.approx(12.0)
    # An event without the field (an older launcher's) or with a nonsense one: its own time.
    for since in (None, 30.0, "8"):
        odd = [dict(r, training_since=since) if r["event"] == "startup" else r for r in records]
        assert goodput.summarize(odd)[0].loop == 9.0


def test_a_live_run_counts_up_to_now_and_loses_nothing_yet():
    records = [r for r in _storm_like_run() if r["attempt"] != "c"]
    records += [_event(31.0, "attempt_started", attempt="c", process_start=30.0)]
    records += [_event(33.0, "startup", attempt="c", figures={})]
    live = goodput.account(goodput.summarize(records), now=50.0)
    assert live["wall_s"] == 50.0 and live["per_attempt"][-1]["productive"] == 17.0
    assert live["per_attempt"][-1][goodput.WASTED] == 0.0


def test_interruptions_are_the_killed_and_the_retriable_attempts():
    found = goodput.interruptions(goodput.summarize(_storm_like_run()), current="c")
    assert [(f["attempt"], f["kind"]) for f in found] == [("a", "sigterm"), ("b", "sigterm")]
    assert found[0]["t"] == 15.5
    bad_config = [_event(1.0, "attempt_started"), _event(2.0, "attempt_ended", status=2)]
    assert goodput.interruptions(goodput.summarize(bad_config)) == []


def test_the_accounting_reads_the_files_the_launcher_writes(tmp_path):
    log = events.EventLog(str(tmp_path), process=0, attempt="x")
    log.emit("attempt_started", process_start=0.0, topology="1x1")
    log.emit("startup", figures={})
    log.emit("attempt_ended", status=0, outcome="finished")
    with open(events.local_path(str(tmp_path), 0), "a") as f:
        f.write('{"t": 1, "event": "prog')  # a process killed mid-write
    (attempt,) = goodput.summarize(events.read(str(tmp_path)))
    assert attempt.status == 0 and attempt.loop is not None and len(log.records) == 3


def test_the_live_account_joins_earlier_attempts_with_this_ones_own_events(tmp_path):
    past = [r for r in _storm_like_run() if r["attempt"] != "c"]
    log = events.EventLog(str(tmp_path), process=0, attempt="c")
    log.emit("attempt_started", process_start=30.0)
    log.emit("resumed", step=22)
    live = goodput.Live(past, log)
    assert [a.id for a in live.attempts()] == ["a", "b", "c"]
    now = log.records[-1]["t"] + 10.0
    fractions = live.fractions(now)
    assert sum(fractions.values()) == pytest.approx(1.0)
    # Two faults (a killed, b preempted) in the run's time so far.
    assert live.mtbf_seconds(now, prior_s=3600.0) == pytest.approx(now / 2)
    assert goodput.Live([], log).mtbf_seconds(now, prior_s=1e12) == 1e12
