"""convert(): checks the options, reads the source, writes the shards and metadata.json into
a fresh folder, and publishes it at the output."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable

from absl import logging

from pipeline import records
from pipeline.conversion import stopping
from pipeline.conversion.cifar import read_cifar
from pipeline.conversion.errors import ConversionError, OutputWriteError
from pipeline.conversion.imagefolder import read_imagefolder
from pipeline.conversion.images import (
    DEFAULT_MAX_PIXELS,
    JPEG_QUALITY,
    JPEG_RESTART_MCUS,
    MAX_PIXELS_LIMIT,
    ImageOptions,
    encode_array,
    restarts_available,
)
from pipeline.conversion.mnist import read_mnist
from pipeline.conversion.progress import Progress
from pipeline.conversion.publishing import check_not_nested, existing_output, fresh_folder, publish
from pipeline.conversion.source import SPLITS, Source
from pipeline.conversion.writing import (
    SHARD_TARGET_BYTES,
    WRITER_OPTIONS,
    fsync_dir_files,
    stored_size_stats,
    write_shards,
)

FORMATS = ("imagefolder", "mnist", "cifar10", "cifar100")
ENCODINGS = (records.ENCODED, records.RAW)
# encoding=None: raw pixels for the small fixed-size formats, files as they are otherwise.
DEFAULT_ENCODING = {
    "imagefolder": records.ENCODED,
    "mnist": records.RAW,
    "cifar10": records.RAW,
    "cifar100": records.RAW,
}
MAX_LISTED_SKIPS = 1000  # metadata lists at most this many skipped files (all are logged)


# imagefolder, the one with options, is called by name.
_READERS: dict[str, Callable[[str, str | None], Source]] = {
    "mnist": read_mnist,
    "cifar10": functools.partial(read_cifar, fmt="cifar10"),
    "cifar100": functools.partial(read_cifar, fmt="cifar100"),
}


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
    jpeg_restarts: bool = True,
    encoding: str | None = None,
    progress_stream=None,
) -> dict:
    """Converts a dataset to ArrayRecord shards plus metadata.json; returns the metadata.

    `keep(example_id)` selects examples (those it rejects are not written and not counted as
    skipped). imagefolder images over `max_pixels`, or whose shorter side exceeds
    `shorter_side` or longer side `max_side`, are downscaled once (Lanczos; JPEG stays JPEG at
    `jpeg_quality`, others become PNG); smaller ones keep their size and pixels. JPEGs are
    stored re-encoded losslessly with restart markers unless `jpeg_restarts` is False
    (images.py). `encoding`: "raw" (uint8 pixels; the default for mnist and cifar) or
    "encoded" (PNG/JPEG; the default for imagefolder). Progress goes to `progress_stream`
    (default stderr): one redrawn line on a terminal, log lines otherwise. Raises
    ConversionError for bad input or options, unreadable files under `strict`, raw images of
    differing sizes, an output that is in use or must not be replaced (see
    publishing.existing_output), an output nested with the input, and I/O errors.
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
    opts = ImageOptions(max_pixels, shorter_side, max_side, jpeg_quality, raw, jpeg_restarts)
    # The longest restart interval (MCUs) of JPEGs stored with markers; null where none can
    # be (not an imagefolder, raw, jpeg_restarts off, or pipeline._jpegcrop not built). A
    # JPEG whose re-encoding failed or decoded otherwise is stored as it is all the same.
    restart_mcus = (
        JPEG_RESTART_MCUS
        if format == "imagefolder" and not raw and jpeg_restarts and restarts_available()
        else None
    )
    if not output_dir:  # abspath("") would be the current folder
        raise ConversionError("--output is empty; name the dataset folder to write")
    if not os.path.exists(input_path):
        raise ConversionError(f"input path {input_path!r} does not exist")
    output_dir = os.path.abspath(output_dir)
    check_not_nested(input_path, output_dir)
    existing_output(output_dir, overwrite)  # fail before the work, not after it

    try:
        if format == "imagefolder":
            source = read_imagefolder(input_path, split, opts)
        else:
            source = _READERS[format](input_path, split)
            source.encode_fn = functools.partial(encode_array, raw)
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
    tmp: str | None = None
    made: list[str] = []  # the output's parent folders this run created
    try:
        with stopping.held():  # what was made must be known to clean it up
            _make_folders(parent, made)
            tmp = fresh_folder(os.path.join(parent, f"{base}.tmp-{os.getpid()}"))
        started = time.monotonic()
        tracker = Progress(f"{format} {base}", len(items), progress, progress_stream)
        try:
            out = write_shards(tmp, source, items, num_shards, num_workers, strict, tracker)
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
            "schema_version": records.SCHEMA_VERSION,
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
            "jpeg_restart_mcus": restart_mcus,
            "stored_size": stored_size_stats(out["stored"]),
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
        fsync_dir_files(tmp)  # data on disk before the rename makes it visible
        stopping.commit()
        publish(tmp, output_dir, overwrite)
    except OSError as e:  # disk full, no permission, ...: nothing half-written is left
        _remove_unpublished(tmp, made)
        raise OutputWriteError(f"cannot write the output {output_dir!r}: {e}") from None
    except BaseException:  # ConversionError, Interrupted, ...
        _remove_unpublished(tmp, made)
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


def _make_folders(path: str, made: list[str]) -> None:
    """os.makedirs(path, exist_ok=True) that appends each folder it makes to `made`."""
    missing = []
    while not os.path.lexists(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.mkdir(folder)
        made.append(folder)


def _remove_unpublished(tmp: str | None, made: list[str]) -> None:
    """Deletes this run's temporary folder and the (then empty) folders it made for it."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            os.rmdir(folder)
