"""The on-disk record schema shared by the converter and the input pipeline.

Every ArrayRecord record is one example, laid out as

    offset  size  field
    0       4     magic b"RNR1" (schema version 1)
    4       8     example id, uint64 little-endian (stable across conversions)
    12      4     label, int32 little-endian
    16      ...   the encoded image (PNG or JPEG; docs/data.md says when it is re-encoded)

A fixed binary header keeps decoding to one `struct.unpack` per record and needs no
serialization library; the image codec is recognised from the image bytes.

Every problem found in a dataset, from its metadata.json to one record, is a `DatasetError`
whose one-line message says what is wrong and where.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

SCHEMA_VERSION = 1
MAGIC = b"RNR1"
_HEADER = struct.Struct("<4sQi")
HEADER_SIZE = _HEADER.size
METADATA_FILE = "metadata.json"
SHARD_PATTERN = "data-{index:05d}-of-{count:05d}.array_record"


class DatasetError(ValueError):
    """Something is wrong with a converted dataset: its metadata, its shards or one record.

    The message is one line naming the dataset directory and, for a record, the shard file,
    the record's index in that shard and the example id (when the header could be read).
    """


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset directory, its metadata.json or one of its shard files does not exist."""


@dataclasses.dataclass(frozen=True)
class Example:
    example_id: int
    label: int
    image: bytes  # encoded PNG or JPEG


def encode_example(example_id: int, label: int, image: bytes) -> bytes:
    return _HEADER.pack(MAGIC, example_id, label) + image


def decode_example(record: bytes) -> Example:
    """Raises DatasetError (without a location: the caller knows it) for a foreign record."""
    if len(record) < HEADER_SIZE or record[:4] != MAGIC:
        raise DatasetError(
            f"not a schema-{SCHEMA_VERSION} record (starts with {bytes(record[:4])!r}, "
            f"expected {MAGIC!r}); re-convert the dataset with tools.make_arrayrecord"
        )
    _, example_id, label = _HEADER.unpack_from(record)
    return Example(example_id, label, bytes(record[HEADER_SIZE:]))


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_metadata(metadata, where: str) -> None:
    """Checks every field the reader relies on; `where` names the file in the message."""
    if not isinstance(metadata, dict):
        raise DatasetError(f"{where} holds a JSON {type(metadata).__name__}, not an object")
    version = metadata.get("schema_version")
    if version != SCHEMA_VERSION:
        raise DatasetError(
            f"{where} has record schema version {version!r}, this code reads {SCHEMA_VERSION}"
        )
    required = ("num_examples", "num_classes", "class_names", "shards", "shard_sizes")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise DatasetError(f"{where} lacks {', '.join(missing)}; convert the dataset again")

    def bad(key: str, expected: str):
        return DatasetError(f"{where}: {key} is {metadata[key]!r}, expected {expected}")

    if not _is_int(metadata["num_examples"], 1):
        raise bad("num_examples", "a positive integer")
    num_classes = metadata["num_classes"]
    if not _is_int(num_classes, 1):
        raise bad("num_classes", "a positive integer")
    names = metadata["class_names"]
    if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
        raise bad("class_names", "a list of strings")
    if len(names) != num_classes:
        raise DatasetError(f"{where}: {len(names)} class_names for num_classes={num_classes}")
    shards, sizes = metadata["shards"], metadata["shard_sizes"]
    # Plain file names only: a path would read files outside the dataset directory.
    if not (
        isinstance(shards, list)
        and shards
        and all(isinstance(s, str) and s not in ("", ".", "..") and "/" not in s for s in shards)
        and len(set(shards)) == len(shards)
    ):
        raise bad("shards", "a non-empty list of distinct file names")
    if not (isinstance(sizes, list) and len(sizes) == len(shards)):
        raise bad("shard_sizes", f"a list of {len(shards)} record counts")
    if not all(_is_int(n, 0) for n in sizes):
        raise bad("shard_sizes", "record counts (integers >= 0)")
    shape = metadata.get("image_shape")
    if shape is not None and not (
        isinstance(shape, list)
        and len(shape) == 3
        and all(_is_int(n, 1) for n in shape)
        and shape[2] in (1, 3)
    ):
        raise bad("image_shape", "null or [height, width, 1 or 3]")


def read_metadata(dataset_dir: str) -> dict:
    """Reads and checks `metadata.json`; anything missing or malformed is a DatasetError."""
    path = os.path.join(dataset_dir, METADATA_FILE)
    if not os.path.isdir(dataset_dir):
        raise DatasetNotFoundError(f"dataset directory {dataset_dir!r} does not exist")
    if not os.path.exists(path):
        raise DatasetNotFoundError(
            f"{path!r} is missing: {dataset_dir!r} is not a complete dataset "
            "(convert one with `python -m tools.make_arrayrecord`)"
        )
    try:
        with open(path, "rb") as f:
            metadata = json.loads(f.read())
    except OSError as e:
        raise DatasetError(f"cannot read {path!r}: {e.strerror or e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise DatasetError(f"{path!r} is not valid JSON ({e})") from None
    _check_metadata(metadata, repr(path))
    return metadata


def shard_paths(dataset_dir: str, metadata: dict) -> list[str]:
    paths = [os.path.join(dataset_dir, name) for name in metadata["shards"]]
    missing = [os.path.basename(p) for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetNotFoundError(f"dataset {dataset_dir!r} lacks shard files: {missing}")
    return paths
