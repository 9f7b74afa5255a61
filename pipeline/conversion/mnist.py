"""Reads MNIST: IDX files (gzipped or not), train-* or t10k-*; each digit becomes raw pixels
(the default) or a PNG (encoding="encoded")."""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import zlib

import numpy as np

from pipeline.conversion.errors import ConversionError
from pipeline.conversion.images import encode_array
from pipeline.conversion.source import SPLITS, Source, pick_split


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip, whatever the file name says
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:  # zlib.error: damaged deflate data
            raise ConversionError(f"{path}: corrupt gzip data ({e})") from None
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise ConversionError(f"{path}: too short for an IDX header ({len(data)} bytes)")
    got, *dims = struct.unpack_from(f">{1 + ndim}I", data)
    if got != magic:
        raise ConversionError(f"{path}: IDX magic number is {got}, expected {magic}")
    if len(data) - header != math.prod(dims):
        raise ConversionError(
            f"{path}: header says shape {dims} ({math.prod(dims)} bytes) but "
            f"the file holds {len(data) - header} bytes of data"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


def _find_mnist(path: str, prefix: str) -> tuple[str, str] | None:
    def first(kind: str, idx: str) -> str | None:
        # "train-images-idx3-ubyte" is the original name; some mirrors use
        # "train-images.idx3-ubyte".
        for name in (f"{prefix}-{kind}-{idx}-ubyte", f"{prefix}-{kind}.{idx}-ubyte"):
            for candidate in (name, name + ".gz"):
                if os.path.isfile(os.path.join(path, candidate)):
                    return os.path.join(path, candidate)
        return None

    images, labels = first("images", "idx3"), first("labels", "idx1")
    if not images:
        return None
    if not labels:
        raise ConversionError(f"found {images} but no {prefix}-labels-idx1-ubyte[.gz] next to it")
    return images, labels


def read_mnist(path: str, split: str | None) -> Source:
    if not os.path.isdir(path):
        raise ConversionError(f"mnist input {path!r} is not a directory")
    prefixes = {"train": "train", "test": "t10k"}
    found = {s: f for s in SPLITS if (f := _find_mnist(path, prefixes[s]))}
    split = pick_split(
        "mnist", path, split, found, "train-images-idx3-ubyte[.gz] or t10k-images-idx3-ubyte[.gz]"
    )
    images_path, labels_path = found[split]
    images = _read_idx(images_path, 2051, 3)
    labels = _read_idx(labels_path, 2049, 1)
    if len(images) != len(labels):
        raise ConversionError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and labels.max() > 9:
        raise ConversionError(f"{labels_path}: label {labels.max()} is not a digit 0..9")
    _, rows, cols = images.shape
    items = [(i, int(labels[i]), images[i]) for i in range(len(images))]
    return Source(
        split,
        [str(d) for d in range(10)],
        [rows, cols, 1],
        items,
        functools.partial(encode_array, False),
        rows * cols,
    )
