"""The set-up that training and evaluation share: data, workdir, program, checkpoints, resume.

`launch.train` and `launch.evaluate` both start here: which data (`data_dirs`, `load_info`),
what the run may write (`RUN_FILES`, `run_folders`, `lock_workdir`), the program and the
checkpoints with the signature a restore must match (`program_and_checkpoints`), and where a
resume starts from (`initial_state`, `check_same_data`, `log_resume`).

The last section is a training run's start-up, one function per step of
`launch.train.train_and_evaluate`: claim the workdir, build the run, find the newest step,
compile in the background while restoring, begin the attempt's events, start the input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
import time
from typing import Any

import jax
import ml_collections
from absl import logging
from etils import epath

import pipeline
import resnet.from_weights
import resnet.weights
from launch import checkpoint_weights, checkpointing, distributed, executables
from launch import events as events_lib
from launch import metrics as metrics_lib
from launch import plan as plan_lib
from launch import program as program_lib
from launch import workdir as workdir_lib
from launch.plan import ConfigError
from pipeline import resizing
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


# --- a training run's start-up: what `launch.train.train_and_evaluate` calls, in order --------


@dataclasses.dataclass(frozen=True)
class Run:
    """What a training run is, checked before anything is compiled or restored."""

    plan: plan_lib.Plan
    program: program_lib.Program
    ckpt: checkpointing.Checkpointer
    signature: dict[str, Any]  # what a restore must match
    train_info: Any
    eval_info: Any  # None without eval data
    data: dict[str, Any]  # the train and eval data, described for FINISHED
    identity: dict[str, Any]  # the data's fingerprints, checked on a resume


def claim_workdir(workdir: str, cleanup: contextlib.ExitStack) -> dict | None:
    """Every path the run writes is usable, and the workdir is ours alone (released by
    `cleanup`); returns the FINISHED record of an earlier run, if any."""
    workdir_lib.check_run_paths(workdir, run_folders(), RUN_FILES)
    finished = finished_record(workdir)
    lock = lock_workdir(workdir)
    if lock is not None:
        cleanup.callback(lock.release)
    return finished


def build_run(config: ml_collections.ConfigDict, workdir: str, cleanup) -> Run:
    """Data, plan, program and checkpoints (closed by `cleanup`), logged as they are found."""
    train_dir, eval_dir = data_dirs(config)
    train_info = load_info(train_dir, "train_dir")
    eval_info = load_info(eval_dir, "eval_dir") if eval_dir else None
    plan = plan_lib.make_plan(config, train_info, eval_info)
    program, ckpt, signature = program_and_checkpoints(
        config,
        workdir,
        channels=train_info.channels,
        num_examples=train_info.num_examples,
        plan=plan,
    )
    cleanup.callback(ckpt.close)
    data = {"train": describe(train_info), "eval": eval_info and describe(eval_info)}
    logging.info("Topology: %s", distributed.describe_topology(plan.global_batch))
    logging.info("Train data: %s", data["train"])
    logging.info("Eval data: %s", data["eval"] or "none")
    logging.info("Plan: %s", plan.describe())
    ramp = resizing.ramp(config.data)
    if ramp is not None:
        steps = resizing.changes(config.data, plan.steps_per_epoch, 0, plan.num_steps)
        logging.info(
            "Progressive resizing: %s: %s; evaluation at %d px.",
            ramp.describe(),
            ", ".join(f"{size} px from step {step}" for step, size in steps),
            config.data.image_size,
        )
    return Run(
        plan, program, ckpt, signature, train_info, eval_info, data, identity(train_dir, eval_dir)
    )


def newest_step(run: Run, config: ml_collections.ConfigDict) -> int:
    """The newest step a restore would take (0 if none), refused early if it was trained on
    other data (unless `data.allow_change`)."""
    newest = run.ckpt.check_compatible(run.signature)
    if newest is None:
        return 0
    if not config.data.allow_change:
        check_same_data(newest[1], run.identity, newest[0], allow_change=False)
    return int(epath.Path(newest[0]).name)


def already_finished(finished: dict | None, run: Run, workdir: str) -> dict | None:
    """The FINISHED record if this is a rerun of a finished job (a supervisor's, a requeue's),
    which ends before compiling. Without its final checkpoint it goes on, and the restore says
    what is wrong."""
    if (
        finished is not None
        and finished["step"] >= run.plan.num_steps
        and finished["step"] in checkpointing.committed_steps(workdir)
    ):
        return finished
    return None


class Background:
    """Runs `fn` in a daemon thread, for work that overlaps the rest of start-up."""

    def __init__(self, fn):
        self._result = self._error = None
        self._thread = threading.Thread(target=self._run, args=(fn,), daemon=True)
        self._thread.start()

    def _run(self, fn):
        try:
            self._result = fn()
        except BaseException as e:  # pylint: disable=broad-except  # re-raised in result()
            self._error = e

    def finish(self) -> None:
        """Waits for `fn` without raising, on every way out of the run.

        A process that exits while the thread is inside XLA's compiler aborts ("FATAL:
        exception not rethrown") instead of exiting with its status. A stop during start-up
        still ends in time: its deadline exits 75 if this takes too long.
        """
        if self._thread.is_alive():
            logging.info("Waiting for the background compilation to finish before exiting.")
            self._thread.join()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def compile_steps(run: Run, config: ml_collections.ConfigDict, from_step: int):
    """The train step at every training size from `from_step` on (progressive resizing: each
    its own), the eval step, and the pre-save checks, compiled (or loaded) ahead of time;
    returns ((train steps, eval step), seconds)."""
    start = time.perf_counter()
    plan = run.plan
    sizes = resizing.sizes(config.data, plan.steps_per_epoch, from_step, plan.num_steps)
    train_steps = program_lib.TrainSteps(run.program, plan.global_batch)
    train_steps.compile(sizes)
    eval_step = None
    if run.eval_info:
        eval_step = run.program.compile_eval_step(plan.eval_batch, config.data.image_size)
    run.ckpt.prepare(run.program.abstract_state)
    return (train_steps, eval_step), time.perf_counter() - start


def restore_or_initialize(run: Run, config: ml_collections.ConfigDict):
    """(state, start step, the restored step's metadata or None, this run's metadata): the
    newest trustworthy checkpoint on whatever topology this is, or a fresh state."""
    restored = run.ckpt.restore_latest(run.program.abstract_state, run.signature)
    data_changed = False
    if restored:
        state, start_step, saved_meta = restored
        where = str(run.ckpt.directory / str(start_step))
        data_changed = check_same_data(saved_meta, run.identity, where, config.data.allow_change)
        log_resume(start_step, saved_meta)
    else:
        state, start_step, saved_meta = initial_state(config, run.program), 0, None
    history = checkpointing.topology_history(saved_meta, start_step, run.identity, data_changed)
    meta = dict(
        run.signature,
        data=run.identity,
        topology_history=history,
        # What tools.export, tools.predict and init_from need to use a step on their own.
        model=resnet.weights.model_spec(
            config.model.name,
            config.model.num_classes,
            in_channels=run.train_info.channels,
            bn_epsilon=config.model.bn_epsilon,
        ),
        preprocessing={
            "mean": list(config.data.mean),
            "std": list(config.data.std),
            "image_size": config.data.image_size,
            "eval_crop_fraction": config.data.eval_crop_fraction,
        },
        class_names=list(run.train_info.class_names),
    )
    return state, start_step, saved_meta, meta


def begin_attempt(config, workdir, timings, ckpt, start_step: int, saved_meta):
    """This attempt's event log, with what start-up has done so far; and the workdir's earlier
    events (process 0)."""
    topology = f"{jax.process_count()}x{jax.local_device_count()}"
    timeout = config.distributed.initialization_timeout_seconds
    log, past = events_lib.begin_attempt(workdir, topology, timeout)
    for key, seconds in timings.items():
        log.emit("phase_ended", phase=key.split("/")[1][:-2], seconds=seconds)
    for step, reason in ckpt.rejected:
        log.emit("checkpoint_rejected", step=step, reason=reason)
    before = ((saved_meta or {}).get("topology_history") or [{}])[-1]
    was = f"{before.get('processes')}x{before.get('devices_per_process')}" if before else None
    log.emit("resumed", step=start_step, from_topology=was)
    return log, past


def input_from(run: Run, config: ml_collections.ConfigDict, start_step: int, cleanup):
    """(train batches from `start_step`, loading already; eval batches or None)."""
    plan, sharding = run.plan, run.program.batch_sharding
    train_iter = pipeline.train_batches(
        run.train_info,
        config.data,
        sharding,
        global_batch_size=plan.global_batch,
        num_steps=plan.num_steps,
        start_step=start_step,
        seed=config.train.seed,
    )
    cleanup.callback(train_iter.close)
    train_iter.start()
    eval_batches = None
    if run.eval_info:
        eval_batches = pipeline.eval_batches(
            run.eval_info, config.data, sharding, global_batch_size=plan.eval_batch
        )
    return train_iter, eval_batches
