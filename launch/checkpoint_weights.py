"""A run's checkpoint as weights (`resnet.weights`): exported to a weights folder, or read for
`tools.predict` and a new run's `model.init_from`, which also take a weights folder.

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


def weights_from_checkpoint(
    directory: str, step: int | None = None, *, ema: bool = False
) -> resnet.weights.Weights:
    """The parameters and BatchNorm statistics of a run's newest (or given) trustworthy step;
    with `ema`, their moving average (train.ema_decay)."""
    state, meta, step = checkpointing.read_trusted(directory, step)
    if "model" not in meta:
        raise checkpointing.IncompatibleCheckpoint(
            f"step {step} of {directory} was written before checkpoints described their model; "
            "export it with the version that wrote it"
        )
    logging.info("Read the checkpoint of step %d from %s.", step, directory)
    metadata = {"source": str(directory), "step": step}
    if ema:
        if not state.get("ema"):
            raise ValueError(
                f"--ema: step {step} of {directory} holds no moving average of the weights (the "
                "run trained with train.ema_decay=0); export its weights without --ema"
            )
        state = state["ema"]
        metadata["ema_decay"] = meta.get("train.ema_decay")
    return resnet.weights.Weights(
        model=meta["model"],
        preprocessing=meta["preprocessing"],
        class_names=tuple(meta["class_names"]) if meta.get("class_names") else None,
        params=_inference_vars(state["params"]),
        batch_stats=_inference_vars(state["batch_stats"]),
        metadata=metadata,
    )


def is_weights_dir(path: str) -> bool:
    return (epath.Path(path) / resnet.weights.MODEL_JSON).exists()


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _has_step_folders(path: str) -> bool:
    """Whether `path` (a workdir or its checkpoints folder) holds any step folder."""
    root = os.path.join(path, "checkpoints")
    root = root if os.path.isdir(root) else path
    return any(n.isdigit() and os.path.isdir(os.path.join(root, n)) for n in _names(root))


def load_weights(path: str, step: int | None = None) -> resnet.weights.Weights:
    """A weights directory (`tools.export`, `tools.import_torchvision`) or a run's checkpoint."""
    if not os.path.exists(path) and not str(path).startswith("gs://"):
        raise FileNotFoundError(f"{path} does not exist")
    if is_weights_dir(path):
        if step is not None:
            raise ValueError(f"{path} is a weights directory: it has no steps to choose from")
        return resnet.weights.load(path)
    if not str(path).startswith("gs://") and not _has_step_folders(path):
        raise ValueError(
            f"{resnet.weights.not_weights_message(path)}, and no checkpoints: not a run's workdir"
        )
    return weights_from_checkpoint(path, step)


def _holds_committed_steps(folder: str) -> bool:
    return any(
        n.isdigit() and os.path.exists(os.path.join(folder, n, checkpointing.COMMIT_MARKER))
        for n in _names(folder)
    )


def _check_export_target(output: str) -> None:
    """Refuses an output inside a run's checkpoints folder (any folder above it that holds
    committed steps): that run would find a folder there that it did not write, and refuse to
    resume."""
    folder = os.path.dirname(os.path.realpath(output))
    while True:
        if _holds_committed_steps(folder):
            raise ValueError(
                f"--output={output} is inside {folder}, a run's checkpoints folder: the run "
                "would refuse to resume with a folder there that it did not write; write the "
                "weights elsewhere (nothing was written)"
            )
        if folder == os.path.dirname(folder):
            return
        folder = os.path.dirname(folder)


def export(
    workdir: str, output: str, step: int | None, dtype: str, *, ema: bool = False
) -> resnet.weights.Weights:
    """Writes the weights (with `ema`, their moving average) of the run's newest (or given)
    trustworthy step to the new folder `output`; returns them. Refuses an output that exists
    or lies in a checkpoints folder, and `ema` for a run that kept no average."""
    _check_export_target(output)
    if os.path.lexists(output):  # save() checks again; this fails before reading the run
        raise FileExistsError(f"{output} exists; weights are written to a new directory only")
    weights = weights_from_checkpoint(workdir, step, ema=ema)
    resnet.weights.save(
        output,
        model=weights.model,
        params=weights.params,
        batch_stats=weights.batch_stats,
        preprocessing=weights.preprocessing,
        class_names=weights.class_names,
        dtype=dtype,
        metadata=weights.metadata,
    )
    return weights
