"""Residual networks (He et al. 2015, "Deep Residual Learning for Image Recognition")
in Flax NNX, NHWC layout.

Two families share one `ResNet` module:

* ImageNet: 7x7/2 stem + 3x3/2 max pool, four stages (64-128-256-512), projection
  shortcuts, BasicBlock (18/34) or Bottleneck (50/101/152, ResNet v1.5: the stride
  sits on the 3x3 conv). Parameter counts equal torchvision's.
* CIFAR (paper section 4.2): 3x3 stem with 16 channels, three stages (16-32-64) of
  n basic blocks each (6n+2 layers), no max pool, parameter-free shortcuts.

Calling convention: `model(images, training) -> float32 logits`. BatchNorm mode is
passed explicitly on every call (`use_running_average=not training`), so the
module's train()/eval() flags are never consulted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx

from resnet.batch_norm import BatchNorm
from resnet.pooling import max_pool_3x3_s2

Shortcut = Literal["projection", "zero_pad"]
SHORTCUTS = ("projection", "zero_pad")
# "fused": resnet.batch_norm (float32 per-channel maths, hand-written backward pass);
# "flax": nnx.BatchNorm, kept as the reference it is tested and benchmarked against.
BATCH_NORMS = ("fused", "flax")
# The stem's max pool backward: "dense" (resnet.pooling, fused and order-independent) or "xla"
# (autodiff of reduce_window: select-and-scatter). The same values either way.
MAX_POOLS = ("dense", "xla")

# He-normal with fan_out, as torchvision initialises its convolutions.
CONV_INIT = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")
# Dense head: N(0, 0.01^2) weights and zero bias, the Caffe/Goyal et al. (2017)
# choice; small logits at init give a near-uniform softmax and a loss of ~log(K).
HEAD_KERNEL_INIT = nnx.initializers.normal(stddev=0.01)


class _Layers:
    """Builds convs and BatchNorms with the options shared by the whole network."""

    def __init__(
        self,
        *,
        dtype,
        batch_norm: str,
        bn_momentum: float,
        bn_epsilon: float,
        bn_group_size: int,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.batch_norm = batch_norm
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        self.bn_group_size = bn_group_size
        self.rngs = rngs

    def conv(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nnx.Conv:
        # Symmetric padding k//2 (as torchvision/the paper), not XLA "SAME": with a
        # stride of 2, SAME pads (0, 1) and the sampled grid would no longer line up
        # with the 1x1/2 projection or the ::2 subsample of a zero-pad shortcut.
        pad = kernel // 2
        return nnx.Conv(
            in_ch,
            out_ch,
            (kernel, kernel),
            strides=(stride, stride),
            padding=((pad, pad), (pad, pad)),
            use_bias=False,  # BN supplies the bias
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=CONV_INIT,
            rngs=self.rngs,
        )

    def bn(self, channels: int, zero_scale: bool = False) -> BatchNorm | nnx.BatchNorm:
        # Both keep scale/bias and running statistics in float32 under the same names.
        if self.batch_norm == "fused":
            return BatchNorm(
                channels,
                momentum=self.bn_momentum,
                epsilon=self.bn_epsilon,
                dtype=self.dtype,
                zero_scale=zero_scale,
                group_size=self.bn_group_size,
            )
        # nnx.BatchNorm casts them to the compute dtype before use (see resnet.batch_norm).
        return nnx.BatchNorm(
            channels,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
            rngs=self.rngs,
        )


class ProjectionShortcut(nnx.Module):
    """Option B: 1x1 conv (strided) + BN."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, layers: _Layers):
        self.conv = layers.conv(in_ch, out_ch, 1, stride)
        self.bn = layers.bn(out_ch)

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        return self.bn(self.conv(x), use_running_average=not training)


class ZeroPadShortcut(nnx.Module):
    """Option A: parameter-free identity; subsample by the stride, zero-pad channels."""

    def __init__(self, in_ch: int, out_ch: int, stride: int):
        if out_ch < in_ch:
            raise ValueError(f"zero-pad shortcut cannot reduce channels ({in_ch} -> {out_ch})")
        self.stride = stride
        extra = out_ch - in_ch
        self.pad = (extra // 2, extra - extra // 2)  # split evenly, as the usual reference code

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        del training
        s = self.stride
        x = x[:, ::s, ::s, :]  # same sample grid as a 3x3/s conv with padding 1
        return jnp.pad(x, ((0, 0), (0, 0), (0, 0), self.pad))


def _shortcut(kind: str, in_ch: int, out_ch: int, stride: int, layers: _Layers):
    if stride == 1 and in_ch == out_ch:
        return None  # plain identity
    if kind == "projection":
        return ProjectionShortcut(in_ch, out_ch, stride, layers)
    if kind == "zero_pad":
        return ZeroPadShortcut(in_ch, out_ch, stride)
    raise ValueError(f"unknown shortcut {kind!r}; valid: {sorted(SHORTCUTS)}")


class BasicBlock(nnx.Module):
    """Two 3x3 convs; the first carries the stride."""

    expansion = 1

    def __init__(
        self,
        in_ch: int,
        channels: int,
        stride: int,
        layers: _Layers,
        *,
        shortcut: str = "projection",
        zero_init_residual: bool = True,
    ):
        out_ch = channels * self.expansion
        self.conv1 = layers.conv(in_ch, channels, 3, stride)
        self.bn1 = layers.bn(channels)
        self.conv2 = layers.conv(channels, out_ch, 3)
        # A zero last-BN scale makes every block start as the identity (Goyal et al.).
        self.bn2 = layers.bn(out_ch, zero_scale=zero_init_residual)
        self.shortcut = _shortcut(shortcut, in_ch, out_ch, stride, layers)

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        ura = not training
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        skip = x if self.shortcut is None else self.shortcut(x, training)
        return nnx.relu(y + skip)


class Bottleneck(nnx.Module):
    """1x1 reduce, 3x3 (strided, ResNet v1.5), 1x1 expand by 4."""

    expansion = 4

    def __init__(
        self,
        in_ch: int,
        channels: int,
        stride: int,
        layers: _Layers,
        *,
        shortcut: str = "projection",
        zero_init_residual: bool = True,
    ):
        out_ch = channels * self.expansion
        self.conv1 = layers.conv(in_ch, channels, 1)
        self.bn1 = layers.bn(channels)
        self.conv2 = layers.conv(channels, channels, 3, stride)
        self.bn2 = layers.bn(channels)
        self.conv3 = layers.conv(channels, out_ch, 1)
        self.bn3 = layers.bn(out_ch, zero_scale=zero_init_residual)
        self.shortcut = _shortcut(shortcut, in_ch, out_ch, stride, layers)

    def __call__(self, x: jax.Array, training: bool) -> jax.Array:
        ura = not training
        y = nnx.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = nnx.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        skip = x if self.shortcut is None else self.shortcut(x, training)
        return nnx.relu(y + skip)


class ResNet(nnx.Module):
    """A stem, stages of residual blocks (the first block of each stage after the
    first downsamples by 2), global average pooling and a dense head.

    `stage_widths` are the blocks' inner widths; a stage outputs
    `width * block.expansion` channels. `bn_group_size` > 0 makes every BatchNorm normalise
    a training batch in ghost groups of that many examples (resnet.batch_norm).
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        stage_sizes: Sequence[int],
        stage_widths: Sequence[int],
        *,
        num_classes: int,
        stem: Literal["imagenet", "cifar"],
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        shortcut: Shortcut = "projection",
        zero_init_residual: bool = True,
        bn_momentum: float = 0.9,
        bn_epsilon: float = 1e-5,
        bn_group_size: int = 0,
        batch_norm: str = "fused",
        max_pool: str = "dense",
        in_channels: int = 3,
    ):
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; valid: {sorted(SHORTCUTS)}")
        if stem not in ("imagenet", "cifar"):
            raise ValueError(f"unknown stem {stem!r}; valid: ['cifar', 'imagenet']")
        if batch_norm not in BATCH_NORMS:
            raise ValueError(f"unknown batch_norm {batch_norm!r}; valid: {list(BATCH_NORMS)}")
        if max_pool not in MAX_POOLS:
            raise ValueError(f"unknown max_pool {max_pool!r}; valid: {list(MAX_POOLS)}")
        if bn_group_size and batch_norm != "fused":
            raise ValueError("bn_group_size needs batch_norm='fused' (nnx.BatchNorm has no groups)")
        self.dtype = jnp.dtype(dtype)
        layers = _Layers(
            dtype=self.dtype,
            batch_norm=batch_norm,
            bn_momentum=bn_momentum,
            bn_epsilon=bn_epsilon,
            bn_group_size=bn_group_size,
            rngs=rngs,
        )
        # ImageNet stem: 7x7/2 conv and a 3x3/2 max pool; CIFAR stem: one 3x3/1 conv.
        imagenet = stem == "imagenet"
        self.max_pool = max_pool if imagenet else None
        width = stage_widths[0]
        self.stem_conv = layers.conv(in_channels, width, 7 if imagenet else 3, 2 if imagenet else 1)
        self.stem_bn = layers.bn(width)

        stages = []
        in_ch = width
        for i, (n_blocks, channels) in enumerate(zip(stage_sizes, stage_widths)):
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(
                    block(
                        in_ch,
                        channels,
                        stride,
                        layers,
                        shortcut=shortcut,
                        zero_init_residual=zero_init_residual,
                    )
                )
                in_ch = channels * block.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        # The head runs in float32: it is tiny, and the loss wants float32 logits.
        self.head = nnx.Linear(
            in_ch,
            num_classes,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
            kernel_init=HEAD_KERNEL_INIT,
            bias_init=nnx.initializers.zeros,
            rngs=rngs,
        )

    def __call__(self, images: jax.Array, training: bool) -> jax.Array:
        x = jnp.asarray(images, self.dtype)
        x = nnx.relu(self.stem_bn(self.stem_conv(x), use_running_average=not training))
        if self.max_pool == "dense":
            x = max_pool_3x3_s2(x)
        elif self.max_pool == "xla":
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in self.stages:
            for blk in stage:
                x = blk(x, training)
        x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # global average pool
        return self.head(x).astype(jnp.float32)


def count_params(model: nnx.Module) -> int:
    """Number of trainable scalars (nnx.Param leaves; BN running stats excluded).

    Works on abstract models from `nnx.eval_shape` as well as on real ones.
    """
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return sum(math.prod(leaf.shape) for leaf in leaves)
