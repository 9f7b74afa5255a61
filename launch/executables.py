"""Compiled steps (and the checkpoints' pre-save checks) kept across restarts and shared
between processes, so that a restart loads them and a cluster compiles each program once.

JAX's persistent compilation cache still traces and lowers every program before it can look
one up, and only process 0 writes entries (on the CPU backend the key also differs between
processes, by the topology's fingerprint alone, so the other processes of a simulated cluster
never hit it). Here the serialized executables live next to that cache, in `executables/`,
and a restart with the same program loads them without tracing, lowering or compiling.

Every process of an SPMD program runs the same executable, so it is compiled once. Process 0
loads or compiles it and hands it to the others through the coordination service (as JAX's
`jax_share_binary_between_hosts` does on GPUs); a process that finds the file itself does not
wait. Where process 0 cannot hand one over (it was loaded from JAX's own cache, or did not
serialize), it says so and each process compiles its own.

Safety is in the key. It covers everything the executable depends on: the source of the
modules that define the model and the steps, the run config (but for its host-only sections,
see `launch.program`), the arguments that shape the schedule, the abstract arguments with
their shardings, every device of the mesh (id, process, kind, coordinates, slice), the
jax/jaxlib/flax/optax versions, the backend's platform version, XLA's flags and JAX's and
flax's own configuration. Anything else that changes means another file name, so a changed
program recompiles and is never loaded in place of the one asked for. A file that cannot be
read or loaded is reported and replaced by a fresh compile. Loading runs code from the file
(pickle), so it is only read from the run's own cache folder or taken from process 0 of the
run, with the trust the run's checkpoints have.

What the programs are traced from, the model's graph definition and the shapes of its state,
is kept the same way (`load_or_build`, under the program's key less the abstract arguments,
which come from it): a restart reads it back instead of building the model again.

Only fresh compiles are kept: an executable that JAX itself loaded from its persistent cache
serializes incompletely on the CPU backend (loading that copy fails at the first call with
"Function ... not found"), so when JAX's cache answered, nothing is written here.

Loading ahead. A restart cannot name its executables before it has built the program (the key
needs the abstract state, hence flax, optax and the model), yet loading one is mostly XLA's
own work, which needs only the backend and runs without the GIL. So each process records the
entries its start-up used (`record_used`: `last-used-<run>-p<process>.json` here, <run> a
digest of the workdir), and the next start of that run begins loading those files in a
background thread as soon as the backend is up (`preload`), while the main thread imports
the rest and checks the data. `load_or_compile` takes a preloaded executable only for the
entry name it computed itself: a changed program has another name and never meets what was
read ahead.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import io
import json
import os
import pickle
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import serialize_executable

from launch import distributed

_PACKAGES = ("jax", "jaxlib", "flax", "optax")
_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "TPU_ACCELERATOR_TYPE", "MEGASCALE_NUM_SLICES")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code a step is made of: the model, its layers, the steps, how they are put together and
# the plan's figures they take (BatchNorm groups, micro-batches).
_SOURCES = ("resnet", os.path.join("launch", "program.py"), os.path.join("launch", "plan.py"))
# Where process 0 hands executables over in the coordination service, and how long another
# process waits for one before compiling its own.
_KV_PREFIX = "launch/executables/"
SHARE_TIMEOUT_SECONDS = 1800
# A file holds (the executable's bytes, its pickled pytrees): the bytes load before the
# classes in the trees (flax's, optax's) are imported. In every key: another layout, other names.
_FORMAT = 2
_LAST_USED = "last-used-{run}-p{process}.json"  # run: a digest of the run's identity (workdir)
_ENTRY = re.compile(r"[a-z_]+-[0-9a-f]{32}")


_jax_cache_hits: collections.Counter[int] = collections.Counter()  # per compiling thread


def _count_jax_cache_hit(event: str, **_) -> None:
    if event == "/jax/compilation_cache/cache_hits":  # recorded in the compiling thread
        _jax_cache_hits[threading.get_ident()] += 1


jax.monitoring.register_event_listener(_count_jax_cache_hit)


def source_digest(entries: tuple[str, ...] = _SOURCES) -> str:
    """A digest of the Python files of `entries` (files or folders, relative to the repo)."""
    digest = hashlib.sha256()
    for entry in entries:
        path = os.path.join(_REPO, entry)
        files = (
            sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(".py"))
            if os.path.isdir(path)
            else [path]
        )
        for name in files:
            digest.update(os.path.relpath(name, _REPO).encode())
            with open(name, "rb") as f:
                digest.update(hashlib.sha256(f.read()).digest())
    return digest.hexdigest()


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _device(d) -> list:
    return [d.id, d.process_index, d.device_kind, getattr(d, "coords", None),
            getattr(d, "slice_index", None)]  # fmt: skip


def abstract_signature(tree: Any) -> str:
    """The tree's structure and every leaf's shape, dtype and sharding, as text."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shown = [(x.shape, str(x.dtype), str(getattr(x, "sharding", None))) for x in leaves]
    return f"{treedef}|{shown}"


def environment_key(mesh: jax.sharding.Mesh) -> dict[str, Any]:
    """What every executable on `mesh` depends on, beyond its own program: the same in every
    process of the run."""
    import flax  # pylint: disable=g-import-not-at-top  # not before a start-up loads ahead

    backend = jax.devices()[0].client
    return {
        "sources": source_digest(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "platform": [backend.platform, backend.platform_version],
        "mesh": [list(mesh.axis_names), list(mesh.devices.shape)],
        "devices": [_device(d) for d in mesh.devices.flat],
        "env": {name: os.environ.get(name, "") for name in _ENV},
        "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
        # Its settings (FLAX_* variables) shape the variables' metadata, hence the trees.
        "flax_config": repr(flax.config),
    }


def cache_folder() -> str | None:
    """Where executables live: `executables/` in JAX's compilation cache folder, if one is set."""
    root = getattr(jax.config, "jax_compilation_cache_dir", None)
    return os.path.join(root, "executables") if root else None


def load_or_compile(
    name: str,
    lower: Callable[[], jax.stages.Lowered],
    key: dict[str, Any],
    abstract_args: Any,
    *,
    compiled_by: int = 0,
) -> jax.stages.Compiled:
    """The executable of `lower()`: loaded from the cache folder when the key matches, else
    compiled by process `compiled_by` (negative: counted from the last) and handed to the
    others.

    `name` names the program in the file name and log ("train_step"); `key` holds what the
    program depends on besides `abstract_args` (see `environment_key`). Every process of a
    multi-process run calls this for the same programs; giving programs that compile at the
    same time different `compiled_by` spreads the compiling over the hosts.
    """
    folder = cache_folder()
    if folder is None:
        return lower().compile()
    entry = _entry(name, {"program": key, "args": abstract_signature(abstract_args)})
    path = epath.Path(folder) / f"{entry}.jaxexe"
    start = time.perf_counter()
    compiled, how = _load_or_compile(entry, path, lower, compiled_by % jax.process_count())
    _used.append((name, entry, how))
    if how != "compiled":
        seconds = time.perf_counter() - start
        logging.info("Loaded the compiled %s (%.1fs; %s).", name, seconds, how)
    return compiled


def _entry(name: str, material: dict[str, Any]) -> str:
    """A cache entry's name: `name` and a digest of what it depends on (and of the format)."""
    text = json.dumps({**material, "format": _FORMAT}, sort_keys=True)
    return f"{name}-{hashlib.sha256(text.encode()).hexdigest()[:32]}"


def load_or_build(name: str, build: Callable[[], Any], key: dict[str, Any]) -> Any:
    """`build()`, kept in the cache folder beside the executables and read back, not built,
    by a restart with the same `key`: for what the programs are traced from (the model's graph
    and state shapes), which takes longer to build than to read. Must pickle; where it does
    not, or the file does not load, it is built (and reported)."""
    folder = cache_folder()
    if folder is None:
        return build()
    path = epath.Path(folder) / f"{_entry(name, {'program': key})}.pkl"
    if payload := _read(path):
        try:
            return pickle.loads(payload)
        except Exception as e:  # pylint: disable=broad-except  # built again, replaced below
            logging.warning("%s could not be read back (%s); building it again.", path, e)
    value = build()
    try:
        payload = pickle.dumps(value)
    except Exception as e:  # pylint: disable=broad-except  # a cache: built again next time
        logging.warning("%s not kept for restarts: %s", path, e)
    else:
        _write(path, payload)
    return value


def _load_or_compile(
    entry: str, path: epath.Path, lower: Callable[[], jax.stages.Lowered], compiler: int
) -> tuple[jax.stages.Compiled, str]:
    """(the executable, how it came: "compiled", "read ahead", "loaded" or "from process N")."""
    if jax.process_index() == compiler:
        handed_over = b""  # tells the others to compile their own
        try:
            compiled, how = _load_entry(entry, path)  # the others find the same file
            if compiled is None:
                compiled, handed_over = _compile(lower, path)
                return compiled, "compiled"
        finally:
            if jax.process_count() > 1:
                _hand_over(entry, handed_over)
        return compiled, how
    compiled, how = _load_entry(entry, path)
    if compiled is None:
        compiled, how = _from_process(compiler, entry, path), f"from process {compiler}"
    if compiled is None:
        return _compile(lower, path)[0], "compiled"
    return compiled, how


def _hand_over(entry: str, payload: bytes) -> None:
    try:
        distributed.coordination_client().key_value_set_bytes(
            _KV_PREFIX + entry, payload, allow_overwrite=True
        )
    except Exception as e:  # pylint: disable=broad-except  # the others compile their own
        logging.warning("Could not hand the compiled %s to the other processes: %s", entry, e)


def _compile(lower: Callable[[], jax.stages.Lowered], path: epath.Path):
    """(the fresh executable, its serialized form, written to `path`; or b"" where JAX's own
    cache answered or it does not serialize)."""
    hits = _jax_cache_hits[threading.get_ident()]
    compiled = lower().compile()
    payload = b""
    if _jax_cache_hits[threading.get_ident()] == hits:
        payload = _serialize(compiled, path)
        if payload:
            _write(path, payload)
    else:  # another key, the same program (an edited comment, a changed flag it ignores)
        logging.info(
            "%s came from JAX's compilation cache: not kept from this process (such "
            "executables serialize incompletely), nor handed to the other processes, which "
            "compile their own (a fresh compile is kept).",
            path.name,
        )
    return compiled, payload


def _from_process(compiler: int, entry: str, path: epath.Path) -> jax.stages.Compiled | None:
    """The executable process `compiler` hands over (kept in this process's cache folder
    too, which on a shared one is already there), or None where it has none to give."""
    try:
        payload = distributed.coordination_client().blocking_key_value_get_bytes(
            _KV_PREFIX + entry, SHARE_TIMEOUT_SECONDS * 1000
        )
    except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError: deadline
        logging.warning(
            "No compiled %s came from process %d (%s); compiling it.", entry, compiler, e
        )
        return None
    compiled = _load(path, payload, source=f"{entry} from process {compiler}")
    if compiled is not None and not path.exists():
        _write(path, payload)
    return compiled


def _read(path: epath.Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:  # absent (the usual miss), or unreadable: compiled again
        return b""


def _load(path: epath.Path, payload: bytes, source: str = "") -> jax.stages.Compiled | None:
    """The executable in `payload`, or None if it is empty or cannot be loaded (a damaged file
    is removed: a fresh compile replaces it)."""
    if not payload:
        return None
    try:
        blob, trees = pickle.loads(payload)
        return _with_trees(_deserialize(blob), trees)
    except Exception as e:  # pylint: disable=broad-except  # unreadable: compile it again
        where = source or str(path)
        logging.warning("Compiled program %s could not be loaded (%s); compiling it.", where, e)
        if not source:
            path.unlink(missing_ok=True)  # a cache entry: a fresh compile replaces it
        return None


# Loading split in two, as `serialize_executable.deserialize_and_load` does it (jax 0.10 and
# 0.11): the executable on this process's devices with its flat argument info, which needs no
# class beyond jax's; then the pytrees, which need the model's and the optimizer's.
def _deserialize(blob: bytes) -> tuple[Any, list[Any], bool]:
    backend = jax.devices()[0].client
    unpickler = serialize_executable._JaxPjrtUnpickler(  # pylint: disable=protected-access
        io.BytesIO(blob), backend, backend.devices()
    )
    unloaded, args_info_flat, no_kwargs = unpickler.load()
    return unloaded.load(), args_info_flat, no_kwargs


def _with_trees(loaded: tuple[Any, list[Any], bool], trees: bytes) -> jax.stages.Compiled:
    executable, args_info_flat, no_kwargs = loaded
    in_tree, out_tree = pickle.loads(trees)
    args_info = in_tree.unflatten(args_info_flat)
    return jax.stages.Compiled(executable, [], args_info, out_tree, no_kwargs=no_kwargs)


def _serialize(compiled: jax.stages.Compiled, path: epath.Path) -> bytes:
    try:
        blob, in_tree, out_tree = serialize_executable.serialize(compiled)
        return pickle.dumps((blob, pickle.dumps((in_tree, out_tree))))
    except (ValueError, NotImplementedError, pickle.PicklingError) as e:
        logging.warning("Compiled program not kept for restarts (%s): %s", path, e)
        return b""


def _write(path: epath.Path, payload: bytes) -> None:
    """Writes `payload` atomically (a temp file renamed into place); a cache, so a failure
    to write is logged and the run goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Unique across hosts too: processes of several hosts may write the same entry into a
        # shared folder at once (same bytes; the last rename wins), and containers share pids.
        temp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        temp.write_bytes(payload)
        temp.replace(path)
    except Exception as e:  # pylint: disable=broad-except  # gcsfs raises its own errors
        logging.warning("Not kept for restarts (%s): %s", path, e)


# --- loading ahead ------------------------------------------------------------------------

_used: list[tuple[str, str, str]] = []  # (name, entry, how it came) per program, in order


def programs() -> list[list[str]]:
    """[name, how it came] for each program this process has asked for (see `_load_or_compile`)."""
    return [[name, how] for name, _, how in _used]


class _Ahead:
    """The background load of the entries recorded in `record`, one after another in the
    order they were used. `take(entry)` gives the loaded executable (before its pytrees) and
    its pickled trees; None where the record does not name it, its load failed, or its load
    had not begun (the caller then loads it itself rather than wait behind the others).

    The thread is not a daemon: a process that exits while XLA is deserializing would abort
    (SIGABRT) instead of exiting with its own status, so the exit waits for the load under
    way, and no further load begins once the main thread has ended."""

    def __init__(self, folder: epath.Path, record: epath.Path):
        self.entries: list[str] = []
        self._named = threading.Event()  # set once the record has been read (or not)
        self._lock = threading.Lock()
        self._waiting: dict[str, futures.Future] = {}  # loads not begun
        self._begun: dict[str, futures.Future] = {}
        self._folder, self._record = folder, record
        threading.Thread(target=self._run, name="preload-executables").start()

    def _run(self) -> None:
        try:
            entries = json.loads(self._record.read_text())
            if isinstance(entries, list):
                self.entries = [e for e in entries if isinstance(e, str) and _ENTRY.fullmatch(e)]
        except Exception:  # pylint: disable=broad-except  # no record (a first start) or
            pass  # an unreadable one (on any file system): nothing is read ahead
        finally:
            with self._lock:
                self._waiting = {entry: futures.Future() for entry in self.entries}
            self._named.set()
        while threading.main_thread().is_alive():
            with self._lock:
                if not self._waiting:
                    return
                entry, future = next(iter(self._waiting.items()))
                self._begun[entry] = self._waiting.pop(entry)
            loaded = None  # whatever goes wrong, `take` gets an answer
            try:
                blob, trees = pickle.loads((self._folder / f"{entry}.jaxexe").read_bytes())
                loaded = (_deserialize(blob), trees)
            except Exception:  # pylint: disable=broad-except  # the usual path reports it
                pass
            finally:
                future.set_result(loaded)

    def take(self, entry: str):
        self._named.wait()
        with self._lock:
            self._waiting.pop(entry, None)
            future = self._begun.pop(entry, None)
        return None if future is None else future.result()


_ahead: _Ahead | None = None


def _record(folder: str, run: str) -> epath.Path:
    digest = hashlib.sha256(run.encode()).hexdigest()[:16]
    return epath.Path(folder) / _LAST_USED.format(run=digest, process=jax.process_index())


def preload(run: str) -> None:
    """Starts loading, in the background, the executables that the last start-up of `run`
    (the launcher passes its workdir) used in this process, as `record_used` recorded them;
    call once the backend is up. Without a cache folder, nothing. What is loaded and not
    taken is let go at `record_used`."""
    global _ahead
    folder = cache_folder()
    if folder is not None and _ahead is None:
        _ahead = _Ahead(epath.Path(folder), _record(folder, run))


def record_used(run: str) -> None:
    """Records the entries used so far as those the next start of `run` loads ahead (written
    only when they changed; a cache, so a failure to write is logged and ignored), and lets
    go of whatever was read ahead and not taken (it may hold device memory)."""
    global _ahead
    folder = cache_folder()
    used = list(dict.fromkeys(entry for _, entry, _ in _used))
    # Every entry in `used` went through `take`, which waited for the record: `entries` is
    # complete here.
    recorded = _ahead.entries if _ahead is not None else None
    _ahead = None
    if folder is None or not used or recorded == used:
        return
    _write(_record(folder, run), json.dumps(used).encode())


def _load_entry(entry: str, path: epath.Path) -> tuple[jax.stages.Compiled | None, str]:
    """(the executable of `entry`, "read ahead" or "loaded"): from the load ahead where it
    read this entry, else from its file (None where there is none or it cannot be loaded)."""
    ahead = _ahead.take(entry) if _ahead is not None else None
    if ahead is not None:
        try:
            return _with_trees(*ahead), "read ahead"
        except Exception:  # pylint: disable=broad-except  # read again below, and reported
            pass
    return _load(path, _read(path)), "loaded"
