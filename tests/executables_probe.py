"""Run by tests in several processes (via launch.local_cluster): each asks
`launch.executables` for the same small sharded program and prints whether it compiled it
and what it computes."""

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tests import probe_cluster

flags.DEFINE_string("cache", None, "JAX's compilation cache folder (executables/ goes in it).")
flags.DEFINE_integer("compiled_by", 0, "The process that is to compile the program.")
FLAGS = flags.FLAGS


def main(_):
    # pylint: disable=g-import-not-at-top  # after jax.distributed, as in the launcher
    from launch import distributed, executables

    jax.config.update("jax_compilation_cache_dir", FLAGS.cache)
    probe_cluster.join()
    executables.preload("probe")  # as the launcher does once the backend is up
    mesh = distributed.make_mesh()
    sharding = NamedSharding(mesh, P("batch"))
    fn = jax.jit(lambda x: (x * jnp.arange(4.0)).sum(), in_shardings=sharding)
    args = (jax.ShapeDtypeStruct((12, 4), jnp.float32, sharding=sharding),)
    lowered = []

    def lower():
        lowered.append(True)
        return fn.lower(*args)

    key = executables.environment_key(mesh)
    compiled = executables.load_or_compile("probe", lower, key, args, compiled_by=FLAGS.compiled_by)
    executables.record_used("probe")
    ((_, how),) = executables.programs()
    rows = np.arange(48, dtype=np.float32).reshape(12, 4)
    x = jax.make_array_from_callback((12, 4), sharding, lambda index: rows[index])
    result = float(jax.device_get(compiled(x)))
    print(
        f"process {jax.process_index()}: compiled={bool(lowered)} how={how} result={result}",
        flush=True,
    )


if __name__ == "__main__":
    app.run(main)
