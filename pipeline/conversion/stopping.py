"""Stopping a conversion on a signal: Ctrl-C, SIGTERM, or the terminal closing (SIGHUP).

Under `stop_on_signals()` (the CLI) these raise `Interrupted` in the main thread, and convert()
deletes its temporary folder on the way out: nothing is published. Once convert() starts
publishing (`commit()`), signals are only noted (`received()`): the rename into place is a
moment, and a dataset half replaced would be worse than one finished. Outside
stop_on_signals (convert() called by the launcher) nothing here touches signal handling.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """A stop signal arrived. A BaseException, like KeyboardInterrupt: no `except Exception`
    on the way may swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class _State:
    def __init__(self, active: bool = False):
        self.active = active  # stop_on_signals() installed the handlers
        self.holding = 0  # depth of held() blocks
        self.committed = False  # publishing began
        self.received: int | None = None  # the first stop signal
        self.raised = False  # Interrupted was raised once: later signals only wait


_state = _State()


def _raise_once(signum: int) -> None:
    _state.raised = True
    raise Interrupted(signum)


def _on_signal(signum: int, _frame) -> None:
    if _state.received is None:
        _state.received = signum
    if not (_state.holding or _state.committed or _state.raised):
        _raise_once(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Turns STOP_SIGNALS into Interrupted for the block (main thread only)."""
    global _state
    previous = {s: signal.signal(s, _on_signal) for s in STOP_SIGNALS}
    _state = _State(active=True)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        _state = _State()


@contextlib.contextmanager
def held() -> Iterator[None]:
    """Signals wait for the end of the block: for steps whose outcome the clean-up must know
    (a folder made, or not)."""
    _state.holding += 1
    try:
        yield
    finally:
        _state.holding -= 1
    if not (_state.holding or _state.committed or _state.raised) and _state.received:
        _raise_once(_state.received)


def commit() -> None:
    """From here on signals are noted, not raised: the dataset is published whole."""
    _state.committed = _state.active


def received() -> int | None:
    """The stop signal that arrived under stop_on_signals, if any."""
    return _state.received
