"""BatchNorm for NHWC activations with float32 parameters, statistics and arithmetic, and a
hand-written backward pass.

Why not `nnx.BatchNorm`: with a bfloat16 compute dtype it casts its scale, bias and running
statistics to bfloat16 before use, so scale/bias gradients are rounded to bfloat16 and eval
normalises with bfloat16 statistics. Here everything per-channel stays float32 and only the
full-size tensors (input, output, their gradients) are in the compute dtype.

The training pass is one `jax.custom_vjp` so that autodiff cannot keep float32 copies of the
activations alive for the backward pass: the only residual of activation size is the input
itself, in the compute dtype. Each direction reads the activations twice, which is the least
a BatchNorm can do without fusing into the convolution:

  forward:  sum(x), sum(x^2)           (one fused reduction, float32 accumulators)
            y = x * a + b              (per-channel a, b; XLA fuses the ReLU and the add)
  backward: sum(dy), sum(dy * (x - m)) (one fused reduction)
            dx = dy * a + x * k1 + k0  (per-channel a, k1, k0)

Statistics are over every axis but the last. Under SPMD `jit` with the batch axis sharded
that is the global batch: XLA all-reduces the per-channel sums (two vectors each way).
The variance is the biased batch variance E[x^2] - E[x]^2 (clipped at 0), the running
averages are `momentum * old + (1 - momentum) * batch`, both as `nnx.BatchNorm`, and the
state has the same names (scale, bias, mean, var), so checkpoints do not depend on which
implementation wrote them.

Ghost groups (`group_size`): the batch of N rows is normalised in N / group_size groups,
each by its own statistics. Row j belongs to group j mod (N / group_size), strided like the
micro-batches of `resnet.steps.split_microbatches`, so a group takes rows from every device
of a sharded batch and the groups do not depend on the number of devices. The running
averages take the mean of the groups' statistics, once per call (as Keras' virtual batches).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

_F32 = jnp.float32


def _grouped(x: jax.Array, groups: int) -> jax.Array:
    """[N, ..., C] -> [N / groups, groups, ..., C]: group g holds rows g, g + groups, ..."""
    return x.reshape((x.shape[0] // groups, groups) + x.shape[1:])


def _reduce_axes(xg: jax.Array) -> tuple[int, ...]:
    """Every axis of a grouped array but the group axis (1) and the channels (last)."""
    return (0,) + tuple(range(2, xg.ndim - 1))


def _scale_shift(x, scale, bias, mean, inv_std, dtype):
    """(x - mean) * inv_std * scale + bias as one multiply-add per element, in float32.

    The mean is folded into the shift on purpose. Writing `x - mean` here as well as in the
    backward reduction lets XLA merge the two (CSE) and keep that float32 difference alive
    from the forward to the backward pass: +48 MB scratch and +96 MB traffic per step for
    ResNet-20 at batch 64 (bench_step's XLA estimate, CPU). The cancellation it risks is
    ~1e-7 * |mean| / std, far below the one-pass variance's own ~1e-7 * (mean / std)^2.
    """
    a = scale * inv_std
    return (x.astype(_F32) * a + (bias - mean * a)).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, epsilon: float, dtype: Any, groups: int = 1):
    """Normalises `x` by its own statistics in `groups` strided groups (see `_grouped`);
    returns (y, batch mean, biased batch variance), the statistics of shape [groups, C]."""
    return _forward(x, scale, bias, epsilon, dtype, groups)[0]


def _forward(x, scale, bias, epsilon, dtype, groups):
    xg = _grouped(x, groups)
    axes = _reduce_axes(xg)
    count = xg.size // (groups * xg.shape[-1])
    x32 = xg.astype(_F32)
    # Per group and channel, kept as [1, groups, 1, ..., C] to broadcast against xg.
    mean = jnp.sum(x32, axes, keepdims=True) / count
    # One pass: both sums read x once. Activations arrive in bf16/fp32 with float32 sums, the
    # same trade-off as nnx.BatchNorm's default `use_fast_variance`.
    var = jnp.maximum(jnp.sum(x32 * x32, axes, keepdims=True) / count - mean * mean, 0.0)
    inv_std = jax.lax.rsqrt(var + epsilon)
    y = _scale_shift(xg, scale, bias, mean, inv_std, dtype).reshape(x.shape)
    per_group = lambda s: s.reshape(groups, x.shape[-1])
    return (y, per_group(mean), per_group(var)), (x, scale, mean, var, inv_std)


def _backward(epsilon, dtype, groups, residuals, cotangents):
    del epsilon
    x, scale, mean, var, inv_std = residuals
    dy, dmean, dvar = cotangents  # dmean, dvar: from whoever uses the returned statistics
    dmean, dvar = dmean.reshape(mean.shape), dvar.reshape(var.shape)
    dvar = jnp.where(var > 0, dvar, 0.0)  # where the variance was clipped at 0 it is constant
    xg, dyg = _grouped(x, groups), _grouped(dy, groups)
    axes = _reduce_axes(xg)
    count = xg.size // (groups * xg.shape[-1])
    x32, dy32 = xg.astype(_F32), dyg.astype(_F32)
    # Per group: each group is an independent BatchNorm that shares scale and bias.
    dbias = jnp.sum(dy32, axes, keepdims=True)
    dscale = jnp.sum(dy32 * (x32 - mean), axes, keepdims=True) * inv_std  # centred
    # dx = a*dy - a*mean(dy) - a*xhat*mean(dy*xhat) + dmean/M + 2*dvar*(x - mean)/M,
    # with a = scale*inv_std and xhat = (x - mean)*inv_std, regrouped per channel as
    # dy*a + x*k1 + k0 (the mean folded into k0, as in _scale_shift).
    a = scale * inv_std
    k1 = (2.0 * dvar - a * inv_std * dscale) / count
    k0 = (dmean - a * dbias) / count - mean * k1
    dx = (dy32 * a + x32 * k1 + k0).astype(x.dtype).reshape(x.shape)
    channels = lambda s: jnp.sum(s.reshape(groups, x.shape[-1]), 0)
    return dx, channels(dscale), channels(dbias)


batch_norm_train.defvjp(_forward, _backward)


class BatchNorm(nnx.Module):
    """BatchNorm over all axes but the last (channels), as `nnx.BatchNorm` computes it, or
    in ghost groups of `group_size` examples in training (0: the whole batch).

    `dtype` is the output (compute) dtype; parameters, statistics and the arithmetic are
    float32. The mode is explicit on every call, as the rest of the model does.
    """

    def __init__(
        self,
        channels: int,
        *,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        dtype: Any = jnp.float32,
        zero_scale: bool = False,
        group_size: int = 0,
    ):
        self.scale = nnx.Param((jnp.zeros if zero_scale else jnp.ones)((channels,), _F32))
        self.bias = nnx.Param(jnp.zeros((channels,), _F32))
        self.mean = nnx.BatchStat(jnp.zeros((channels,), _F32))
        self.var = nnx.BatchStat(jnp.ones((channels,), _F32))
        self.momentum = momentum
        self.epsilon = epsilon
        self.dtype = jnp.dtype(dtype)
        self.group_size = group_size  # examples per statistics group; 0: the whole input

    def groups(self, batch: int) -> int:
        """How many statistics groups a training batch of `batch` examples is split into."""
        if not self.group_size:
            return 1
        if batch % self.group_size:
            raise ValueError(f"a batch of {batch} does not split into groups of {self.group_size}")
        return batch // self.group_size

    def __call__(self, x: jax.Array, use_running_average: bool) -> jax.Array:
        scale, bias = self.scale[...], self.bias[...]
        if use_running_average:
            inv_std = jax.lax.rsqrt(self.var[...] + self.epsilon)
            return _scale_shift(x, scale, bias, self.mean[...], inv_std, self.dtype)
        groups = self.groups(x.shape[0])
        y, mean, var = batch_norm_train(x, scale, bias, self.epsilon, self.dtype, groups)
        mean, var = (jnp.mean(jax.lax.stop_gradient(s), 0) for s in (mean, var))
        m = self.momentum
        self.mean[...] = m * self.mean[...] + (1.0 - m) * mean
        self.var[...] = m * self.var[...] + (1.0 - m) * var
        return y
