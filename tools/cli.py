"""What the after-training tools (export, predict, import_torchvision) share on the command line.

A tool's user reads its result, or one `error: ...` line, and the exit statuses are the
launcher's (launch/status.py): 2 (bad input) when the tool cannot work on what it was given
(flags, a missing or foreign folder, an output that exists), 1 (failed) when the work found
damage (an array that does not match its SHA-256) or left some of it undone (images that could
not be classified).

Two kinds of library output would bury the error line, so the tools keep them out:

- Orbax logs every save and restore at INFO, and warns about files it merely looks for.
- When one array of a restore cannot be read, Orbax ends its event loop at once (the failure
  reaches the tool as an exception) while TensorStore's other reads are still in flight. Each
  of those reads, finishing later in TensorStore's thread, hands its result to the closed loop
  and raises "Event loop is closed" there, an unraisable exception that Python prints as a
  traceback; asyncio adds "Task exception was never retrieved" for the read that failed. Both
  repeat the error the tool already reported.
"""

from __future__ import annotations

import contextlib
import logging as std_logging
import os
import sys
from collections.abc import Callable, Iterator

from absl import app, flags, logging

from launch.status import ExitStatus

_LIBRARY_DIRS = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorstore"))


class _LibraryNoise(std_logging.Filter):
    """Drops Orbax's and TensorStore's records below ERROR and asyncio's echo of a failed read."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.name == "asyncio" and str(record.msg).startswith("Task exception was never"):
            return False
        from_library = any(d in record.pathname for d in _LIBRARY_DIRS)
        return not (from_library and record.levelno < std_logging.ERROR)


def _closed_loop_echo(unraisable) -> bool:
    error = unraisable.exc_value
    return isinstance(error, RuntimeError) and str(error) == "Event loop is closed"


def _silence() -> Callable[[], None]:
    """Installs the quiet (see the module docstring); returns what undoes it."""
    verbosity = logging.get_verbosity()
    handler = logging.get_absl_handler()
    noise = _LibraryNoise()
    default_hook = sys.unraisablehook

    def hook(unraisable) -> None:
        if not _closed_loop_echo(unraisable):
            default_hook(unraisable)

    logging.set_verbosity(logging.WARNING)
    handler.addFilter(noise)
    sys.unraisablehook = hook

    def undo() -> None:
        sys.unraisablehook = default_hook
        handler.removeFilter(noise)
        logging.set_verbosity(verbosity)

    return undo


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Within: absl logs at WARNING and above, without Orbax's noise or the closed-loop echoes."""
    undo = _silence()
    try:
        yield
    finally:
        undo()


def fail(error: object, status: ExitStatus | None = None) -> int:
    """Prints `error` as the one `error: ...` line (on one line whatever it holds); returns
    `status`, by default 1 (failed) for damage found (`DigestMismatch`), else 2 (bad input)."""
    from resnet import weights  # pylint: disable=g-import-not-at-top

    if status is None:
        damaged = isinstance(error, weights.DigestMismatch)
        status = ExitStatus.FAILED if damaged else ExitStatus.BAD_INPUT
    message = " ".join(str(error).split())
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()
    return int(status)


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag as one `error:` line and exit status 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(fail(e))


def run(main: Callable[[list[str]], int]) -> None:
    """`app.run(main)`, quiet for the whole life of the process: the echoes of a failed read
    can arrive after `main` has returned, while the interpreter shuts down. Usage errors are
    one line and exit 2, like the launcher's."""
    _silence()

    def main_with_usage_errors(argv: list[str]) -> int:
        try:
            return main(argv)
        except app.UsageError as e:
            return fail(e)

    app.run(main_with_usage_errors, flags_parser=_parse_flags)
