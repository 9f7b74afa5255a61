"""The layers with hand-written backward passes, against what autodiff and Flax compute:
resnet.batch_norm (against nnx.BatchNorm and the textbook formula) and resnet.pooling
(against select-and-scatter)."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import resnet
from resnet.batch_norm import BatchNorm, batch_norm_train
from resnet.pooling import max_pool_3x3_s2
from tests import helpers

EPS = 1e-5
SHAPE = (8, 5, 5, 6)  # NHWC, 200 values per channel


def _data(seed=0):
    rng = np.random.default_rng(seed)
    # A mean well away from 0 exercises the centred backward reduction.
    x = jnp.asarray(rng.normal(3.0, 2.0, SHAPE), jnp.float32)
    weights = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    return x, weights


def _textbook(x, scale, bias, groups=1):
    """Each group of rows g, g + groups, ... normalised by its own statistics."""
    ys, means, variances = [], [], []
    for g in range(groups):
        rows = x[g::groups]
        mean = jnp.mean(rows, (0, 1, 2))
        var = jnp.maximum(jnp.mean(rows * rows, (0, 1, 2)) - mean * mean, 0.0)
        ys.append((rows - mean) * jax.lax.rsqrt(var + EPS) * scale + bias)
        means.append(mean)
        variances.append(var)
    y = jnp.stack(ys, 1).reshape(x.shape)  # row p * groups + g is row p of group g
    return y, jnp.stack(means), jnp.stack(variances)


def _loss_through_all_outputs(norm, weights):
    # Uses y, mean and var, so every cotangent of the custom VJP is non-zero.
    def loss(x, scale, bias):
        y, mean, var = norm(x, scale, bias)
        return jnp.sum(jnp.tanh(y) * weights) + jnp.sum(mean * 1.5) + jnp.sum(jnp.sqrt(var))

    return loss


@pytest.mark.parametrize("groups", [1, 2, 8])
def test_custom_vjp_matches_autodiff_of_the_formula(groups):
    # groups=8: ghost groups of one example each (statistics over its 5 x 5 pixels).
    x, weights = _data()
    scale, bias = jnp.linspace(0.5, 2.0, 6), jnp.linspace(-1.0, 1.0, 6)
    ours = lambda x, s, b: batch_norm_train(x, s, b, EPS, jnp.float32, groups)
    textbook = lambda x, s, b: _textbook(x, s, b, groups)
    for got, want in zip(jax.jit(ours)(x, scale, bias), jax.jit(textbook)(x, scale, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Jitted: one compile each, not one per primitive.
    grad = lambda f: jax.jit(jax.grad(_loss_through_all_outputs(f, weights), argnums=(0, 1, 2)))
    for got, want in zip(grad(ours)(x, scale, bias), grad(textbook)(x, scale, bias)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_ghost_groups_move_the_running_averages_by_their_mean_statistics():
    x, weights = _data(5)
    module = BatchNorm(6, momentum=0.9, epsilon=EPS, group_size=2)  # 4 groups of 2 examples
    module.mean[...] = jnp.linspace(-1.0, 1.0, 6)
    old_mean, old_var = module.mean[...], module.var[...]
    _, _, stats = _train_once(module, x, weights)
    _, means, variances = _textbook(x, 1.0, 0.0, groups=4)
    np.testing.assert_allclose(stats["mean"][...], 0.9 * old_mean + 0.1 * means.mean(0), 1e-6)
    np.testing.assert_allclose(stats["var"][...], 0.9 * old_var + 0.1 * variances.mean(0), 1e-6)
    with pytest.raises(ValueError, match="does not split into groups of 3"):
        BatchNorm(6, group_size=3)(x, use_running_average=False)


def _train_once(module, x, weights):
    """Loss, gradients and new running statistics after one training-mode call."""
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    def loss(params, x):
        m = nnx.merge(graphdef, params, stats, copy=True)
        y = m(x, use_running_average=False)
        return jnp.sum(jnp.tanh(y) * weights), nnx.state(m, nnx.BatchStat)

    (value, new_stats), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return value, grads, new_stats


def test_matches_nnx_batchnorm_in_float32():
    x, weights = _data(1)
    ours = BatchNorm(6, momentum=0.9, epsilon=EPS)
    ref = nnx.BatchNorm(6, momentum=0.9, epsilon=EPS, rngs=nnx.Rngs(0))
    for m in (ours, ref):
        m.scale[...] = jnp.linspace(0.5, 2.0, 6)
        m.bias[...] = jnp.linspace(-1.0, 1.0, 6)
    # Same state names and shapes: checkpoints do not depend on the implementation.
    same_tree = jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(ref))
    assert same_tree
    got, want = _train_once(ours, x, weights), _train_once(ref, x, weights)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
    # Eval mode, with the statistics written by the step above.
    for m, (_, _, stats) in ((ours, got), (ref, want)):
        nnx.update(m, stats)
    np.testing.assert_allclose(
        ours(x, use_running_average=True), ref(x, use_running_average=True), rtol=1e-5, atol=1e-5
    )


def test_bfloat16_keeps_per_channel_maths_in_float32():
    # A loss linear in y with small integer weights: the output gradient is exact in bfloat16,
    # so float32 per-channel maths must give the float32 answer to float32 rounding. (Rounding
    # scale/bias gradients to bfloat16, as nnx.BatchNorm does, misses by ~1e-3.)
    x, _ = _data(2)
    xb = x.astype(jnp.bfloat16)
    weights = jnp.asarray(np.random.default_rng(5).integers(-8, 8, SHAPE), jnp.float32)
    results = {}
    for dtype in (jnp.bfloat16, jnp.float32):
        module = BatchNorm(6, momentum=0.9, epsilon=EPS, dtype=dtype)
        module.scale[...] = jnp.linspace(0.5, 2.0, 6)
        graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

        def loss(params, x, graphdef=graphdef, stats=stats):
            m = nnx.merge(graphdef, params, stats, copy=True)
            y = m(x, use_running_average=False)
            return jnp.sum(y.astype(jnp.float32) * weights), (y, nnx.state(m, nnx.BatchStat))

        (_, (y, new_stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, xb.astype(dtype)
        )
        results[dtype] = y, grads, new_stats
    y, (param_grads, x_grad), new_stats = results[jnp.bfloat16]
    y32, (param_grads32, _), new_stats32 = results[jnp.float32]
    assert y.dtype == x_grad.dtype == jnp.bfloat16  # activations stay in compute dtype
    np.testing.assert_allclose(y.astype(jnp.float32), y32, rtol=2**-8, atol=2**-8)
    for got, want in zip(jax.tree.leaves(param_grads), jax.tree.leaves(param_grads32)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for got, want in zip(jax.tree.leaves(new_stats), jax.tree.leaves(new_stats32)):
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=1e-6)


# Run in a child with 4 simulated CPU devices (this process has one).
_SHARDED_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from resnet.batch_norm import batch_norm_train
assert jax.device_count() == 4
x = jnp.asarray(np.random.default_rng(3).normal(3.0, 2.0, (8, 5, 5, 6)), jnp.float32)
w = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
s, b = jnp.linspace(0.5, 2.0, 6), jnp.zeros(6)
for groups in (1, 2):  # 2 ghost groups of 4 rows: one row of each on every device
    def loss(x, s, b):
        y, mean, var = batch_norm_train(x, s, b, 1e-5, jnp.float32, groups)
        return jnp.sum(jnp.tanh(y) * w) + jnp.sum(mean) + jnp.sum(jnp.sqrt(var))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    whole = step(jax.device_put(x, jax.devices()[0]), s, b)
    sharded = step(jax.device_put(x, split), s, b)
    for a, c in zip(jax.tree.leaves(sharded), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-5)
print("ok")
"""


def test_custom_vjp_under_a_sharded_batch():
    # The hand-written passes under SPMD jit with the batch split over 4 devices: XLA must
    # all-reduce the per-channel sums of both passes, giving the unsharded values exactly.
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED_CHECK],
        env=helpers.child_env(4),
        cwd=helpers.REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_model_state_is_the_same_for_either_implementation(name):
    shapes = {}
    for kind in resnet.BATCH_NORMS:
        model = nnx.eval_shape(
            lambda kind=kind: resnet.create_model(
                name, num_classes=10, rngs=nnx.Rngs(0), batch_norm=kind
            )
        )
        shapes[kind] = jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(model))
    assert shapes["fused"] == shapes["flax"]


def test_unknown_batch_norm_rejected():
    with pytest.raises(ValueError, match="batch_norm"):
        resnet.create_model("resnet20", num_classes=10, rngs=nnx.Rngs(0), batch_norm="sync")


# --- max pool ----------------------------------------------------------------------------


def _flax_max_pool(x):
    return nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (2, 7, 9, 3), (1, 16, 15, 2)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_max_pool_gradient_equals_select_and_scatter(shape, dtype):
    rng = np.random.default_rng(sum(shape))
    # ReLU outputs (many tied zeros) plus whole rows of equal values: the tie rule matters.
    x = jnp.maximum(jnp.asarray(rng.normal(size=shape), dtype), 0).at[:, ::3].set(1.0)
    y = _flax_max_pool(x)
    np.testing.assert_array_equal(max_pool_3x3_s2(x), y)
    # Small integer weights: every sum of gradients is exact, so the two must be bit-equal.
    weights = jnp.asarray(rng.integers(-8, 8, size=y.shape), jnp.float32)

    def grad(pool):
        return jax.jit(jax.grad(lambda x: jnp.sum(pool(x).astype(jnp.float32) * weights)))(x)

    got, want = grad(max_pool_3x3_s2), grad(_flax_max_pool)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow  # two ResNet-18 forward and backward passes
def test_max_pool_choice_gives_the_same_model():
    x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
    outputs = {}
    for kind in resnet.MAX_POOLS:
        model = resnet.resnet18(num_classes=4, rngs=nnx.Rngs(0), max_pool=kind)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params, graphdef=graphdef, rest=rest):
            return jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, True) ** 2)

        outputs[kind] = jax.jit(jax.value_and_grad(loss))(params)
    for a, b in zip(jax.tree.leaves(outputs["dense"]), jax.tree.leaves(outputs["xla"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
