"""The progress of a conversion: one line redrawn on a terminal, log lines otherwise."""

from __future__ import annotations

import math
import sys
import time

from absl import logging

PROGRESS_INTERVAL_S = 5.0  # log lines when stderr is not a terminal
TTY_PROGRESS_INTERVAL_S = 0.2  # redraws of the progress line on a terminal


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Examples done, rate and ETA: one line redrawn in place on a terminal, a log line every
    PROGRESS_INTERVAL_S otherwise (files, pipes, batch jobs)."""

    def __init__(self, what: str, total: int, enabled: bool, stream=None):
        self.what, self.total, self.enabled = what, total, enabled
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = enabled and bool(isatty and isatty())
        self.start = self.last = time.monotonic()
        self.drawn = False  # a progress line is on the terminal, not ended by a newline

    def line(self, done: int, skipped: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else math.inf
        percent = 100.0 * done / max(self.total, 1)
        text = (
            f"{self.what}: {done}/{self.total} ({percent:.0f}%), {rate:.0f} images/s, "
            f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}, {skipped} skipped"
        )
        if self.tty:
            filled = int(20 * done / max(self.total, 1))
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {text}"
        return text

    def update(self, done: int, skipped: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interval = TTY_PROGRESS_INTERVAL_S if self.tty else PROGRESS_INTERVAL_S
        if not force and now - self.last < interval:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r" + self.line(done, skipped, now) + "\x1b[K")
            self.stream.flush()
            self.drawn = True
        else:
            logging.info("%s", self.line(done, skipped, now))

    def interrupt(self) -> None:
        """Clears the progress line before something else is printed on the terminal."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
