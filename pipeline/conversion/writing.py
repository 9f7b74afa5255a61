"""Writes the examples into ArrayRecord shards, and summarizes what was stored.

The output folder holds `data-XXXXX-of-YYYYY.array_record` shards, each a contiguous block of
examples in example order, plus `metadata.json` (converter.py assembles it). The same input
gives byte-identical output, whatever --num_workers is.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from absl import logging
from array_record.python import array_record_module

from pipeline import records
from pipeline.conversion.errors import ConversionError
from pipeline.conversion.progress import Progress
from pipeline.conversion.source import Skip, Source

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

SIZE_PERCENTILES = (0, 5, 25, 50, 75, 95, 100)  # metadata's stored_size distribution


@contextlib.contextmanager
def _ordered_map(num_workers: int):
    if num_workers == 1:
        yield map
        return
    # spawn, not fork: the caller may be a JAX process with threads, which fork can deadlock.
    with multiprocessing.get_context("spawn").Pool(
        num_workers, initializer=_leave_stopping_to_the_parent
    ) as pool:
        # imap returns results in input order, so output does not depend on the worker count.
        yield lambda fn, it: pool.imap(fn, it, chunksize=32)


def _leave_stopping_to_the_parent() -> None:
    """A worker ignores Ctrl-C and the terminal closing, which reach its whole process group:
    the parent stops the conversion and ends the workers (Pool.terminate, on leaving its
    `with`). A worker dying on its own would leave the parent waiting for its results."""
    for signum in (signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)


def _array_record(call: Callable, *args) -> Any:
    try:
        return call(*args)
    except RuntimeError as e:  # how array_record reports I/O errors (disk full, no folder)
        raise OSError(str(e)) from None


def _example_name(example_id: int, payload: Any) -> str:
    if isinstance(payload, Skip):
        return payload.relpath
    return payload if isinstance(payload, str) else f"example {example_id}"


def write_shards(
    tmp: str,
    source: Source,
    items: list,
    num_shards: int,
    num_workers: int,
    strict: bool,
    progress: Progress,
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
                    if strict and not isinstance(payload, Skip):
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


def stored_size_stats(stored: list[tuple[int, int, int]]) -> dict:
    widths, heights, sizes = zip(*stored)
    return {
        "width": _distribution(widths),
        "height": _distribution(heights),
        "bytes": _distribution(sizes),
        "total_bytes": int(sum(sizes)),
    }


def fsync_dir_files(path: str) -> None:
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
