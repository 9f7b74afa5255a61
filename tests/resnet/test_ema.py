"""The moving average of the weights (train.ema_decay): its update written out by hand, the
state with and without it, and the train and eval steps on a tiny ResNet."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import default
from launch import checkpointing, distributed
from launch import program as program_lib
from resnet import steps as steps_lib
from tests import helpers


def test_the_decay_warms_up_then_holds():
    decays = [float(steps_lib.ema_decay_at(0.9, jnp.int32(t))) for t in (0, 8, 80, 1000)]
    assert decays == pytest.approx([1 / 10, 9 / 18, 0.9, 0.9])


def test_the_update_by_hand_on_a_tiny_tree():
    ema = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(4.0)}
    new = {"w": jnp.array([3.0, 2.0]), "b": jnp.array(0.0)}
    first = steps_lib.ema_update(ema, new, 0.9, jnp.int32(0))  # decay 1/10
    np.testing.assert_allclose(first["w"], [0.1 * 1 + 0.9 * 3, 0.1 * -2 + 0.9 * 2], rtol=1e-6)
    np.testing.assert_allclose(first["b"], 0.4, rtol=1e-6)
    late = steps_lib.ema_update(ema, new, 0.9, jnp.int32(500))  # the full 0.9
    np.testing.assert_allclose(late["w"], [0.9 * 1 + 0.1 * 3, 0.9 * -2 + 0.1 * 2], rtol=1e-6)
    np.testing.assert_allclose(late["b"], 3.6, rtol=1e-6)


def _tiny_model():
    return helpers.tiny_resnet(in_channels=1)


def _sgd():
    schedule = steps_lib.learning_rate_schedule(0.1, 1, 10)
    return steps_lib.sgd_optimizer(schedule, momentum=0.9, nesterov=True, weight_decay=1e-4)


def _paths_and_shapes(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    paths = checkpointing.leaf_paths(tree)
    return {p: (x.shape, x.dtype) for p, (_, x) in zip(paths, leaves)}


def test_off_the_state_is_unchanged_and_on_it_mirrors_the_weights():
    tx = _sgd()
    off = jax.eval_shape(lambda: steps_lib.init_state(_tiny_model(), tx)[1])
    on = jax.eval_shape(lambda: steps_lib.init_state(_tiny_model(), tx, ema=True)[1])
    assert off.ema is None
    without_ema = {
        "step": off.step,
        "params": off.params,
        "batch_stats": off.batch_stats,
        "opt_state": off.opt_state,
        "nonfinite_in_a_row": off.nonfinite_in_a_row,
        "nonfinite_total": off.nonfinite_total,
    }
    assert _paths_and_shapes(off) == _paths_and_shapes(without_ema)
    ema = {p: s for p, s in _paths_and_shapes(on).items() if p.startswith("ema/")}
    weights = _paths_and_shapes({"params": off.params, "batch_stats": off.batch_stats})
    assert ema == {f"ema/{p}": s for p, s in weights.items()}


def test_the_average_is_placed_like_the_weights():
    config = default.get_config()
    config.model.name, config.model.num_classes, config.train.ema_decay = "resnet20", 10, 0.99
    program = program_lib.build_program(config, distributed.make_mesh(), channels=1)
    state = program.abstract_state
    shardings = lambda tree: [x.sharding for x in jax.tree.leaves(tree)]
    weights = {"params": state.params, "batch_stats": state.batch_stats}
    assert shardings(state.ema) == shardings(weights)


BATCH = {
    "image": jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), np.uint8)),
    "label": jnp.arange(8) % 10,
}
DECAY = 0.5


def _weights(state):
    return {"params": state.params, "batch_stats": state.batch_stats}


@pytest.fixture(scope="module")
def run():
    """A tiny ResNet with an average, its jitted train step (compiled once for the module)
    and the states of its first three steps."""
    tx = _sgd()
    graphdef, state = steps_lib.init_state(_tiny_model(), tx, ema=True)
    step = jax.jit(
        steps_lib.make_train_step(
            graphdef,
            tx,
            steps_lib.learning_rate_schedule(0.1, 1, 10),
            mean=(127.5,),
            std=(64.0,),
            compute_dtype=jnp.float32,
            label_smoothing=0.0,
            ema_decay=DECAY,
        )
    )
    states = [state]
    for _ in range(3):
        states.append(step(states[-1], BATCH)[0])
    return graphdef, step, states


def test_each_applied_step_moves_the_average_towards_the_new_weights(run):
    _, _, states = run
    expected = jax.device_get(_weights(states[0]))
    for t, state in enumerate(states[1:]):
        decay = min(DECAY, (1 + t) / (10 + t))
        new = jax.device_get(_weights(state))
        expected = jax.tree.map(lambda e, n, d=decay: d * e + (1 - d) * n, expected, new)
    final = states[-1]
    assert int(final.nonfinite_total) == 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), final.ema, expected
    )
    moved = jax.tree.map(lambda a, b: np.any(a != b), _weights(final), final.ema)
    assert any(jax.tree.leaves(moved))  # the average lags behind the weights


def test_a_skipped_step_leaves_the_average_as_it_was(run):
    _, step, states = run
    state = states[-1]
    leaves, tree = jax.tree.flatten(state.params)
    broken = state.replace(params=jax.tree.unflatten(tree, [leaves[0] * jnp.nan, *leaves[1:]]))
    new, metrics = step(broken, BATCH)
    assert not np.isfinite(metrics["loss"]) and int(new.nonfinite_total) == 1
    jax.tree.map(np.testing.assert_array_equal, new.ema, state.ema)


def test_eval_with_use_ema_evaluates_the_average(run):
    graphdef, _, states = run
    state = states[-1]
    batch = dict(BATCH, mask=jnp.ones(8))
    evaluate = lambda s, use_ema: jax.jit(
        steps_lib.make_eval_step(
            graphdef, mean=(127.5,), std=(64.0,), compute_dtype=jnp.float32, use_ema=use_ema
        )
    )(s, batch, steps_lib.zero_eval_totals())
    averaged = state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"])
    on, off = evaluate(state, True), evaluate(state, False)
    assert jax.device_get(on) == jax.device_get(evaluate(averaged, False))
    assert float(on["loss"]) != float(off["loss"])
