"""Converts an image dataset into sharded ArrayRecord files in the schema of records.py.

The command line is `python -m tools.make_arrayrecord`; the launcher calls `convert` directly
for the embedded demo data.

Formats:
  imagefolder  INPUT/<class>/<image>: class index = position in the sorted folder names. JPEG
               and PNG bytes are kept as they are (after a full decode check); other formats
               PIL reads are re-encoded as PNG. Undecodable files are skipped (or, with
               --strict, fail the conversion).
  mnist        IDX files (gzipped or not), train-* or t10k-*; each digit becomes a PNG.
  cifar10/100  the python pickle batches (data_batch_1..5 / test_batch, or train / test).

The output folder holds `data-XXXXX-of-YYYYY.array_record` shards, each a contiguous block of
examples in example order, plus `metadata.json`. Everything is written into `OUTPUT.tmp-<pid>`
and renamed to OUTPUT only when complete, so a killed conversion never leaves a folder that
looks like a dataset. The same input gives byte-identical output, whatever --num_workers is.
"""

from __future__ import annotations

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
import time
from typing import Any, Callable

from absl import logging
from array_record.python import array_record_module
import numpy as np
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
MAX_LISTED_SKIPS = 1000  # metadata lists at most this many skipped files (all are logged)
PROGRESS_INTERVAL_S = 5.0
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
    """An expected failure (bad input or options); the CLI prints it without a traceback."""


@dataclasses.dataclass
class _Source:
    """What a format reader found: examples to encode and the dataset-level facts."""

    split: str | None
    class_names: list[str]
    image_shape: list[int] | None
    items: list[tuple[int, int, Any]]  # (example id, label, payload for encode_fn)
    # Runs in the workers: payload -> (image bytes, "png"/"jpeg") or (None, why it is skipped).
    encode_fn: Callable[[Any], tuple[bytes | None, str]]
    bytes_per_example: float  # rough output size, only for the default shard count


# ------------------------------------------------------------------------------ encoding


def _png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    # No timestamps or text chunks are written; only what the image itself carries.
    img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _encode_array(pixels: np.ndarray) -> tuple[bytes, str]:
    """HxW (grayscale) or HxWx3 (RGB) uint8 -> PNG."""
    return _png_bytes(Image.fromarray(pixels)), "png"


def _png_compatible(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "LA", "RGB", "RGBA"):
        return img
    if img.mode == "1":
        return img.convert("L")
    has_alpha = "A" in img.mode or "transparency" in img.info
    return img.convert("RGBA" if has_alpha else "RGB")


def _encode_file(root: str, relpath: str) -> tuple[bytes | None, str]:
    """Reads and checks one image file of an imagefolder; runs in the worker processes."""
    if os.path.splitext(relpath)[1].lower() not in IMAGE_EXTENSIONS:
        return None, "not an image file (by extension)"
    try:
        with open(os.path.join(root, relpath), "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decodes every pixel: catches truncated and corrupt files
            if img.format in ("JPEG", "MPO"):  # MPO: camera JPEG with extra frames, decodes as JPEG
                return data, "jpeg"
            if img.format == "PNG":
                return data, "png"
            return _png_bytes(_png_compatible(img)), "png"
    except Exception as e:  # PIL raises many exception types for bad files
        return None, f"cannot decode image ({type(e).__name__}: {e})"


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


def _read_imagefolder(path: str, split: str | None) -> _Source:
    if not os.path.isdir(path):
        raise ConversionError(f"imagefolder input {path!r} is not a directory")
    classes = sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise ConversionError(
            f"no class sub-folders in {path!r} (imagefolder expects INPUT/<class>/<image>)"
        )
    items = []
    for label, name in enumerate(classes):
        files = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(path, name), followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            files += [
                os.path.relpath(os.path.join(dirpath, f), path)
                for f in filenames
                if not f.startswith(".")
            ]
        if not files:
            logging.warning("class folder %r has no files", name)
        # Ids follow the sorted list of ALL candidates, so a skipped file shifts no other id.
        items += [(len(items) + i, label, rel) for i, rel in enumerate(sorted(files))]
    if not items:
        raise ConversionError(f"no files in the class folders of {path!r}")
    # Output size ~ input size; stat a sample rather than every file (slow on network disks).
    sample = items[:: max(1, len(items) // 1000)]
    sizes = [
        os.path.getsize(os.path.join(path, rel))
        for _, _, rel in sample
        if os.path.isfile(os.path.join(path, rel))
    ]
    return _Source(
        split,
        classes,
        None,
        items,
        functools.partial(_encode_file, path),
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
    if images and not labels:
        raise ConversionError(f"found {images} but no {prefix}-labels-idx1-ubyte[.gz] next to it")
    return (images, labels) if images else None


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
        split, [str(d) for d in range(10)], [rows, cols, 1], items, _encode_array, rows * cols
    )


def _load_pickle(path: str) -> dict:
    # The CIFAR batches are pickles: only convert files from a source you trust.
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")
    except Exception as e:
        raise ConversionError(f"{path}: not a readable CIFAR pickle ({type(e).__name__}: {e})")
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
    return _Source(split, class_names, [32, 32, 3], items, _encode_array, 3072)


_READERS = {
    "imagefolder": _read_imagefolder,
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


class _Progress:
    def __init__(self, what: str, total: int, enabled: bool):
        self.what, self.total, self.enabled = what, total, enabled
        self.start = self.last = time.monotonic()

    def update(self, done: int, skipped: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.enabled and (force or now - self.last >= PROGRESS_INTERVAL_S):
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            logging.info(
                "%s: %d/%d examples (%.0f/s), %d skipped",
                self.what,
                done,
                self.total,
                rate,
                skipped,
            )


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
    sizes, codecs, skipped = [0] * num_shards, set(), []
    class_counts = collections.Counter()
    writer, shard = None, -1
    try:
        with _ordered_map(num_workers) as imap:
            results = imap(source.encode_fn, (payload for _, _, payload in items))
            for pos, ((example_id, label, payload), (image, info)) in enumerate(
                zip(items, results)
            ):
                while pos >= bounds[shard + 1]:
                    if writer is not None:
                        writer.close()
                        writer = None
                    shard += 1
                    writer = array_record_module.ArrayRecordWriter(
                        os.path.join(tmp, shards[shard]), WRITER_OPTIONS
                    )
                if image is None:
                    name = payload if isinstance(payload, str) else f"example {example_id}"
                    if strict:
                        raise ConversionError(f"{name}: {info} (--strict)")
                    logging.warning("skipping %s: %s", name, info)
                    skipped.append(name)
                else:
                    writer.write(records.encode_example(example_id, label, image))
                    sizes[shard] += 1
                    codecs.add(info)
                    class_counts[label] += 1
                progress.update(pos + 1, len(skipped))
    finally:
        if writer is not None:
            writer.close()
    return dict(
        shards=shards, shard_sizes=sizes, codecs=codecs, skipped=skipped, class_counts=class_counts
    )


def _fsync_dir_files(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _output_in_use(path: str) -> bool:
    return os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))


def _publish(tmp: str, output_dir: str, overwrite: bool) -> None:
    if _output_in_use(output_dir):
        if not overwrite:
            raise ConversionError(
                f"output {output_dir!r} already exists and is not empty "
                "(pass --overwrite to replace it)"
            )
        old = f"{output_dir}.old-{os.getpid()}"
        os.rename(output_dir, old)
        os.rename(tmp, output_dir)
        if os.path.isdir(old):
            shutil.rmtree(old)
        else:
            os.remove(old)
    else:
        if os.path.isdir(output_dir):
            os.rmdir(output_dir)  # an empty folder is replaced
        os.rename(tmp, output_dir)


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
) -> dict:
    """Converts a dataset to ArrayRecord shards plus metadata.json; returns the metadata.

    `keep(example_id)` selects examples (those it rejects are not written and not counted as
    skipped). Raises ConversionError for bad input, unreadable files under `strict`, or an
    existing non-empty output folder without `overwrite`.
    """
    if format not in FORMATS:
        raise ConversionError(f"unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    if split is not None and split not in SPLITS:
        raise ConversionError(f"unknown split {split!r}; expected train or test")
    if num_workers < 1 or (num_shards is not None and num_shards < 1):
        raise ConversionError("num_workers and num_shards must be at least 1")
    if not os.path.exists(input_path):
        raise ConversionError(f"input path {input_path!r} does not exist")
    output_dir = os.path.abspath(output_dir)
    if _output_in_use(output_dir) and not overwrite:  # fail before the work, not after it
        raise ConversionError(
            f"output {output_dir!r} already exists and is not empty "
            "(pass --overwrite to replace it)"
        )

    source = _READERS[format](input_path, split)
    items = [it for it in source.items if keep is None or keep(it[0])]
    if not items:
        raise ConversionError(
            f"no examples to write from {input_path!r} "
            f"({len(source.items)} found, all rejected by the keep filter)"
        )
    if num_shards is None:
        num_shards = math.ceil(len(items) * source.bytes_per_example / SHARD_TARGET_BYTES)
    num_shards = max(1, min(num_shards, len(items)))  # every shard gets at least one example

    tmp = f"{output_dir}.tmp-{os.getpid()}"
    if os.path.lexists(tmp):  # left by an earlier, killed process with the same pid
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        started = time.monotonic()
        tracker = _Progress(f"{format} {os.path.basename(output_dir)}", len(items), progress)
        out = _write_shards(tmp, source, items, num_shards, num_workers, strict, tracker)
        num_examples = sum(out["shard_sizes"])
        if num_examples == 0:
            raise ConversionError(
                f"every one of the {len(items)} files in {input_path!r} was skipped as unreadable"
            )
        codecs = out["codecs"]
        metadata = {
            "schema_version": records.SCHEMA_VERSION,
            "format": format,
            "split": source.split,
            "num_examples": num_examples,
            "num_source_examples": len(source.items),
            "num_classes": len(source.class_names),
            "class_names": source.class_names,
            "class_counts": [out["class_counts"][c] for c in range(len(source.class_names))],
            "image_format": codecs.pop() if len(codecs) == 1 else "mixed",
            "image_shape": source.image_shape,
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
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tracker.update(len(items), len(out["skipped"]), force=True)
    if progress:
        size = sum(os.path.getsize(os.path.join(output_dir, s)) for s in metadata["shards"])
        logging.info(
            "wrote %d examples (%d skipped) in %d shard(s), %.1f MB, to %s in %.1f s",
            num_examples,
            len(out["skipped"]),
            num_shards,
            size / 1e6,
            output_dir,
            time.monotonic() - started,
        )
    return metadata
