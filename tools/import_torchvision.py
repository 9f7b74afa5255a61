"""Converts a torchvision ResNet's weights into a resnet.weights directory.

    python -m tools.import_torchvision --model=resnet50 --weights=resnet50.pth --output=DIR
    python -m tools.import_torchvision --model=resnet18 --weights=r18.pth --output=DIR \
        --num_classes=10 --class_names=classes.txt

`--weights` is a file written by `torch.save`: a `state_dict` (what torchvision's download
URLs hold), a whole torchvision ResNet, or a training checkpoint dict with the state_dict under
"model" or "state_dict" ("module." prefixes of DistributedDataParallel are dropped). Files are
read with `torch.load(weights_only=True)`, which allows the torchvision ResNet classes and the
torch.nn layers they use but runs no other pickled code; `--allow_pickle` lifts that for files
you trust. Requires torch and torchvision.

The networks agree layer for layer (tests/resnet/test_torchvision.py compares them with random
weights and statistics): the same padding (k // 2), stride on the bottleneck's 3x3 conv
(ResNet v1.5), max pool 3x3/2 with padding 1, BatchNorm epsilon 1e-5 and the same momentum
convention (torch's 0.1 is our 0.9). One difference remains in training mode only: torch
updates running_var with the unbiased batch variance, we with the biased one (as flax).

Conversion: conv kernels OIHW -> HWIO, the linear weight transposed, BatchNorm weight/bias/
running_mean/running_var -> scale/bias/mean/var, num_batches_tracked dropped. Every
torchvision key must be used and every variable of ours filled, else it stops with the names
of the leftovers. The stored preprocessing is torchvision's ImageNet one: mean and std times
255, and by default 224 pixels at crop 0.875 (resize 256, centre crop 224), the evaluation of
torchvision's V1 weights; its V2 weights are evaluated at 224 out of 232
(--eval_crop_fraction=0.9655).

Expected failures (unreadable file, keys or shapes that do not fit the model, an existing
output) print one `error: ...` line and exit 2 (bad input).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import app, flags
from flax import nnx

import resnet
import resnet.weights
from tools import cli

MODELS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")

# torchvision's ImageNet normalisation (transforms.Normalize on 0..1 pixels), on 0..255.
IMAGENET_PREPROCESSING = {
    "mean": [0.485 * 255, 0.456 * 255, 0.406 * 255],
    "std": [0.229 * 255, 0.224 * 255, 0.225 * 255],
    "image_size": 224,
    "eval_crop_fraction": 0.875,
}
# The options torchvision's ResNet implies (BatchNorm2d's default eps).
TORCHVISION_OPTIONS = {"shortcut": "projection", "bn_epsilon": 1e-5}


class ConversionError(ValueError):
    """The file or its contents do not fit the requested model."""


# --- the mapping ----------------------------------------------------------------------------

# Our module names -> torchvision's, where they differ.
_TOP = {"stem_conv": "conv1", "stem_bn": "bn1", "head": "fc"}
_SHORTCUT = {"conv": "downsample.0", "bn": "downsample.1"}
# Our variable names -> torchvision's parameter and buffer names.
_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torchvision_module(path: tuple[str, ...]) -> str:
    """Our module path (e.g. ("stages", "1", "0", "shortcut", "conv")) -> torchvision's
    module name ("layer2.0.downsample.0"). KeyError for modules torchvision does not have."""
    match tuple(str(p) for p in path):
        case (top,) if top in _TOP:
            return _TOP[top]
        case ("stages", stage, block):
            return f"layer{int(stage) + 1}.{block}"
        case ("stages", stage, block, "shortcut"):
            return f"layer{int(stage) + 1}.{block}.downsample"
        case ("stages", stage, block, "shortcut", layer) if layer in _SHORTCUT:
            return f"layer{int(stage) + 1}.{block}.{_SHORTCUT[layer]}"
        case ("stages", stage, block, layer):  # conv1, bn1, conv2, ... keep their names
            return f"layer{int(stage) + 1}.{block}.{layer}"
    raise KeyError(f"no torchvision module for {'/'.join(map(str, path))}")


def torchvision_key(path: str) -> str:
    """Our variable path ("stages/1/0/conv1/kernel") -> torchvision's state_dict key
    ("layer2.0.conv1.weight")."""
    *module, leaf = path.split("/")
    if leaf not in _LEAF:
        raise KeyError(f"no torchvision name for variable {path}")
    return f"{torchvision_module(tuple(module))}.{_LEAF[leaf]}"


def to_ours(array: np.ndarray) -> np.ndarray:
    """A torchvision tensor's layout -> ours: conv OIHW -> HWIO, linear (out, in) -> (in, out)."""
    if array.ndim == 4:
        return np.transpose(array, (2, 3, 1, 0))
    if array.ndim == 2:
        return array.T
    return array


# --- conversion -----------------------------------------------------------------------------


def _is_ignored(key: str) -> bool:
    return key.endswith(".num_batches_tracked")  # a counter: BN momentum is fixed, not 1/n


def convert_state_dict(
    model_name: str, state_dict: Mapping[str, Any], num_classes: int | None = None
) -> tuple[dict, dict, dict]:
    """torchvision state_dict (tensors or arrays) -> (model description, params, batch_stats),
    the last two as nested dicts of float32 numpy arrays ready for `resnet.weights.save`."""
    if model_name not in MODELS:
        raise ConversionError(f"unknown model {model_name!r}; valid: {', '.join(MODELS)}")
    arrays = {k: _numpy(v) for k, v in state_dict.items() if not _is_ignored(k)}
    for key in ("fc.weight", "conv1.weight"):
        if key not in arrays or arrays[key].ndim != (2 if key == "fc.weight" else 4):
            raise ConversionError(f"{key} is missing or misshapen: not a torchvision ResNet")
    found_classes = int(arrays["fc.weight"].shape[0])
    if num_classes is not None and num_classes != found_classes:
        raise ConversionError(
            f"--num_classes={num_classes} but fc.weight has {found_classes} classes "
            "(a new head belongs to fine-tuning: resnet.from_weights.assign(..., skip=('head',)))"
        )
    spec = {
        "name": model_name,
        "num_classes": found_classes,
        "in_channels": int(arrays["conv1.weight"].shape[1]),
        **TORCHVISION_OPTIONS,
    }
    abstract = nnx.eval_shape(
        lambda: resnet.create_model(
            model_name,
            num_classes=spec["num_classes"],
            in_channels=spec["in_channels"],
            shortcut=spec["shortcut"],
            bn_epsilon=spec["bn_epsilon"],
            rngs=nnx.Rngs(0),
        )
    )
    _, param_state, stat_state = nnx.split(abstract, nnx.Param, nnx.BatchStat)

    used: set[str] = set()
    missing: list[str] = []
    out: dict[str, dict] = {}
    for collection, state in (("params", param_state), ("batch_stats", stat_state)):
        flat = {}
        for path, var in nnx.to_flat_state(state):
            ours = "/".join(map(str, path))
            key = torchvision_key(ours)
            if key not in arrays:
                missing.append(key)
                continue
            value = to_ours(arrays[key])
            if value.shape != tuple(var.shape):
                raise ConversionError(
                    f"{key} has shape {arrays[key].shape}: as {ours} that is {value.shape}, "
                    f"{model_name} needs {tuple(var.shape)}"
                )
            flat[ours] = np.ascontiguousarray(value, np.float32)
            used.add(key)
        out[collection] = resnet.weights.unflatten(flat)
    leftover = sorted(set(arrays) - used)
    if missing or leftover:
        parts = [f"missing {len(missing)}: {_listing(missing)}"] if missing else []
        parts += [f"not used {len(leftover)}: {_listing(leftover)}"] if leftover else []
        raise ConversionError(f"the state_dict does not fit {model_name}: {'; '.join(parts)}")
    return spec, out["params"], out["batch_stats"]


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().float().numpy()
    return np.asarray(value, np.float32)


# --- reading .pth files ---------------------------------------------------------------------


def _safe_classes() -> list:
    import torch.nn as nn
    import torchvision.models.resnet as tv

    return [
        tv.ResNet,
        tv.BasicBlock,
        tv.Bottleneck,
        nn.Conv2d,
        nn.BatchNorm2d,
        nn.ReLU,
        nn.MaxPool2d,
        nn.AdaptiveAvgPool2d,
        nn.Linear,
        nn.Sequential,
    ]


def read_state_dict(file: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The state_dict in a torch.save file (see the module docstring), as numpy arrays."""
    try:
        import torch
    except ImportError:
        raise ConversionError("reading .pth files needs torch and torchvision installed") from None
    if not os.path.isfile(file):
        raise ConversionError(f"{file}: no such file")
    try:
        with torch.serialization.safe_globals(_safe_classes()):
            obj = torch.load(file, map_location="cpu", weights_only=not allow_pickle)
    except Exception as e:
        if isinstance(e, pickle.UnpicklingError) and not allow_pickle:
            try:
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(file)
            except Exception:
                unsafe = []
            raise ConversionError(
                f"{file}: refers to code weights_only loading does not run ({', '.join(unsafe)}); "
                "save the model's state_dict() instead, or pass --allow_pickle if you trust it"
            ) from None
        raise ConversionError(
            f"{file}: not readable by torch.load ({type(e).__name__}: {e})"
        ) from None

    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, Mapping) and not all(torch.is_tensor(v) for v in obj.values()):
        for wrapper in ("model", "state_dict"):  # training checkpoints
            inner = obj.get(wrapper)
            if isinstance(inner, torch.nn.Module):
                inner = inner.state_dict()
            if (
                isinstance(inner, Mapping)
                and inner
                and all(torch.is_tensor(v) for v in inner.values())
            ):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj or not all(torch.is_tensor(v) for v in obj.values()):
        what = (
            f"a dict with keys {sorted(obj)[:8]}"
            if isinstance(obj, Mapping)
            else type(obj).__name__
        )
        raise ConversionError(f"{file}: holds {what}, not a state_dict of tensors or a ResNet")
    keys = list(obj)
    if all(k.startswith("module.") for k in keys):  # DistributedDataParallel
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return {k: _numpy(v) for k, v in obj.items()}


def read_class_names(file: str | None) -> list[str] | None:
    """One name per line; "imagenet" gives torchvision's ImageNet-1k category names."""
    if file is None:
        return None
    if file == "imagenet":
        import torchvision

        return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    try:
        with open(file) as f:
            return [line.strip() for line in f if line.strip()]
    except OSError as e:
        raise ConversionError(f"{file}: {e.strerror}") from None


def import_torchvision(
    model_name: str,
    weights_file: str,
    output: str,
    *,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    dtype: str = "float32",
    allow_pickle: bool = False,
    image_size: int = 224,
    eval_crop_fraction: float = 0.875,
) -> None:
    """Reads `weights_file`, converts it and writes the weights directory `output`.

    `image_size` and `eval_crop_fraction` describe the eval transform stored with the weights
    (torchvision's IMAGENET1K_V2 weights are evaluated at 224 out of 232: 0.9655).
    """
    if os.path.lexists(output):  # save() checks again; this fails before the slow part
        raise ConversionError(f"{output} exists; weights are written to a new directory only")
    state_dict = read_state_dict(weights_file, allow_pickle)
    spec, params, batch_stats = convert_state_dict(model_name, state_dict, num_classes)
    with open(weights_file, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    try:
        resnet.weights.save(
            output,
            model=spec,
            params=params,
            batch_stats=batch_stats,
            preprocessing=dict(
                IMAGENET_PREPROCESSING, image_size=image_size, eval_crop_fraction=eval_crop_fraction
            ),
            class_names=class_names,
            dtype=dtype,
            metadata={
                "source": "torchvision",
                "file": os.path.basename(weights_file),
                "sha256": digest,
            },
        )
    except FileExistsError as e:
        raise ConversionError(str(e)) from None


# --- CLI ------------------------------------------------------------------------------------


def _define_flags() -> None:
    flags.DEFINE_enum("model", None, MODELS, "torchvision architecture of the weights.")
    flags.DEFINE_string("weights", None, "torch.save file: state_dict, model or checkpoint.")
    flags.DEFINE_string("output", None, "Weights directory to create (must not exist).")
    flags.DEFINE_integer(
        "num_classes", None, "Expected classes (default: fc.weight's); a check.", lower_bound=1
    )
    flags.DEFINE_string(
        "class_names", None, "Text file, one class name a line, or 'imagenet' (torchvision's)."
    )
    flags.DEFINE_integer("image_size", 224, "Eval input side stored with the weights.")
    flags.DEFINE_float(
        "eval_crop_fraction", 0.875, "Eval centre crop (of the short side) stored with the weights."
    )
    flags.DEFINE_enum("dtype", "float32", list(resnet.weights.DTYPES), "Stored array dtype.")
    flags.DEFINE_bool("allow_pickle", False, "Let torch.load run the file's pickled code.")
    flags.mark_flags_as_required(["model", "weights", "output"])


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    with cli.quiet_libraries():
        return _import(f)


def _import(f) -> int:
    try:
        import_torchvision(
            f.model,
            f.weights,
            f.output,
            num_classes=f.num_classes,
            class_names=read_class_names(f.class_names),
            dtype=f.dtype,
            allow_pickle=f.allow_pickle,
            image_size=f.image_size,
            eval_crop_fraction=f.eval_crop_fraction,
        )
    except ValueError as e:  # ConversionError, and save's checks (e.g. class name count)
        return cli.fail(e)
    print(f"wrote {f.output}")
    return 0


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
