"""The pre-save checks (launch.checkpointing): the digest is the per-leaf formula that saved
checkpoints hold, the finite flag sees every float leaf, and the program stays small."""

import re

import jax
import jax.numpy as jnp
import numpy as np

from launch import checkpointing


def _reference_digest(leaf) -> list[int]:
    """The digest of one leaf, in numpy, from the formula in checkpointing._checks."""
    x = np.asarray(leaf)
    if x.dtype == np.bool_:
        words = x.astype(np.uint64).ravel()
    else:
        unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
        words = x.view(unsigned).astype(np.uint64).ravel()
    index = np.arange(words.size, dtype=np.uint64)
    mixed = words ^ (words >> 15)
    first = int(np.sum(words * (2 * index + 1)) % 2**32)
    second = int(np.sum(mixed * (0x9E3779B1 + 2 * index)) % 2**32)
    return [first, second]


def _tree():
    rng = np.random.default_rng(0)
    return {
        "a": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
        "b": jnp.int32(7),
        "c": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),  # a's group
        "d": jnp.asarray(rng.normal(size=(5,)), jnp.bfloat16),
        "e": jnp.asarray([True, False, True]),
        "f": jnp.asarray(rng.normal(size=(2, 3)), jnp.float16),  # a's shape, not its dtype
        "g": jnp.int32(-3),  # b's group
    }


def test_the_digest_is_each_leafs_formula_in_leaf_order():
    tree = _tree()
    expected = [_reference_digest(leaf) for leaf in jax.tree.leaves(tree)]
    assert np.asarray(checkpointing.digest(tree)).tolist() == expected
    finite, hashes = checkpointing._pre_save_checks(tree)
    assert bool(finite) and np.asarray(hashes).tolist() == expected


def test_a_nan_or_inf_in_any_float_leaf_is_seen():
    for name, bad in (("c", jnp.nan), ("d", jnp.inf), ("f", -jnp.inf)):
        tree = _tree()
        tree[name] = tree[name].at[0].set(bad)
        assert not bool(checkpointing._pre_save_checks(tree)[0]), name


def test_the_checks_reduce_per_shape_not_per_leaf():
    # 60 leaves of 2 shapes: 3 reductions per group and one joining the finite flags. Leaf by
    # leaf it would be 180, and a program that size is most of what a restart spends loading
    # the checks.
    tree = [jnp.ones((4, 4)) for _ in range(30)] + [jnp.ones((8,)) for _ in range(30)]
    text = checkpointing._pre_save_checks.lower(tree).compile().as_text()
    reductions = len(re.findall(r"\breduce\(", text))
    assert 0 < reductions <= 3 * 2 + 1, reductions


def test_an_empty_tree_or_one_without_floats_is_checked():
    finite, hashes = checkpointing._pre_save_checks({})
    assert bool(finite) and np.asarray(hashes).shape == (0, 2)
    finite, hashes = checkpointing._pre_save_checks({"step": jnp.int32(5)})
    assert bool(finite) and np.asarray(hashes).tolist() == [_reference_digest(np.int32(5))]
