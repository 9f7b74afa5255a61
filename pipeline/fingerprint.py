"""A dataset's identity: a short content fingerprint that a resumed run compares with the one
its checkpoint recorded.

What it covers: `metadata.json` (parsed and written out again with sorted keys, so
reformatting the file changes nothing; it holds every count, class name and size
statistic), and for each shard, in order: its name, its size in bytes, and its first and last
`EDGE_BYTES` bytes. An ArrayRecord file ends with its footer and chunk index, which hold the
offset of every chunk, so a record added, removed or resized anywhere in a shard changes its
tail. The path is not part of it: a moved or copied dataset is still the same dataset.

What it costs: one small JSON file and 2 x `EDGE_BYTES` per shard, whatever the shard's
size (for ImageNet's 1,024 training shards, 128 MiB read instead of 140 GB), so it runs at
every start. What it cannot see: bytes rewritten inside a shard's middle that keep every
record's length (an edit of pixels within a raw record); converting again, as the dataset
checks ask, gives new counts or sizes.
"""

from __future__ import annotations

import hashlib
import json
import os

from pipeline import records

EDGE_BYTES = 64 * 1024
_METHOD = b"resnet-multihost dataset fingerprint 1\n"


def dataset_fingerprint(data_dir: str) -> str:
    """16 hex digits naming the dataset's content (see the module docstring)."""
    metadata = records.read_metadata(data_dir)
    digest = hashlib.sha256(_METHOD)
    digest.update(json.dumps(metadata, sort_keys=True).encode())
    for path in records.shard_paths(data_dir, metadata):
        digest.update(_shard_summary(path))
    return digest.hexdigest()[:16]


def _shard_summary(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(EDGE_BYTES)
            f.seek(max(size - EDGE_BYTES, 0))
            tail = f.read(EDGE_BYTES)
    except OSError as e:
        raise records.DatasetError(f"cannot read the shard {path!r}: {e.strerror or e}") from None
    parts = [os.path.basename(path).encode(), str(size).encode(), head, tail]
    return b"".join(hashlib.sha256(part).digest() for part in parts)
