"""Training, top to bottom: set-up, resume, input, compile, then the loop of a `Trainer`.

`train_and_evaluate` reads as the run happens and returns a `RunResult`; `launch.main` turns
results and exceptions into exit statuses. Each start-up step is one call into
`launch.setup` (shared with evaluation), the maths is in `resnet.steps` (built by
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
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from launch import (
    checkpointing,
    distributed,
    events,
    executables,
    goodput,
    interval,
    liveness,
    setup,
)
from launch import metrics as metrics_lib
from launch import plan as plan_lib
from launch.setup import FINISHED_MARKER
from pipeline import resizing

LAG = 2  # steps in flight beyond the one the host waits for


class Diverged(Exception):
    """Too many non-finite steps in a row: the run cannot make progress."""


@dataclasses.dataclass(frozen=True)
class RunResult:
    outcome: str  # "finished" or "preempted"
    step: int
    eval: dict[str, float]


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
        events.current().emit("phase_ended", phase=name, seconds=now - clock)
        clock = now
        stop.check()

    plan_lib.check_config(config)
    with contextlib.ExitStack() as cleanup:
        # 0. The workdir: every path the run writes is usable, and the workdir is ours alone.
        finished = setup.claim_workdir(workdir, cleanup)

        # 1. Data, plan, program and checkpoints, all checked before anything is compiled.
        run = setup.build_run(config, workdir, cleanup)
        phase("data")

        # 2. Compile the steps in the background (they need only shapes) while the newest
        #    trustworthy checkpoint is restored, on whatever topology this is.
        newest_step = setup.newest_step(run, config)
        done = setup.already_finished(finished, run, workdir)
        if done is not None:
            logging.info("The run had already finished (step %d).", done["step"])
            return RunResult("finished", done["step"], done.get("eval", {}))
        compiled = setup.Background(lambda: setup.compile_steps(run, config, newest_step))
        cleanup.callback(compiled.finish)
        state, start_step, saved_meta, meta = setup.restore_or_initialize(run, config)
        phase("restore" if start_step else "init")  # a fresh start builds its state
        # Only now, with nothing left to refuse, does the run write its events.
        log, past_events = setup.begin_attempt(
            config, workdir, timings, run.ckpt, start_step, saved_meta
        )

        # 3. Input from the restored step; its first batches load while compilation finishes.
        train_iter, eval_batches = setup.input_from(run, config, start_step, cleanup)
        (train_step, eval_step), timings["startup/compile_s"] = compiled.result()
        # An older step restored (the newest was damaged) may start lower on the ramp.
        plan = run.plan
        needed = resizing.sizes(config.data, plan.steps_per_epoch, start_step, plan.num_steps)
        timings["startup/compile_s"] += train_step.compile(needed)
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
        watchdog = liveness.Watchdog(config.train.stall_timeout_seconds)
        cleanup.callback(watchdog.close)
        trainer = Trainer(
            config=config,
            workdir=workdir,
            run=run,
            train_step=train_step,
            eval_step=eval_step,
            train_iter=train_iter,
            eval_batches=eval_batches,
            meta=meta,
            writer=writer,
            stop=stop,
            watchdog=watchdog,
            timings=timings,
            started=started,
            state=state,
            start_step=start_step,
            log=log,
            past_events=past_events,
        )
        try:
            result = trainer.run()
        except BaseException:
            # The original error is the one to report; a failing save is only logged here.
            try:
                run.ckpt.wait()
            except checkpointing.CheckpointSaveError as e:
                logging.error("While stopping after an error: %s", e)
            raise
        run.ckpt.wait()  # every exit path leaves no half-written step behind
        return result


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


# --- the loop -----------------------------------------------------------------------------


class Trainer:
    """The training loop of one run: `state` advances by `step()`, `run()` loops to the end.

    Built once by `train_and_evaluate` with everything set up; its methods are what a step
    can lead to: `evaluate`, `save`, `stop_here` (the hosts agreed to stop) and `finish`.
    """

    def __init__(
        self,
        *,
        config: ml_collections.ConfigDict,
        workdir: str,
        run: setup.Run,
        train_step: Any,
        eval_step: Any,
        train_iter: Any,
        eval_batches: Any,
        meta: dict[str, Any],
        writer: metrics_lib.Writer,
        stop: liveness.StopRequest,
        watchdog: liveness.Watchdog,
        timings: dict[str, float],
        started: float,  # time.perf_counter() when train_and_evaluate began
        state: Any,
        start_step: int,
        log: events.EventLog | events.NullLog,
        past_events: list[dict[str, Any]],
    ):
        plan = run.plan
        self.config, self.workdir, self.plan, self.program = config, workdir, plan, run.program
        self.train_step, self.eval_step = train_step, eval_step
        self.train_iter, self.eval_batches = train_iter, eval_batches
        self.ckpt, self.meta, self.writer = run.ckpt, meta, writer
        self.stop, self.watchdog = stop, watchdog
        self.timings, self.started, self.data = timings, started, run.data
        self.state, self.step, self.start_step = state, start_step, start_step
        self.last_saved: int | None = start_step if start_step else None
        self.meter = metrics_lib.ProgressMeter(plan.global_batch, plan.num_steps, start_step)
        self.pending: list[dict[str, jax.Array]] = []  # metrics not yet logged
        self.in_flight: collections.deque = collections.deque()  # unconfirmed stop flags
        self.profile = metrics_lib.Profile(config.train.profile_steps, workdir)
        self.startup_end = 0.0
        self.training_since: float | None = None  # wall time of the first step's dispatch
        self._first_step_done: tuple[float, float] | None = None  # (wall, perf_counter) times
        self.log = log
        self.live = goodput.Live(past_events, log) if jax.process_index() == 0 else None
        self.saves = interval.Saves(
            plan.save_every,
            start_step,
            plan.num_steps,
            restore_s=timings.get("startup/restore_s", 0.0) if start_step else 0.0,
            past=past_events,
            mtbf=self._mtbf,
            log=log,
            writer=writer,
            timeout_s=config.checkpoint.barrier_timeout_seconds,
        )
        self.seen_commit: tuple[int, float] | None = None
        self.fault_seen = False

    def run(self) -> RunResult:
        """Trains from the restored step to the last, evaluating and saving on the plan."""
        plan = self.plan
        self.stop.training_started()
        self.watchdog.start()
        if self.config.eval.at_start and self.start_step == 0 and self.evaluate() is None:
            return self.stop_here()
        self.startup_end = time.perf_counter()
        while self.step < plan.num_steps:
            agreed_stop = self.train_one_step()
            step = self.step
            if step % plan.log_every == 0 or step == plan.num_steps:
                _log(step, plan.num_steps, self.pending, self.meter, self.writer, self.config)
                self.pending = []
                self._progress()
            self.ckpt.check_for_errors()  # cheap: looks at the save futures, not the devices
            self._note_commit_and_fault()
            if agreed_stop:
                return self.stop_here()
            if plan.eval_every and step % plan.eval_every == 0 and step < plan.num_steps:
                if self.evaluate() is None:
                    return self.stop_here()
            if self.saves.due(step):
                self.saves.saved(step, self.save())
        return self.finish()

    def train_one_step(self) -> bool:
        """Dispatches the next step; returns whether the hosts agreed to stop (read `LAG`
        steps back, which is also where the host waits for the devices)."""
        wait_start = time.perf_counter()
        batch = next(self.train_iter)
        self.meter.add_data_wait(time.perf_counter() - wait_start)
        if self.step == self.profile.first:
            self.profile.start()
        votes = self.program.stop_votes(self.stop.requested)
        if self.training_since is None:
            self.training_since = time.time()
        self.state, step_metrics = self.train_step(self.state, batch, votes)
        if self.step == self.start_step:  # while the first step runs
            _start_summaries(self, batch)
        self.step += 1
        if self.step == self.profile.last:
            self.profile.stop(self.state)
        self.pending.append(step_metrics)
        self.in_flight.append(step_metrics["stop"])
        # When the first step finished, without waiting for it: its flag heads `in_flight`
        # until it is read, and is looked at after each dispatch (a backend that runs one
        # step at a time has finished it when the next dispatch returns).
        if self._first_step_done is None and self.in_flight[0].is_ready():
            self._first_step_done = (time.time(), time.perf_counter())
        if len(self.in_flight) <= LAG:
            return False
        agreed_stop = bool(jax.device_get(self.in_flight.popleft()))  # waits for that step
        self.watchdog.beat()
        if self.step - self.start_step == LAG + 1:
            self._startup_done()
        return agreed_stop

    def evaluate(self) -> dict[str, float] | None:
        """Evaluates the current state; None if the hosts agreed to stop midway."""
        if self.eval_batches is None:
            return {}
        start = time.perf_counter()
        results = evaluate(
            self.eval_step, self.program, self.state, self.eval_batches, self.stop, self.watchdog
        )
        if results is None:
            logging.warning("Eval at step %d stopped: the hosts agreed to stop.", self.step)
            return None
        self.saves.pause(time.perf_counter() - start)
        self.log.emit("eval", step=self.step, **results)
        self.writer.scalars(
            self.step, {k: v for k, v in results.items() if k != "eval/count"}, "eval"
        )
        logging.info(
            "eval at step %d: loss %.4f  top1 %.4f  top5 %.4f  (%d examples, %.1fs)",
            self.step,
            results["eval/loss"],
            results["eval/top1"],
            results["eval/top5"],
            results["eval/count"],
            time.perf_counter() - start,
        )
        return results

    def save(self) -> float:
        """Starts an asynchronous checkpoint of the current step (once per step); returns how
        long the loop was held up."""
        if self.last_saved == self.step:
            return 0.0
        blocked = self.ckpt.save(self.step, self.state, self.meta)
        self.last_saved = self.step
        self.log.emit("save_started", step=self.step, blocked_s=round(blocked, 4))
        logging.info(
            "checkpoint of step %d started; the loop was blocked %.3fs", self.step, blocked
        )
        return blocked

    def stop_here(self) -> RunResult:
        """The hosts agreed to stop: save this step, wait for it, report a preemption."""
        logging.warning(
            "Stop agreed by every host: saving step %d, then exiting (rerun to resume).",
            self.step,
        )
        self._note_commit_and_fault()
        self.log.emit("stop_agreed", step=self.step, reason=self.stop.reason or "another host")
        self.save()
        self.ckpt.wait()
        self._note_commit_and_fault()
        return RunResult("preempted", self.step, {})

    def finish(self) -> RunResult:
        """Final eval, final checkpoint, and the FINISHED marker with the final figures."""
        results = self.evaluate()
        self.save()
        self.ckpt.wait()
        self._note_commit_and_fault()
        if results is None:  # stopped during the final eval: the rerun evaluates
            return RunResult("preempted", self.step, {})
        self.writer.flush()
        if jax.process_index() == 0:
            record = {
                "step": self.step,
                "eval": results,
                "data": self.data,
                "topology_history": self.meta["topology_history"],
            }
            marker = epath.Path(self.workdir) / FINISHED_MARKER
            marker.write_text(json.dumps(record, indent=2))
        logging.info("Finished %d steps.", self.step)
        return RunResult("finished", self.step, results)

    def _startup_done(self) -> None:
        """The first step is done on every host (its result was read): the start-up figures,
        up to when it finished. Training (what goodput counts as productive) began when it was
        dispatched: the steps queued behind it since are kept progress."""
        if self._first_step_done is None:  # not seen earlier: done when its result was read
            self._first_step_done = (time.time(), time.perf_counter())
        done_wall, done = self._first_step_done
        self.timings["startup/first_step_s"] = done - self.startup_end
        self.timings["startup/total_s"] = (
            done - self.started + self.timings.get("startup/distributed_s", 0.0)
        )
        _log_startup(self, self.step)
        executables.record_used(self.workdir)  # what the next start loads ahead
        self.log.emit(
            "startup",
            figures=dict(self.timings),
            programs=executables.programs(),
            training_since=self.training_since,
            first_step_done=done_wall,
        )
        self.saves.training(self.step)

    def _progress(self) -> None:
        """At a log interval: the progress event; on process 0 the goodput so far, across the
        workdir's attempts (TensorBoard and metrics.jsonl)."""
        self.log.emit("progress", step=self.step)
        if self.live is not None:
            self.writer.scalars(self.step, self.live.fractions(time.time()), "goodput")

    def _note_commit_and_fault(self) -> None:
        """Emits a save's commit once the loop has seen it, and the first stop request."""
        commit = self.ckpt.last_commit
        if commit is not None and commit != self.seen_commit:
            self.seen_commit = commit
            self.log.emit("save_committed", step=commit[0], seconds=round(commit[1], 4))
            self.saves.committed(commit[1])
        if self.stop.requested and not self.fault_seen:
            self.fault_seen = True
            self.log.emit("fault", kind=(self.stop.reason or "stop").split()[0].lower())

    def _mtbf(self, now: float) -> float:
        """The workdir's mean time between faults (process 0: the others' is not used)."""
        prior = float(self.config.checkpoint.expected_fault_interval_seconds)
        return self.live.mtbf_seconds(now, prior) if self.live is not None else prior


def _start_summaries(run: Trainer, batch) -> None:
    """What TensorBoard shows of an attempt's start: its config and its first augmented
    inputs. Written once the first step is dispatched, while it runs (opening the event file
    and encoding images are host work the step need not wait for)."""
    config = run.config
    if not run.writer.active:
        return
    run.writer.text("config", "```\n" + config.to_json_best_effort(indent=2) + "\n```")
    if config.train.num_image_summaries:
        images = np.asarray(batch["image"].addressable_shards[0].data)
        run.writer.images(
            "train/augmented_inputs",
            run.step,
            metrics_lib.image_grid_input(images, config.train.num_image_summaries),
        )


def _log_startup(run: Trainer, step: int) -> None:
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
