"""ArrayRecord + Grain input into globally sharded arrays.

The public face:

    pipeline.load_info(directory) -> DatasetInfo    # what a converted dataset holds
    pipeline.prepare_embedded(name)                 # the shipped demo data -> (train, eval) dirs
    pipeline.train_batches(...), pipeline.eval_batches(...)   # global batches (pipeline/input.py)
    pipeline.DatasetError                           # anything wrong with a dataset
    pipeline.dataset_fingerprint(directory)         # its content's identity, path-free

The attributes are loaded on first use: Grain's worker processes import `pipeline.dataset`,
and must not pay for (or be able to touch) jax, which `pipeline.input` imports.
"""

import importlib
import os

# The datasets shipped inside the package (the MNIST test set, as the demo).
EMBEDDED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded")

_PUBLIC = {
    "DatasetInfo": "pipeline.dataset",
    "load_info": "pipeline.dataset",
    "DatasetError": "pipeline.records",
    "dataset_fingerprint": "pipeline.fingerprint",
    "train_batches": "pipeline.input",
    "eval_batches": "pipeline.input",
    "EvalBatches": "pipeline.input",
}


def prepare_embedded(name: str, cache_dir: str | None = None) -> tuple[str, str]:
    """(train, eval) dirs of the named embedded dataset, converted once into a checked cache
    outside every workdir (see pipeline/demo_data.py)."""
    from pipeline import demo_data  # pylint: disable=g-import-not-at-top

    return demo_data.prepare(name, cache_dir)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")


__all__ = ["EMBEDDED_DIR", "prepare_embedded", *_PUBLIC]
