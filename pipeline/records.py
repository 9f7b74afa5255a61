"""The on-disk record schema shared by the converter and the input pipeline.

Every ArrayRecord record is one example, laid out as

    offset  size  field
    0       4     magic b"RNR1" (schema version 1)
    4       8     example id, uint64 little-endian (stable across conversions)
    12      4     label, int32 little-endian
    16      ...   the encoded image (PNG or JPEG bytes, as the source had them)

A fixed binary header keeps decoding to one `struct.unpack` per record and needs no
serialization library; the image codec is recognised from the image bytes.
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


@dataclasses.dataclass(frozen=True)
class Example:
    example_id: int
    label: int
    image: bytes  # encoded PNG or JPEG


def encode_example(example_id: int, label: int, image: bytes) -> bytes:
    return _HEADER.pack(MAGIC, example_id, label) + image


def decode_example(record: bytes) -> Example:
    if len(record) < HEADER_SIZE or record[:4] != MAGIC:
        raise ValueError(
            f"not a schema-{SCHEMA_VERSION} record (starts with {bytes(record[:4])!r}, "
            f"expected {MAGIC!r}); re-convert the dataset with tools.make_arrayrecord"
        )
    _, example_id, label = _HEADER.unpack_from(record)
    return Example(example_id, label, bytes(record[HEADER_SIZE:]))


def read_metadata(dataset_dir: str) -> dict:
    """Reads and checks `metadata.json`; a missing or foreign dataset is a clear error."""
    path = os.path.join(dataset_dir, METADATA_FILE)
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset directory {dataset_dir!r} does not exist")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path!r} is missing: {dataset_dir!r} is not a complete dataset "
            "(convert one with `python -m tools.make_arrayrecord`)"
        )
    with open(path) as f:
        metadata = json.load(f)
    version = metadata.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ValueError(
            f"{path!r} has record schema version {version}, this code reads {SCHEMA_VERSION}"
        )
    return metadata


def shard_paths(dataset_dir: str, metadata: dict) -> list[str]:
    paths = [os.path.join(dataset_dir, name) for name in metadata["shards"]]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"dataset {dataset_dir!r} lacks shard files: {missing}")
    return paths
