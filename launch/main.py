r"""Trains a ResNet on one host or many.

  python -m launch.main --config=configs/demo.py --workdir=/tmp/demo
  python -m launch.main --config=configs/resnet50_imagenet.py --workdir=gs://bucket/run \
      --config.train.global_batch_size=2048

Exit status: 0 finished, 75 preempted (a checkpoint was saved: run the same command again to
resume), 2 bad configuration or unusable checkpoints, 3 training diverged (non-finite
steps), 4 a checkpoint could not be saved, anything else a failure.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from launch import distributed

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
    "Checkpoints, TensorBoard events and converted demo "
    "data go here; a local path or gs://bucket/path.",
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

EXIT_BAD_CONFIG = 2
EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 4
_CHATTY_LIBRARIES = ("/orbax/", "/grain/", "/etils/")


def _quiet_libraries(record) -> bool:
    """Keeps Orbax's and Grain's per-save INFO lines out of the log unless --v=1 or more."""
    chatty = any(lib in record.pathname for lib in _CHATTY_LIBRARIES)
    return not chatty or record.levelno >= std_logging.WARNING or FLAGS.verbosity >= 1


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.get_absl_handler().addFilter(_quiet_libraries)
    config = FLAGS.config
    distributed.initialize(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        heartbeat_timeout_seconds=config.distributed.heartbeat_timeout_seconds,
        initialization_timeout_seconds=config.distributed.initialization_timeout_seconds,
    )
    # Imported after jax.distributed is up: nothing may touch a device before that.
    from launch import checkpointing, train  # pylint: disable=g-import-not-at-top

    try:
        with config.unlocked():
            status = train.train_and_evaluate(config, FLAGS.workdir)
    except (
        train.ConfigError,
        checkpointing.IncompatibleCheckpoint,
        checkpointing.NoUsableCheckpoint,
    ) as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    except checkpointing.CheckpointSaveError as e:
        logging.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_SAVE_FAILED)
    except FloatingPointError as e:
        logging.error("%s", e)
        print(f"error: training diverged: {e}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    sys.exit(status)


if __name__ == "__main__":
    app.run(main)
