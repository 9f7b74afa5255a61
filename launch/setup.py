"""The set-up that training and evaluation share: data, workdir, program, checkpoints, resume.

`launch.train` and `launch.evaluate` both start here: which data (`data_dirs`, `load_info`),
what the run may write (`RUN_FILES`, `run_folders`, `lock_workdir`), the program and the
checkpoints with the signature a restore must match (`program_and_checkpoints`), and where a
resume starts from (`initial_state`, `check_same_data`, `log_resume`).
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

import pipeline
import resnet.from_weights
from launch import checkpoint_weights, checkpointing, distributed, executables
from launch import events as events_lib
from launch import metrics as metrics_lib
from launch import plan as plan_lib
from launch import program as program_lib
from launch import workdir as workdir_lib
from launch.plan import ConfigError
from resnet import steps as steps_lib

FINISHED_MARKER = "FINISHED"


def data_dirs(config: ml_collections.ConfigDict, *, need_train: bool = True) -> tuple[str, str]:
    """(train_dir, eval_dir): explicit directories always win over the embedded demo data.

    Evaluation alone (`need_train=False`) needs only eval_dir; train_dir may then be empty.
    """
    data = config.data
    explicit = bool(data.train_dir or data.eval_dir)
    if data.embedded and not explicit:
        try:
            return pipeline.prepare_embedded(data.embedded)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not need_train:
        if not data.eval_dir:
            raise ConfigError(
                "config.data.eval_dir is empty: there is nothing to evaluate on (name a dataset "
                "made by `python -m tools.make_arrayrecord`)"
            )
        if data.embedded:
            logging.info(
                "Evaluating on config.data.eval_dir=%r, not on the embedded %r data.",
                data.eval_dir,
                data.embedded,
            )
        return data.train_dir, data.eval_dir
    if data.embedded:
        logging.warning(
            "config.data.train_dir/eval_dir are set (%r, %r): training on them, not on the "
            "embedded %r dataset that config.data.embedded names.",
            data.train_dir,
            data.eval_dir,
            data.embedded,
        )
    if not data.train_dir:
        if data.embedded:
            raise ConfigError(
                "config.data.eval_dir is set but config.data.train_dir is empty: give both, or "
                f"neither to train on the embedded {data.embedded!r} data"
            )
        raise ConfigError(
            "config.data.train_dir is empty: point it at a dataset made by "
            "`python -m tools.make_arrayrecord` (or use configs/demo.py)"
        )
    return data.train_dir, data.eval_dir


def load_info(directory: str, field: str):
    try:
        return pipeline.load_info(directory)
    except FileNotFoundError as e:
        raise ConfigError(f"config.data.{field}: {e}") from None


def describe(info) -> dict[str, Any]:
    return {"path": info.data_dir, "examples": info.num_examples, "classes": info.num_classes}


def identity(train_dir: str, eval_dir: str) -> dict[str, Any]:
    """The data a checkpoint records it was trained on: paths, and content fingerprints that
    a resume compares (a moved dataset keeps its fingerprint)."""
    identify = lambda d: {"path": d, "fingerprint": pipeline.dataset_fingerprint(d)}
    return {"train": identify(train_dir), "eval": identify(eval_dir) if eval_dir else None}


def check_same_data(saved_meta: dict, data: dict, where: str, allow_change: bool) -> bool:
    """Whether this run trains on other data than the checkpoint at `where` (allowed only with
    data.allow_change); raises DataChanged otherwise."""
    change = checkpointing.data_change(saved_meta, data)
    if change is None:
        return False
    if not allow_change:
        raise checkpointing.DataChanged(
            f"the checkpoint {where} was trained on other data ({change}). Resume on the "
            "original data, or set --config.data.allow_change=True to train on these (the "
            "change is recorded in the checkpoints' history and in FINISHED); the checkpoints "
            "were left untouched."
        )
    logging.warning(
        "config.data.allow_change=True: resuming %s on other data (%s); recorded in the "
        "topology and data history.",
        where,
        change,
    )
    return True


RUN_FILES = {
    workdir_lib.LOCK_FILE: "the workdir lock",
    FINISHED_MARKER: "the finished run's record",
    metrics_lib.METRICS_FILE: "the metrics log",
}


def run_folders() -> dict[str, str]:
    """The folders the run writes besides the workdir (relative: under it)."""
    folders = {
        "checkpoints": "the checkpoints",
        "tensorboard": "the TensorBoard events",
        events_lib.FOLDER: "the structured events",
    }
    cache = getattr(jax.config, "jax_compilation_cache_dir", None)  # set by launch.main
    if cache:
        folders[cache] = "JAX's compilation cache"
        folders[executables.cache_folder() or cache] = "the compiled steps"
    return folders


def finished_record(workdir: str) -> dict | None:
    marker = epath.Path(workdir) / FINISHED_MARKER
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError) as e:
        record = e
    if not isinstance(record, dict) or not isinstance(record.get("step"), int):
        raise workdir_lib.WorkdirError(
            f"{marker} is not the record of a finished run ({str(record)[:80]}): it was damaged "
            "or written by hand; move it away to let the run go on"
        )
    return record


def initial_state(config, program: program_lib.Program):
    """Random initialisation, or the parameters and statistics of `model.init_from`."""
    source = config.model.init_from
    if not source:
        return program.init()
    step = config.model.init_from_step if config.model.init_from_step >= 0 else None
    try:
        weights = checkpoint_weights.load_weights(source, step)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.model.init_from={source}: {e}") from None
    for key, ours in (("name", config.model.name), ("in_channels", program.channels)):
        if weights.model[key] != ours:
            raise ConfigError(
                f"config.model.init_from={source} holds a model with {key} "
                f"{weights.model[key]!r}; this run's is {ours!r}"
            )
    model = program_lib.build_model(config, program.channels)
    skip: tuple[str, ...] = ()
    if weights.model["num_classes"] != config.model.num_classes:
        skip = ("head",)
        logging.warning(
            "The classifier head of %s has %d classes, this run %d: it is initialised afresh.",
            source,
            weights.model["num_classes"],
            config.model.num_classes,
        )
    try:
        resnet.from_weights.assign(model, weights, skip=skip)
    except ValueError as e:
        raise ConfigError(f"config.model.init_from={source}: {e}") from None
    logging.info("Parameters and BatchNorm statistics initialised from %s.", source)
    # Fresh optimizer state, step 0; an average starts from the weights taken.
    _, state = steps_lib.init_state(model, program.tx, ema=config.train.ema_decay > 0)
    return jax.device_put(state, program.replicated)


def lock_workdir(workdir: str) -> workdir_lib.WorkdirLock | None:
    """Process 0 takes the lock; every host learns whether it got it."""
    lock, error = None, None
    if jax.process_index() == 0:
        lock = workdir_lib.WorkdirLock(workdir)
        try:
            lock.acquire()
        except workdir_lib.WorkdirError as e:
            lock, error = None, e
    if distributed.any_host(error is not None):
        raise error or workdir_lib.WorkdirError(f"{workdir} is in use (see process 0's log)")
    return lock


def log_resume(step: int, meta: dict) -> None:
    before = (meta.get("topology_history") or [{}])[-1]
    now = checkpointing.topology()
    if before and {k: before.get(k) for k in now} != now:
        logging.warning(
            "Resuming a %sx%s checkpoint on %sx%s (processes x devices per process); the global "
            "batches are the same, only their split over devices changes.",
            before.get("processes"),
            before.get("devices_per_process"),
            now["processes"],
            now["devices_per_process"],
        )
    logging.info("Resumed from the checkpoint of step %d.", step)


def program_and_checkpoints(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    channels: int,
    num_examples: int,
    plan: plan_lib.Plan | None = None,
    read_only: bool = False,
) -> tuple[program_lib.Program, checkpointing.Checkpointer, dict[str, Any]]:
    """The program on this topology's mesh, the run's checkpoints, and the run signature a
    restore must match. `plan` shapes the learning-rate schedule (training); evaluation passes
    none and opens the checkpoints `read_only`."""
    mesh = distributed.make_mesh()
    if plan is None:  # the schedule does not matter to an evaluation
        program = program_lib.build_program(config, mesh, channels=channels)
    else:
        program = program_lib.build_program(
            config,
            mesh,
            channels=channels,
            steps_per_epoch=plan.steps_per_epoch,
            num_steps=plan.num_steps,
        )
    ckpt = checkpointing.Checkpointer(
        str(epath.Path(workdir) / "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save and not read_only,
        barrier_timeout_seconds=config.checkpoint.barrier_timeout_seconds,
        read_only=read_only,
    )
    signature = checkpointing.run_signature(config, num_examples, channels, program.shapes_digest())
    return program, ckpt, signature
