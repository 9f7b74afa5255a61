"""The training loop: data, model and optimizer, resume, steps, eval, checkpoints, metrics.

`train_and_evaluate` reads top to bottom as the run happens. The math lives in
`resnet.steps`, the input in `pipeline`, durability in `launch.checkpointing`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from flax import nnx

import resnet
from launch import checkpointing
from launch import demo_data
from launch import distributed
from launch import metrics as metrics_lib
from pipeline import dataset as dataset_lib
from pipeline import global_batches
from pipeline import transforms
from resnet import steps as steps_lib

EXIT_FINISHED = 0
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpoint saved, run the same command again to resume
FINISHED_MARKER = "FINISHED"


class ConfigError(ValueError):
    """A configuration that cannot run; raised before anything is compiled."""


# --- configuration checks -------------------------------------------------------------------


def _dataset_info(directory: str, field: str) -> dataset_lib.DatasetInfo:
    if not directory:
        raise ConfigError(
            f"config.{field} is empty: point it at a dataset made by "
            "`python -m tools.make_arrayrecord` (or use configs/demo.py)"
        )
    try:
        return dataset_lib.load_info(directory)
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config.{field}: {e}") from None


def check_config(config: ml_collections.ConfigDict, train_info, eval_info) -> None:
    if config.model.name not in resnet.MODEL_NAMES:
        raise ConfigError(
            f"config.model.name={config.model.name!r} is not a known model; "
            f"choose one of {', '.join(resnet.MODEL_NAMES)}"
        )
    if config.model.num_classes != train_info.num_classes:
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes} but the training "
            f"data has {train_info.num_classes} classes"
        )
    if eval_info and eval_info.num_classes != train_info.num_classes:
        raise ConfigError(
            f"train data has {train_info.num_classes} classes, eval data {eval_info.num_classes}"
        )
    for field in ("mean", "std"):
        if len(config.data[field]) != train_info.channels:
            raise ConfigError(
                f"config.data.{field} has {len(config.data[field])} values for "
                f"images with {train_info.channels} channel(s)"
            )
    if config.model.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(
            f"config.model.dtype={config.model.dtype!r}: use float32, bfloat16 or float16"
        )
    for field, valid in (("batch_norm", resnet.BATCH_NORMS), ("max_pool", resnet.MAX_POOLS)):
        if config.model[field] not in valid:
            raise ConfigError(
                f"config.model.{field}={config.model[field]!r}: use one of {', '.join(valid)}"
            )
    try:
        distributed.check_batch_size(config.train.global_batch_size)
        distributed.check_batch_size(eval_batch_size(config), "eval.global_batch_size")
        dataset_lib.steps_per_epoch(train_info.num_examples, config.train.global_batch_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def eval_batch_size(config) -> int:
    size = config.eval.global_batch_size
    return config.train.global_batch_size if size <= 0 else size


def total_steps(config, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    return max(1, int(math.ceil(config.train.num_epochs * steps_per_epoch)))


# --- model and state --------------------------------------------------------------------------


def build_model(config, channels: int) -> nnx.Module:
    return resnet.create_model(
        config.model.name,
        num_classes=config.model.num_classes,
        rngs=nnx.Rngs(config.train.seed + 1),
        dtype=jnp.dtype(config.model.dtype),
        in_channels=channels,
        zero_init_residual=config.model.zero_init_residual,
        bn_momentum=config.model.bn_momentum,
        bn_epsilon=config.model.bn_epsilon,
        batch_norm=config.model.batch_norm,
        max_pool=config.model.max_pool,
    )


def make_optimizer(config, steps_per_epoch: int, num_steps: int):
    peak = config.train.base_learning_rate * config.train.global_batch_size / 256
    warmup = int(round(config.train.warmup_epochs * steps_per_epoch))
    schedule = steps_lib.learning_rate_schedule(peak, warmup, num_steps)
    tx = steps_lib.sgd_optimizer(
        schedule,
        momentum=config.train.momentum,
        nesterov=config.train.nesterov,
        weight_decay=config.train.weight_decay,
    )
    return tx, schedule


# --- evaluation -------------------------------------------------------------------------------


def evaluate(
    eval_step, state, eval_data, sharding, batch_size: int, prefetch: int
) -> dict[str, float]:
    """Exact metrics over every eval example: masked sums on device, one division at the end."""
    batches = global_batches.DeviceIterator(eval_data, sharding, batch_size, prefetch)
    totals = None
    for batch in batches:
        sums = eval_step(state, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    batches.close()
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1": float(totals["top1"]) / count,
        "eval/top5": float(totals["top5"]) / count,
        "eval/count": count,
    }


# --- the run ----------------------------------------------------------------------------------


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> int:
    """Trains (resuming if WORKDIR holds checkpoints); returns the process exit status."""
    # 1. Data and configuration, all checked before anything is compiled.
    if config.data.embedded:
        config.data.train_dir, config.data.eval_dir = demo_data.prepare(
            config.data.embedded, workdir
        )
    train_info = _dataset_info(config.data.train_dir, "data.train_dir")
    eval_info = (
        _dataset_info(config.data.eval_dir, "data.eval_dir") if config.data.eval_dir else None
    )
    check_config(config, train_info, eval_info)
    global_batch = config.train.global_batch_size
    steps_per_epoch = dataset_lib.steps_per_epoch(train_info.num_examples, global_batch)
    num_steps = total_steps(config, steps_per_epoch)

    # 2. The global mesh: parameters replicated, batches split over 'batch'.
    mesh = distributed.make_mesh()
    replicated = distributed.replicated(mesh)
    batch_sharding = distributed.batch_sharding(mesh)
    logging.info("Topology: %s", distributed.describe_topology(global_batch))
    logging.info(
        "%d steps (%d per epoch, %d train examples, %d dropped per epoch)",
        num_steps,
        steps_per_epoch,
        train_info.num_examples,
        train_info.num_examples - steps_per_epoch * global_batch,
    )

    # 3. Model, optimizer and jitted steps.
    tx, schedule = make_optimizer(config, steps_per_epoch, num_steps)
    make_model = lambda: build_model(config, train_info.channels)
    graphdef = nnx.graphdef(nnx.eval_shape(make_model))
    init = lambda: steps_lib.init_state(make_model(), tx)[1]
    compute = dict(
        mean=tuple(config.data.mean),
        std=tuple(config.data.std),
        compute_dtype=jnp.dtype(config.model.dtype),
    )
    train_step = jax.jit(
        steps_lib.make_train_step(
            graphdef, tx, schedule, label_smoothing=config.train.label_smoothing, **compute
        ),
        in_shardings=(replicated, batch_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )
    eval_step = jax.jit(
        steps_lib.make_eval_step(graphdef, **compute),
        in_shardings=(replicated, batch_sharding),
        out_shardings=replicated,
    )

    # 4. Input, then resume from the newest trustworthy checkpoint (state and data position).
    rows = global_batches.host_rows(batch_sharding, global_batch)
    augmentation = transforms.Augmentation(
        image_size=config.data.image_size,
        channels=train_info.channels,
        crop_scale=tuple(config.data.crop_scale),
        crop_ratio=tuple(config.data.crop_ratio),
        random_flip=config.data.random_flip,
    )
    train_data = dataset_lib.train_dataset(
        train_info,
        rows=rows,
        global_batch_size=global_batch,
        num_steps=num_steps,
        seed=config.train.seed,
        augmentation=augmentation,
        num_workers=config.data.num_workers,
        num_threads=config.data.num_threads,
    )
    train_iter = global_batches.DeviceIterator(
        train_data, batch_sharding, global_batch, config.data.prefetch
    )
    eval_data = None
    if eval_info:
        eval_global = eval_batch_size(config)
        eval_data = dataset_lib.eval_dataset(
            eval_info,
            rows=global_batches.host_rows(batch_sharding, eval_global),
            global_batch_size=eval_global,
            image_size=config.data.image_size,
            crop_fraction=config.data.eval_crop_fraction,
            num_workers=config.data.num_workers,
            num_threads=config.data.num_threads,
        )

    ckpt = checkpointing.Checkpointer(
        str(epath.Path(workdir) / "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=config.checkpoint.async_save,
        barrier_timeout_seconds=config.checkpoint.barrier_timeout_seconds,
    )
    signature = checkpointing.run_signature(config, jax.process_count(), train_info.num_examples)
    abstract_state = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), jax.eval_shape(init)
    )
    restored = ckpt.restore_latest(abstract_state, train_iter, signature)
    if restored:
        state, start_step = restored
        logging.info("Resumed from the checkpoint of step %d.", start_step)
    else:
        state, start_step = jax.jit(init, out_shardings=replicated)(), 0
    ckpt.prepare(state)

    writer = metrics_lib.Writer(workdir)
    writer.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
    run = _Run(
        config,
        workdir,
        num_steps,
        train_step,
        eval_step,
        train_iter,
        eval_data,
        batch_sharding,
        ckpt,
        signature,
        writer,
    )
    try:
        return _loop(run, state, start_step)
    finally:
        # Every exit path waits for an in-flight save: a half-written step must not be left.
        try:
            ckpt.wait()
        finally:
            ckpt.close()
            train_iter.close()
            writer.close()


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything the loop needs, built once by `train_and_evaluate`."""

    config: ml_collections.ConfigDict
    workdir: str
    num_steps: int
    train_step: Callable
    eval_step: Callable
    train_iter: global_batches.DeviceIterator
    eval_data: Any
    batch_sharding: jax.sharding.NamedSharding
    ckpt: checkpointing.Checkpointer
    signature: dict[str, Any]
    writer: metrics_lib.Writer


def _loop(run: _Run, state: steps_lib.TrainState, start_step: int) -> int:
    global_batch = run.config.train.global_batch_size
    eval_every = run.config.eval.every_steps
    save_every = run.config.checkpoint.every_steps
    log_every = max(run.config.train.log_every_steps, 1)
    preemption = distributed.PreemptionWatch()
    meter = metrics_lib.ProgressMeter(global_batch, run.num_steps, start_step)
    pending: list[dict[str, jax.Array]] = []
    last_saved = start_step if start_step else None

    def run_eval(step: int) -> dict[str, float]:
        if run.eval_data is None:
            return {}
        start = time.perf_counter()
        results = evaluate(
            run.eval_step,
            state,
            run.eval_data,
            run.batch_sharding,
            eval_batch_size(run.config),
            run.config.data.prefetch,
        )
        run.writer.scalars(step, {k: v for k, v in results.items() if k != "eval/count"})
        logging.info(
            "eval at step %d: loss %.4f  top1 %.4f  top5 %.4f  (%d examples, %.1fs)",
            step,
            results["eval/loss"],
            results["eval/top1"],
            results["eval/top5"],
            results["eval/count"],
            time.perf_counter() - start,
        )
        return results

    def save(step: int) -> None:
        nonlocal last_saved
        blocked = run.ckpt.save(step, state, run.train_iter, run.signature)
        last_saved = step
        logging.info("checkpoint of step %d started; the loop was blocked %.3fs", step, blocked)

    if start_step >= run.num_steps:
        logging.info("The run had already finished (step %d of %d).", start_step, run.num_steps)
        return EXIT_FINISHED

    step = start_step
    while step < run.num_steps:
        wait_start = time.perf_counter()
        batch = next(run.train_iter)
        meter.add_data_wait(time.perf_counter() - wait_start)
        if step == start_step and run.config.train.num_image_summaries:
            images = np.asarray(batch["image"].addressable_shards[0].data)
            run.writer.images(
                "train/augmented_inputs",
                step,
                metrics_lib.image_grid_input(images, run.config.train.num_image_summaries),
            )
        state, step_metrics = run.train_step(state, batch)
        step += 1
        pending.append(step_metrics)

        if step % log_every == 0 or step == run.num_steps:
            _log(
                step,
                run.num_steps,
                pending,
                meter,
                run.writer,
                run.config.train.max_nonfinite_in_a_row,
            )
            pending = []
        run.ckpt.check_for_errors()  # cheap: looks at the save futures, not at the devices
        if preemption.should_stop(step):
            logging.warning(
                "Preemption: saving step %d, then exiting with status %d.", step, EXIT_PREEMPTED
            )
            if last_saved != step:
                save(step)
            run.ckpt.wait()
            return EXIT_PREEMPTED
        if eval_every > 0 and step % eval_every == 0 and step < run.num_steps:
            run_eval(step)
        if save_every > 0 and step % save_every == 0 and step < run.num_steps:
            save(step)

    results = run_eval(run.num_steps)
    if last_saved != run.num_steps:
        save(run.num_steps)
    run.ckpt.wait()
    run.writer.flush()
    if jax.process_index() == 0:
        marker = {"step": run.num_steps, **{k: v for k, v in results.items()}}
        (epath.Path(run.workdir) / FINISHED_MARKER).write_text(json.dumps(marker, indent=2))
    logging.info("Finished %d steps.", run.num_steps)
    return EXIT_FINISHED


def _log(step, num_steps, pending, meter, writer, max_nonfinite_in_a_row) -> None:
    values = jax.device_get(pending)  # the only host sync of the hot loop, once per interval
    worst = max(int(v["nonfinite_in_a_row"]) for v in values)
    if worst > max_nonfinite_in_a_row:
        raise FloatingPointError(
            f"{worst} steps in a row up to step {step} had a non-finite loss, gradient or update "
            f"(limit train.max_nonfinite_in_a_row={max_nonfinite_in_a_row}); their updates were "
            "skipped and no checkpoint holds them. Lower the learning rate or check the data."
        )
    finite = [v for v in values if np.isfinite(v["loss"])]
    figures = meter.summarize(step)
    figures.update(
        {
            "train/loss": float(np.mean([v["loss"] for v in finite])) if finite else float("nan"),
            "train/top1": float(np.mean([v["top1"] for v in finite])) if finite else float("nan"),
            "train/learning_rate": float(values[-1]["learning_rate"]),
            "train/skipped_nonfinite_steps": float(values[-1]["nonfinite_total"]),
        }
    )
    metrics_lib.log_progress(step, num_steps, figures)
    writer.scalars(step, {k: v for k, v in figures.items() if k.startswith("train/")})
