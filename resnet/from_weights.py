"""Trained weights (`resnet.weights`) at work: a model built from them, weights assigned into
an existing model for fine-tuning, and a jitted predictor.

    predict = resnet.from_weights.load_for_inference(path)     # jitted, eval mode
    logits = predict(images_uint8_nhwc)                         # float32 (N, num_classes)

    weights = resnet.weights.load(path)                         # arrays and description
    model = resnet.from_weights.build(weights, dtype=jnp.bfloat16)
    resnet.from_weights.assign(model, weights, skip=("head",))  # fine-tuning: keep a new head

Options that do not change the computed function (`batch_norm`, `max_pool`, `bn_momentum`,
the compute dtype) are not stored with the weights: pass them to `build`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from resnet import steps
from resnet.batch_norm import BatchNorm
from resnet.model import ProjectionShortcut
from resnet.weights import (
    MODEL_KEYS,
    Tree,
    Weights,
    abstract_model,
    check_variables,
    flatten,
    load,
    modules_of,
    variable_shapes,
)


def _state_paths(state: nnx.State) -> dict[str, tuple]:
    """Flat path ("stages/0/1/conv1/kernel") -> the state's own key path (int list indices)."""
    return {"/".join(map(str, path)): path for path, _ in nnx.to_flat_state(state)}


def _check_options(weights: Weights, options: Mapping[str, Any]) -> None:
    fixed = sorted(set(options) & set(MODEL_KEYS))
    if fixed:
        raise ValueError(f"{fixed} are fixed by the weights ({weights.model}); do not pass them")


def _fill(state: nnx.State, given: Tree, what: str, skip: tuple[str, ...] = ()) -> None:
    """Checks `given` against `state` and replaces the state's values with it, as float32
    (the model's variable dtype), leaving paths under the `skip` prefixes untouched."""
    skipped = lambda p: any(p == s or p.startswith(s + "/") for s in skip)
    paths = {p: k for p, k in _state_paths(state).items() if not skipped(p)}
    shapes = {p: s for p, s in variable_shapes(state).items() if p in paths}
    flat = {p: v for p, v in flatten(given).items() if not skipped(p)}
    check_variables(shapes, flat, what)
    dtypes = {"/".join(map(str, path)): var.dtype for path, var in nnx.to_flat_state(state)}
    values: dict = {}
    for p, v in flat.items():
        node = values
        *parents, leaf = paths[p]
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = jnp.asarray(np.asarray(v, np.float32), dtypes[p])
    nnx.replace_by_pure_dict(state, values)


def build(weights: Weights, dtype: Any = jnp.float32, **options) -> nnx.Module:
    """The model described by `weights` with its variables in place.

    `dtype` is the compute dtype (variables stay float32). `options` are constructor options
    that do not change the function (`batch_norm`, `max_pool`, `bn_momentum`, ...); the ones
    stored with the weights cannot be overridden. Raises ValueError naming the first variable
    that is missing, extra or of the wrong shape.
    """
    _check_options(weights, options)
    abstract = abstract_model(weights.model, dtype, **options)
    # Flax types split() with filters as variadic; it returns one State per filter.
    graphdef, params, batch_stats, rest = nnx.split(abstract, nnx.Param, nnx.BatchStat, ...)  # type: ignore[misc]
    if jax.tree.leaves(rest):
        raise ValueError(f"the model has variables the weights format does not hold: {rest}")
    _fill(params, weights.params, "params")
    _fill(batch_stats, weights.batch_stats, "batch_stats")
    return nnx.merge(graphdef, params, batch_stats, rest)


def assign(model: nnx.Module, weights: Weights, *, skip: Iterable[str] = ()) -> None:
    """Writes the stored variables into an existing model, in place (for fine-tuning).

    `skip` lists path prefixes to leave as they are, e.g. ("head",) to keep a freshly
    initialised classifier for a different number of classes. Every other variable must be
    present with its shape, and the model's BatchNorm epsilon must be the stored one.
    """
    skip = tuple(skip)
    eps = weights.model["bn_epsilon"]
    for bn in modules_of(model, (BatchNorm, nnx.BatchNorm)):
        if not math.isclose(bn.epsilon, eps, rel_tol=1e-6):
            raise ValueError(f"the model's BatchNorm epsilon is {bn.epsilon}, the weights' {eps}")
    has_projection = bool(modules_of(model, ProjectionShortcut))
    if has_projection != (weights.model["shortcut"] == "projection"):
        raise ValueError(
            f"the model's shortcuts differ from the weights' {weights.model['shortcut']!r}"
        )
    params = nnx.state(model, nnx.Param)
    batch_stats = nnx.state(model, nnx.BatchStat)
    _fill(params, weights.params, "params", skip)
    _fill(batch_stats, weights.batch_stats, "batch_stats", skip)
    nnx.update(model, params, batch_stats)


class Predictor:
    """`predictor(images) -> logits`: uint8 (N, H, W, C) pixels in, float32 (N, classes) out.

    Normalises with the stored mean/std (as `resnet.steps.normalize`), runs the model in eval
    mode, jitted (one compile per input shape). Images should be prepared like the eval
    transform (`preprocessing["image_size"]`, `eval_crop_fraction`); any size runs.
    """

    def __init__(self, weights: Weights, dtype: Any = jnp.float32, **options):
        self.weights = weights
        self.class_names = weights.class_names
        self.preprocessing = weights.preprocessing
        model = build(weights, dtype, **options)
        graphdef, self._state = nnx.split(model)
        mean = tuple(weights.preprocessing["mean"])
        std = tuple(weights.preprocessing["std"])

        def forward(state, images):
            net = steps.merge(graphdef, state)
            return net(steps.normalize(images, mean, std, dtype), training=False)

        self._forward = jax.jit(forward)

    def __call__(self, images) -> jax.Array:
        images = jnp.asarray(images)
        channels = self.weights.model["in_channels"]
        if images.dtype != jnp.uint8 or images.ndim != 4 or images.shape[-1] != channels:
            raise ValueError(
                f"expected uint8 images shaped (N, H, W, {channels}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        return self._forward(self._state, images)


def load_for_inference(path: str | os.PathLike, dtype: Any = jnp.float32, **options) -> Callable:
    """`load` + `build` as a jitted uint8-images-to-logits function (a `Predictor`)."""
    return Predictor(load(path), dtype, **options)


__all__ = ["Predictor", "assign", "build", "load_for_inference"]
