"""The embedded demo dataset: the MNIST test set shipped in the repository.

Its 10,000 digits are split deterministically by example id (every fifth digit is held out
for evaluation: 8,000 train, 2,000 eval) and converted to ArrayRecord under
WORKDIR/data/ on first use.
"""

from __future__ import annotations

import functools
import os
import shutil
import socket

from absl import logging

import pipeline
from pipeline import conversion

DATASETS = {"mnist": "mnist-t10k"}
EVAL_EVERY = 5


def _in_split(split: str, example_id: int) -> bool:
    held_out = example_id % EVAL_EVERY == 0
    return held_out if split == "eval" else not held_out


def prepare(name: str, workdir: str) -> tuple[str, str]:
    """Converts the embedded dataset once; returns (train_dir, eval_dir).

    Every process may call this at once (hosts without a shared disk each need a copy): each
    converts into a private folder and renames it into place, and the conversion is
    byte-deterministic, so whichever rename wins, the data are the same.
    """
    if name not in DATASETS:
        raise ValueError(
            f"config.data.embedded={name!r}: the embedded datasets are {sorted(DATASETS)}"
        )
    if workdir.startswith("gs://"):
        raise ValueError("the embedded demo data is converted on local disk: use a local --workdir")
    source = os.path.join(pipeline.EMBEDDED_DIR, DATASETS[name])
    root = os.path.join(workdir, "data", DATASETS[name])
    os.makedirs(root, exist_ok=True)
    dirs = []
    for split in ("train", "eval"):
        final = os.path.join(root, split)
        if not os.path.exists(os.path.join(final, "metadata.json")):
            private = os.path.join(root, f".{split}.{socket.gethostname()}.{os.getpid()}")
            logging.info("Converting the embedded %s %s split into %s", name, split, final)
            conversion.convert(
                name, source, private, keep=functools.partial(_in_split, split), progress=False
            )
            try:
                os.rename(private, final)
            except OSError:  # another process got there first with the same bytes
                shutil.rmtree(private)
        dirs.append(final)
    return dirs[0], dirs[1]
