"""Converts an image dataset into sharded ArrayRecord files in the schema of records.py.

The command line is `python -m tools.make_arrayrecord`; the launcher calls `convert` directly
for the embedded demo data. docs/data.md is the user's reference for everything below.

Formats:
  imagefolder  INPUT/<class>/<image>: class index = position in the sorted folder names. JPEG
               and PNG bytes are kept as they are (after a full decode check); other formats
               PIL reads, and 16-bit images, are re-encoded as 8-bit PNG; images over
               `max_pixels`, or over the bounded size (`shorter_side`, `max_side`), are
               downscaled once with a Lanczos filter (JPEG stays JPEG at `jpeg_quality`, the
               rest PNG). Undecodable and floating-point images are skipped (or, with --strict,
               fail the conversion). Symlinks are followed, but no file becomes two examples
               (see _list_imagefolder). encoding="raw" stores RGB pixels instead and needs
               every (bounded) image to have one size.
  mnist        IDX files (gzipped or not), train-* or t10k-*; each digit becomes raw pixels
               (the default) or a PNG (encoding="encoded").
  cifar10/100  the python pickle batches (data_batch_1..5 / test_batch, or train / test), read
               with an unpickler that only builds the numpy arrays and lists they hold; raw
               pixels by default, as for mnist.

The output folder holds `data-XXXXX-of-YYYYY.array_record` shards, each a contiguous block of
examples in example order, plus `metadata.json`. Everything is written into a fresh
`OUTPUT.tmp-<pid>-<random>` folder and renamed to OUTPUT only when complete, so a failed or
killed conversion never leaves a folder that looks like a dataset. The output may not be, hold
or lie inside the input; an existing output is replaced (with `overwrite`) only if it is a
symlink or a dataset this module wrote, and nothing but its own files is ever deleted. The same
input gives byte-identical output, whatever --num_workers is.
"""

from __future__ import annotations

import codecs
import collections
import contextlib
import dataclasses
import functools
import gzip
import io
import json
import math
import multiprocessing
import os
import pickle
import re
import shutil
import struct
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
from absl import logging
from array_record.python import array_record_module
from PIL import Image

from pipeline import records

FORMATS = ("imagefolder", "mnist", "cifar10", "cifar100")
SPLITS = ("train", "test")

# group_size:1 makes every record its own chunk, so a random-access read decodes one record
# instead of a whole group (array_record issue #143; Grain logs an error for any other size).
# Measured here (ArrayRecordDataSource, random __getitem__, 2 shared CPU cores):
#   1,000 records of 50 kB:  group_size:1 ~30 us/read;  group_size:100 ~2,300 us/read
#   MNIST t10k, 10,000 PNGs: group_size:1,uncompressed 3.54 MB, 27 us/read, written in 0.02 s
#                            group_size:1 (zstd:3)     3.74 MB, 29 us/read, written in 0.15 s
# PNG/JPEG bytes are already compressed: per-record zstd only adds size and CPU, so we skip it.
WRITER_OPTIONS = "group_size:1,uncompressed"

# Default shard count: about 1 GiB per shard (ImageNet train ~ 140 shards, MNIST/CIFAR 1).
# Readers index records globally across shards, so the count only matters for file-system
# convenience and parallel copying, not for how hosts split the data.
SHARD_TARGET_BYTES = 1 << 30

PNG_COMPRESS_LEVEL = 6  # fixed (zlib's default), so PNG bytes are reproducible
JPEG_QUALITY = 95  # default for downscaled JPEGs; visually lossless, and bytes are reproducible
ENCODINGS = (records.ENCODED, records.RAW)
# encoding=None: raw pixels for the small fixed-size formats, files as they are otherwise.
DEFAULT_ENCODING = {
    "imagefolder": records.ENCODED,
    "mnist": records.RAW,
    "cifar10": records.RAW,
    "cifar100": records.RAW,
}
SIZE_PERCENTILES = (0, 5, 25, 50, 75, 95, 100)  # metadata's stored_size distribution
MAX_LISTED_SKIPS = 1000  # metadata lists at most this many skipped files (all are logged)

# Images with more pixels are downscaled (aspect kept) when converted. Training crops and
# resizes every image to ~224 px, so detail beyond a few megapixels is never seen, while decode
# time and memory grow with pixels (a 169-megapixel PNG of 0.5 MB took 1.25 GB to decode and
# crop). 40 MP keeps photos from common cameras (12-36 MP) byte for byte and bounds one decoded
# RGB image to 120 MB per reader process.
DEFAULT_MAX_PIXELS = 40_000_000
# The reader opens records with PIL's default limits: above this PIL warns of a decompression
# bomb, and refuses twice it, so no record may hold a larger image.
# PIL types it int | None (None switches the check off); its default, read here, is an int.
MAX_PIXELS_LIMIT = cast(int, Image.MAX_IMAGE_PIXELS)
PROGRESS_INTERVAL_S = 5.0  # log lines when stderr is not a terminal
TTY_PROGRESS_INTERVAL_S = 0.2  # redraws of the progress line on a terminal
IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".png",
        ".bmp",
        ".gif",
        ".webp",
        ".tif",
        ".tiff",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
    }
)


class ConversionError(Exception):
    """An expected failure (bad input, options or output, I/O errors); the CLI prints it
    without a traceback."""


@dataclasses.dataclass(frozen=True)
class _Skip:
    """An imagefolder file that listing already decided not to convert (see the link rules)."""

    relpath: str
    reason: str


@dataclasses.dataclass
class _Source:
    """What a format reader found: examples to encode and the dataset-level facts."""

    split: str | None
    class_names: list[str]
    image_shape: list[int] | None
    items: list[tuple[int, int, Any]]  # (example id, label, payload for encode_fn)
    # Runs in the workers: payload -> (image bytes, "png"/"jpeg"/"raw", note or None,
    # (width, height, channels) as stored), where the note says how the image was downscaled;
    # or (None, why it is skipped, None, None).
    encode_fn: Callable[[Any], tuple[bytes | None, str, str | None, tuple | None]]
    bytes_per_example: float  # rough output size, only for the default shard count


@dataclasses.dataclass(frozen=True)
class _ImageOptions:
    """How imagefolder images are stored (picklable: it travels to the worker processes)."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    shorter_side: int | None = None  # bound on the shorter side (None: no bound)
    max_side: int | None = None  # bound on the longer side
    jpeg_quality: int = JPEG_QUALITY  # for JPEGs that are downscaled
    raw: bool = False  # store RGB pixels instead of PNG/JPEG bytes


# ------------------------------------------------------------------------------ encoding


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No timestamps or text chunks are written; only what the image itself carries.
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _jpeg_bytes(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _encode_array(raw: bool, pixels: np.ndarray) -> tuple[bytes, str, None, tuple]:
    """HxW (grayscale) or HxWx3 (RGB) uint8 -> raw pixels or PNG."""
    height, width = pixels.shape[:2]
    shape = (width, height, 1 if pixels.ndim == 2 else pixels.shape[2])
    if raw:
        return records.encode_raw(pixels), "raw", None, shape
    return _png_bytes(Image.fromarray(pixels)), "png", None, shape


def _png_compatible(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if img.mode == "1":
        return img.convert("L")
    has_alpha = "A" in img.mode or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


class _Unsupported(Exception):
    """An image PIL decodes but whose pixels cannot be mapped to 8 bits faithfully."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit (and 16-bit-range integer) grayscale -> 8 bits over the full range.

    PIL opens 16-bit RGB(A) PNG/TIFF/PPM as 8-bit RGB(A) already (the high byte of each
    sample), but 16-bit grayscale as mode I;16 or I, which its convert("L") clips at 255: a
    normal photo came out almost white. v >> 8 is PIL's own mapping for RGB, so a gray image
    gives the same values whether it was saved as gray or as RGB, and it inverts the usual
    8->16-bit widening (v * 257) exactly.
    """
    if img.mode == "F":
        raise _Unsupported(
            "floating-point pixels (mode F) have no known range to map onto 0..255; "
            "convert the image to 8 or 16 bits first"
        )
    if img.mode == "I" or img.mode.startswith("I;16"):
        pixels = np.asarray(img)
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:  # a 32-bit integer image: its range is unknown
            raise _Unsupported(
                f"integer pixels span {low}..{high}, outside the 16-bit range 0..65535; "
                "convert the image to 8 or 16 bits first"
            )
        return Image.fromarray((pixels >> 8).astype(np.uint8))
    return img


def _downscaled_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    scale = math.sqrt(max_pixels / (width * height))
    w, h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    while w * h > max_pixels:  # floating-point rounding
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def _side_bounded(width: int, height: int, side: int, shorter: bool) -> tuple[int, int]:
    """The size whose shorter (or longer) side is exactly `side`, the aspect ratio kept."""
    wide = width >= height
    fixed, other = (height, width) if wide == shorter else (width, height)
    scaled = max(1, round(other * side / fixed))
    return (scaled, side) if wide == shorter else (side, scaled)


def stored_size(width: int, height: int, opts: _ImageOptions) -> tuple[int, int] | None:
    """The size an image of width x height is stored at, or None when it is kept as it is.

    Each bound that the image exceeds gives a size that meets it exactly (aspect kept); the
    smallest of those is taken, then trimmed a pixel at a time if rounding broke another.
    """
    candidates = []
    if width * height > opts.max_pixels:
        candidates.append(_downscaled_size(width, height, opts.max_pixels))
    if opts.shorter_side and min(width, height) > opts.shorter_side:
        candidates.append(_side_bounded(width, height, opts.shorter_side, shorter=True))
    if opts.max_side and max(width, height) > opts.max_side:
        candidates.append(_side_bounded(width, height, opts.max_side, shorter=False))
    if not candidates:
        return None
    w, h = min(candidates, key=lambda size: (size[0] * size[1], size))

    def too_big(w, h):
        return (
            w * h > opts.max_pixels
            or (opts.shorter_side and min(w, h) > opts.shorter_side)
            or (opts.max_side and max(w, h) > opts.max_side)
        )

    while too_big(w, h):
        w, h = (w - 1, h) if w >= h else (w, h - 1)
    return w, h


def _encode_image(
    img: Image.Image, data: bytes, opts: _ImageOptions
) -> tuple[bytes, str, str | None, tuple]:
    jpeg = img.format in ("JPEG", "MPO")  # MPO: camera JPEG with extra frames, decodes as JPEG
    width, height = img.size
    small = stored_size(width, height, opts)
    if small is not None and jpeg:
        # Decode at 1/2, 1/4 or 1/8 scale while that leaves at least twice the target size:
        # the DCT does the coarse reduction, the Lanczos filter the last factor of 2 or more.
        img.draft(None, (2 * small[0], 2 * small[1]))
    img.load()  # decodes every pixel: catches truncated and corrupt files
    eight = _to_8bit(img)
    if small is not None or opts.raw:
        # The reader converts to L or RGB anyway (dropping alpha); resize in that mode. Raw
        # imagefolder records are RGB, as the reader reads imagefolder datasets.
        mode = "L" if eight.mode in ("1", "L", "LA") and not opts.raw else "RGB"
        out = eight.convert(mode) if eight.mode != mode else eight
        note = None
        if small is not None:
            out = out.resize(small, Image.Resampling.LANCZOS, reducing_gap=3.0)
            note = f"downscaled from {width}x{height} to {small[0]}x{small[1]}"
        shape = (*out.size, 1 if mode == "L" else 3)
        if opts.raw:
            return records.encode_raw(np.asarray(out)), "raw", note, shape
        if jpeg:
            return _jpeg_bytes(out, opts.jpeg_quality), "jpeg", note, shape
        return _png_bytes(out), "png", note, shape
    channels = 1 if eight.mode in ("1", "L", "LA") else 3
    if jpeg:
        return data, "jpeg", None, (width, height, channels)
    # PNG bytes are kept unless 16-bit (IHDR bit depth, byte 24): 8 bits halve the size and
    # decode the same.
    if img.format == "PNG" and eight is img and data[24] <= 8:
        return data, "png", None, (width, height, channels)
    return _png_bytes(_png_compatible(eight)), "png", None, (width, height, channels)


def _encode_file(
    root: str, opts: _ImageOptions, payload: str | _Skip
) -> tuple[bytes | None, str, Any, Any]:
    """Reads and checks one image file of an imagefolder; runs in the worker processes."""
    if isinstance(payload, _Skip):
        return None, payload.reason, None, None
    if os.path.splitext(payload)[1].lower() not in IMAGE_EXTENSIONS:
        return None, "not an image file (by extension)", None, None
    try:
        with open(os.path.join(root, payload), "rb") as f:
            data = f.read()
    except OSError as e:
        return None, f"cannot read the file ({e.strerror or e})", None, None
    try:
        with warnings.catch_warnings():
            # Images over max_pixels are downscaled here: PIL's warning about size is noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                return _encode_image(img, data, opts)
    except Image.DecompressionBombError as e:
        return None, f"too many pixels to decode safely ({e}); downscale it first", None, None
    except _Unsupported as e:
        return None, str(e), None, None
    except Exception as e:  # PIL raises many exception types for bad files
        return None, f"cannot decode image ({type(e).__name__}: {e})", None, None


# ------------------------------------------------------------------------------ formats


def _pick_split(fmt: str, path: str, split: str | None, found: dict, expected: str) -> str:
    if split is not None:
        if split not in found:
            raise ConversionError(f"no {fmt} {split} files in {path!r} (expected {expected})")
        return split
    if not found:
        raise ConversionError(f"no {fmt} files in {path!r} (expected {expected})")
    if len(found) > 1:
        raise ConversionError(
            f"{path!r} holds both {fmt} train and test files; pass --split=train or --split=test"
        )
    return next(iter(found))


def _sorted_entries(path: str) -> list[os.DirEntry]:
    with os.scandir(path) as entries:
        return sorted(entries, key=lambda e: e.name)


def _class_of(real: str, label_of_real: dict[str, int]) -> int | None:
    """The class whose (real) folder is or holds the real path `real`, if any."""
    while True:
        if real in label_of_real:
            return label_of_real[real]
        parent = os.path.dirname(real)
        if parent == real:
            return None
        real = parent


def _walk_class(
    path: str, label: int, classes: list[str], reals: list[str], label_of_real: dict[str, int]
) -> list[tuple[str, str | None]]:
    """Lists one class folder depth-first in sorted order, following symlinks.

    Returns (relpath, real path) per file, the real path only for files reached through a
    symlink (it decides which class they belong to). Each directory (device, inode) is read
    at most once per class, so symlink loops end; a directory link into another class's folder
    is not followed.
    """
    files, seen = [], set()
    stack = [(path, classes[label], reals[label], False)]
    while stack:
        path, rel, real, linked = stack.pop()
        st = os.stat(path)
        if (st.st_dev, st.st_ino) in seen:
            logging.warning("%s: a directory already read in this class, not read again", rel)
            continue
        seen.add((st.st_dev, st.st_ino))
        subdirs = []
        for entry in _sorted_entries(path):
            if entry.name.startswith("."):
                continue
            is_link = entry.is_symlink()
            child = os.path.realpath(entry.path) if is_link else os.path.join(real, entry.name)
            child_rel = f"{rel}/{entry.name}"
            if not entry.is_dir():  # is_dir follows symlinks
                files.append((child_rel, child if linked or is_link else None))
            elif (
                (linked or is_link)
                and (other := _class_of(child, label_of_real)) is not None
                and other != label
            ):
                logging.warning(
                    "%s: leads into class folder %r (through a symlink); not followed",
                    child_rel,
                    classes[other],
                )
            else:
                subdirs.append((entry.path, child_rel, child, linked or is_link))
        stack.extend(reversed(subdirs))
    return files


def _resolve_links(
    per_class: list[list[tuple[str, str | None]]],
    classes: list[str],
    reals: list[str],
    label_of_real: dict[str, int],
) -> dict[str, str]:
    """Which files reached through symlinks to skip (see _list_imagefolder): relpath -> why."""
    linked = collections.defaultdict(list)  # real path -> [(label, relpath)] in sorted order
    for label, files in enumerate(per_class):
        for rel, real in files:
            if real is not None:
                linked[real].append((label, rel))
    if not linked:
        return {}
    direct = {}  # real path -> relpath, for linked files that are also reached directly
    for label, files in enumerate(per_class):
        for rel, real in files:
            if real is None:
                real = os.path.join(reals[label], rel.split("/", 1)[1])
                if real in linked:
                    direct[real] = rel
    skip = {}
    for real, links in linked.items():
        if real in direct:
            for _, rel in links:
                skip[rel] = f"a link to {direct[real]}, which is read as itself"
            continue
        lies_in = _class_of(real, label_of_real)
        labels = sorted({label for label, _ in links})
        if lies_in is not None:  # in a class folder, but where its walk does not go (hidden)
            keep = next((link for link in links if link[0] == lies_in), None)
        else:
            keep = links[0] if len(labels) == 1 else None
        for link in links:
            if link is keep:
                continue
            if keep is not None and link[0] == keep[0]:
                skip[link[1]] = f"a link to the same file as {keep[1]}"
            elif lies_in is not None:
                skip[link[1]] = f"a link into class folder {classes[lies_in]!r}"
            else:
                names = " and ".join(repr(classes[i]) for i in labels)
                skip[link[1]] = f"the same file is linked from classes {names}: ambiguous label"
    return skip


def _list_imagefolder(path: str) -> tuple[list[str], list[tuple[int, int, str | _Skip]]]:
    """The classes, and (example id, label, relpath or _Skip) for every candidate file.

    Symlink rules, which make one file one example with one label, whatever links point at it:
    * a class is a folder, or a symlink to one, directly in INPUT; two classes that are the
      same directory, or one inside the other, are an error;
    * inside a class folder, file and directory symlinks are followed in sorted order; each
      directory is read once per class (loops end); a directory link into another class's
      folder is not followed;
    * a file is identified by its real path. Reached directly (no symlink below its class
      folder), it is read there and every link to it is skipped. Reached only through links,
      it goes to the class whose folder it lies in, if any (links from other classes are
      skipped), else to the one class linking it (its first link in sorted order); linked from
      several classes and lying in none, its label is ambiguous and every link is skipped.
    Skipped files stay candidates (they take an id, so they shift no other id) and are listed
    in metadata's `skipped`; --strict does not fail on them.
    """
    if not os.path.isdir(path):
        raise ConversionError(f"imagefolder input {path!r} is not a directory")
    classes = [e.name for e in _sorted_entries(path) if e.is_dir() and not e.name.startswith(".")]
    if not classes:
        raise ConversionError(
            f"no class sub-folders in {path!r} (imagefolder expects INPUT/<class>/<image>)"
        )
    reals = [os.path.realpath(os.path.join(path, c)) for c in classes]
    # With a trailing separator, a folder is a prefix of what it holds, and sorted, a folder
    # that holds others is directly followed by one of them.
    key = [real.rstrip(os.sep) + os.sep for real in reals]
    order = sorted(range(len(classes)), key=key.__getitem__)
    for outer, inner in zip(order, order[1:]):
        if key[inner].startswith(key[outer]):
            raise ConversionError(
                f"class folders {classes[outer]!r} and {classes[inner]!r} of {path!r} are the "
                "same directory or one holds the other (through a symlink): each class needs "
                "its own folder"
            )
    label_of_real = {real: label for label, real in enumerate(reals)}

    per_class = []
    for label, name in enumerate(classes):
        files = _walk_class(os.path.join(path, name), label, classes, reals, label_of_real)
        files.sort(key=lambda file: file[0])
        if not files:
            logging.warning("class folder %r has no files; it stays class %d", name, label)
        per_class.append(files)
    skip = _resolve_links(per_class, classes, reals, label_of_real)

    items: list[tuple[int, int, str | _Skip]] = []
    for label, files in enumerate(per_class):
        # Ids follow the sorted list of ALL candidates, so a skipped file shifts no other id.
        for rel, _ in files:
            payload = _Skip(rel, skip[rel]) if rel in skip else rel
            items.append((len(items), label, payload))
    return classes, items


def _read_imagefolder(path: str, split: str | None, opts: _ImageOptions) -> _Source:
    classes, items = _list_imagefolder(path)
    if not items:
        raise ConversionError(f"no files in the class folders of {path!r}")
    # Output size ~ input size; stat a sample rather than every file (slow on network disks).
    step = max(1, len(items) // 1000)
    sample = [os.path.join(path, p) for _, _, p in items[::step] if isinstance(p, str)]
    sizes = [os.path.getsize(p) for p in sample if os.path.isfile(p)]
    return _Source(
        split,
        classes,
        None,
        items,
        functools.partial(_encode_file, path, opts),
        sum(sizes) / max(1, len(sizes)),
    )


def _read_idx(path: str, magic: int, ndim: int) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":  # gzip, whatever the file name says
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
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


def _read_mnist(path: str, split: str | None) -> _Source:
    if not os.path.isdir(path):
        raise ConversionError(f"mnist input {path!r} is not a directory")
    prefixes = {"train": "train", "test": "t10k"}
    found = {s: f for s in SPLITS if (f := _find_mnist(path, prefixes[s]))}
    split = _pick_split(
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
    return _Source(
        split,
        [str(d) for d in range(10)],
        [rows, cols, 1],
        items,
        functools.partial(_encode_array, False),
        rows * cols,
    )


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


def _read_cifar(path: str, split: str | None, fmt: str) -> _Source:
    cifar100 = fmt == "cifar100"
    if not os.path.isdir(path):
        raise ConversionError(f"{fmt} input {path!r} is not a directory")
    inner = os.path.join(path, "cifar-100-python" if cifar100 else "cifar-10-batches-py")
    if os.path.isdir(inner):  # the folder the archive was extracted into
        path = inner
    names = set(os.listdir(path))
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
    split = _pick_split(fmt, path, split, found, expected)
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
    return _Source(
        split, class_names, [32, 32, 3], items, functools.partial(_encode_array, False), 3072
    )


# imagefolder, the one with options, is called by name.
_READERS: dict[str, Callable[[str, str | None], _Source]] = {
    "mnist": _read_mnist,
    "cifar10": functools.partial(_read_cifar, fmt="cifar10"),
    "cifar100": functools.partial(_read_cifar, fmt="cifar100"),
}


# ------------------------------------------------------------------------------ writing


@contextlib.contextmanager
def _ordered_map(num_workers: int):
    if num_workers == 1:
        yield map
        return
    # spawn, not fork: the caller may be a JAX process with threads, which fork can deadlock.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        # imap returns results in input order, so output does not depend on the worker count.
        yield lambda fn, it: pool.imap(fn, it, chunksize=32)


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class _Progress:
    """Examples done, rate and ETA: one line redrawn in place on a terminal, a log line every
    PROGRESS_INTERVAL_S otherwise (files, pipes, batch jobs)."""

    def __init__(self, what: str, total: int, enabled: bool, stream=None):
        self.what, self.total, self.enabled = what, total, enabled
        self.stream = sys.stderr if stream is None else stream
        isatty = getattr(self.stream, "isatty", None)
        self.tty = enabled and bool(isatty and isatty())
        self.start = self.last = time.monotonic()
        self.drawn = False  # a progress line is on the terminal, not ended by a newline

    def line(self, done: int, skipped: int, now: float) -> str:
        elapsed = max(now - self.start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else math.inf
        percent = 100.0 * done / max(self.total, 1)
        text = (
            f"{self.what}: {done}/{self.total} ({percent:.0f}%), {rate:.0f} images/s, "
            f"elapsed {_duration(elapsed)}, ETA {_duration(eta)}, {skipped} skipped"
        )
        if self.tty:
            filled = int(20 * done / max(self.total, 1))
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {text}"
        return text

    def update(self, done: int, skipped: int, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        interval = TTY_PROGRESS_INTERVAL_S if self.tty else PROGRESS_INTERVAL_S
        if not force and now - self.last < interval:
            return
        self.last = now
        if self.tty:
            self.stream.write("\r" + self.line(done, skipped, now) + "\x1b[K")
            self.stream.flush()
            self.drawn = True
        else:
            logging.info("%s", self.line(done, skipped, now))

    def interrupt(self) -> None:
        """Clears the progress line before something else is printed on the terminal."""
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.drawn = False

    def close(self) -> None:
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def _array_record(call: Callable, *args) -> Any:
    try:
        return call(*args)
    except RuntimeError as e:  # how array_record reports I/O errors (disk full, no folder)
        raise OSError(str(e)) from None


def _example_name(example_id: int, payload: Any) -> str:
    if isinstance(payload, _Skip):
        return payload.relpath
    return payload if isinstance(payload, str) else f"example {example_id}"


def _write_shards(
    tmp: str,
    source: _Source,
    items: list,
    num_shards: int,
    num_workers: int,
    strict: bool,
    progress: _Progress,
) -> dict:
    # Shard s holds items[bounds[s]:bounds[s+1]]: contiguous blocks keep example order = file order.
    bounds = [len(items) * s // num_shards for s in range(num_shards + 1)]
    shards = [records.SHARD_PATTERN.format(index=s, count=num_shards) for s in range(num_shards)]
    sizes, image_formats, skipped, downscaled = [0] * num_shards, set(), [], []
    class_counts: collections.Counter[int] = collections.Counter()
    stored = []  # (width, height, bytes) of every image written
    first_shape = None  # raw: (name, shape) of the first image, which every other must match
    writer, shard = None, -1
    try:
        with _ordered_map(num_workers) as imap:
            results = imap(source.encode_fn, (payload for _, _, payload in items))
            for pos, ((example_id, label, payload), (image, info, note, shape)) in enumerate(
                zip(items, results)
            ):
                while pos >= bounds[shard + 1]:
                    if writer is not None:
                        _array_record(writer.close)
                        writer = None
                    shard += 1
                    writer = array_record_module.ArrayRecordWriter(
                        os.path.join(tmp, shards[shard]), WRITER_OPTIONS
                    )
                name = _example_name(example_id, payload)
                if image is None:
                    # Links skipped by the listing rules are not unreadable files.
                    if strict and not isinstance(payload, _Skip):
                        raise ConversionError(f"{name}: {info} (--strict)")
                    progress.interrupt()
                    logging.warning("skipping %s: %s", name, info)
                    skipped.append(name)
                else:
                    if info == "raw":
                        if first_shape is None:
                            first_shape = (name, shape)
                        elif shape != first_shape[1]:
                            raise ConversionError(
                                f"--encoding=raw stores one fixed image size, but {name} is "
                                f"{_shape_text(shape)} and {first_shape[0]} is "
                                f"{_shape_text(first_shape[1])}; bound the size "
                                "(--shorter_side/--max_side) only if that makes them equal, "
                                "resize them beforehand, or use --encoding=encoded"
                            )
                    assert writer is not None  # opened for shard 0 at pos 0, then kept open
                    _array_record(writer.write, records.encode_example(example_id, label, image))
                    sizes[shard] += 1
                    image_formats.add(info)
                    class_counts[label] += 1
                    stored.append((shape[0], shape[1], len(image)))
                    if note:
                        progress.interrupt()
                        logging.info("%s: %s", name, note)
                        downscaled.append(name)
                progress.update(pos + 1, len(skipped))
            progress.update(len(items), len(skipped), force=True)
    finally:
        if writer is not None:
            _array_record(writer.close)
    return dict(
        shards=shards,
        shard_sizes=sizes,
        image_formats=image_formats,
        skipped=skipped,
        downscaled=downscaled,
        class_counts=class_counts,
        stored=stored,
        raw_shape=first_shape[1] if first_shape else None,
    )


def _shape_text(shape: tuple) -> str:
    width, height, channels = shape
    return f"{width}x{height}" + (" RGB" if channels == 3 else " grayscale")


def _distribution(values: Sequence[int]) -> dict:
    """Percentiles (actual values, so integers) and the mean of a list of sizes."""
    array = np.asarray(values, dtype=np.int64)
    out: dict[str, float] = {
        f"p{q}": int(v)
        for q, v in zip(SIZE_PERCENTILES, np.percentile(array, SIZE_PERCENTILES, method="nearest"))
    }
    out["mean"] = round(float(array.mean()), 1)
    return out


def _stored_size_stats(stored: list[tuple[int, int, int]]) -> dict:
    widths, heights, sizes = zip(*stored)
    return {
        "width": _distribution(widths),
        "height": _distribution(heights),
        "bytes": _distribution(sizes),
        "total_bytes": int(sum(sizes)),
    }


def _fsync_dir_files(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ------------------------------------------------------------------------------ output safety


def _is_within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_not_nested(input_path: str, output_dir: str) -> None:
    """The output may not be the input, hold it, or lie inside it (compared as real paths).

    Replacing such an output deletes the input; one inside the input would be read by the next
    conversion (as a class folder of an imagefolder).
    """
    source = os.path.realpath(input_path)
    # Where the output's folder really goes: a symlink at OUTPUT is replaced, not followed.
    target = os.path.join(
        os.path.realpath(os.path.dirname(output_dir)), os.path.basename(output_dir)
    )
    if _is_within(target, source) or _is_within(source, target):
        if target == source:
            how = "is"
        else:
            how = "lies inside" if _is_within(target, source) else "contains"
        real = "" if source == os.path.abspath(input_path) else f" (really {source})"
        raise ConversionError(
            f"output {output_dir!r} {how} the input {input_path!r}{real}; "
            "choose an output folder outside the input"
        )


def _own_files(path: str) -> list[str] | None:
    """The files a dataset written by this module holds, if `path` is one; else None."""
    try:
        with open(os.path.join(path, records.METADATA_FILE), "rb") as f:
            shards = json.loads(f.read()).get("shards")
    except (OSError, ValueError, AttributeError):  # no file, not JSON, not a JSON object
        return None
    if not (isinstance(shards, list) and all(isinstance(s, str) for s in shards)):
        return None
    return [records.METADATA_FILE, *shards]


def _existing_output(output_dir: str, overwrite: bool) -> str:
    """What is at OUTPUT: "absent", "empty" (an empty folder), "a symlink" or "a dataset".

    Raises ConversionError when it must not be replaced: without `overwrite` anything but an
    empty folder; with it, anything but a symlink or a folder holding exactly a dataset this
    module wrote (metadata.json and its shards as plain files, nothing else, hidden files
    included: whatever else sits there may be someone's work).
    """
    if not os.path.lexists(output_dir):
        return "absent"
    if os.path.islink(output_dir):
        kind = "a symlink"
    elif not os.path.isdir(output_dir):
        raise ConversionError(f"output {output_dir!r} is a file, not a folder; not replacing it")
    else:
        names = sorted(os.listdir(output_dir))
        if not names:
            return "empty"
        own = _own_files(output_dir)
        foreign = [
            n
            for n in names
            if own is None
            or n not in own
            or os.path.islink(os.path.join(output_dir, n))
            or not os.path.isfile(os.path.join(output_dir, n))
        ]
        if foreign:
            listed = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            what = (
                f"is not a dataset written by make_arrayrecord (it holds {listed})"
                if own is None
                else f"holds files that make_arrayrecord did not write ({listed})"
            )
            raise ConversionError(
                f"output {output_dir!r} {what}; not replacing it: choose another --output"
            )
        kind = "a dataset"
    if not overwrite:
        raise ConversionError(
            f"output {output_dir!r} already exists ({kind}); pass --overwrite to replace it"
        )
    return kind


def _fresh_folder(prefix: str) -> str:
    """Creates PREFIX-<random>: never a folder someone else (or an earlier run) left there.

    Not tempfile.mkdtemp: its mode 0700 would be the published dataset's.
    """
    while True:
        path = f"{prefix}-{os.urandom(4).hex()}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _aside_name(output_dir: str) -> str:
    for n in range(1000):
        old = f"{output_dir}.old-{os.getpid()}-{n}"
        if not os.path.lexists(old):
            return old
    raise ConversionError(f"too many {output_dir}.old-* entries; remove them")


def _publish(tmp: str, output_dir: str, overwrite: bool) -> None:
    kind = _existing_output(output_dir, overwrite)  # again: it may have changed meanwhile
    if kind in ("absent", "empty"):
        os.rename(tmp, output_dir)  # rename(2) replaces an empty folder atomically
        return
    own = _own_files(output_dir) if kind == "a dataset" else None
    old = _aside_name(output_dir)
    os.rename(output_dir, old)
    try:
        os.rename(tmp, output_dir)
    except OSError:
        os.rename(old, output_dir)
        raise
    try:
        if kind == "a symlink":
            os.remove(old)  # the link only: whatever it pointed at is left alone
        else:
            # Only the files this module wrote; rmdir fails if anything else appeared.
            assert own is not None  # kind is "a dataset": _own_files found one
            for name in own:
                os.remove(os.path.join(old, name))
            os.rmdir(old)
    except OSError as e:  # the new dataset is in place: not a failure of the conversion
        logging.warning("the replaced dataset is left at %s (%s); delete it yourself", old, e)


def convert(
    format: str,
    input_path: str,
    output_dir: str,
    *,
    split: str | None = None,
    num_shards: int | None = None,
    num_workers: int = 1,
    strict: bool = False,
    keep: Callable[[int], bool] | None = None,
    progress: bool = True,
    overwrite: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    shorter_side: int | None = None,
    max_side: int | None = None,
    jpeg_quality: int = JPEG_QUALITY,
    encoding: str | None = None,
    progress_stream=None,
) -> dict:
    """Converts a dataset to ArrayRecord shards plus metadata.json; returns the metadata.

    `keep(example_id)` selects examples (those it rejects are not written and not counted as
    skipped). imagefolder images over `max_pixels`, or whose shorter side exceeds
    `shorter_side` or longer side `max_side`, are downscaled once (Lanczos; JPEG stays JPEG at
    `jpeg_quality`, others become PNG); smaller ones are stored untouched. `encoding`: "raw"
    (uint8 pixels; the default for mnist and cifar) or "encoded" (PNG/JPEG; the default for
    imagefolder). Progress goes to `progress_stream` (default stderr): one redrawn line on a
    terminal, log lines otherwise. Raises ConversionError for bad input or options,
    unreadable files under `strict`, raw images of differing sizes, an output that is in use
    or must not be replaced (see _existing_output), an output nested with the input, and I/O
    errors.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise ConversionError(f"unknown split {split!r}; expected train or test")
    if num_workers < 1 or (num_shards is not None and num_shards < 1):
        raise ConversionError("num_workers and num_shards must be at least 1")
    if not 1 <= max_pixels <= MAX_PIXELS_LIMIT:
        raise ConversionError(
            f"max_pixels={max_pixels} must be in 1..{MAX_PIXELS_LIMIT} (PIL's decompression-"
            "bomb threshold, which the training reader keeps)"
        )
    for name, value in (("shorter_side", shorter_side), ("max_side", max_side)):
        if value is not None and not 1 <= value <= records.RAW_MAX_SIDE:
            raise ConversionError(f"{name}={value} must be in 1..{records.RAW_MAX_SIDE}")
    if shorter_side is not None and max_side is not None and max_side < shorter_side:
        raise ConversionError(
            f"max_side={max_side} is below shorter_side={shorter_side}: no image could have "
            "its shorter side bounded by the one and its longer side by the other"
        )
    if not 1 <= jpeg_quality <= 100:
        raise ConversionError(f"jpeg_quality={jpeg_quality} must be in 1..100")
    if format != "imagefolder" and (shorter_side or max_side):
        raise ConversionError(
            f"--shorter_side and --max_side bound imagefolder images; {format} images have "
            "one small size and are stored as they are"
        )
    encoding = DEFAULT_ENCODING[format] if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise ConversionError(
            f"unknown encoding {encoding!r}; expected one of {', '.join(ENCODINGS)}"
        )
    raw = encoding == records.RAW
    opts = _ImageOptions(max_pixels, shorter_side, max_side, jpeg_quality, raw)
    if not os.path.exists(input_path):
        raise ConversionError(f"input path {input_path!r} does not exist")
    output_dir = os.path.abspath(output_dir)
    _check_not_nested(input_path, output_dir)
    _existing_output(output_dir, overwrite)  # fail before the work, not after it

    try:
        if format == "imagefolder":
            source = _read_imagefolder(input_path, split, opts)
        else:
            source = _READERS[format](input_path, split)
            source.encode_fn = functools.partial(_encode_array, raw)
    except OSError as e:
        raise ConversionError(f"cannot read the input {input_path!r}: {e}") from None
    items = [it for it in source.items if keep is None or keep(it[0])]
    if not items:
        raise ConversionError(
            f"no examples to write from {input_path!r} "
            f"({len(source.items)} found, all rejected by the keep filter)"
        )
    if num_shards is None:
        num_shards = math.ceil(len(items) * source.bytes_per_example / SHARD_TARGET_BYTES)
    num_shards = max(1, min(num_shards, len(items)))  # every shard gets at least one example

    parent, base = os.path.split(output_dir)
    tmp = None
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = _fresh_folder(os.path.join(parent, f"{base}.tmp-{os.getpid()}"))
        started = time.monotonic()
        tracker = _Progress(f"{format} {base}", len(items), progress, progress_stream)
        try:
            out = _write_shards(tmp, source, items, num_shards, num_workers, strict, tracker)
        finally:
            tracker.close()
        num_examples = sum(out["shard_sizes"])
        if num_examples == 0:
            raise ConversionError(
                f"every one of the {len(items)} files in {input_path!r} was skipped "
                "(the warnings above say why)"
            )
        class_counts = [out["class_counts"][c] for c in range(len(source.class_names))]
        # Kept as classes so that labels stay the positions of the sorted class names.
        empty_classes = [n for n, c in zip(source.class_names, class_counts) if c == 0]
        for name in empty_classes:
            logging.warning("class %r has no examples in %s", name, output_dir)
        image_formats = out["image_formats"]
        image_shape = source.image_shape
        if raw:
            width, height, channels = out["raw_shape"]
            image_shape = [height, width, channels]
        metadata = {
            "schema_version": records.SCHEMA_VERSION if raw else records.ENCODED_SCHEMA_VERSION,
            "encoding": encoding,
            "format": format,
            "split": source.split,
            "num_examples": num_examples,
            "num_source_examples": len(source.items),
            "num_classes": len(source.class_names),
            "class_names": source.class_names,
            "class_counts": class_counts,
            "empty_classes": empty_classes,
            "image_format": image_formats.pop() if len(image_formats) == 1 else "mixed",
            "image_shape": image_shape,
            "max_pixels": max_pixels,
            "shorter_side": shorter_side,
            "max_side": max_side,
            "jpeg_quality": jpeg_quality,
            "stored_size": _stored_size_stats(out["stored"]),
            "downscaled": {
                "count": len(out["downscaled"]),
                "files": out["downscaled"][:MAX_LISTED_SKIPS],
            },
            "shards": out["shards"],
            "shard_sizes": out["shard_sizes"],
            "skipped": {"count": len(out["skipped"]), "files": out["skipped"][:MAX_LISTED_SKIPS]},
            "source": os.path.basename(os.path.normpath(os.path.abspath(input_path))),
            "writer_options": WRITER_OPTIONS,
        }
        # metadata.json last: its presence is what marks a dataset complete.
        with open(os.path.join(tmp, records.METADATA_FILE), "w") as f:
            f.write(json.dumps(metadata, sort_keys=True, indent=2) + "\n")
        _fsync_dir_files(tmp)  # data on disk before the rename makes it visible
        _publish(tmp, output_dir, overwrite)
    except OSError as e:  # disk full, no permission, ...: nothing half-written is left
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(f"cannot write the output {output_dir!r}: {e}") from None
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        size = sum(os.path.getsize(os.path.join(output_dir, s)) for s in metadata["shards"])
        elapsed = time.monotonic() - started
        logging.info(
            "wrote %d examples (%d skipped, %d downscaled) in %d shard(s), %.1f MB, to %s "
            "in %.1f s (%.0f images/s with %d worker(s))",
            num_examples,
            len(out["skipped"]),
            len(out["downscaled"]),
            num_shards,
            size / 1e6,
            output_dir,
            elapsed,
            len(items) / max(elapsed, 1e-9),
            num_workers,
        )
    return metadata
