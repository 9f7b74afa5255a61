"""Never hang: signals handled from process start, a deadline after SIGTERM, a stall watchdog.

A launcher must end by itself whatever happens to its peers. Three mechanisms:

* `StopRequest` installs the SIGTERM/SIGINT handlers first thing in `main`, so a signal during
  start-up (data preparation, restore, compilation) is a clean stop (exit 75) rather than
  death by signal 143. In the training loop the request becomes a vote that rides the train
  step's own all-reduce, so every host stops at the same step (see `launch.train`).
* Once a signal has arrived, a deadline thread gives the run `grace_seconds` to save and exit;
  past it, it dumps every thread's stack and exits with `ExitStatus.STALLED`. (A preemption
  notice is a promise of SIGKILL: a stuck save must not hold the host until then, silently.)
* `Watchdog`: when no training step and no eval batch completes for the larger of a floor
  and 50x the median step time, it dumps the stacks and exits with `ExitStatus.STALLED`. A
  process blocked in a collective whose peer is gone or deadlocked is alive, so the
  coordination service's heartbeat cannot catch it; this can.

The exits here are `os._exit`: the main thread may be blocked inside XLA, where no Python
exception would ever reach it.
"""

from __future__ import annotations

import collections
import faulthandler
import os
import signal
import statistics
import sys
import threading
import time

from absl import logging

from launch.status import ExitStatus

_MEDIAN_MULTIPLE = 50  # a step 50x slower than usual is not a slow step, it is a stall
_WINDOW = 200  # step intervals kept for the median


def dump_stacks_and_exit(reason: str, status: ExitStatus) -> None:
    """Logs why, writes every thread's Python stack to stderr, and exits at once."""
    logging.error("%s; dumping all stacks and exiting with status %d", reason, int(status))
    logging.flush()
    sys.stderr.write(f"\n=== stacks of process {os.getpid()}: {reason} ===\n")
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(int(status))  # pylint: disable=protected-access


class StopBeforeStart(Exception):
    """A stop was requested before the first training step: nothing new to save."""


class StopRequest:
    """SIGTERM/SIGINT from process start: a flag, and a deadline for the stop to finish.

    Before `training_started()`, nothing is worth saving: `check()` raises StopBeforeStart at
    the next phase boundary, and if the main thread is stuck in a long call (compilation, a
    barrier) the deadline thread exits 75 itself. After it, the loop polls `requested` and
    must finish its agreed save within the grace period, or the deadline exits 5.
    A second SIGINT (Ctrl-C twice) exits at once with 130.
    """

    def __init__(self, grace_seconds: float, install: bool = True):
        """`install=False`: no handlers (library use); `request()` is then the only way in."""
        self.grace_seconds = grace_seconds
        self._requested = threading.Event()
        self._training = False
        self._signal_name = ""
        if install:
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, self._on_signal)

    def request(self, reason: str = "stop requested") -> None:
        """Asks for a stop as a signal would (for callers that are not signal handlers)."""
        self._start(reason)

    @property
    def requested(self) -> bool:
        return self._requested.is_set()

    @property
    def reason(self) -> str:
        """What asked for the stop ("SIGTERM caught", ...); empty before any request."""
        return self._signal_name

    def _on_signal(self, signum, _frame) -> None:
        name = signal.Signals(signum).name
        if self._requested.is_set():
            if signum == signal.SIGINT:
                logging.warning("Second SIGINT: exiting at once without saving.")
                os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
            logging.warning("%s caught again; the stop is already under way.", name)
            return
        self._start(f"{name} caught")

    def _start(self, reason: str) -> None:
        if self._requested.is_set():
            return
        self._signal_name = reason
        self._requested.set()
        phase = "training" if self._training else "start-up"
        logging.warning(
            "%s during %s; stopping (deadline %.0fs).", reason, phase, self.grace_seconds
        )
        threading.Thread(target=self._deadline, name="stop-deadline", daemon=True).start()

    def _deadline(self) -> None:
        time.sleep(self.grace_seconds)
        if self._training:
            dump_stacks_and_exit(
                f"{self._signal_name} {self.grace_seconds:.0f}s ago and the agreed "
                "checkpoint has not committed (distributed.preemption_grace_seconds)",
                ExitStatus.STALLED,
            )
        logging.warning("Stopped during start-up: nothing new to save.")
        logging.flush()
        os._exit(int(ExitStatus.PREEMPTED))  # pylint: disable=protected-access

    def check(self) -> None:
        """Raises StopBeforeStart if a stop was requested during start-up."""
        if self._requested.is_set() and not self._training:
            raise StopBeforeStart(f"{self._signal_name} before the first training step")

    def training_started(self) -> None:
        """From here on a stop means: agree on a step, save it, exit 75."""
        self.check()
        self._training = True


class Watchdog:
    """Exits the process (status 5, stacks logged) when progress stops for too long."""

    def __init__(self, floor_seconds: float):
        self.floor_seconds = floor_seconds
        self._last = time.monotonic()
        self._intervals: collections.deque[float] = collections.deque(maxlen=_WINDOW)
        self._lock = threading.Lock()
        self._armed = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.floor_seconds <= 0:
            return
        self._last = time.monotonic()
        self._armed.set()
        self._thread = threading.Thread(target=self._watch, name="stall-watchdog", daemon=True)
        self._thread.start()

    def beat(self, step_completed: bool = True) -> None:
        """Something completed; `step_completed` intervals feed the median step time."""
        now = time.monotonic()
        with self._lock:
            if step_completed:
                self._intervals.append(now - self._last)
            self._last = now

    def timeout(self) -> float:
        with self._lock:
            median = statistics.median(self._intervals) if self._intervals else 0.0
        return max(self.floor_seconds, _MEDIAN_MULTIPLE * median)

    def _watch(self) -> None:
        while not self._closed.wait(1.0):
            with self._lock:
                idle = time.monotonic() - self._last
            limit = self.timeout()
            if self._armed.is_set() and idle > limit:
                dump_stacks_and_exit(
                    f"stalled: no training step or eval batch completed for {idle:.0f}s "
                    f"(limit {limit:.0f}s, train.stall_timeout_seconds); a rerun resumes from "
                    "the last checkpoint",
                    ExitStatus.STALLED,
                )

    def close(self) -> None:
        self._closed.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
