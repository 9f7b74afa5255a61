"""Tests for resnet.model / resnet.create_model.

Kept fast for CPU: parameter counts and most shapes use abstract models
(nnx.eval_shape / jax.eval_shape, no compile); real forwards use tiny inputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import resnet
import resnet.weights

# torchvision's counts for num_classes=1000 (nnx.Param only).
IMAGENET_COUNTS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "resnet101": 44_549_160,
    "resnet152": 60_192_808,
}
# He et al. 2015, table 6 (CIFAR-10, 10 classes).
PAPER_CIFAR_COUNTS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
}
# Exact counts of this implementation with the default (zero-pad) shortcuts.
CIFAR_COUNTS = {
    "resnet8": 75_290,  # n = 1: not in the paper
    "resnet20": 269_722,
    "resnet32": 464_154,
    "resnet44": 658_586,
    "resnet56": 853_018,
    "resnet110": 1_727_962,
}


def abstract_model(name, **kwargs):
    kwargs.setdefault("num_classes", 10)
    return nnx.eval_shape(lambda: resnet.create_model(name, rngs=nnx.Rngs(0), **kwargs))


def abstract_forward(model, images, training=False):
    """Output ShapeDtypeStruct of a forward pass, traced but never compiled."""
    graphdef, state = nnx.split(model)
    return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, training), state, images)


def leaves(model, kind):
    return jax.tree.leaves(nnx.state(model, kind))


def images(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


# Real (initialised) models are shared: eager init costs seconds on CPU. Tests that
# mutate a model work on an nnx.clone.
@pytest.fixture(scope="module")
def resnet20():
    return resnet.resnet20(num_classes=10, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def resnet18():
    return resnet.resnet18(num_classes=5, rngs=nnx.Rngs(1))


# --- registry -------------------------------------------------------------------


def test_model_names():
    assert resnet.MODEL_NAMES == tuple(sorted([*IMAGENET_COUNTS, *CIFAR_COUNTS]))
    for name in resnet.MODEL_NAMES:
        assert callable(getattr(resnet, name))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        resnet.create_model("resnet19", num_classes=10, rngs=nnx.Rngs(0))
    message = str(info.value)
    assert "resnet19" in message
    assert ", ".join(sorted(resnet.MODEL_NAMES)) in message


def test_unknown_shortcut_rejected():
    with pytest.raises(ValueError, match="shortcut"):
        abstract_model("resnet20", shortcut="bogus")


# --- parameter counts -------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(IMAGENET_COUNTS))
def test_imagenet_param_counts_match_torchvision(name):
    model = abstract_model(name, num_classes=1000)
    assert resnet.count_params(model) == IMAGENET_COUNTS[name]


@pytest.mark.parametrize("name", sorted(PAPER_CIFAR_COUNTS))
def test_cifar_param_counts_match_paper(name):
    n = resnet.count_params(abstract_model(name, num_classes=10))
    assert abs(n - PAPER_CIFAR_COUNTS[name]) <= 0.02 * PAPER_CIFAR_COUNTS[name]


@pytest.mark.parametrize("name", sorted(CIFAR_COUNTS))
def test_cifar_param_counts_are_exact(name):
    assert resnet.count_params(abstract_model(name, num_classes=10)) == CIFAR_COUNTS[name]


def test_cifar_projection_shortcut_adds_two_projections():
    # 1x1 convs 16->32 and 32->64, each followed by a BN with scale and bias.
    extra = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    n = resnet.count_params(abstract_model("resnet20", shortcut="projection"))
    assert n == CIFAR_COUNTS["resnet20"] + extra


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet8", "resnet20"])
def test_the_weights_spec_names_the_shortcuts_the_built_model_has(name):
    # resnet.weights.model_spec reads the family's default from the table, without a model.
    spec = resnet.weights.model_spec(name, 10)
    model = abstract_model(name)
    kinds = {"projection": resnet.ProjectionShortcut, "zero_pad": resnet.ZeroPadShortcut}
    assert resnet.weights.modules_of(model, kinds[spec["shortcut"]])
    other = next(k for k in kinds if k != spec["shortcut"])
    assert not resnet.weights.modules_of(model, kinds[other])


def test_count_params_excludes_batch_stats():
    model = abstract_model("resnet20")
    n_stats = sum(x.size for x in leaves(model, nnx.BatchStat))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    assert n_stats > 0
    assert resnet.count_params(model) == n_all - n_stats


# --- shapes and dtypes --------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape",
    [
        ("resnet20", (2, 16, 16, 3)),
        ("resnet20", (1, 9, 9, 3)),  # odd sizes: zero-pad shortcut must line up with the conv
        ("resnet18", (1, 33, 33, 3)),
        ("resnet50", (2, 64, 48, 3)),
    ],
)
def test_abstract_output_shape(name, shape):
    out = abstract_forward(
        abstract_model(name, num_classes=7), jax.ShapeDtypeStruct(shape, jnp.float32)
    )
    assert out.shape == (shape[0], 7)
    assert out.dtype == jnp.float32


def test_resnet20_forward(resnet20):
    logits = nnx.jit(lambda m, x: m(x, training=False))(resnet20, images((2, 16, 16, 3)))
    assert logits.shape == (2, 10)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


@pytest.mark.slow  # the fast tier runs ResNet-18 against torchvision (test_torchvision.py)
def test_resnet18_forward(resnet18):
    logits = nnx.jit(lambda m, x: m(x, training=False))(resnet18, images((1, 32, 32, 3)))
    assert logits.shape == (1, 5)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))


def test_bfloat16_compute_keeps_float32_params_stats_and_logits():
    model = resnet.resnet20(num_classes=10, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    logits = nnx.jit(lambda m, x: m(x, training=True))(model, images((2, 16, 16, 3)))
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(logits))
    assert {x.dtype for x in leaves(model, nnx.Param)} == {jnp.dtype(jnp.float32)}
    # Checked after a training step, which wrote new running statistics.
    assert {x.dtype for x in leaves(model, nnx.BatchStat)} == {jnp.dtype(jnp.float32)}


def test_bfloat16_convolutions_run_in_bfloat16():
    model = abstract_model("resnet20", dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x, True))(
        state, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    )
    convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 19  # 6n+1 convs for n=3 (the +1 layer is the dense head)
    assert all(v.aval.dtype == jnp.bfloat16 for e in convs for v in e.invars)


# --- BatchNorm train/eval -------------------------------------------------------------


def test_batchnorm_stats_update_only_in_training(resnet20):
    model = nnx.clone(resnet20)
    x = images((4, 16, 16, 3), seed=1)
    before = [np.asarray(a) for a in leaves(model, nnx.BatchStat)]

    nnx.jit(lambda m, x: m(x, training=False))(model, x)
    after_eval = [np.asarray(a) for a in leaves(model, nnx.BatchStat)]
    for a, b in zip(before, after_eval):
        np.testing.assert_array_equal(a, b)

    nnx.jit(lambda m, x: m(x, training=True))(model, x)
    after_train = [np.asarray(a) for a in leaves(model, nnx.BatchStat)]
    changed = [not np.array_equal(a, b) for a, b in zip(before, after_train)]
    assert all(changed)  # every mean and var moved

    # momentum 0.9 (not NNX's default 0.99): new_mean = 0.9 * 0 + 0.1 * batch_mean.
    batch_mean = jnp.mean(resnet20.stem_conv(x), axis=(0, 1, 2))
    np.testing.assert_allclose(model.stem_bn.mean[...], 0.1 * batch_mean, rtol=1e-4, atol=1e-6)


def test_eval_mode_is_deterministic_per_example(resnet20):
    # With running averages, an example's logits do not depend on the rest of the batch.
    x = images((3, 16, 16, 3), seed=2)
    fwd = nnx.jit(lambda m, x: m(x, training=False))
    np.testing.assert_allclose(fwd(resnet20, x)[:1], fwd(resnet20, x[:1]), rtol=1e-5, atol=1e-5)


# --- initialisation and gradients ---------------------------------------------------------


def test_zero_init_residual_can_be_disabled():
    model = resnet.resnet20(num_classes=10, rngs=nnx.Rngs(0), zero_init_residual=False)
    np.testing.assert_array_equal(model.stages[0][0].bn2.scale[...], np.ones(16))


def _loss(model, x):
    return jnp.mean(jax.nn.log_softmax(model(x, training=True))[:, 0])


@pytest.mark.parametrize("stem, shortcut", [("cifar", "zero_pad"), ("imagenet", "projection")])
def test_gradient_reaches_stem_through_skips(stem, shortcut):
    # One narrow block per stage: the path from the loss to the stem is what is checked.
    model = resnet.ResNet(
        resnet.BasicBlock, (1, 1, 1), (4, 8, 16), num_classes=5, stem=stem, shortcut=shortcut,
        rngs=nnx.Rngs(1),
    )  # fmt: skip
    last_bn = [blk.bn2 for stage in model.stages for blk in stage]
    assert all(np.all(bn.scale[...] == 0) for bn in last_bn)  # zero_init_residual default

    grads = nnx.jit(nnx.grad(_loss))(nnx.clone(model), images((2, 16, 16, 3), seed=3))
    assert np.any(grads.stem_conv.kernel[...] != 0)
    # The zero-initialised scales themselves receive a gradient, so the branches can learn.
    assert np.any(grads.stages[0][0].bn2.scale[...] != 0)


def test_zero_pad_shortcut_matches_strided_conv_grid(resnet20):
    # The first 3x3/2 conv of stage 2, made a channel-identity delta kernel, must
    # sample the same pixels as the shortcut's ::2 subsample (odd size included).
    block = nnx.clone(resnet20.stages[1][0])
    delta = np.zeros((3, 3, 16, 32), np.float32)
    delta[1, 1, np.arange(16), np.arange(16)] = 1.0
    block.conv1.kernel[...] = jnp.asarray(delta)
    x = images((1, 9, 9, 16), seed=5)
    np.testing.assert_allclose(block.conv1(x)[..., :16], x[:, ::2, ::2, :], atol=1e-6)
    skip = block.shortcut(x, False)
    assert skip.shape == (1, 5, 5, 32)
    np.testing.assert_array_equal(skip[..., 8:24], x[:, ::2, ::2, :])
    assert not np.any(skip[..., :8]) and not np.any(skip[..., 24:])


def test_split_merge_roundtrip(resnet20):
    graphdef, params, stats = nnx.split(resnet20, nnx.Param, nnx.BatchStat)
    restored = nnx.merge(graphdef, params, stats)
    x = images((2, 8, 8, 3), seed=4)
    fwd = nnx.jit(lambda m, x: m(x, training=False))
    np.testing.assert_array_equal(fwd(restored, x), fwd(resnet20, x))
    assert len(leaves(resnet20, nnx.BatchStat)) == 2 * 19  # mean and var of each BN
