"""Joining with explicit flags (launch.distributed.initialize), in a fresh process each."""

import subprocess
import sys
import textwrap

import portpicker

from tests import helpers

_JOIN = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from launch import distributed
    distributed.initialize(
        sys.argv[1], 1, 0, heartbeat_timeout_seconds=10, initialization_timeout_seconds=30
    )
    total = jax.pmap(lambda x: jax.lax.psum(x, "d"), axis_name="d")(np.arange(4.0))
    print(jax.config.jax_cpu_collectives_implementation, jax.process_count(), total.tolist())
    """
)


def test_a_single_process_reduces_in_memory_not_over_gloo():
    address = f"localhost:{portpicker.pick_unused_port()}"
    out = subprocess.run(
        [sys.executable, "-c", _JOIN, address],
        cwd=helpers.REPO,
        env=helpers.child_env(4),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[-2] == "None 1 [6.0, 6.0, 6.0, 6.0]"
