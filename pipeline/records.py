"""The on-disk record schema shared by the converter and the input pipeline.

Every ArrayRecord record is one example, laid out as

    offset  size  field
    0       4     magic b"RNR1"
    4       8     example id, uint64 little-endian (stable across conversions)
    12      4     label, int32 little-endian
    16      ...   the image: PNG or JPEG bytes, or raw pixels (below)

Raw pixels (`encoding: raw` in metadata.json) are a 12-byte image header
followed by the uint8 pixels in row-major height x width x channels order:

    offset  size  field
    0       4     magic b"RAW8"
    4       2     height, uint16 little-endian
    6       2     width, uint16 little-endian
    8       1     channels (1 or 3)
    9       3     zero

so every record says how its image is stored (PNG starts with b"\x89PNG", JPEG with
b"\xff\xd8", raw with b"RAW8"), and metadata.json says it for the whole dataset
(`encoding`: "encoded" or "raw"). metadata.json also carries `schema_version`; a reader
refuses any version but its own, by name, instead of failing on the first record.

A fixed binary header keeps decoding to one `struct.unpack` per record and needs no
serialization library.

Every problem found in a dataset, from its metadata.json to one record, is a `DatasetError`
whose one-line message says what is wrong and where.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct

SCHEMA_VERSION = 1  # the one version this code reads and writes
MAGIC = b"RNR1"
_HEADER = struct.Struct("<4sQi")
HEADER_SIZE = _HEADER.size

# metadata.json "encoding": how the records store their images.
ENCODED = "encoded"  # PNG or JPEG bytes (image_format says which)
RAW = "raw"  # raw uint8 pixels of one fixed image_shape
ENCODINGS = (ENCODED, RAW)
RAW_MAGIC = b"RAW8"
_RAW_HEADER = struct.Struct("<4sHHB3x")
RAW_HEADER_SIZE = _RAW_HEADER.size
RAW_MAX_SIDE = 65535
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
    image: bytes  # PNG or JPEG bytes, or a raw image (encode_raw)


def encode_example(example_id: int, label: int, image: bytes) -> bytes:
    return _HEADER.pack(MAGIC, example_id, label) + image


def decode_example(record: bytes) -> Example:
    """Raises DatasetError (without a location: the caller knows it) for a foreign record."""
    if len(record) < HEADER_SIZE or record[:4] != MAGIC:
        raise DatasetError(
            f"not a dataset record (starts with {bytes(record[:4])!r}, "
            f"expected {MAGIC!r}); re-convert the dataset with tools.make_arrayrecord"
        )
    _, example_id, label = _HEADER.unpack_from(record)
    return Example(example_id, label, bytes(record[HEADER_SIZE:]))


def unpack_header(record: bytes) -> tuple[bytes, int, int]:
    """(magic, example id, label) of a record, without copying its image."""
    return _HEADER.unpack_from(record)


def encode_raw(pixels) -> bytes:
    """A raw image: HxW (grayscale) or HxWxC (C = 1 or 3) uint8 pixels -> header + pixels."""
    if pixels.dtype.name != "uint8":
        raise ValueError(f"raw images are uint8, not {pixels.dtype}")
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3):
        raise ValueError(f"raw images are HxW or HxWx1|3, not shape {pixels.shape}")
    height, width, channels = pixels.shape
    if not (0 < height <= RAW_MAX_SIDE and 0 < width <= RAW_MAX_SIDE):
        raise ValueError(f"raw image sides must be 1..{RAW_MAX_SIDE}, not {height}x{width}")
    return _RAW_HEADER.pack(RAW_MAGIC, height, width, channels) + pixels.tobytes()


def is_raw(image: bytes) -> bool:
    return image[:4] == RAW_MAGIC


def raw_shape(image: bytes) -> tuple[int, int, int]:
    """(height, width, channels) of a raw image; ValueError if it is not a complete one."""
    if len(image) < RAW_HEADER_SIZE or image[:4] != RAW_MAGIC:
        raise ValueError(f"not a raw image (starts with {bytes(image[:4])!r})")
    _, height, width, channels = _RAW_HEADER.unpack_from(image)
    if channels not in (1, 3) or len(image) != RAW_HEADER_SIZE + height * width * channels:
        raise ValueError(
            f"raw image header says {height}x{width}x{channels} "
            f"({height * width * channels} bytes) but it holds {len(image) - RAW_HEADER_SIZE}"
        )
    return height, width, channels


def _is_int(value, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _check_metadata(metadata, where: str) -> None:
    """Checks every field the reader relies on; `where` names the file in the message."""
    if not isinstance(metadata, dict):
        raise DatasetError(f"{where} holds a JSON {type(metadata).__name__}, not an object")
    version = metadata.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise DatasetError(
            f"{where} has record schema version {version!r}, this code reads {SCHEMA_VERSION}"
        )
    required = ("encoding", "num_examples", "num_classes", "class_names", "shards", "shard_sizes")
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
    encoding = metadata["encoding"]
    if encoding not in ENCODINGS:
        raise bad("encoding", " or ".join(repr(e) for e in ENCODINGS))
    if encoding == RAW and shape is None:
        raise DatasetError(
            f"{where}: encoding 'raw' needs a fixed image_shape (it has {shape!r}); convert the "
            "dataset again"
        )


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
