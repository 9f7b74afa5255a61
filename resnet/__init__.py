"""ResNet models in Flax NNX: the family of He et al. 2015 as one table.

    model = resnet.create_model("resnet50", num_classes=1000, rngs=nnx.Rngs(0),
                                dtype=jnp.bfloat16)
    logits = model(images_nhwc, training=True)   # float32 logits

Options (keyword-only): `shortcut` ("projection" or "zero_pad"; each family has the paper's
default), `zero_init_residual` (default True), `bn_momentum` (0.9), `bn_epsilon` (1e-5),
`bn_group_size` (0: BatchNorm statistics over the whole training batch; n: ghost groups of
n examples, "fused" only), `batch_norm` ("fused" or "flax"), `max_pool` ("dense" or "xla"),
`in_channels` (3).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

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
    Shortcut,
    ZeroPadShortcut,
    count_params,
)


@dataclasses.dataclass(frozen=True)
class Architecture:
    block: type[BasicBlock] | type[Bottleneck]
    stage_sizes: tuple[int, ...]  # blocks per stage
    widths: tuple[int, ...]  # each stage's base channel count
    stem: Literal["imagenet", "cifar"]  # a 7x7/2 conv and max pool, or one 3x3 conv
    shortcut: Shortcut  # the paper's choice for this family


def _imagenet(block: type[BasicBlock] | type[Bottleneck], stage_sizes) -> Architecture:
    return Architecture(block, stage_sizes, (64, 128, 256, 512), "imagenet", "projection")


def _cifar(n: int) -> Architecture:
    # The paper uses option A (parameter-free, zero-padded identity) shortcuts on CIFAR: its
    # parameter counts (0.27M ... 1.7M) are for that choice. shortcut="projection" adds 1x1
    # convs at the two downsamplings.
    return Architecture(BasicBlock, (n, n, n), (16, 32, 64), "cifar", "zero_pad")


ARCHITECTURES: dict[str, Architecture] = {
    # ImageNet (table 1 of the paper)
    "resnet18": _imagenet(BasicBlock, (2, 2, 2, 2)),
    "resnet34": _imagenet(BasicBlock, (3, 4, 6, 3)),
    "resnet50": _imagenet(Bottleneck, (3, 4, 6, 3)),
    "resnet101": _imagenet(Bottleneck, (3, 4, 23, 3)),
    "resnet152": _imagenet(Bottleneck, (3, 8, 36, 3)),
    # CIFAR (section 4.2: 6n+2 layers, n blocks per stage). n = 1 is not in the paper; it is
    # the family's smallest member, for quick runs and the tests.
    "resnet8": _cifar(1),
    "resnet20": _cifar(3),
    "resnet32": _cifar(5),
    "resnet44": _cifar(7),
    "resnet56": _cifar(9),
    "resnet110": _cifar(18),
}
MODEL_NAMES: tuple[str, ...] = tuple(sorted(ARCHITECTURES))


def create_model(
    name: str, *, num_classes: int, rngs: nnx.Rngs, dtype: Any = jnp.float32, **options
) -> ResNet:
    """Builds the named ResNet; raises ValueError listing MODEL_NAMES if unknown."""
    try:
        arch = ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}") from None
    options.setdefault("shortcut", arch.shortcut)
    return ResNet(
        arch.block,
        arch.stage_sizes,
        arch.widths,
        num_classes=num_classes,
        stem=arch.stem,
        rngs=rngs,
        dtype=dtype,
        **options,
    )


resnet18 = functools.partial(create_model, "resnet18")
resnet34 = functools.partial(create_model, "resnet34")
resnet50 = functools.partial(create_model, "resnet50")
resnet101 = functools.partial(create_model, "resnet101")
resnet152 = functools.partial(create_model, "resnet152")
resnet8 = functools.partial(create_model, "resnet8")
resnet20 = functools.partial(create_model, "resnet20")
resnet32 = functools.partial(create_model, "resnet32")
resnet44 = functools.partial(create_model, "resnet44")
resnet56 = functools.partial(create_model, "resnet56")
resnet110 = functools.partial(create_model, "resnet110")

__all__ = [
    "ARCHITECTURES",
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
]
