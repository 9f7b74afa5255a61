"""Gradient accumulation (train.microbatches) and ghost BatchNorm (model.bn_group_size), through
the launcher's own program (launch.program.build_program): k micro-batches at global batch B
give the update of one step at B with BatchNorm groups of B/k examples, on any topology."""

from __future__ import annotations

import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo
from launch import distributed
from launch import program as program_lib
from resnet import steps as steps_lib
from tests import helpers

BATCH = 16


def _config(**overrides):
    config = demo.get_config()  # float32
    config.model.name = "resnet8"
    config.data.image_size = 16
    config.train.global_batch_size = BATCH
    config.train.compilation_cache_dir = ""
    for key, value in overrides.items():
        section, field = key.split(".")
        config[section][field] = value
    return config


def _batch(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "image": rng.integers(0, 256, (BATCH, 16, 16, 1), dtype=np.uint8),
        "label": rng.integers(0, 10, BATCH, dtype=np.int32),
    }


def one_step(mesh=None, **overrides) -> tuple[dict[str, np.ndarray], str]:
    """Every array of the state after one step from the initial state and the metrics, and
    the compiled step's HLO."""
    program = program_lib.build_program(
        _config(**overrides), mesh or distributed.make_mesh(), channels=1
    )
    args = (program.init(), jax.device_put(_batch(), program.batch_sharding))
    compiled = program.train_step.lower(*args, program.stop_votes(False)).compile()
    state, metrics = compiled(*args, program.stop_votes(False))
    arrays = helpers.flat_arrays(state)
    arrays.update({f"metrics/{k}": np.asarray(v) for k, v in metrics.items()})
    return arrays, compiled.as_text()


def max_abs_error(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]), initial=0.0)) for k in a)


def test_microbatches_are_strided_rows_of_the_batch():
    rows = np.arange(12)
    np.testing.assert_array_equal(
        steps_lib.split_microbatches(rows, 3), [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8, 11]]
    )


def test_k_microbatches_give_the_update_of_one_step_with_ghost_groups_of_b_over_k():
    one_pass, _ = one_step(**{"model.bn_group_size": 4})  # batch 16 in 4 ghost groups
    four_micro, _ = one_step(**{"train.microbatches": 4})  # each micro-batch is one group
    global_bn, _ = one_step()  # one group of 16: another update
    error = max_abs_error(four_micro, one_pass)
    print(f"4 micro-batches against one pass with ghost groups of 4: max abs error {error:.3g}")
    assert error < 1e-5
    assert max_abs_error(global_bn, one_pass) > 1e-3  # the groups do change the update
    # Loss and accuracy are over the whole global batch, not the last micro-batch.
    for key in ("metrics/loss", "metrics/top1"):
        np.testing.assert_allclose(four_micro[key], one_pass[key], rtol=1e-6)


# Run in a child with 4 simulated CPU devices (this process has one).
_TOPOLOGY_CHECK = """
import re
import jax, numpy as np
from jax.sharding import Mesh
from tests.resnet import test_microbatches as t
assert jax.device_count() == 4
four, hlo = t.one_step(**{"train.microbatches": 2, "model.bn_group_size": 4})
one, _ = t.one_step(Mesh(np.array(jax.devices()[:1]), ("batch",)), **{"model.bn_group_size": 4})
print("error", t.max_abs_error(four, one))
print("moves", sorted(set(re.findall(r" (all-gather|all-to-all|collective-permute)", hlo))))
"""


@pytest.mark.slow
def test_microbatches_and_ghost_groups_do_not_depend_on_the_devices():
    # 2 micro-batches of 8 on 4 devices, in ghost groups of 4: each micro-batch takes 2 of
    # each device's 4 rows and each group one, so no data moves between devices, and the
    # update equals one pass with groups of 4 on one device within rounding.
    proc = subprocess.run(
        [sys.executable, "-c", _TOPOLOGY_CHECK],
        env=helpers.child_env(4),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines())
    print(f"2 micro-batches on 4 devices against one pass on 1: max abs error {lines['error']}")
    assert float(lines["error"]) < 1e-5, proc.stdout
    assert lines["moves"] == "[]", proc.stdout  # only all-reduces: the sums of statistics


def test_flax_batchnorm_refuses_ghost_groups():
    from flax import nnx

    import resnet

    with pytest.raises(ValueError, match="bn_group_size needs batch_norm='fused'"):
        nnx.eval_shape(
            lambda: resnet.create_model(
                "resnet20", num_classes=10, rngs=nnx.Rngs(0), batch_norm="flax", bn_group_size=4
            )
        )
