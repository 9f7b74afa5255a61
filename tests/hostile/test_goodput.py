"""The hostile suite, goodput side: damaged or foreign lines in WORKDIR/events.

The events are the contract between the launcher and what measures it (the live goodput,
the automatic checkpoint interval's fault rate, the storm). A line torn by a killed process,
edited by hand or written by something else must be skipped, never raise, never change the
figures of the good lines, and never be rewritten. Each row runs the real reader and the real
accounting (in-process: no subprocess needed). The automatic interval's settings are refused
before anything runs: exit 2, one line, the workdir as it was.
"""

from __future__ import annotations

import json
import os

import pytest

from launch import events, goodput, interval, train
from launch import main as launcher
from launch.status import ExitStatus
from tests import helpers
from tests.hostile.harness import assert_one_clear_line, tree_digest

GOOD = [
    {"t": 1.0, "event": "attempt_started", "process": 0, "attempt": "a", "process_start": 0.0},
    {"t": 5.0, "event": "startup", "process": 0, "attempt": "a", "figures": {}},
    {"t": 8.0, "event": "save_started", "process": 0, "attempt": "a", "step": 10, "blocked_s": 1},
    {"t": 20.0, "event": "attempt_ended", "process": 0, "attempt": "a", "status": 0},
]
DAMAGED = [
    # (case, the line appended among the good ones)
    ("torn line", '{"t": 9.0, "event": "progr'),
    ("not JSON", "this is not an event"),
    ("a JSON list", "[1, 2, 3]"),
    ("no time", '{"event": "progress", "process": 0, "attempt": "a", "step": 3}'),
    ("time as text", '{"t": "late", "event": "progress", "process": 0, "step": 3}'),
    ("step as text", '{"t": 9.0, "event": "progress", "process": 0, "attempt": "a", "step": "x"}'),
    ("no blocked_s", '{"t": 9.0, "event": "save_started", "process": 0, "step": 12}'),
    ("status as text", '{"t": 19.0, "event": "attempt_ended", "process": 0, "status": "ok"}'),
    ("unknown event", '{"t": 9.0, "event": "launch_rocket", "process": 0, "attempt": "a"}'),
    ("binary junk", "\udcff\udcfe"),
    ("phase without name", '{"t": 2.0, "event": "phase_ended", "process": 0, "seconds": 1}'),
    (
        "commit seconds as text",
        '{"t": 9.0, "event": "save_committed", "process": 0, "seconds": "x"}',
    ),
    ("blocked_s not finite", '{"t": 9.0, "event": "save_started", "process": 0, "blocked_s": NaN}'),
]


def _write(workdir: str, extra: str) -> str:
    path = events.local_path(workdir, 0)
    os.makedirs(os.path.dirname(path))
    lines = [json.dumps(r) for r in GOOD]
    lines.insert(2, extra)
    with open(path, "w", errors="surrogateescape") as f:
        f.write("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("case, line", DAMAGED, ids=[c[0] for c in DAMAGED])
def test_a_damaged_event_line_is_skipped_and_left_alone(tmp_path, case, line):
    workdir = str(tmp_path / "w")
    _write(workdir, line)
    before = tree_digest(workdir)
    attempts = goodput.summarize(events.read(workdir))
    accounting = goodput.account(attempts)
    clean = goodput.account(goodput.summarize(GOOD))
    assert accounting["goodput"] == clean["goodput"], case
    assert accounting["badput_s"] == clean["badput_s"], case
    assert goodput.interruptions(attempts) == []  # a finished attempt is not a fault
    # The automatic interval starts from the same lines: their figures, the damaged one out.
    saves = interval.Saves(-1, 0, 100, restore_s=0.0, past=events.read(workdir),
                           mtbf=lambda now: 60.0, log=events.NullLog(), writer=None,
                           timeout_s=1.0)  # fmt: skip
    assert saves.due(interval.FIRST_SAVE_STEPS)
    assert tree_digest(workdir) == before


# --- the automatic interval's settings, refused before anything runs -----------------------

CONFIG_CASES = [
    # (overrides, the start of the error line)
    ({"checkpoint.every_steps": "often"}, "config.checkpoint.every_steps='often': must be a num"),
    ({"checkpoint.every_epochs": "Auto"}, "config.checkpoint.every_epochs='Auto': must be a num"),
    ({"checkpoint.every_steps": -1}, "config.checkpoint.every_steps=-1: must be a whole number"),
    (
        {"checkpoint.expected_fault_interval_seconds": 0.0},
        "config.checkpoint.expected_fault_interval_seconds=0.0: must be a number > 0",
    ),
    (
        {"checkpoint.expected_fault_interval_seconds": float("nan")},
        "config.checkpoint.expected_fault_interval_seconds=nan: must be a number > 0",
    ),
]


@pytest.mark.parametrize("overrides, message", CONFIG_CASES, ids=[str(c[0]) for c in CONFIG_CASES])
def test_bad_interval_settings_are_refused_before_anything_runs(
    data, tmp_path, capfd, overrides, message
):
    workdir = str(tmp_path / "w")
    os.makedirs(os.path.join(workdir, "events"))
    with open(events.local_path(workdir, 0), "w") as f:
        f.write(json.dumps(GOOD[0]) + "\n")  # an earlier attempt's events: left as they are
    before = tree_digest(workdir)
    capfd.readouterr()
    with pytest.raises(SystemExit) as exited:
        launcher.exit_with_status(
            lambda: train.train_and_evaluate(helpers.tiny_config(*data, **overrides), workdir)
        )
    assert exited.value.code == ExitStatus.BAD_INPUT
    line = assert_one_clear_line(capfd.readouterr().err, message)
    assert line.startswith(f"error: {message}")
    assert tree_digest(workdir) == before
