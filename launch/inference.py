"""From a run's checkpoint to inference weights (`resnet.weights`), and back into a new run.

Every checkpoint's meta describes its model, preprocessing and class names, so a workdir alone
is enough to export, predict or fine-tune from; the arrays are checked against their digest
first (`launch.checkpointing.read_trusted`), exactly as a resume would.
"""

from __future__ import annotations

import os

from absl import logging
from etils import epath

import resnet.weights
from launch import checkpointing


def _inference_vars(tree):
    """The `value` of every nnx Variable saved in a TrainState collection (drops the level)."""
    if isinstance(tree, dict):
        if set(tree) == {"value"} and not isinstance(tree["value"], dict):
            return tree["value"]
        return {k: _inference_vars(v) for k, v in tree.items()}
    return tree


def weights_from_checkpoint(directory: str, step: int | None = None) -> resnet.weights.Weights:
    """The parameters and BatchNorm statistics of a run's newest (or given) trustworthy step."""
    state, meta, step = checkpointing.read_trusted(directory, step)
    if "model" not in meta:
        raise checkpointing.IncompatibleCheckpoint(
            f"step {step} of {directory} was written before checkpoints described their model; "
            "export it with the version that wrote it"
        )
    logging.info("Read the checkpoint of step %d from %s.", step, directory)
    return resnet.weights.Weights(
        model=meta["model"],
        preprocessing=meta["preprocessing"],
        class_names=tuple(meta["class_names"]) if meta.get("class_names") else None,
        params=_inference_vars(state["params"]),
        batch_stats=_inference_vars(state["batch_stats"]),
        metadata={"source": str(directory), "step": step},
    )


def is_weights_dir(path: str) -> bool:
    return (epath.Path(path) / resnet.weights.MODEL_JSON).exists()


def load_weights(path: str, step: int | None = None) -> resnet.weights.Weights:
    """A weights directory (`tools.export`, `tools.import_torchvision`) or a run's checkpoint."""
    if not os.path.exists(path) and not str(path).startswith("gs://"):
        raise FileNotFoundError(f"{path} does not exist")
    if is_weights_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a weights directory: it has no steps to choose from")
        return resnet.weights.load(path)
    return weights_from_checkpoint(path, step)
