"""Reads CIFAR-10/100: the python pickle batches (data_batch_1..5 / test_batch, or train /
test), with an unpickler that only builds the numpy arrays and lists they hold; raw pixels by
default, as for mnist."""

from __future__ import annotations

import codecs
import functools
import os
import pickle
import re
from typing import Any

import numpy as np
from absl import logging

from pipeline.conversion.errors import ConversionError
from pipeline.conversion.images import encode_array
from pipeline.conversion.source import Source, pick_split

_NUMPY_CORE = getattr(np, "_core", None) or np.core  # numpy 2 renamed numpy.core
# Everything a CIFAR batch pickle may name: numpy 1 (the originals: Python 2 cPickle, numpy's
# _reconstruct) and numpy 2 spellings, protocol 5 arrays, and the _codecs.encode that Python 3
# uses for bytes at protocols 0-2. None of these runs code it is given.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
    **{(f"{m}.multiarray", "_reconstruct"): _NUMPY_CORE.multiarray._reconstruct
       for m in ("numpy.core", "numpy._core")},
    **{(f"{m}.numeric", "_frombuffer"): _NUMPY_CORE.numeric._frombuffer
       for m in ("numpy.core", "numpy._core")},
}  # fmt: skip


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _CifarUnpickler(pickle.Unpickler):
    """Builds only dicts, lists, bytes, numbers and numpy arrays: a crafted "batch" cannot run
    code (plain pickle.load calls any function the file names, e.g. os.system)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _CIFAR_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _load_pickle(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="bytes").load()
    except OSError as e:
        raise ConversionError(f"{path}: cannot read ({e.strerror or e})") from None
    except _ForbiddenGlobal as e:
        raise ConversionError(
            f"{path}: refusing to unpickle it: it references {e}, which no CIFAR batch does "
            "(a crafted pickle runs code this way)"
        ) from None
    except Exception as e:  # unpickling raises many types for damaged or foreign files
        raise ConversionError(
            f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})"
        ) from None
    if not isinstance(obj, dict):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a CIFAR dict")
    return obj


def read_cifar(path: str, split: str | None, fmt: str) -> Source:
    cifar100 = fmt == "cifar100"
    if not os.path.isdir(path):
        raise ConversionError(f"{fmt} input {path!r} is not a directory")
    inner = os.path.join(path, "cifar-100-python" if cifar100 else "cifar-10-batches-py")
    if os.path.isdir(inner):  # the folder the archive was extracted into
        path = inner
    # Plain files only: opening a FIFO named like a batch would wait forever.
    names = {n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n))}
    if cifar100:
        splits = {"train": ["train"], "test": ["test"]}
        expected, meta_file, names_key, labels_key = (
            "train / test",
            "meta",
            b"fine_label_names",
            b"fine_labels",
        )
    else:
        batches = [n for n in names if re.fullmatch(r"data_batch_\d+", n)]
        splits = {
            "train": sorted(batches, key=lambda n: int(n.rsplit("_", 1)[1])),
            "test": ["test_batch"],
        }
        expected, meta_file, names_key, labels_key = (
            "data_batch_1..5 / test_batch",
            "batches.meta",
            b"label_names",
            b"labels",
        )
    found = {s: files for s, files in splits.items() if files and set(files) <= names}
    split = pick_split(fmt, path, split, found, expected)
    if not cifar100 and split == "train" and len(found["train"]) != 5:
        logging.warning("%s: found %d training batches, expected 5", path, len(found["train"]))

    num_classes = 100 if cifar100 else 10
    class_names = [str(i) for i in range(num_classes)]
    if os.path.isfile(os.path.join(path, meta_file)):
        meta = _load_pickle(os.path.join(path, meta_file))
        if names_key in meta:
            class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]

    pixels, labels = [], []
    for name in found[split]:
        batch = _load_pickle(os.path.join(path, name))
        if b"data" not in batch or labels_key not in batch:
            raise ConversionError(
                f"{name}: missing b'data' or {labels_key!r} ({fmt} batch expected)"
            )
        data = np.asarray(batch[b"data"], np.uint8)
        if data.ndim != 2 or data.shape[1] != 3072 or len(batch[labels_key]) != len(data):
            raise ConversionError(
                f"{name}: data shape {data.shape} with {len(batch[labels_key])} "
                "labels; expected N x 3072 and N labels"
            )
        pixels.append(data)
        labels += [int(x) for x in batch[labels_key]]
    if labels and not 0 <= min(labels) <= max(labels) < len(class_names):
        raise ConversionError(
            f"{fmt} labels span {min(labels)}..{max(labels)}, "
            f"but there are {len(class_names)} classes"
        )
    # Rows are channel-major (1024 R, 1024 G, 1024 B); PNG wants HxWx3.
    images = np.concatenate(pixels).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    images = np.ascontiguousarray(images)
    items = [(i, label, images[i]) for i, label in enumerate(labels)]
    return Source(
        split, class_names, [32, 32, 3], items, functools.partial(encode_array, False), 3072
    )
