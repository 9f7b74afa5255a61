r"""Training-loop stall per checkpoint save: asynchronous against synchronous, side by side.

    python -m tools.bench.checkpoint [--steps=60 --every=10 --topology=2x2] \
        [-- EXTRA_LAUNCHER_FLAGS...]

Runs the real launcher on the demo config twice in a row, once with `checkpoint.async_save`
on and once off, saving every `--every` steps, and reads the stall of each save from the
launcher's events (`save_started` `blocked_s`, process 0; launch.events). `--topology` PxD
runs P launcher processes of D CPU devices each (`launch.local_cluster`), so that the state
is replicated across devices and hosts as in a real job. With async saves the stall is the
pre-save checks and Orbax's synchronous part (its barrier, the step directory, the
device-to-host copy); with sync saves it is the whole write. The first save of each run is
reported separately (it also pays one-off set-up).
"""

import os
import statistics
import subprocess
import sys
import tempfile

from absl import app, flags

from launch import events

flags.DEFINE_integer("steps", 60, "Training steps per run.")
flags.DEFINE_integer("every", 10, "Save every this many steps.")
flags.DEFINE_string("config", "configs/demo.py", "Launcher config.")
flags.DEFINE_string("topology", "2x2", "PxD: launcher processes x CPU devices per process.")
FLAGS = flags.FLAGS


def run_once(async_save: bool, workdir: str, extra: list[str]) -> list[float]:
    processes, devices = (int(n) for n in FLAGS.topology.split("x"))
    cmd = [
        sys.executable, "-m", "launch.local_cluster", f"--num_processes={processes}",
        f"--devices_per_process={devices}", "--",
        f"--config={FLAGS.config}", f"--workdir={workdir}",
        f"--config.train.num_steps={FLAGS.steps}",
        f"--config.checkpoint.every_steps={FLAGS.every}",
        f"--config.checkpoint.async_save={async_save}",
        "--config.checkpoint.max_to_keep=100", *extra,
    ]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if run.returncode != 0:
        sys.exit(f"launcher failed ({run.returncode}):\n{run.stderr[-3000:]}")
    saves = [r for r in events.read(workdir) if r["event"] == "save_started"]
    return [float(r["blocked_s"]) for r in saves if r["process"] == 0]


def main(argv):
    extra = argv[1:]
    with tempfile.TemporaryDirectory() as root:
        # The demo data is converted once, into its cache: the second run reads it there.
        stalls = {"async": run_once(True, os.path.join(root, "async"), extra)}
        stalls["sync"] = run_once(False, os.path.join(root, "sync"), extra)
    print(
        f"{FLAGS.config}, {FLAGS.topology}, {FLAGS.steps} steps, a save every {FLAGS.every} steps"
    )
    for mode, values in stalls.items():
        rest = values[1:] or values
        print(
            f"  {mode:5s}: first save {values[0] * 1000:7.1f} ms, then median "
            f"{statistics.median(rest) * 1000:7.1f} ms over {len(rest)} saves"
        )
    ratio = statistics.median(stalls["sync"][1:]) / statistics.median(stalls["async"][1:])
    print(f"  a synchronous save stalls the loop {ratio:.1f}x longer than an async one")


if __name__ == "__main__":
    app.run(main)
