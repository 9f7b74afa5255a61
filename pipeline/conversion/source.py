"""What every format reader hands the writer: the examples to encode, and the dataset facts."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pipeline.conversion.errors import ConversionError

SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True)
class Skip:
    """An imagefolder file that listing already decided not to convert (see the link rules in
    imagefolder.py)."""

    relpath: str
    reason: str


@dataclasses.dataclass
class Source:
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


def pick_split(fmt: str, path: str, split: str | None, found: dict, expected: str) -> str:
    """The split to convert: the one asked for, else the only one `found` in `path`."""
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
