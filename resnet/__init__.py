"""ResNet models in Flax NNX.

    model = resnet.create_model("resnet50", num_classes=1000, rngs=nnx.Rngs(0),
                                dtype=jnp.bfloat16)
    logits = model(images_nhwc, training=True)   # float32 logits

Options accepted by every constructor (keyword-only): `shortcut` ("projection" or
"zero_pad"), `zero_init_residual` (default True), `bn_momentum` (0.9),
`bn_epsilon` (1e-5), `batch_norm` ("fused" or "flax"), `max_pool` ("dense" or "xla"),
`in_channels` (3).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from flax import nnx

from resnet.model import (
    BATCH_NORMS,
    MAX_POOLS,
    SHORTCUTS,
    BasicBlock,
    Bottleneck,
    ProjectionShortcut,
    ResNet,
    ZeroPadShortcut,
    count_params,
)


def _imagenet(block, stage_sizes, *, num_classes, rngs, dtype, **options) -> ResNet:
    options.setdefault("shortcut", "projection")
    return ResNet(
        block,
        stage_sizes,
        (64, 128, 256, 512),
        num_classes=num_classes,
        stem="imagenet",
        rngs=rngs,
        dtype=dtype,
        **options,
    )


def _cifar(n, *, num_classes, rngs, dtype, **options) -> ResNet:
    # The paper uses option A (parameter-free, zero-padded identity) shortcuts on
    # CIFAR; its parameter counts (0.27M ... 1.7M) are for that choice, so it is the
    # default here. shortcut="projection" adds 1x1 convs at the two downsamplings.
    options.setdefault("shortcut", "zero_pad")
    return ResNet(
        BasicBlock,
        (n, n, n),
        (16, 32, 64),
        num_classes=num_classes,
        stem="cifar",
        rngs=rngs,
        dtype=dtype,
        **options,
    )


# --- ImageNet family (He et al. 2015, table 1) --------------------------------


def resnet18(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _imagenet(
        BasicBlock, (2, 2, 2, 2), num_classes=num_classes, rngs=rngs, dtype=dtype, **options
    )


def resnet34(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _imagenet(
        BasicBlock, (3, 4, 6, 3), num_classes=num_classes, rngs=rngs, dtype=dtype, **options
    )


def resnet50(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _imagenet(
        Bottleneck, (3, 4, 6, 3), num_classes=num_classes, rngs=rngs, dtype=dtype, **options
    )


def resnet101(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _imagenet(
        Bottleneck, (3, 4, 23, 3), num_classes=num_classes, rngs=rngs, dtype=dtype, **options
    )


def resnet152(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _imagenet(
        Bottleneck, (3, 8, 36, 3), num_classes=num_classes, rngs=rngs, dtype=dtype, **options
    )


# --- CIFAR family (He et al. 2015, section 4.2: 6n+2 layers) -------------------


def resnet20(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _cifar(3, num_classes=num_classes, rngs=rngs, dtype=dtype, **options)


def resnet32(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _cifar(5, num_classes=num_classes, rngs=rngs, dtype=dtype, **options)


def resnet44(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _cifar(7, num_classes=num_classes, rngs=rngs, dtype=dtype, **options)


def resnet56(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _cifar(9, num_classes=num_classes, rngs=rngs, dtype=dtype, **options)


def resnet110(*, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options) -> ResNet:
    return _cifar(18, num_classes=num_classes, rngs=rngs, dtype=dtype, **options)


_MODELS: dict[str, Callable[..., ResNet]] = {
    f.__name__: f
    for f in (
        resnet18,
        resnet34,
        resnet50,
        resnet101,
        resnet152,
        resnet20,
        resnet32,
        resnet44,
        resnet56,
        resnet110,
    )
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(_MODELS))


def create_model(
    name: str, *, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options
) -> ResNet:
    """Builds the named ResNet; raises ValueError listing MODEL_NAMES if unknown."""
    try:
        factory = _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    return factory(num_classes=num_classes, rngs=rngs, dtype=dtype, **options)


__all__ = [
    "BATCH_NORMS",
    "MAX_POOLS",
    "MODEL_NAMES",
    "SHORTCUTS",
    "BasicBlock",
    "Bottleneck",
    "ProjectionShortcut",
    "ResNet",
    "ZeroPadShortcut",
    "count_params",
    "create_model",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnet20",
    "resnet32",
    "resnet44",
    "resnet56",
    "resnet110",
]
