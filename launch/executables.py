"""Compiled steps (and the checkpoints' pre-save checks) kept per process, so that a restart
loads them instead of rebuilding them.

JAX's persistent compilation cache still traces and lowers every program before it can look
one up, and only process 0 writes entries (on the CPU backend the key also differs between
processes, so the other processes of a simulated cluster never hit it). Here each process
keeps its own serialized executables next to that cache, in `executables/`, and a restart
with the same program loads them without tracing, lowering or compiling.

Safety is in the key. It covers everything the executable depends on: the source of the
modules that define the model and the steps, the whole run config, the arguments that shape
the schedule, the abstract arguments with their shardings, every device of the mesh (id,
process, kind, coordinates, slice), this process's index, the jax/jaxlib/flax/optax
versions, the backend's platform version, XLA's flags and JAX's own configuration. Anything
else that changes means another file name, so a changed program recompiles and is never
loaded in place of the one asked for. A file that cannot be read or loaded is reported and
replaced by a fresh compile. Loading runs code from the file (pickle), so it is only read
from the run's own cache folder, with the trust the run's checkpoints have.

Only fresh compiles are kept: an executable that JAX itself loaded from its persistent cache
serializes incompletely on the CPU backend (loading that copy fails at the first call with
"Function ... not found"), so when JAX's cache answered, nothing is written here.
"""

from __future__ import annotations

import collections
import hashlib
import importlib.metadata
import json
import os
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import logging
from etils import epath
from jax.experimental import serialize_executable

_PACKAGES = ("jax", "jaxlib", "flax", "optax")
_ENV = ("XLA_FLAGS", "LIBTPU_INIT_ARGS", "TPU_ACCELERATOR_TYPE", "MEGASCALE_NUM_SLICES")
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The code a step is made of: the model, its layers, the steps and how they are put together.
_SOURCES = ("resnet", os.path.join("launch", "program.py"))


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
    """What every executable of this process depends on, beyond its own program."""
    backend = jax.devices()[0].client
    return {
        "sources": source_digest(),
        "versions": {p: _version(p) for p in _PACKAGES},
        "platform": [backend.platform, backend.platform_version],
        "mesh": [list(mesh.axis_names), list(mesh.devices.shape)],
        "devices": [_device(d) for d in mesh.devices.flat],
        "process": jax.process_index(),
        "env": {name: os.environ.get(name, "") for name in _ENV},
        "jax_config": sorted((k, repr(v)) for k, v in jax.config.values.items()),
    }


def cache_folder() -> str | None:
    """Where executables live: `executables/` in JAX's compilation cache folder, if one is set."""
    root = getattr(jax.config, "jax_compilation_cache_dir", None)
    return os.path.join(root, "executables") if root else None


def load_or_compile(
    name: str, lower: Callable[[], jax.stages.Lowered], key: dict[str, Any], abstract_args: Any
) -> jax.stages.Compiled:
    """The executable of `lower()`, loaded from this process's cache when the key matches.

    `name` names the program in the file name and log ("train_step"); `key` holds what the
    program depends on besides `abstract_args` (see `environment_key`).
    """
    folder = cache_folder()
    if folder is None:
        return lower().compile()
    material = json.dumps(
        {"program": key, "args": abstract_signature(abstract_args)}, sort_keys=True
    )
    digest = hashlib.sha256(material.encode()).hexdigest()[:32]
    path = epath.Path(folder) / f"{name}-p{jax.process_index()}-{digest}.jaxexe"
    start = time.perf_counter()
    compiled = _load(path)
    if compiled is not None:
        logging.info("Loaded the compiled %s (%.1fs).", name, time.perf_counter() - start)
        return compiled
    hits = _jax_cache_hits[threading.get_ident()]
    compiled = lower().compile()
    if _jax_cache_hits[threading.get_ident()] == hits:
        _save(path, compiled)
    return compiled


def _load(path: epath.Path) -> jax.stages.Compiled | None:
    try:
        if not path.exists():
            return None
        blob, in_tree, out_tree = pickle.loads(path.read_bytes())
        return serialize_executable.deserialize_and_load(blob, in_tree, out_tree)
    except Exception as e:  # pylint: disable=broad-except  # unreadable: compile it again
        logging.warning("Compiled program %s could not be loaded (%s); compiling it.", path, e)
        path.unlink(missing_ok=True)  # a cache entry: a fresh compile replaces it
        return None


def _save(path: epath.Path, compiled: jax.stages.Compiled) -> None:
    """Writes the executable atomically (a temp file renamed into place); a cache, so a
    failure to write is logged and the run goes on."""
    try:
        payload = pickle.dumps(serialize_executable.serialize(compiled))
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".{path.name}.{os.getpid()}.tmp"
        temp.write_bytes(payload)
        temp.replace(path)
    except (OSError, ValueError, NotImplementedError, pickle.PicklingError) as e:
        logging.warning("Compiled program not kept for restarts (%s): %s", path, e)
