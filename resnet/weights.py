"""A portable format for a trained model's inference variables: writing, reading, checking.

A weights directory holds everything needed to run a model, and nothing about how it was
trained:

    DIR/model.json   format name and version, the model (what `resnet.create_model` needs to
                     rebuild the same function), the input preprocessing, the class names and
                     the dtype of the stored arrays
    DIR/arrays/      Orbax (StandardCheckpointer) tree {"params": ..., "batch_stats": ...}: the
                     plain nested dicts of `nnx.to_pure_dict(state)`, keys as strings

`model.json` (version 1):

    {
      "format": "resnet-multihost-weights",
      "version": 1,
      "model": {"name": "resnet50", "num_classes": 1000, "in_channels": 3,
                "shortcut": "projection", "bn_epsilon": 1e-05},
      "preprocessing": {"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375],
                        "image_size": 224, "eval_crop_fraction": 0.875},
      "class_names": ["tench", ...] or null,
      "dtype": "float32" or "bfloat16",
      "sha256": {"params/stem_conv/kernel": "9f86d0...", ...},
      "metadata": {...}   (free-form provenance, not interpreted)
    }

`sha256` holds, for every stored array (by its path under `arrays/`), the SHA-256 of its bytes
in the stored dtype, C order, little-endian. `load` recomputes them and refuses the directory
if any array differs by a single bit: a flipped bit in a parameter would otherwise change the
model's answers without any error.

`model` lists every constructor option that changes the computed function. Options that only
change how training runs or how the same numbers are computed (`bn_momentum`,
`zero_init_residual`, `batch_norm`, `max_pool`, the compute dtype) are not stored; pass them to
`resnet.from_weights.build` or `assign`. `mean`/`std` are per channel on the 0..255 pixel
scale, as `resnet.steps.normalize` uses them; `image_size` and `eval_crop_fraction` describe
the eval transform of `pipeline.transforms` (centre crop of that fraction of the short side,
resized to `image_size`).

Use:

    resnet.weights.save(path, model=..., params=..., batch_stats=..., preprocessing=...)
    weights = resnet.weights.load(path)          # arrays (verified) and description

and `resnet.from_weights` to run them (build a model, assign them into one, predict). Paths
are local file system paths; `save` runs in one process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import resnet

FORMAT = "resnet-multihost-weights"
VERSION = 1
MODEL_JSON = "model.json"
ARRAYS = "arrays"
DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(jnp.bfloat16)}

# Constructor options stored in model.json: those that change the computed function.
MODEL_OPTIONS = ("in_channels", "shortcut", "bn_epsilon")
MODEL_KEYS = ("name", "num_classes", *MODEL_OPTIONS)
PREPROCESSING_KEYS = ("mean", "std", "image_size", "eval_crop_fraction")
COLLECTIONS = ("params", "batch_stats")

Tree = dict[str, Any]  # nested dicts with str keys and numpy array leaves


@dataclasses.dataclass(frozen=True)
class Weights:
    """The contents of a weights directory (its arrays verified against their digests).

    `params` and `batch_stats` are nested dicts with str keys (list indices as "0", "1", ...)
    of numpy arrays in the stored dtype, shaped as the model's variables (conv kernels HWIO).
    """

    model: dict[str, Any]  # name, num_classes, in_channels, shortcut, bn_epsilon
    preprocessing: dict[str, Any]  # mean, std (0..255, per channel), image_size, crop fraction
    class_names: tuple[str, ...] | None
    params: Tree
    batch_stats: Tree
    dtype: str = "float32"
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


# --- nested dicts -----------------------------------------------------------------------------


def _pure(tree: Any) -> Any:
    """nnx.State or nested mapping -> nested dict with str keys (empty subtrees dropped)."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if isinstance(tree, Mapping):
        out = {str(k): _pure(v) for k, v in tree.items()}
        return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}
    if isinstance(tree, nnx.Variable):
        tree = tree.get_value()
    return tree


def flatten(tree: Mapping) -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update({f"{key}/{k}": v for k, v in flatten(value).items()})
        else:
            out[str(key)] = value
    return out


def unflatten(flat: Mapping[str, Any]) -> Tree:
    """{"a/b": x} -> {"a": {"b": x}}."""
    out: Tree = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def variable_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """Flat path ("stages/0/1/conv1/kernel") -> shape of every variable in `state`."""
    return {"/".join(map(str, path)): tuple(var.shape) for path, var in nnx.to_flat_state(state)}


def _listing(paths: Iterable[str], limit: int = 8) -> str:
    paths = sorted(paths)
    more = f" and {len(paths) - limit} more" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


def check_variables(expected: Mapping[str, tuple], given: Mapping[str, Any], what: str) -> None:
    """Raises ValueError unless `given` (flat path -> array) has exactly the `expected` paths
    (flat path -> shape), with those shapes; names the missing, extra or first mismatching path.
    """
    missing = [p for p in expected if p not in given]
    extra = [p for p in given if p not in expected]
    if missing or extra:
        parts = [f"missing {len(missing)}: {_listing(missing)}"] if missing else []
        parts += [f"unexpected {len(extra)}: {_listing(extra)}"] if extra else []
        raise ValueError(f"{what} do not match the model: {'; '.join(parts)}")
    for path, shape in expected.items():
        got = tuple(np.shape(given[path]))
        if got != tuple(shape):
            raise ValueError(f"{what}: {path} has shape {got}, the model needs {tuple(shape)}")


class DigestMismatch(ValueError):
    """A stored array is not what was written: its bytes differ from model.json's digest."""


def array_sha256(array: np.ndarray) -> str:
    """SHA-256 of the array's bytes: C order, little-endian, in its own dtype."""
    array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.byteswap().view(array.dtype.newbyteorder("<"))
    return hashlib.sha256(array.reshape(-1).view(np.uint8).data).hexdigest()


def _check_sha256(sha256: Any, where: str) -> dict[str, str]:
    if not isinstance(sha256, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in sha256.items()
    ):
        raise ValueError(f"{where}: 'sha256' must map array paths to hex digests")
    return dict(sha256)


def verify_arrays(arrays: Mapping[str, np.ndarray], sha256: Mapping[str, str], path: str) -> None:
    """Raises DigestMismatch naming the first array (and the folder) whose bytes are not the
    ones written, or the arrays that are missing or not listed in model.json."""
    missing = sorted(set(sha256) - set(arrays))
    extra = sorted(set(arrays) - set(sha256))
    if missing or extra:
        parts = [f"missing {_listing(missing)}"] if missing else []
        parts += [f"not listed in {MODEL_JSON}: {_listing(extra)}"] if extra else []
        raise DigestMismatch(
            f"{path}: the stored arrays differ from {MODEL_JSON} ({'; '.join(parts)})"
        )
    changed = [p for p in sorted(arrays) if array_sha256(arrays[p]) != sha256[p]]
    if changed:
        others = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise DigestMismatch(
            f"{path}: array {changed[0]}{others} does not match its SHA-256 in {MODEL_JSON}: "
            "the weights were changed or damaged after they were written"
        )


# --- model description ------------------------------------------------------------------------


def _constructor_default(option: str) -> Any:
    return inspect.signature(resnet.ResNet.__init__).parameters[option].default


def abstract_model(spec: Mapping[str, Any], dtype: Any = jnp.float32, **options) -> nnx.Module:
    """The model `spec` (model.json's `model`) describes, shapes only (nothing allocated)."""
    kwargs = {k: spec[k] for k in MODEL_OPTIONS if k in spec}
    return nnx.eval_shape(
        lambda: resnet.create_model(
            spec["name"],
            num_classes=spec["num_classes"],
            rngs=nnx.Rngs(0),
            dtype=dtype,
            **kwargs,
            **options,
        )
    )


def modules_of(model: nnx.Module, kind) -> list:
    """Every submodule of `model` that is an instance of `kind`."""
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, kind)]


def _check_model_spec(model: Any, where: str) -> dict[str, Any]:
    if not isinstance(model, Mapping):
        raise ValueError(f"{where}: 'model' must be an object, got {type(model).__name__}")
    unknown = sorted(set(model) - set(MODEL_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown model option(s) {unknown}; known: {list(MODEL_KEYS)}")
    spec = dict(model)
    if spec.get("name") not in resnet.MODEL_NAMES:
        raise ValueError(
            f"{where}: model name {spec.get('name')!r} is not one of "
            + ", ".join(resnet.MODEL_NAMES)
        )
    for key in ("num_classes", "in_channels"):
        value = spec.get(key, 1)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{where}: model {key} must be a positive integer, got {value!r}")
    if "num_classes" not in spec:
        raise ValueError(f"{where}: model num_classes is missing")
    if "shortcut" in spec and spec["shortcut"] not in resnet.SHORTCUTS:
        raise ValueError(
            f"{where}: model shortcut {spec['shortcut']!r} is not one of {resnet.SHORTCUTS}"
        )
    if "bn_epsilon" in spec:
        eps = spec["bn_epsilon"]
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f"{where}: model bn_epsilon must be a positive number, got {eps!r}")
        spec["bn_epsilon"] = float(eps)
    return spec


def _complete_model_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Writes out the defaults the constructor applies, so that model.json is explicit."""
    spec = dict(spec)
    spec.setdefault("in_channels", _constructor_default("in_channels"))
    spec.setdefault("bn_epsilon", float(_constructor_default("bn_epsilon")))
    # The family's (projection for ImageNet, zero_pad CIFAR), read from the table that
    # create_model reads: every training start writes this, so no model is built for it.
    spec.setdefault("shortcut", resnet.ARCHITECTURES[spec["name"]].shortcut)
    return {k: spec[k] for k in MODEL_KEYS}


def model_spec(name: str, num_classes: int, **options) -> dict[str, Any]:
    """model.json's `model` for `resnet.create_model(name, num_classes=..., **options)`:
    the stored options (those that change the function), defaults written out."""
    stored = {k: options[k] for k in MODEL_OPTIONS if k in options}
    spec = _check_model_spec({"name": name, "num_classes": num_classes, **stored}, "model_spec")
    return _complete_model_spec(spec)


def _check_preprocessing(pre: Any, in_channels: int, where: str) -> dict[str, Any]:
    if not isinstance(pre, Mapping):
        raise ValueError(f"{where}: 'preprocessing' must be an object, got {type(pre).__name__}")
    keys = set(pre)
    if keys != set(PREPROCESSING_KEYS):
        raise ValueError(
            f"{where}: preprocessing needs exactly {list(PREPROCESSING_KEYS)}; "
            f"missing {sorted(set(PREPROCESSING_KEYS) - keys)}, "
            f"unknown {sorted(keys - set(PREPROCESSING_KEYS))}"
        )
    out: dict[str, Any] = {}
    for key in ("mean", "std"):
        values = pre[key]
        if (
            isinstance(values, (str, bytes, Mapping))
            or not hasattr(values, "__len__")
            or len(values) != in_channels
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        ):
            raise ValueError(
                f"{where}: preprocessing {key} must be {in_channels} number(s) (one per input "
                f"channel, 0..255 scale), got {values!r}"
            )
        out[key] = [float(v) for v in values]
    if not all(s > 0 for s in out["std"]):
        raise ValueError(f"{where}: preprocessing std must be positive, got {out['std']}")
    size = pre["image_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(
            f"{where}: preprocessing image_size must be a positive integer, got {size!r}"
        )
    out["image_size"] = size
    crop = pre["eval_crop_fraction"]
    if not isinstance(crop, (int, float)) or isinstance(crop, bool) or not 0 < crop <= 1:
        raise ValueError(
            f"{where}: preprocessing eval_crop_fraction must be in (0, 1], got {crop!r}"
        )
    out["eval_crop_fraction"] = float(crop)
    return out


def _check_class_names(names: Any, num_classes: int, where: str) -> tuple[str, ...] | None:
    if names is None:
        return None
    if isinstance(names, (str, bytes)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: class_names must be a list of strings or null")
    names = tuple(names)
    if len(names) != num_classes:
        raise ValueError(f"{where}: {len(names)} class_names for {num_classes} classes")
    return names


# --- save and load ----------------------------------------------------------------------------


def save(
    path: str | os.PathLike,
    *,
    model: Mapping[str, Any],
    params: nnx.State | Mapping,
    batch_stats: nnx.State | Mapping,
    preprocessing: Mapping[str, Any],
    class_names: Iterable[str] | None = None,
    dtype: str = "float32",
    metadata: Mapping[str, Any] | None = None,
) -> None:
    """Writes a new weights directory at `path` (see the module docstring).

    `model` holds `name`, `num_classes` and any of `in_channels`, `shortcut`, `bn_epsilon`;
    the others get the constructor's defaults, written out. `params` and `batch_stats` are the
    model's nnx.Param and nnx.BatchStat states (or their pure dicts); they are checked against
    the described model, every variable with its shape, and stored as `dtype` ("float32" or
    "bfloat16"). The directory is written under a temporary name beside `path` and renamed
    into place when complete. Raises FileExistsError if `path` exists, ValueError for
    arguments that do not describe a loadable model.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        raise FileExistsError(f"{path} exists; weights are written to a new directory only")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    spec = _complete_model_spec(_check_model_spec(model, "save"))
    abstract = abstract_model(spec)
    pre = _check_preprocessing(preprocessing, spec["in_channels"], "save")
    names = _check_class_names(
        None if class_names is None else list(class_names), spec["num_classes"], "save"
    )
    # Flax types split() with filters as variadic; it returns one State per filter.
    _, param_state, stat_state = nnx.split(abstract, nnx.Param, nnx.BatchStat)  # type: ignore[misc]
    tree = {}
    for name, given, state in (
        ("params", params, param_state),
        ("batch_stats", batch_stats, stat_state),
    ):
        flat = flatten(_pure(given))
        check_variables(variable_shapes(state), flat, f"save: {name}")
        tree[name] = unflatten(
            {
                p: np.asarray(jax.device_get(v), np.float32).astype(DTYPES[dtype])
                for p, v in flat.items()
            }
        )
    description = {
        "format": FORMAT,
        "version": VERSION,
        "model": spec,
        "preprocessing": pre,
        "class_names": None if names is None else list(names),
        "dtype": dtype,
        "sha256": {p: array_sha256(v) for p, v in sorted(flatten(tree).items())},
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(description, indent=2, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"save: metadata is not JSON-serialisable: {e}") from None

    parent = os.path.dirname(path)
    made = _make_folders(parent)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        os.mkdir(tmp)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.join(tmp, ARRAYS), tree)
            checkpointer.wait_until_finished()
        with open(os.path.join(tmp, MODEL_JSON), "w") as f:
            f.write(text)
        _rename_to_new(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in reversed(made):  # a failed save leaves no trace
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        raise


def _make_folders(folder: str) -> list[str]:
    """Creates `folder` and missing parents; returns those it created, outermost first."""
    missing = []
    while not os.path.isdir(folder) and folder != os.path.dirname(folder):
        missing.append(folder)
        folder = os.path.dirname(folder)
    for f in reversed(missing):
        os.makedirs(f, exist_ok=True)
    return missing[::-1]


def _rename_to_new(source: str, path: str) -> None:
    """Renames `source` to `path` unless something is there: a folder is never replaced."""
    exists = FileExistsError(f"{path} exists; weights are written to a new directory only")
    if os.path.lexists(path):  # appeared meanwhile
        raise exists
    try:
        os.rename(source, path)
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR):
            raise exists from None
        raise


def not_weights_message(path: str) -> str:
    return f"{path} has no {MODEL_JSON}: not a weights folder written by tools.export"


def load(path: str | os.PathLike) -> Weights:
    """Reads a weights directory; ValueError naming the file if it is missing or not one."""
    path = os.path.abspath(os.fspath(path))
    json_path = os.path.join(path, MODEL_JSON)
    if not os.path.isdir(path):
        raise ValueError(f"{path}: no such weights directory")
    if not os.path.isfile(json_path):
        raise ValueError(not_weights_message(path))
    try:
        with open(json_path) as f:
            description = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{json_path}: unreadable ({e})") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else None
        raise ValueError(f"{json_path}: format is {found!r}, expected {FORMAT!r}")
    version = description.get("version")
    if version != VERSION:
        raise ValueError(f"{json_path}: version {version!r}, this code reads version {VERSION}")
    for key in ("model", "preprocessing", "class_names", "dtype", "sha256"):
        if key not in description:
            raise ValueError(f"{json_path}: {key!r} is missing")
    spec = _check_model_spec(description["model"], json_path)
    missing = [k for k in MODEL_KEYS if k not in spec]
    if missing:
        raise ValueError(f"{json_path}: model {missing} missing")
    pre = _check_preprocessing(description["preprocessing"], spec["in_channels"], json_path)
    names = _check_class_names(description["class_names"], spec["num_classes"], json_path)
    dtype = description["dtype"]
    if dtype not in DTYPES:
        raise ValueError(f"{json_path}: dtype {dtype!r} is not one of {list(DTYPES)}")
    sha256 = _check_sha256(description["sha256"], json_path)
    metadata = description.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{json_path}: metadata must be an object")

    arrays_path = os.path.join(path, ARRAYS)
    if not os.path.isdir(arrays_path):
        raise ValueError(f"{arrays_path}: missing; {path} is not a complete weights directory")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(arrays_path)
    except Exception as e:  # Orbax raises many kinds for a damaged tree; all mean the same here
        raise ValueError(
            f"{arrays_path}: cannot be read as an Orbax tree ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(tree, Mapping) or set(tree) != set(COLLECTIONS):
        keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
        raise ValueError(f"{arrays_path}: holds {keys}, expected {list(COLLECTIONS)}")
    flat = {p: np.asarray(v) for p, v in flatten(_pure(tree)).items()}
    wrong = [p for p, v in sorted(flat.items()) if v.dtype != DTYPES[dtype]]
    if wrong:
        raise ValueError(
            f"{arrays_path}: {wrong[0]} is {flat[wrong[0]].dtype}, model.json says {dtype}"
        )
    verify_arrays(flat, sha256, path)
    collections = unflatten(flat)
    return Weights(
        model=spec,
        preprocessing=pre,
        class_names=names,
        params=collections.get("params", {}),
        batch_stats=collections.get("batch_stats", {}),
        dtype=dtype,
        metadata=metadata,
    )


__all__ = [
    "ARRAYS",
    "DTYPES",
    "DigestMismatch",
    "FORMAT",
    "MODEL_JSON",
    "MODEL_KEYS",
    "VERSION",
    "Weights",
    "abstract_model",
    "array_sha256",
    "check_variables",
    "flatten",
    "load",
    "model_spec",
    "modules_of",
    "not_weights_message",
    "save",
    "unflatten",
    "variable_shapes",
]
