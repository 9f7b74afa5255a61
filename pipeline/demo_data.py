"""The embedded demo dataset: the MNIST test set shipped in the repository.

Its 10,000 digits are split deterministically by example id (every fifth digit is held out
for evaluation: 8,000 train, 2,000 eval) and converted to ArrayRecord once per machine, into
a cache outside every workdir: $RESNET_MULTIHOST_CACHE, else $XDG_CACHE_HOME/resnet-multihost,
else ~/.cache/resnet-multihost. A workdir then holds only a run's own files, and a command
that finds no run in a workdir leaves it as it was.

The converted folder, CACHE/mnist-t10k-<fingerprint of the source files>/{train,eval}, is
built under a private name and renamed into place whole, with a list of its files' SHA-256
digests that is checked on every use: a folder that fails the check (edited, truncated, half
deleted) is moved aside with a warning and converted again, never read. On each machine one
process converts while the others wait on a lock in the cache folder; hosts that share the
cache folder share one conversion, and where that lock does not reach (a shared disk without
working locks) the rename still keeps one whole copy and discards the other.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import shutil
import socket
import time

from absl import logging

import pipeline
from pipeline import conversion, records
from pipeline.conversion import publishing

DATASETS = {"mnist": "mnist-t10k"}
EVAL_EVERY = 5
SPLITS = ("train", "eval")
CACHE_ENV = "RESNET_MULTIHOST_CACHE"
MANIFEST = "SHA256SUMS.json"
LOCK_FILE = ".lock"
LOCK_TIMEOUT_SECONDS = 600.0  # a conversion takes seconds; a lock held this long is stuck


def _in_split(split: str, example_id: int) -> bool:
    held_out = example_id % EVAL_EVERY == 0
    return held_out if split == "eval" else not held_out


def cache_root() -> str:
    """Where converted demo data is kept: $RESNET_MULTIHOST_CACHE or the user's cache folder."""
    root = os.environ.get(CACHE_ENV)
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "resnet-multihost")
    if "://" in root:
        raise ValueError(
            f"{CACHE_ENV}={root}: the embedded demo data is converted on local disk; "
            "give a local folder"
        )
    return os.path.abspath(root)


def prepare(name: str, cache_dir: str | None = None) -> tuple[str, str]:
    """The (train_dir, eval_dir) of the embedded dataset `name`, converted into the cache
    (`cache_dir`, default `cache_root()`) unless a checked copy is there already.

    Raises ValueError, with one line naming the setting to change, for an unknown name or a
    cache folder that cannot be written.
    """
    if name not in DATASETS:
        raise ValueError(
            f"config.data.embedded={name!r}: the embedded datasets are {sorted(DATASETS)}"
        )
    source = os.path.join(pipeline.EMBEDDED_DIR, DATASETS[name])
    root = os.path.abspath(cache_dir or cache_root())
    folder = os.path.join(root, f"{DATASETS[name]}-{_fingerprint(source)}")
    if problem(folder) is not None:
        try:
            _convert_once(name, source, folder)
        except (OSError, conversion.ConversionError) as e:
            raise ValueError(
                f"cannot convert the embedded demo data into {root} ({e}); set {CACHE_ENV} to a "
                "writable local folder"
            ) from None
    return os.path.join(folder, "train"), os.path.join(folder, "eval")


def _fingerprint(source: str) -> str:
    """Names the conversion's inputs: the source files, the split rule and the record schema."""
    digest = hashlib.sha256(f"eval_every={EVAL_EVERY} schema={records.SCHEMA_VERSION}".encode())
    for name in sorted(n for n in os.listdir(source) if n.endswith(".gz")):
        digest.update(name.encode())
        digest.update(_sha256(os.path.join(source, name)).encode())
    return digest.hexdigest()[:16]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(functools.partial(f.read, 1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _listing(folder: str) -> dict[str, str]:
    """Every entry under `folder` but the manifest, relative, as "file" or what else it is."""
    entries = {}
    for parent, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(parent, name)
            rel = os.path.relpath(path, folder).replace(os.sep, "/")
            if os.path.islink(path):
                entries[rel] = "a symlink"
            elif name in files:
                entries[rel] = "file"
    entries.pop(MANIFEST, None)
    return entries


def _digests(folder: str) -> dict[str, str]:
    return {rel: _sha256(os.path.join(folder, rel)) for rel in sorted(_listing(folder))}


def problem(folder: str) -> str | None:
    """Why the converted folder cannot be trusted ("absent" when there is none); None if its
    files are exactly those its manifest lists, each with its digest."""
    if not os.path.lexists(folder):
        return "absent"
    try:
        with open(os.path.join(folder, MANIFEST), "rb") as f:
            listed = json.loads(f.read())
    except (OSError, ValueError) as e:
        return f"its {MANIFEST} is missing or unreadable ({e})"
    if not (isinstance(listed, dict) and all(isinstance(v, str) for v in listed.values())):
        return f"its {MANIFEST} is not a mapping of files to digests"
    entries = _listing(folder)
    odd = sorted(rel for rel, kind in entries.items() if kind != "file")
    missing, extra = sorted(set(listed) - set(entries)), sorted(set(entries) - set(listed))
    if odd or missing or extra:
        return f"its files differ from its {MANIFEST} (missing {missing}, unexpected {extra + odd})"
    for rel, want in sorted(listed.items()):
        if _sha256(os.path.join(folder, rel)) != want:
            return f"{rel} does not match its digest"
    return None


def _convert_once(name: str, source: str, folder: str) -> None:
    """Converts into `folder` unless another process did while this one waited for the lock;
    moves a folder that fails its check aside first."""
    root = os.path.dirname(folder)
    os.makedirs(root, exist_ok=True)
    with _locked(os.path.join(root, LOCK_FILE)):
        why = problem(folder)
        if why is None:
            return
        if why != "absent":
            aside = publishing.fresh_folder(f"{folder}.rejected")
            os.rename(folder, aside)  # rename(2) replaces the empty placeholder atomically
            logging.warning(
                "The cached demo data at %s cannot be trusted (%s): moved aside to %s; "
                "converting it again.",
                folder,
                why,
                aside,
            )
        _build(name, source, folder)


def _build(name: str, source: str, folder: str) -> None:
    """Converts both splits into a private folder, then renames it to `folder` whole."""
    private = publishing.fresh_folder(
        os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.tmp-"
                     f"{socket.gethostname()}-{os.getpid()}")
    )  # fmt: skip
    try:
        for split in SPLITS:
            logging.info("Converting the embedded %s %s split into %s", name, split, folder)
            conversion.convert(
                name,
                source,
                os.path.join(private, split),
                keep=functools.partial(_in_split, split),
                progress=False,
            )
        manifest = os.path.join(private, MANIFEST)
        with open(manifest, "w") as f:
            f.write(json.dumps(_digests(private), indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.rename(private, folder)
        except OSError:
            # Another host got there first (a shared disk whose locks do not reach here).
            if problem(folder) is not None:
                raise
    finally:
        shutil.rmtree(private, ignore_errors=True)


@contextlib.contextmanager
def _locked(path: str):
    """Holds an exclusive lock on `path`; the system releases it if this process dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_SECONDS
        waiting = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OSError(
                        f"another process has held {path} for over {LOCK_TIMEOUT_SECONDS:.0f}s"
                    ) from None
                if not waiting:
                    logging.info("Waiting for another process converting the demo data.")
                    waiting = True
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)
