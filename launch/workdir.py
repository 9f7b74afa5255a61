"""The run directory: checked before anything is set up, and held by one run at a time.

Every path a run will write (the workdir, its checkpoints and TensorBoard folders, the lock,
FINISHED, metrics.jsonl, the compilation cache) is checked at start-up, before the compile:
a file where a folder is needed, or a folder that cannot be written, is a `WorkdirError`
naming the path, not a failed save after hours of training. Local paths only: a gs:// path
is checked by its first write.

Two launchers on one workdir would interleave their checkpoints (one deleted the other's
in-progress save in a probe), so process 0 holds `WORKDIR/LOCK` for the whole run. The lock
records who holds it and is refreshed every `REFRESH_SECONDS`, because a preempted run never
gets to release it: a lock whose holder is a dead process on this host, or whose refresh is
older than `STALE_SECONDS`, is taken over with a warning. A live holder is waited for up to
`STALE_SECONDS` (a requeued job may start before the old one has fully gone); after that the
new launcher gives up naming the holder.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid

from absl import logging
from etils import epath

LOCK_FILE = "LOCK"
REFRESH_SECONDS = 15.0
STALE_SECONDS = 90.0


class WorkdirError(Exception):
    """The workdir cannot be used: not writable, not a directory, or held by another run."""


def check_run_paths(workdir: str, folders: dict[str, str], files: dict[str, str]) -> None:
    """Checks the workdir and every path the run will write, then creates the workdir.

    `folders` and `files` map paths (relative ones are under the workdir) to what they are
    for, which the error names. Nothing is created unless every check passes.
    """
    if not workdir.strip():
        raise WorkdirError("--workdir is empty: name the folder the run keeps its checkpoints in")
    where = lambda path: path if _remote(path) else os.path.join(workdir, path)
    checks = [(workdir, "--workdir", _check_folder)]
    checks += [(where(path), purpose, _check_folder) for path, purpose in folders.items()]
    checks += [(where(path), purpose, _check_file) for path, purpose in files.items()]
    for path, purpose, check in checks:
        if not _remote(path):
            check(path, purpose)
    if not _remote(workdir):
        try:
            os.makedirs(workdir, exist_ok=True)
        except OSError as e:
            raise WorkdirError(f"--workdir={workdir} is not writable: {e.strerror or e}") from None


def _remote(path: str) -> bool:
    return "://" in path


def _label(path: str, purpose: str) -> str:
    return f"{purpose}={path}" if purpose.startswith("--") else f"{path} ({purpose})"


def _what(path: str) -> str:
    if os.path.islink(path) and not os.path.exists(path):
        return "a broken link"
    return "a folder" if os.path.isdir(path) else "a file"


def _check_folder(path: str, purpose: str) -> None:
    if os.path.lexists(path) and not os.path.isdir(path):
        raise WorkdirError(
            f"{_label(path, purpose)} exists and is not a directory ({_what(path)}): move it "
            "away or use another --workdir"
        )
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing) or "."
    if not os.path.isdir(existing):
        raise WorkdirError(
            f"{_label(path, purpose)} cannot be created: {existing} is {_what(existing)}, "
            "not a directory"
        )
    _probe(existing, path, purpose)


def _check_file(path: str, purpose: str) -> None:
    if os.path.isdir(path) or (os.path.islink(path) and not os.path.exists(path)):
        raise WorkdirError(
            f"{_label(path, purpose)} is {_what(path)} where the run writes a file: move it "
            "away or use another --workdir"
        )
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise WorkdirError(f"{_label(path, purpose)} is not writable")


def _probe(directory: str, path: str, purpose: str) -> None:
    """Creates and removes a file in `directory`: a read-only mount or missing permission
    shows here, whoever runs the process."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=directory)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"{_label(path, purpose)} is not writable ({directory}: {e.strerror or e})"
        ) from None


def _process_start_time(pid: int) -> str | None:
    """The kernel's start time of `pid` (tells a live holder from a reused pid); None if gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class WorkdirLock:
    """Exclusive hold of a workdir by one run (call on process 0 only)."""

    def __init__(self, workdir: str):
        self._path = epath.Path(workdir) / LOCK_FILE
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _record(self) -> dict:
        return {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_start": _process_start_time(os.getpid()),
            "token": self._token,
            "refreshed": time.time(),
        }

    def _read(self) -> dict | None:
        try:
            record = json.loads(self._path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # unreadable: treated as stale below
        return record if isinstance(record, dict) else {}

    def _stale(self, holder: dict) -> str | None:
        """Why the recorded holder no longer holds the lock, or None if it may still."""
        refreshed, pid = holder.get("refreshed"), holder.get("pid", -1)
        if not isinstance(refreshed, (int, float)) or not isinstance(pid, int):
            return "the lock file is unreadable"
        if holder.get("host") == socket.gethostname():
            start = _process_start_time(pid)
            if start is None or start != holder.get("pid_start"):
                return f"its process {holder.get('pid')} on this host is gone"
            return None
        age = time.time() - float(holder["refreshed"])
        if age > STALE_SECONDS:
            return f"it was last refreshed {age:.0f}s ago"
        return None

    def _try_create(self) -> bool:
        data = json.dumps(self._record())
        if str(self._path).startswith("gs://"):
            # No exclusive create through epath: write, then read back who won.
            if self._read() is not None:
                return False
            self._path.write_text(data)
            return (self._read() or {}).get("token") == self._token
        try:
            fd = os.open(str(self._path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(data)
        return True

    def acquire(self, wait_seconds: float = STALE_SECONDS) -> None:
        deadline = time.monotonic() + wait_seconds
        while not self._try_create():
            holder = self._read()
            if holder is None:
                continue  # released between our two looks
            reason = self._stale(holder)
            if reason:
                logging.warning(
                    "Taking over %s from %s (pid %s): %s.",
                    self._path,
                    holder.get("host"),
                    holder.get("pid"),
                    reason,
                )
                self._path.unlink(missing_ok=True)
                continue
            same_host = holder.get("host") == socket.gethostname()
            if same_host or time.monotonic() > deadline:
                raise WorkdirError(
                    f"{self._path.parent} is in use by another run: process {holder.get('pid')} "
                    f"on {holder.get('host')} holds {self._path} (refreshed "
                    f"{time.time() - float(holder['refreshed']):.0f}s ago). Stop that run or "
                    "use another --workdir; delete the LOCK file only if that run is gone."
                )
            logging.info("Waiting for %s, held by %s...", self._path, holder.get("host"))
            time.sleep(5)
        self._thread = threading.Thread(target=self._refresh, name="workdir-lock", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_SECONDS):
            try:
                holder = self._read() or {}
                if holder.get("token") != self._token:
                    logging.error("%s was taken over by %s", self._path, holder.get("host"))
                    return
                self._path.write_text(json.dumps(self._record()))
            except OSError as e:  # a storage hiccup must not kill the run; the next try may work
                logging.warning("Could not refresh %s: %s", self._path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            try:
                if (self._read() or {}).get("token") == self._token:
                    self._path.unlink(missing_ok=True)
            except OSError as e:
                logging.warning("Could not remove %s: %s", self._path, e)
