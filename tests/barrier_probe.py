"""Run by tests in several processes (via launch.local_cluster): the last process reaches
`distributed.wait_for_all_hosts` late; each prints what the barrier did. With --says_true,
the processes agree through `distributed.any_host` instead, three times in a row."""

import sys
import time

from absl import app, flags

from tests import probe_cluster

flags.DEFINE_float("late_seconds", 0.0, "How long the last process sleeps before the barrier.")
flags.DEFINE_float("timeout_seconds", 30.0, "The barrier's deadline.")
flags.DEFINE_list(
    "says_true", None, "Per agreement, the process that says True (-1: none); any_host mode."
)
FLAGS = flags.FLAGS


def main(_):
    from launch import distributed  # pylint: disable=g-import-not-at-top

    probe_cluster.join()
    if FLAGS.process_id == FLAGS.num_processes - 1:
        time.sleep(FLAGS.late_seconds)
    try:
        if FLAGS.says_true is not None:
            said = [int(p) == FLAGS.process_id for p in FLAGS.says_true]
            agreed = [distributed.any_host(s, FLAGS.timeout_seconds) for s in said]
            print(f"process {FLAGS.process_id}: agreed {agreed}", flush=True)
            return
        waited = distributed.wait_for_all_hosts("probe", FLAGS.timeout_seconds)
    except distributed.HostsNotReady as e:
        print(f"process {FLAGS.process_id}: {e}", flush=True)
        sys.exit(5)
    print(f"process {FLAGS.process_id}: all hosts ready after {waited:.1f}s", flush=True)


if __name__ == "__main__":
    app.run(main)
