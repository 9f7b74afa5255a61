"""The optimizers and schedules of resnet.steps, as launch.program builds them from a config.

LARS is checked against optax's own `optax.lars` (with explicit masks) and against the update
written out by hand; SGD against its hand-written update; the MLPerf config is built with
abstract shapes only (no compile); a tiny ResNet-20 trains a few steps with LARS.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import resnet
from configs import default, resnet50_mlperf
from launch import distributed, plan
from launch import program as program_lib
from resnet import steps as steps_lib

LR, WD, MOMENTUM, TRUST = 0.5, 1e-2, 0.9, 0.02


def _params():
    """A conv kernel, a dense kernel, and the 1-D leaves LARS must leave alone."""
    keys = jax.random.split(jax.random.key(0), 4)
    return {
        "conv": {"kernel": jax.random.normal(keys[0], (3, 3, 2, 4))},
        "dense": {"kernel": jax.random.normal(keys[1], (4, 3)), "bias": jnp.full((3,), 0.5)},
        "bn": {"scale": jnp.ones((4,)), "bias": jax.random.normal(keys[2], (4,))},
    }


def _grads(step: int):
    params = _params()
    keys = jax.random.split(jax.random.key(100 + step), len(jax.tree.leaves(params)))
    leaves, tree = jax.tree.flatten(params)
    return jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, steps: int = 3):
    """Every step's updates of `tx` on the tiny tree (params moved along the way)."""
    params, state, history = _params(), tx.init(_params()), []
    for step in range(steps):
        updates, state = tx.update(_grads(step), state, params)
        params = optax.apply_updates(params, updates)
        history.append(updates)
    return history


def _lars(nesterov: bool = False, epsilon: float = 0.0):
    return steps_lib.lars_optimizer(
        optax.constant_schedule(LR),
        momentum=MOMENTUM,
        nesterov=nesterov,
        weight_decay=WD,
        trust_coefficient=TRUST,
        epsilon=epsilon,
    )


@pytest.mark.parametrize("nesterov", [False, True])
def test_lars_is_optax_lars_with_the_1d_leaves_masked(nesterov):
    masks = jax.tree.map(lambda p: p.ndim > 1, _params())
    reference = optax.lars(
        LR,
        weight_decay=WD,
        weight_decay_mask=masks,
        trust_coefficient=TRUST,
        eps=1e-3,
        trust_ratio_mask=masks,
        momentum=MOMENTUM,
        nesterov=nesterov,
    )
    ours, theirs = _run(_lars(nesterov, epsilon=1e-3)), _run(reference)
    for a, b in zip(ours, theirs):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_lars_by_hand_kernels_scaled_1d_leaves_plain_momentum():
    """Kernels: trust ratio and weight decay; 1-D leaves: momentum SGD on the raw gradient."""
    params = jax.tree.map(np.asarray, _params())
    traces = jax.tree.map(np.zeros_like, params)
    for step, updates in enumerate(_run(_lars())):
        grads = jax.tree.map(np.asarray, _grads(step))
        for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
            g = _leaf(grads, path)
            if w.ndim > 1:
                g = g + WD * w
                g = g * TRUST * np.linalg.norm(w) / np.linalg.norm(g)
            trace = LR * g + MOMENTUM * _leaf(traces, path)
            _set_leaf(traces, path, trace)
            np.testing.assert_allclose(_leaf(updates, path), -trace, rtol=2e-5, atol=1e-7)
            _set_leaf(params, path, w - trace)


def _leaf(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)


def _set_leaf(tree, path, value):
    for key in path[:-1]:
        tree = tree[key.key]
    tree[path[-1].key] = value


def test_sgd_by_hand_nesterov_with_decay_on_kernels_only():
    tx = steps_lib.sgd_optimizer(
        optax.constant_schedule(LR), momentum=MOMENTUM, nesterov=True, weight_decay=WD
    )
    params = jax.tree.map(np.asarray, _params())
    traces = jax.tree.map(np.zeros_like, params)
    for step, updates in enumerate(_run(tx)):
        grads = jax.tree.map(np.asarray, _grads(step))
        for path, w in jax.tree_util.tree_flatten_with_path(params)[0]:
            g = _leaf(grads, path) + (WD * w if w.ndim > 1 else 0.0)
            trace = g + MOMENTUM * _leaf(traces, path)
            _set_leaf(traces, path, trace)
            expected = -LR * (g + MOMENTUM * trace)
            np.testing.assert_allclose(_leaf(updates, path), expected, rtol=2e-5, atol=1e-7)
            _set_leaf(params, path, w + expected)


def test_default_config_keeps_sgd_with_warmup_cosine_bit_for_bit():
    config = default.get_config()
    assert (config.train.optimizer, config.train.lr_schedule) == ("sgd", "cosine")
    tx, schedule = program_lib.make_optimizer(config, steps_per_epoch=10, num_steps=100)
    peak = config.train.base_learning_rate * config.train.global_batch_size / 256
    cosine = optax.warmup_cosine_decay_schedule(0.0, peak, 50, 100, 0.0)
    steps = jnp.arange(101)
    np.testing.assert_array_equal(jax.vmap(schedule)(steps), jax.vmap(cosine)(steps))
    chained = optax.chain(
        optax.add_decayed_weights(config.train.weight_decay, mask=steps_lib._decays),
        optax.sgd(cosine, momentum=config.train.momentum, nesterov=config.train.nesterov),
    )
    for a, b in zip(_run(tx), _run(chained)):
        jax.tree.map(np.testing.assert_array_equal, a, b)


def test_polynomial_schedule_warms_up_then_decays_with_the_power():
    peak, end, warmup, total, power = 10.0, 1e-4, 20, 120, 2.0
    schedule = steps_lib.learning_rate_schedule(
        peak, warmup, total, kind="polynomial", end=end, power=power
    )
    steps = np.arange(total + 1)
    decay = np.clip((steps - warmup) / (total - warmup), 0.0, 1.0)
    expected = np.where(
        steps < warmup, peak * steps / warmup, end + (peak - end) * (1 - decay) ** power
    )
    np.testing.assert_allclose(jax.vmap(schedule)(jnp.asarray(steps)), expected, rtol=1e-5)
    assert float(schedule(warmup)) == pytest.approx(peak)
    assert float(schedule(total)) == pytest.approx(end)


def test_bad_choices_are_config_errors_naming_the_field():
    config = default.get_config()
    config.train.optimizer = "adam"
    with pytest.raises(plan.ConfigError, match=r"config.train.optimizer='adam': use one of sgd"):
        program_lib.make_optimizer(config, 10, 100)
    config = default.get_config()
    config.train.lr_schedule = "step"
    with pytest.raises(plan.ConfigError, match=r"config.train.lr_schedule='step': use one of"):
        program_lib.make_optimizer(config, 10, 100)
    config = default.get_config()
    config.train.end_learning_rate = 100.0
    with pytest.raises(plan.ConfigError, match=r"end_learning_rate=100.0: must not exceed"):
        program_lib.make_optimizer(config, 10, 100)


def test_mlperf_config_passes_check_config_and_builds_without_compiling():
    config = resnet50_mlperf.get_config()
    plan.check_config(config)
    steps_per_epoch = 1_281_167 // config.train.global_batch_size
    num_steps = int(config.train.num_epochs * steps_per_epoch)
    program = program_lib.build_program(
        config,
        distributed.make_mesh(),
        channels=3,
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps,
    )
    warmup = int(config.train.warmup_epochs * steps_per_epoch)
    assert float(program.schedule(warmup)) == pytest.approx(10.0)
    assert float(program.schedule(num_steps)) == pytest.approx(1e-4)
    sizes = [x.size for x in jax.tree.leaves(program.abstract_state.params)]
    assert sum(sizes) == 25_557_032  # ResNet-50 v1.5
    trust_states = [
        s
        for s in jax.tree.leaves(
            program.abstract_state.opt_state, is_leaf=lambda s: isinstance(s, optax.MaskedState)
        )
        if isinstance(s, optax.MaskedState)
    ]
    assert trust_states, "LARS's masked trust ratio is missing from the optimizer state"


@pytest.mark.slow  # a convergence check; the update itself is checked above in the fast tier
def test_lars_trains_a_tiny_resnet20():
    model = resnet.create_model("resnet20", num_classes=10, rngs=nnx.Rngs(1))
    config = default.get_config()
    config.train.optimizer, config.train.lr_schedule = "lars", "polynomial"
    # Peak 10 as MLPerf's LARS (batch 256 here, so base x 256 / 256 = 10).
    config.train.base_learning_rate, config.train.global_batch_size = 10.0, 256
    config.train.warmup_epochs = 3.0  # steps, with one step per epoch
    tx, schedule = program_lib.make_optimizer(config, steps_per_epoch=1, num_steps=30)
    graphdef, state = steps_lib.init_state(model, tx)
    step = jax.jit(
        steps_lib.make_train_step(
            graphdef,
            tx,
            schedule,
            mean=(127.5,) * 3,
            std=(64.0,) * 3,
            compute_dtype=jnp.float32,
            label_smoothing=0.0,
        )
    )
    rng = np.random.default_rng(0)
    batch = {
        "image": jnp.asarray(rng.integers(0, 256, (32, 8, 8, 3), dtype=np.uint8)),
        "label": jnp.asarray(rng.integers(0, 10, (32,), dtype=np.int32)),
    }
    losses = []
    for _ in range(16):  # the same batch: the model memorises its random labels
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.nonfinite_total) == 0
    assert losses[-1] < 0.5 * losses[0], losses
