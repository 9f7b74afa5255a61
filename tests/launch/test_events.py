"""launch.events: the per-process writer, the reader, and the tail that watchers use."""

import subprocess
import sys

from launch import events


def test_events_of_every_process_come_back_in_time_order(tmp_path):
    first = events.EventLog(str(tmp_path), process=1, attempt="a")
    zero = events.EventLog(str(tmp_path), process=0, attempt="a")
    first.emit("progress", step=1)
    zero.emit("save_started", step=2, blocked_s=0.1)
    records = events.read(str(tmp_path))
    assert [(r["event"], r["process"]) for r in records] == [("progress", 1), ("save_started", 0)]
    assert records[1]["blocked_s"] == 0.1 and records[1]["attempt"] == "a"
    assert list(events.attempts(records)) == ["a"]


def test_the_tail_returns_each_whole_line_once(tmp_path):
    log = events.EventLog(str(tmp_path), process=0, attempt="a")
    tail = events.Tail(str(tmp_path))
    assert tail.read() == []
    log.emit("progress", step=1)
    path = events.local_path(str(tmp_path), 0)
    with open(path, "a") as f:
        f.write('{"t": 1.0, "event": "save_st')  # a line still being written
    assert [r["step"] for r in tail.read()] == [1]
    with open(path, "a") as f:
        f.write('arted", "process": 0, "step": 2}\n')
    assert [r["event"] for r in tail.read()] == ["save_started"]
    assert tail.read() == []


def test_the_process_start_is_read_from_the_system():
    # A fresh process, so that the figure does not depend on how long this suite has run.
    code = "import time; from launch import events; print(events.process_start_time(), time.time())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    started, now = map(float, out.stdout.split())
    assert 0 <= now - started < 60


def test_an_attempt_begins_with_its_start_event_and_the_earlier_ones(tmp_path):
    before = events.EventLog(str(tmp_path), process=0, attempt="old")
    before.emit("attempt_ended", status=75, outcome="preempted")
    log, past = events.begin_attempt(str(tmp_path), "1x1", timeout_s=1.0)
    assert events.current() is log and [r["attempt"] for r in past] == ["old"]
    (started,) = log.records
    assert started["event"] == "attempt_started" and started["topology"] == "1x1"
    assert started["process_start"] <= started["t"] and started["attempt"] != "old"


def test_events_another_process_wrote_for_this_attempt_are_not_earlier_ones(tmp_path, monkeypatch):
    """Process 1 may start the attempt before process 0 reads the workdir: its unfinished
    attempt must not count as an interrupted earlier one (a fault, for the MTBF)."""
    monkeypatch.setattr(events, "agree_attempt_id", lambda timeout_s: "now")
    events.EventLog(str(tmp_path), process=1, attempt="now").emit("attempt_started")
    events.EventLog(str(tmp_path), process=0, attempt="old").emit("attempt_ended", status=0)
    _, past = events.begin_attempt(str(tmp_path), "2x2", timeout_s=1.0)
    assert [r["attempt"] for r in past] == ["old"]
