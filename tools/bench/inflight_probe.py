r"""Reproduces the two-process evaluation stall: deep queues of cross-process all-reduces on CPU.

    python -m tools.bench.inflight_probe --programs=300 --in_flight=0,2 --tries=8

Starts 2 processes x 2 CPU devices joined by `jax.distributed` (gloo collectives), and in each
dispatches `--programs` small jitted programs, each ending in an all-reduce over all 4 devices
and chained through its output (each depends on the previous one). `--in_flight=0` dispatches
them all before waiting (as the old eval loop did); `N > 0` waits for the program dispatched N
earlier before dispatching the next (as launch/train.py does, with N = 2). A try that has not
finished after `--timeout` seconds is counted as hung and killed. The last line is JSON.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys

from absl import app, flags

flags.DEFINE_integer("programs", 300, "Programs dispatched per try.")
flags.DEFINE_list("in_flight", ["0", "2"], "0: unbounded; N: wait for the program N back.")
flags.DEFINE_integer("tries", 8, "Tries per setting.")
flags.DEFINE_float("timeout", 60, "Seconds before a try counts as hung.")
FLAGS = flags.FLAGS


def _worker(address: str, process_id: int, programs: int, in_flight: int) -> None:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from jax.sharding import NamedSharding, PartitionSpec  # pylint: disable=g-import-not-at-top

    jax.distributed.initialize(address, 2, process_id)
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    split, replicated = (
        NamedSharding(mesh, PartitionSpec("batch")),
        NamedSharding(mesh, PartitionSpec()),
    )
    x = jax.make_array_from_process_local_data(split, np.ones((2, 256), np.float32), (4, 256))
    # A sum over the split axis: every program ends in a cross-device, cross-process all-reduce.
    step = jax.jit(
        lambda total, x: total + jnp.sum(jnp.tanh(x) @ jnp.ones((256, 256)), axis=0),
        out_shardings=replicated,
    )
    total = jax.jit(lambda: jnp.zeros(256), out_shardings=replicated)()
    queue = collections.deque()
    for _ in range(programs):
        total = step(total, x)
        queue.append(total)
        if in_flight and len(queue) > in_flight:
            queue.popleft().block_until_ready()
    total.block_until_ready()
    print("done", flush=True)


def _try(programs: int, in_flight: int, timeout: float) -> bool:
    import portpicker  # pylint: disable=g-import-not-at-top

    address = f"localhost:{portpicker.pick_unused_port()}"
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu"
    )
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tools.bench.inflight_probe",
                "--worker",
                address,
                str(i),
                str(programs),
                str(in_flight),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    finished = True
    for proc in procs:
        try:
            finished &= "done" in proc.communicate(timeout=timeout)[0]
        except subprocess.TimeoutExpired:
            finished = False
    for proc in procs:
        proc.kill()
        proc.wait()
    return finished


def main(argv):
    del argv
    results = {}
    for setting in FLAGS.in_flight:
        in_flight = int(setting)
        hung = sum(not _try(FLAGS.programs, in_flight, FLAGS.timeout) for _ in range(FLAGS.tries))
        name = "unbounded" if in_flight == 0 else f"wait for the program {in_flight} back"
        print(f"{FLAGS.programs} chained programs, {name}: {hung} of {FLAGS.tries} tries hung")
        results[setting] = {"tries": FLAGS.tries, "hung": hung}
    print(json.dumps({"programs": FLAGS.programs, "results": results}))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
    else:
        app.run(main)
