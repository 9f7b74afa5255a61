"""What the probes that tests run through `launch.local_cluster` share: the flags it gives
every process, and joining the cluster with them (before anything touches a device)."""

from absl import flags

flags.DEFINE_string("coordinator_address", None, "Given by launch.local_cluster.")
flags.DEFINE_integer("num_processes", None, "Given by launch.local_cluster.")
flags.DEFINE_integer("process_id", None, "Given by launch.local_cluster.")


def join(heartbeat_timeout_seconds: int = 30) -> None:
    """`launch.distributed.initialize` with this process's flags."""
    from launch import distributed  # pylint: disable=g-import-not-at-top

    distributed.initialize(
        flags.FLAGS.coordinator_address,
        flags.FLAGS.num_processes,
        flags.FLAGS.process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout_seconds=60,
    )
