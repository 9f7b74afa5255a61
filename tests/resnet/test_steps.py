"""resnet.steps.all_finite: what it decides, and what it costs in the executables that use it."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

from resnet import steps as steps_lib

LEAVES = 40


def _tree(bad_leaf: int | None = None, bad_value: float = np.nan):
    leaves = [np.full((3, 2), 0.5, np.float32) for _ in range(LEAVES)]
    if bad_leaf is not None:
        leaves[bad_leaf][1, 1] = bad_value
    return {"floats": leaves, "counter": np.int32(7)}


def test_all_finite_is_false_for_any_nan_or_infinity_in_any_float_leaf():
    assert bool(steps_lib.all_finite(_tree()))
    for leaf, value in ((0, np.nan), (LEAVES // 2, np.inf), (LEAVES - 1, -np.inf)):
        assert not bool(steps_lib.all_finite(_tree(leaf, value)))


def test_all_finite_skips_integer_leaves():
    assert bool(steps_lib.all_finite({"step": jnp.int32(2**31 - 1), "x": jnp.ones(3)}))
    assert bool(steps_lib.all_finite({"step": jnp.int32(3)}))  # no float leaf at all


def test_every_leaf_kept_on_the_flag_reads_it_once():
    # The train step keeps every leaf's old value where the flag is false. XLA copies a cheap
    # flag into each fusion that reads it; the flag must stay one value, or the executable
    # grows as leaves x leaves (most of a ResNet-20 train step's instructions).
    def keep_all(tree):
        finite = steps_lib.all_finite(tree)
        return [jnp.where(finite, x * 2, x) for x in tree["floats"]]

    text = jax.jit(keep_all).lower(_tree()).compile().as_text()
    ands = len(re.findall(r"= \S+ and\(", text))
    assert ands < 3 * LEAVES, f"{ands} and-operations for {LEAVES} leaves"
    out = jax.jit(keep_all)(_tree(3))
    np.testing.assert_array_equal(out[0], _tree()["floats"][0])  # kept: a NaN elsewhere
