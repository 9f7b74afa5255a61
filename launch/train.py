"""The run, top to bottom: data, plan, program, resume, input, compile, the loop, eval, finish.

`train_and_evaluate` reads as the run happens and returns a `RunResult`; `launch.main` turns
results and exceptions into exit statuses. The math lives in `resnet.steps` (built by
`launch.program`), the input in `pipeline`, durability in `launch.checkpointing`.

Keeping every host in step. Each host dispatches a step and then waits for the one dispatched
`LAG` steps earlier, so the device always has work queued while the host never runs far
ahead. That wait is what the stall watchdog watches, and what carries the stop decision:
every step all-reduces the hosts' stop votes, and all hosts read the same step's result at
the same iteration, so they stop, save and exit at one agreed step.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import threading
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

import pipeline
import resnet.from_weights
import resnet.weights
from launch import checkpoint_weights, checkpointing, distributed, executables, liveness
from launch import events as events_lib
from launch import metrics as metrics_lib
from launch import plan as plan_lib
from launch import program as program_lib
from launch import workdir as workdir_lib
from launch.plan import ConfigError
from resnet import steps as steps_lib

FINISHED_MARKER = "FINISHED"
LAG = 2  # steps in flight beyond the one the host waits for


class Diverged(Exception):
    """Too many non-finite steps in a row: the run cannot make progress."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    outcome: str  # "finished" or "preempted"
    step: int
    eval: dict[str, float]


# --- data ---------------------------------------------------------------------------------


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


def _load_info(directory: str, field: str):
    try:
        return pipeline.load_info(directory)
    except FileNotFoundError as e:
        raise ConfigError(f"config.data.{field}: {e}") from None


def _describe(info) -> dict[str, Any]:
    return {"path": info.data_dir, "examples": info.num_examples, "classes": info.num_classes}


def _identity(train_dir: str, eval_dir: str) -> dict[str, Any]:
    """The data a checkpoint records it was trained on: paths, and content fingerprints that
    a resume compares (a moved dataset keeps its fingerprint)."""
    identify = lambda d: {"path": d, "fingerprint": pipeline.dataset_fingerprint(d)}
    return {"train": identify(train_dir), "eval": identify(eval_dir) if eval_dir else None}


def _check_same_data(saved_meta: dict, data: dict, where: str, allow_change: bool) -> bool:
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


# --- evaluation ---------------------------------------------------------------------------


def evaluate(compiled_eval_step, program, state, batches, stop, watchdog) -> dict | None:
    """Exact metrics over every eval example; None if the hosts agreed to stop midway."""
    totals = program.zero_eval_totals()
    in_flight: collections.deque = collections.deque()
    for batch in batches:
        totals, agreed_stop = compiled_eval_step(
            state, batch, totals, program.stop_votes(stop.requested)
        )
        in_flight.append(agreed_stop)
        if len(in_flight) > LAG:
            if jax.device_get(in_flight.popleft()):
                return None
            watchdog.beat(step_completed=False)
    totals = jax.device_get(totals)
    count = float(totals["count"])
    return {
        "eval/loss": float(totals["loss"]) / count,
        "eval/top1": float(totals["top1"]) / count,
        "eval/top5": float(totals["top5"]) / count,
        "eval/count": count,
    }


# --- the run ------------------------------------------------------------------------------


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str,
    stop: liveness.StopRequest | None = None,
    timings: dict[str, float] | None = None,
) -> RunResult:
    """Trains (resuming if WORKDIR holds checkpoints) and evaluates.

    `stop` is the process's signal handling (launch.main installs it at process start; by
    default nothing ever asks to stop); `timings` collects start-up phases in seconds.
    """
    stop = stop or liveness.StopRequest(config.distributed.preemption_grace_seconds, install=False)
    timings = {} if timings is None else timings
    clock = started = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        timings[f"startup/{name}_s"] = now - clock
        clock = now
        stop.check()

    plan_lib.check_config(config)
    with contextlib.ExitStack() as cleanup:
        # 0. The workdir: every path the run writes is usable, and the workdir is ours alone.
        workdir_lib.check_run_paths(workdir, _run_folders(), _RUN_FILES)
        finished = _finished_record(workdir)
        lock = _lock_workdir(workdir)
        if lock is not None:
            cleanup.callback(lock.release)

        # 1. Data and plan, all checked before anything is compiled.
        train_dir, eval_dir = data_dirs(config)
        train_info = _load_info(train_dir, "train_dir")
        eval_info = _load_info(eval_dir, "eval_dir") if eval_dir else None
        plan = plan_lib.make_plan(config, train_info, eval_info)
        mesh = distributed.make_mesh()
        program = program_lib.build_program(
            config,
            mesh,
            channels=train_info.channels,
            steps_per_epoch=plan.steps_per_epoch,
            num_steps=plan.num_steps,
        )
        data = {"train": _describe(train_info), "eval": eval_info and _describe(eval_info)}
        identity = _identity(train_dir, eval_dir)
        logging.info("Topology: %s", distributed.describe_topology(plan.global_batch))
        logging.info("Train data: %s", data["train"])
        logging.info("Eval data: %s", data["eval"] or "none")
        logging.info("Plan: %s", plan.describe())
        phase("data")

        # 2. Compile the steps in the background (they need only shapes) while the newest
        #    trustworthy checkpoint is restored, on whatever topology this is.
        ckpt = checkpointing.Checkpointer(
            str(epath.Path(workdir) / "checkpoints"),
            max_to_keep=config.checkpoint.max_to_keep,
            async_save=config.checkpoint.async_save,
            barrier_timeout_seconds=config.checkpoint.barrier_timeout_seconds,
        )
        cleanup.callback(ckpt.close)
        signature = checkpointing.run_signature(
            config, train_info.num_examples, train_info.channels, program.shapes_digest()
        )
        newest = ckpt.check_compatible(signature)
        if newest is not None and not config.data.allow_change:
            _check_same_data(newest[1], identity, newest[0], allow_change=False)
        if (
            finished is not None
            and finished["step"] >= plan.num_steps
            and finished["step"] in checkpointing.committed_steps(workdir)
        ):
            # A rerun of a finished job (a supervisor's, a requeue's) ends here, uncompiled.
            # Without its final checkpoint it goes on, and the restore says what is wrong.
            logging.info("The run had already finished (step %d).", finished["step"])
            return RunResult("finished", finished["step"], finished.get("eval", {}))
        compiled = _Background(
            lambda: _compile(program, plan, config.data.image_size, ckpt, eval_info is not None)
        )
        cleanup.callback(compiled.finish)
        restored = ckpt.restore_latest(program.abstract_state, signature)
        data_changed = False
        if restored:
            state, start_step, saved_meta = restored
            where = str(ckpt.directory / str(start_step))
            data_changed = _check_same_data(saved_meta, identity, where, config.data.allow_change)
            _log_resume(start_step, saved_meta)
        else:
            state, start_step, saved_meta = _initial_state(config, program), 0, None
        history = checkpointing.topology_history(saved_meta, start_step, identity, data_changed)
        meta = dict(
            signature,
            data=identity,
            topology_history=history,
            # What tools.export, tools.predict and init_from need to use a step on their own.
            model=resnet.weights.model_spec(
                config.model.name,
                config.model.num_classes,
                in_channels=train_info.channels,
                bn_epsilon=config.model.bn_epsilon,
            ),
            preprocessing={
                "mean": list(config.data.mean),
                "std": list(config.data.std),
                "image_size": config.data.image_size,
                "eval_crop_fraction": config.data.eval_crop_fraction,
            },
            class_names=list(train_info.class_names),
        )
        phase("restore")

        # 3. Input from the restored step; its first batches load while compilation finishes.
        train_iter = pipeline.train_batches(
            train_info,
            config.data,
            program.batch_sharding,
            global_batch_size=plan.global_batch,
            num_steps=plan.num_steps,
            start_step=start_step,
            seed=config.train.seed,
        )
        cleanup.callback(train_iter.close)
        train_iter.start()
        eval_batches = None
        if eval_info:
            eval_batches = pipeline.eval_batches(
                eval_info, config.data, program.batch_sharding, global_batch_size=plan.eval_batch
            )
        (train_step, eval_step), timings["startup/compile_s"] = compiled.result()
        phase("compile_wait")
        # Hosts restore and compile at different speeds (a cache hit on one, a compile on
        # another): meet here, under a deadline, so the stall watchdog's clock starts only
        # when every host can run the first step.
        distributed.wait_for_all_hosts(
            "ready to train", config.distributed.initialization_timeout_seconds
        )
        phase("host_wait")

        # 4. The loop.
        writer = metrics_lib.Writer(workdir)
        cleanup.callback(writer.close)
        writer.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
        watchdog = liveness.Watchdog(config.train.stall_timeout_seconds)
        cleanup.callback(watchdog.close)
        run = _Run(
            config=config,
            workdir=workdir,
            plan=plan,
            program=program,
            train_step=train_step,
            eval_step=eval_step,
            train_iter=train_iter,
            eval_batches=eval_batches,
            ckpt=ckpt,
            meta=meta,
            writer=writer,
            stop=stop,
            watchdog=watchdog,
            timings=timings,
            started=started,
            data=data,
        )
        try:
            result = _loop(run, state, start_step)
        except BaseException:
            # The original error is the one to report; a failing save is only logged here.
            try:
                ckpt.wait()
            except checkpointing.CheckpointSaveError as e:
                logging.error("While stopping after an error: %s", e)
            raise
        ckpt.wait()  # every exit path leaves no half-written step behind
        return result


_RUN_FILES = {
    workdir_lib.LOCK_FILE: "the workdir lock",
    FINISHED_MARKER: "the finished run's record",
    metrics_lib.METRICS_FILE: "the metrics log",
}


def _run_folders() -> dict[str, str]:
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


def _finished_record(workdir: str) -> dict | None:
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


class _Background:
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


def _compile(program, plan, image_size: int, ckpt, with_eval: bool):
    """The train and eval steps and the pre-save checks, compiled ahead of time."""
    start = time.perf_counter()
    train_step = program.compile_train_step(plan.global_batch, image_size)
    eval_step = program.compile_eval_step(plan.eval_batch, image_size) if with_eval else None
    ckpt.prepare(program.abstract_state)
    return (train_step, eval_step), time.perf_counter() - start


def _initial_state(config, program: program_lib.Program):
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
    _, state = steps_lib.init_state(model, program.tx)  # fresh optimizer state, step 0
    return jax.device_put(state, program.replicated)


def _lock_workdir(workdir: str) -> workdir_lib.WorkdirLock | None:
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


def _log_resume(step: int, meta: dict) -> None:
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


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything the loop needs, built once by `train_and_evaluate`."""

    config: ml_collections.ConfigDict
    workdir: str
    plan: plan_lib.Plan
    program: program_lib.Program
    train_step: Any
    eval_step: Any
    train_iter: Any
    eval_batches: Any
    ckpt: checkpointing.Checkpointer
    meta: dict[str, Any]
    writer: metrics_lib.Writer
    stop: liveness.StopRequest
    watchdog: liveness.Watchdog
    timings: dict[str, float]
    started: float  # time.perf_counter() when train_and_evaluate began
    data: dict[str, Any]


def _loop(run: _Run, state, start_step: int) -> RunResult:
    plan, stop, watchdog = run.plan, run.stop, run.watchdog
    meter = metrics_lib.ProgressMeter(plan.global_batch, plan.num_steps, start_step)
    pending: list[dict[str, jax.Array]] = []  # metrics not yet logged
    in_flight: collections.deque = collections.deque()  # stop flags of unconfirmed steps
    last_saved = start_step if start_step else None

    def run_eval(step: int) -> dict[str, float] | None:
        if run.eval_batches is None:
            return {}
        start = time.perf_counter()
        results = evaluate(run.eval_step, run.program, state, run.eval_batches, stop, watchdog)
        if results is None:
            logging.warning("Eval at step %d stopped: the hosts agreed to stop.", step)
            return None
        run.writer.scalars(step, {k: v for k, v in results.items() if k != "eval/count"}, "eval")
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
        if last_saved == step:
            return
        blocked = run.ckpt.save(step, state, run.meta)
        last_saved = step
        logging.info("checkpoint of step %d started; the loop was blocked %.3fs", step, blocked)

    def preempted(step: int) -> RunResult:
        logging.warning(
            "Stop agreed by every host: saving step %d, then exiting (rerun to resume).", step
        )
        save(step)
        run.ckpt.wait()
        return RunResult("preempted", step, {})

    profile = _Profile(run.config.train.profile_steps, run.workdir)
    step = start_step
    stop.training_started()
    watchdog.start()
    if run.config.eval.at_start and start_step == 0 and run_eval(0) is None:
        return preempted(0)
    startup_end = time.perf_counter()
    while step < plan.num_steps:
        wait_start = time.perf_counter()
        batch = next(run.train_iter)
        meter.add_data_wait(time.perf_counter() - wait_start)
        if step == start_step and run.config.train.num_image_summaries:
            _image_summary(run, step, batch)
        if step == profile.first:
            profile.start()
        state, step_metrics = run.train_step(state, batch, run.program.stop_votes(stop.requested))
        step += 1
        if step == profile.last:
            profile.stop(state)
        pending.append(step_metrics)
        in_flight.append(step_metrics["stop"])
        agreed_stop = False
        if len(in_flight) > LAG:
            agreed_stop = bool(jax.device_get(in_flight.popleft()))  # waits for that step
            watchdog.beat()
            if step - start_step == LAG + 1:
                now = time.perf_counter()
                run.timings["startup/first_step_s"] = now - startup_end
                run.timings["startup/total_s"] = (
                    now - run.started + run.timings.get("startup/distributed_s", 0.0)
                )
                _log_startup(run, step)

        if step % plan.log_every == 0 or step == plan.num_steps:
            _log(step, plan.num_steps, pending, meter, run.writer, run.config)
            pending = []
        run.ckpt.check_for_errors()  # cheap: looks at the save futures, not at the devices
        if agreed_stop:
            return preempted(step)
        if plan.eval_every and step % plan.eval_every == 0 and step < plan.num_steps:
            if run_eval(step) is None:
                return preempted(step)
        if plan.save_every and step % plan.save_every == 0 and step < plan.num_steps:
            save(step)

    return _finish(run, state, run_eval, save)


def _finish(run: _Run, state, run_eval, save) -> RunResult:
    """Final eval, final checkpoint, and the FINISHED marker with the final figures."""
    step = run.plan.num_steps
    results = run_eval(step)
    save(step)
    run.ckpt.wait()
    if results is None:  # stopped during the final eval: the rerun evaluates
        return RunResult("preempted", step, {})
    run.writer.flush()
    if jax.process_index() == 0:
        record = {
            "step": step,
            **results,  # the eval figures at the top level, as earlier versions wrote them
            "eval": results,
            "data": run.data,
            "topology_history": run.meta["topology_history"],
        }
        (epath.Path(run.workdir) / FINISHED_MARKER).write_text(json.dumps(record, indent=2))
    logging.info("Finished %d steps.", step)
    return RunResult("finished", step, results)


class _Profile:
    """A jax.profiler trace of steps [first, last] on process 0, into WORKDIR/tensorboard."""

    def __init__(self, steps, workdir: str):
        self.first, self.last = (int(steps[0]) - 1, int(steps[1])) if steps else (-1, -1)
        self._directory = str(epath.Path(workdir) / "tensorboard")
        self._on = False

    def start(self) -> None:
        if jax.process_index() == 0:
            jax.profiler.start_trace(self._directory)
            self._on = True

    def stop(self, state) -> None:
        if self._on:
            jax.block_until_ready(state)  # the traced steps must have run
            jax.profiler.stop_trace()
            self._on = False
            logging.info(
                "Profile of steps %d-%d written under %s",
                self.first + 1,
                self.last,
                self._directory,
            )


def _image_summary(run: _Run, step: int, batch) -> None:
    images = np.asarray(batch["image"].addressable_shards[0].data)
    run.writer.images(
        "train/augmented_inputs",
        step,
        metrics_lib.image_grid_input(images, run.config.train.num_image_summaries),
    )


def _log_startup(run: _Run, step: int) -> None:
    parts = ", ".join(f"{k.split('/')[1][:-2]} {v:.1f}s" for k, v in run.timings.items())
    logging.info("Start-up: %s", parts)
    run.writer.scalars(step, run.timings, "startup")


def _log(step, num_steps, pending, meter, writer, config) -> None:
    values = jax.device_get(pending)  # waits for the interval's last step
    worst = max(int(v["nonfinite_in_a_row"]) for v in values)
    if worst > config.train.max_nonfinite_in_a_row:
        raise Diverged(
            f"{worst} steps in a row up to step {step} had a non-finite loss, gradient or update "
            f"(limit train.max_nonfinite_in_a_row={config.train.max_nonfinite_in_a_row}); their "
            "updates were skipped and no checkpoint holds them. Lower the learning rate or "
            "check the data."
        )
    finite = [v for v in values if np.isfinite(v["loss"])]
    mean = lambda key: float(np.mean([v[key] for v in finite])) if finite else float("nan")
    figures = meter.summarize(step)
    figures.update(
        {
            "train/loss": mean("loss"),
            "train/top1": mean("top1"),
            "train/learning_rate": float(values[-1]["learning_rate"]),
            "train/skipped_nonfinite_steps": float(values[-1]["nonfinite_total"]),
        }
    )
    metrics_lib.log_progress(step, num_steps, figures)
    writer.scalars(step, {k: v for k, v in figures.items() if k.startswith("train/")}, "train")
