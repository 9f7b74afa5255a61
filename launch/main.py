r"""Trains a ResNet on one host or many.

  python -m launch.main --config=configs/demo.py --workdir=/tmp/demo
  python -m launch.main --config=configs/resnet50_imagenet.py --workdir=gs://bucket/run \
      --config.train.global_batch_size=2048

Exit statuses (launch/status.py): 0 finished, 75 preempted (a checkpoint was saved: run the
same command again to resume), 2 bad configuration, data, workdir or checkpoints, 3 training
diverged, 4 a checkpoint could not be saved, 5 stalled (stacks are in the log; rerun
resumes), anything else a failure. This is the one place that maps outcomes to statuses.
"""

import logging as std_logging
import os
import posixpath
import sys
import time
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from launch import distributed, events, liveness
from launch.status import ExitStatus

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config",
    None,
    "Python config file (configs/*.py); override fields with --config.section.field=value.",
    lock_config=True,
)
flags.DEFINE_string(
    "workdir",
    None,
    "Checkpoints, TensorBoard events and the compilation cache go here; a local path or "
    "gs://bucket/path.",
)
flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0, for clusters "
    "that JAX does not auto-detect (GPU clusters, local simulation).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])

_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/etils/")


def _quiet_libraries(record) -> bool:
    """Keeps Orbax's and Grain's per-save INFO lines out of the log unless --v=1 or more, and
    the tracebacks they attach to errors of their own threads: the launcher reports the error
    itself, in one line (a library's traceback also runs through the launcher's frames)."""
    chatty = any(lib in record.pathname for lib in _CHATTY_LIBRARIES)
    if not chatty or FLAGS.verbosity >= 1:
        return True
    record.exc_info = record.exc_text = None
    return record.levelno >= std_logging.WARNING


def fail(status: ExitStatus, message: str) -> None:
    logging.error("%s", message)
    logging.flush()
    sys.stderr.flush()
    # One write, starting a fresh line: a library thread that is still printing (Orbax's
    # after a failed save) can leave half a line behind, and the error must stay one line.
    os.write(sys.stderr.fileno(), f"\nerror: {message}\n".encode())
    events.current().emit("attempt_ended", status=int(status), outcome=status.name.lower())
    sys.exit(int(status))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with a bad flag or config override as one line and exit status 2."""
    try:
        remaining = FLAGS(argv)
        if FLAGS["config"].present:
            FLAGS.config.keys()  # config_flags loads lazily: a bad config file fails here
        return remaining
    except Exception as e:  # pylint: disable=broad-except  # config_flags raises many types
        message = str(e)
        if isinstance(e, (KeyError, AttributeError)):  # an override naming no config field
            first, *hint = str(e.args[0] if e.args else e).splitlines()
            key = first.strip("'\"")
            culprits = [a for a in argv if a.startswith("--config.") and key in a.split("=")[0]]
            message = " ".join(
                [f"{', '.join(culprits) or '--config'}: the config has no field {key!r}.", *hint]
            )
        print(f"error: {message}", file=sys.stderr)
        sys.exit(int(ExitStatus.BAD_INPUT))


def _use_compilation_cache(jax, directory: str, workdir: str) -> None:
    """Points JAX's persistent compilation cache at `directory` (relative: under the workdir).

    An explicit JAX_COMPILATION_CACHE_DIR in the environment wins.
    """
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not directory:
        return
    if not (directory.startswith("/") or "://" in directory):
        directory = posixpath.join(workdir, directory)
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, not only those that took over a second: on a restart the small ones
    # (init, digest, eval) add up too.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def start_process(config) -> tuple[liveness.StopRequest, dict[str, float]]:
    """Signals, compilation cache and jax.distributed: what every launcher process does first.

    Returns the stop request (SIGTERM/SIGINT handling from here on) and start-up timings.
    """
    logging.get_absl_handler().addFilter(_quiet_libraries)
    # First: from here on a SIGTERM is a clean stop, whatever the process is doing.
    stop = liveness.StopRequest(config.distributed.preemption_grace_seconds)

    import jax  # pylint: disable=g-import-not-at-top

    # Our own SIGTERM handling agrees on a stop step through the train step (launch/train.py);
    # JAX's preemption service would replace the handler above with its own.
    jax.config.update("jax_enable_preemption_service", False)
    _use_compilation_cache(jax, config.train.compilation_cache_dir, FLAGS.workdir)
    start = time.perf_counter()
    try:
        distributed.initialize(
            FLAGS.coordinator_address,
            FLAGS.num_processes,
            FLAGS.process_id,
            heartbeat_timeout_seconds=config.distributed.heartbeat_timeout_seconds,
            initialization_timeout_seconds=config.distributed.initialization_timeout_seconds,
        )
    except (ValueError, distributed.ClusterError) as e:
        fail(ExitStatus.BAD_INPUT, str(e))
    _routine_logs_from_process_0_only(jax.process_index())
    return stop, {"startup/distributed_s": time.perf_counter() - start}


def _routine_logs_from_process_0_only(process: int) -> None:
    """Every host would log the same progress: past process 0 only warnings and errors are
    logged, each prefixed with its process (all of it with --v=1 or more)."""
    if process == 0 or FLAGS.verbosity >= 1:
        return

    def warnings_with_process(record: std_logging.LogRecord) -> bool:
        if record.levelno < std_logging.WARNING:
            return False
        record.msg = f"[process {process}] {record.msg}"
        return True

    logging.get_absl_handler().addFilter(warnings_with_process)


def exit_with_status(run: Callable[[], ExitStatus]) -> None:
    """Runs `run` and exits with its status, or with the status its exception stands for.

    The one place where outcomes and errors become exit statuses (launch/status.py).
    """
    # Imported after jax.distributed is up: nothing may touch a device before that.
    # pylint: disable=g-import-not-at-top
    import pipeline
    from launch import checkpointing, train
    from launch.plan import ConfigError
    from launch.workdir import WorkdirError

    try:
        status = run()
    except liveness.StopBeforeStart as e:
        logging.warning("Stopped before training (%s): nothing new to save.", e)
        status = ExitStatus.PREEMPTED
    except (
        ConfigError,
        pipeline.DatasetError,
        WorkdirError,
        checkpointing.IncompatibleCheckpoint,
        checkpointing.NoUsableCheckpoint,
    ) as e:
        fail(ExitStatus.BAD_INPUT, str(e))
    except distributed.HostsNotReady as e:
        fail(ExitStatus.STALLED, f"{e}; a rerun resumes from the last checkpoint")
    except train.Diverged as e:
        fail(ExitStatus.DIVERGED, f"training diverged: {e}")
    except checkpointing.CheckpointSaveError as e:
        fail(ExitStatus.SAVE_FAILED, str(e))
    events.current().emit("attempt_ended", status=int(status), outcome=status.name.lower())
    sys.exit(int(status))


def main(argv):
    if len(argv) > 1:
        fail(ExitStatus.BAD_INPUT, f"unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    from launch import plan  # pylint: disable=g-import-not-at-top

    try:
        plan.check_config(config)  # before anything is set up, joined or written
    except plan.ConfigError as e:
        fail(ExitStatus.BAD_INPUT, str(e))
    stop, timings = start_process(config)
    # The backend is up: the compiled steps of the last start load while the rest is imported.
    from launch import executables  # pylint: disable=g-import-not-at-top

    executables.preload(FLAGS.workdir)
    from launch import train  # pylint: disable=g-import-not-at-top

    def run() -> ExitStatus:
        stop.check()
        with config.unlocked():
            result = train.train_and_evaluate(config, FLAGS.workdir, stop, timings)
        return ExitStatus.FINISHED if result.outcome == "finished" else ExitStatus.PREEMPTED

    exit_with_status(run)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
