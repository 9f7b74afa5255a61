"""The stem's 3x3/2 max pool with a gather-style backward pass.

Autodiff of `reduce_window(max)` gives XLA's select-and-scatter, which XLA's GPU backend
emits as a scatter with atomic adds, so the order of the additions (and the rounding) can
vary between runs. Here the gradient is built densely instead: for each of
the 9 window offsets, a mask marks the windows whose maximum sits at that offset (the first
one in row-major order on ties, as select-and-scatter picks), and the masked output
gradients are strided back into place with `lax.pad` and summed in a fixed order. Every
step is elementwise, so XLA fuses it, and the result does not depend on thread timing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

WINDOW, STRIDE, PAD = 3, 2, 1


def _pool(x: jax.Array) -> jax.Array:
    return lax.reduce_window(
        x,
        -jnp.inf,  # a Python scalar: jax recognises the max monoid (and can differentiate it)
        lax.max,
        (1, WINDOW, WINDOW, 1),
        (1, STRIDE, STRIDE, 1),
        ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)),
    )


def _window_taps(x: jax.Array, out_h: int, out_w: int):
    """Yields (i, j, x at offset (i, j) of every window), each shaped like the output."""
    padded = jnp.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD), (0, 0)), constant_values=-jnp.inf)
    for i in range(WINDOW):
        for j in range(WINDOW):
            yield i, j, padded[:, i : i + STRIDE * out_h : STRIDE, j : j + STRIDE * out_w : STRIDE]


@jax.custom_vjp
def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """NHWC max pool, 3x3 window, stride 2, padding 1 (the ImageNet ResNet stem)."""
    return _pool(x)


def _forward(x):
    y = _pool(x)
    return y, (x, y)


def _backward(residuals, dy):
    x, y = residuals
    _, height, width, _ = x.shape
    out_h, out_w = y.shape[1:3]
    dx = jnp.zeros(x.shape, jnp.float32)
    taken = jnp.zeros(y.shape, bool)
    zero = jnp.zeros((), jnp.float32)
    for i, j, tap in _window_taps(x, out_h, out_w):
        chosen = (tap == y) & ~taken  # first maximum of each window, as select-and-scatter
        taken = taken | chosen
        grad = jnp.where(chosen, dy.astype(jnp.float32), zero)
        # Window (p, q) offset (i, j) reads input (STRIDE*p + i - PAD, STRIDE*q + j - PAD):
        # dilate by the stride, then shift by the offset (negative padding crops).
        rows = (i - PAD, height - (STRIDE * (out_h - 1) + 1) - (i - PAD), STRIDE - 1)
        cols = (j - PAD, width - (STRIDE * (out_w - 1) + 1) - (j - PAD), STRIDE - 1)
        dx = dx + lax.pad(grad, zero, ((0, 0, 0), rows, cols, (0, 0, 0)))
    return (dx.astype(x.dtype),)


max_pool_3x3_s2.defvjp(_forward, _backward)
