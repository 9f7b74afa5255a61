r"""Evaluates a run's checkpoint without training, on one host or many.

  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo [--step=N] \
      [--config.data.eval_dir=OTHER_EVAL_SET] [--output=FILE.json]

The same launcher flags and exit statuses as `launch.main`: run it the way the training ran
(`launch.local_cluster`, Slurm, a pod), with the training config. It restores the newest
trustworthy checkpoint (or `--step`), read-only (it can run beside the training: nothing in the
workdir is created, cleaned up or moved aside), with the same integrity checks as a resume,
and runs the exact evaluation: every example once, on any number of hosts. It prints the
figures and writes them as JSON to `--output` (default WORKDIR/eval-step-<N>.json).
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging
from etils import epath

from launch import main as launcher  # the launcher's flags: --config, --workdir, cluster flags
from launch.status import ExitStatus

flags.DEFINE_integer("step", None, "Evaluate this step (default: the newest trustworthy one).")
flags.DEFINE_string("output", None, "JSON file for the figures (default WORKDIR/eval-step-N.json).")
FLAGS = flags.FLAGS


def evaluate_checkpoint(config, workdir: str, step: int | None, stop) -> dict:
    """{"step": N, "eval/loss": ..., ...} for the restored step of `workdir`."""
    # pylint: disable=g-import-not-at-top
    import pipeline
    from launch import checkpointing, distributed, liveness, train
    from launch import program as program_lib
    from launch.plan import ConfigError, eval_batch_size

    train_dir, eval_dir = train.data_dirs(config, workdir)
    if not eval_dir:
        raise ConfigError("config.data.eval_dir is empty: there is nothing to evaluate on")
    eval_info = pipeline.load_info(eval_dir)
    batch = eval_batch_size(config)
    try:
        distributed.check_batch_size(batch, "eval.global_batch_size")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    program = program_lib.build_program(
        config,
        distributed.make_mesh(),
        channels=eval_info.channels,
    )
    ckpt = checkpointing.Checkpointer(
        str(epath.Path(workdir) / "checkpoints"),
        max_to_keep=config.checkpoint.max_to_keep,
        async_save=False,
        barrier_timeout_seconds=config.checkpoint.barrier_timeout_seconds,
        read_only=True,
    )
    try:
        # What the parameters must match; the data and optimizer settings may differ.
        expected = {
            "model.name": config.model.name,
            "model.num_classes": config.model.num_classes,
            "input_channels": eval_info.channels,
            "parameter_shapes": program.shapes_digest(),
        }
        restored = ckpt.restore_latest(program.abstract_state, expected, step=step)
    finally:
        ckpt.close()
    if restored is None:
        raise checkpointing.NoUsableCheckpoint(f"{workdir} has no checkpoints to evaluate")
    state, step, _ = restored
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
    return {"step": step, "eval_dir": eval_dir, **results}


def main(argv):
    if len(argv) > 1:
        launcher.fail(ExitStatus.BAD_INPUT, f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    stop, _ = launcher.start_process(config)

    def run() -> ExitStatus:
        import jax  # pylint: disable=g-import-not-at-top

        with config.unlocked():
            figures = evaluate_checkpoint(config, FLAGS.workdir, FLAGS.step, stop)
        logging.info("eval of step %d: %s", figures["step"], figures)
        if jax.process_index() == 0:
            output = FLAGS.output or str(
                epath.Path(FLAGS.workdir) / f"eval-step-{figures['step']}.json"
            )
            epath.Path(output).write_text(json.dumps(figures, indent=2))
            print(json.dumps(figures), file=sys.stdout, flush=True)
        return ExitStatus.FINISHED

    launcher.exit_with_status(run)


if __name__ == "__main__":
    app.run(main, flags_parser=launcher.parse_flags)
