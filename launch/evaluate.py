r"""Evaluates a run's checkpoint without training, on one host or many.

  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo [--step=N] \
      [--config.data.eval_dir=OTHER_EVAL_SET] [--output=FILE.json]

The same launcher flags and exit statuses as `launch.main`: run it the way the training ran
(`launch.local_cluster`, Slurm, a pod), with the training config. It needs no training data:
it evaluates on config.data.eval_dir, or on the embedded demo data's eval split when the
config names no data. It restores the newest trustworthy checkpoint (or `--step`) with the
same integrity checks as a resume, and runs the exact evaluation: every example once, on any
number of hosts. It prints the figures and writes them as JSON to `--output` (default
WORKDIR/eval-step-<N>.json). `--config.eval.use_ema=True` evaluates the moving average of a
run trained with train.ema_decay > 0 instead of its weights.

That file is all it writes into a workdir. It can run beside the training: no checkpoint is
created, cleaned up or moved aside, and no lock, TensorBoard event or compilation cache entry
is written (a compilation cache configured inside the workdir is not used). A workdir that
holds no run is refused before anything is set up, and then nothing is written at all.
"""

from __future__ import annotations

import json
import os
import posixpath
import sys

from absl import app, flags, logging
from etils import epath

from launch import main as launcher  # the launcher's flags: --config, --workdir, cluster flags
from launch.status import ExitStatus

flags.DEFINE_integer("step", None, "Evaluate this step (default: the newest trustworthy one).")
flags.DEFINE_string("output", None, "JSON file for the figures (default WORKDIR/eval-step-N.json).")
FLAGS = flags.FLAGS

# The run_signature entries that the parameters must match; the data and optimizer settings
# of the training do not matter to an evaluation.
MODEL_SIGNATURE = ("model.name", "model.num_classes", "input_channels", "parameter_shapes")


def missing_run(workdir: str) -> str | None:
    """What WORKDIR lacks to hold a run with a checkpoint, in one line; None if nothing.

    Steps that are damaged, uncommitted or moved aside count as checkpoints here: the restore
    names what is wrong with them.
    """
    if not workdir:
        return "--workdir is empty: name the run's workdir"
    root = epath.Path(workdir)
    if not root.exists():
        return f"--workdir={workdir} does not exist: no run was started there"
    if not root.is_dir():
        return f"--workdir={workdir} is a file, not a run's workdir"
    checkpoints = root / "checkpoints"
    if not checkpoints.is_dir():
        return f"{workdir} has no checkpoints/ folder: no run was started there"
    if not any(p.name.split(".")[0].isdigit() for p in checkpoints.iterdir()):
        return (
            f"{checkpoints} holds no checkpoint: the run has not saved one yet (it saves every "
            "checkpoint.every_steps, at a preemption and at its end)"
        )
    return None


def output_problem(path: str) -> str | None:
    """Why the figures could not be written to `path`, in one line; None if they can."""
    target = epath.Path(path)
    if target.is_dir():
        return f"--output={path} is a folder: give a file name"
    if not target.parent.is_dir():
        return f"--output={path}: the folder {target.parent} does not exist"
    if target.exists() and not _is_figures_file(target):
        return (
            f"--output={path} exists and is not a figures file of launch.evaluate: not "
            "overwriting it"
        )
    if "://" not in path and not os.access(target.parent, os.W_OK):
        return f"cannot write {path}: {target.parent} is not writable; pass --output=FILE"
    return None


def _is_figures_file(path: epath.Path) -> bool:
    """Whether `path` holds figures this command wrote (which a new evaluation may replace)."""
    try:
        figures = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(figures, dict) and {"step", "eval/loss", "eval_dir"} <= figures.keys()


def _compilation_cache_outside(config, workdir: str) -> None:
    """Turns off a compilation cache that lies in the workdir, which evaluation only reads."""
    directory = config.train.compilation_cache_dir
    if not directory:
        return
    if not (directory.startswith("/") or "://" in directory):
        directory = posixpath.join(workdir, directory)
    inside = posixpath.normpath(directory) + "/"
    if inside.startswith(posixpath.normpath(workdir) + "/"):
        logging.info(
            "Not using the compilation cache %s: evaluation writes nothing into the workdir.",
            directory,
        )
        config.train.compilation_cache_dir = ""


def _load_eval_info(eval_dir: str):
    # pylint: disable=g-import-not-at-top
    import pipeline
    from launch.plan import ConfigError

    try:
        return pipeline.load_info(eval_dir)
    except pipeline.DatasetError as e:
        raise ConfigError(f"config.data.eval_dir: {e}") from None


def check_eval_data(meta: dict, eval_info, config) -> None:
    """The eval set's labels mean what the model's outputs mean, and the input settings fit
    its images; or a ConfigError.

    Labels are positions in the sorted class names: an eval set whose names differ from the
    training data's would be scored against the wrong classes.
    """
    from launch.plan import ConfigError  # pylint: disable=g-import-not-at-top

    trained = meta.get("class_names")
    where = f"config.data.eval_dir={eval_info.data_dir}"
    if trained is None:  # a checkpoint that does not record them: the count at least
        if eval_info.num_classes != config.model.num_classes:
            raise ConfigError(
                f"{where} has {eval_info.num_classes} classes, the model {config.model.num_classes}"
            )
    elif tuple(trained) != tuple(eval_info.class_names):
        if len(trained) != eval_info.num_classes:
            raise ConfigError(
                f"{where} has {eval_info.num_classes} classes, the checkpoint's training data "
                f"had {len(trained)}"
            )
        diff = next(i for i, (a, b) in enumerate(zip(trained, eval_info.class_names)) if a != b)
        raise ConfigError(
            f"{where} names its classes differently from the checkpoint's training data: "
            f"class {diff} is {eval_info.class_names[diff]!r} there and {trained[diff]!r} in "
            "the checkpoint"
        )
    for field in ("mean", "std"):
        if len(config.data[field]) != eval_info.channels:
            raise ConfigError(
                f"config.data.{field} has {len(config.data[field])} values for the "
                f"{eval_info.channels}-channel images of {eval_info.data_dir}"
            )
    saved = meta.get("preprocessing") or {}
    for key, value in saved.items():
        ours = config.data.get(key)
        ours = list(ours) if isinstance(ours, tuple) else ours
        if ours is not None and ours != value:
            logging.warning(
                "config.data.%s=%r, but the run trained with %r: the figures are for %r.",
                key,
                ours,
                value,
                ours,
            )


def adopt_the_runs_average(config, workdir: str, step: int | None) -> None:
    """Sets config.train.ema_decay to the run's, from the meta of the step to evaluate: the
    state to restore has an average or not as the run had, whatever this config says.
    eval.use_ema on a run that kept no average is a ConfigError."""
    # pylint: disable=g-import-not-at-top
    from launch import checkpointing
    from launch.plan import ConfigError

    meta = checkpointing.step_meta(workdir, step) or {}
    decay = meta.get("train.ema_decay", config.train.ema_decay)
    if config.eval.use_ema and not decay:
        raise ConfigError(
            f"config.eval.use_ema=True: the run in {workdir} kept no moving average of its "
            "weights (it trained with train.ema_decay=0); evaluate without eval.use_ema"
        )
    config.train.ema_decay = decay


def evaluate_checkpoint(config, workdir: str, step: int | None, stop) -> dict:
    """{"step": N, "eval/loss": ..., ...} for the restored step of `workdir`."""
    # pylint: disable=g-import-not-at-top
    import pipeline
    from launch import checkpointing, distributed, liveness, setup, train
    from launch.plan import ConfigError, eval_batch_size

    adopt_the_runs_average(config, workdir, step)
    _, eval_dir = setup.data_dirs(config, need_train=False)
    eval_info = _load_eval_info(eval_dir)
    batch = eval_batch_size(config)
    try:
        distributed.check_batch_size(batch, "eval.global_batch_size")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    program, ckpt, signature = setup.program_and_checkpoints(
        config,
        workdir,
        channels=eval_info.channels,
        num_examples=0,  # the training's example count, which MODEL_SIGNATURE leaves out
        read_only=True,
    )
    try:
        restored = ckpt.restore_latest(
            program.abstract_state, {k: signature[k] for k in MODEL_SIGNATURE}, step=step
        )
    finally:
        ckpt.close()
    if restored is None:
        raise checkpointing.NoUsableCheckpoint(
            f"{workdir}/checkpoints holds no committed checkpoint to evaluate"
        )
    state, step, meta = restored
    check_eval_data(meta, eval_info, config)
    eval_step = program.compile_eval_step(batch, config.data.image_size)
    # As in training: the watchdog's clock starts once every host has compiled.
    distributed.wait_for_all_hosts(
        "ready to evaluate", config.distributed.initialization_timeout_seconds
    )
    stop.training_started()
    watchdog = liveness.Watchdog(config.train.stall_timeout_seconds)
    watchdog.start()
    try:
        results = train.evaluate(
            eval_step,
            program,
            state,
            pipeline.eval_batches(
                eval_info, config.data, program.batch_sharding, global_batch_size=batch
            ),
            stop,
            watchdog,
        )
    finally:
        watchdog.close()
    if results is None:
        raise liveness.StopBeforeStart("stopped during the evaluation")
    return {"step": step, "eval_dir": eval_dir, "use_ema": bool(config.eval.use_ema), **results}


def _check_output(path: str | None, workdir: str) -> None:
    """Process 0 checks where it will write the figures, before the evaluation; every host
    learns the answer."""
    # pylint: disable=g-import-not-at-top
    import jax

    from launch import distributed
    from launch.plan import ConfigError

    problem = None
    if jax.process_index() == 0:
        # Without --output the step, and so the file name, is known only after the restore.
        problem = output_problem(path or str(epath.Path(workdir) / "eval-step-N.json"))
    if distributed.any_host(problem is not None):
        raise ConfigError(problem or "process 0 cannot write --output (see its log)")


def main(argv):
    if len(argv) > 1:
        launcher.fail(ExitStatus.BAD_INPUT, f"unexpected arguments: {argv[1:]}")
    # Before anything is set up: a mistyped workdir must end here, with nothing written.
    problem = missing_run(FLAGS.workdir)
    if problem:
        launcher.fail(ExitStatus.BAD_INPUT, problem)
    config = FLAGS.config
    _compilation_cache_outside(config, FLAGS.workdir)
    stop, _ = launcher.start_process(config)

    def run() -> ExitStatus:
        import jax  # pylint: disable=g-import-not-at-top

        _check_output(FLAGS.output, FLAGS.workdir)
        with config.unlocked():
            figures = evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step, stop)
        logging.info("eval of step %d: %s", figures["step"], figures)
        if jax.process_index() == 0:
            print(json.dumps(figures), file=sys.stdout, flush=True)
            output = FLAGS.output or str(
                epath.Path(FLAGS.workdir) / f"eval-step-{figures['step']}.json"
            )
            problem = output_problem(output)  # the default's name is known only now
            if problem:
                launcher.fail(ExitStatus.BAD_INPUT, f"{problem}; the figures are printed above")
            try:
                epath.Path(output).write_text(json.dumps(figures, indent=2))
            except OSError as e:
                launcher.fail(
                    ExitStatus.FAILED, f"cannot write {output} ({e}); the figures are printed above"
                )
        return ExitStatus.FINISHED

    launcher.exit_with_status(run)


if __name__ == "__main__":
    app.run(main, flags_parser=launcher.parse_flags)
