"""Augmentation on the accelerator, for raw datasets of one fixed image size: pad, crop, flip.

The host hands over the stored pixels (`pipeline.dataset.train_dataset(augment=False)`) and
does no pixel work at all; inside the jitted train step each image is padded with zeros,
cropped back to its size at a random offset and maybe flipped: the CIFAR recipe of He et al.
(2015) (4-pixel padding, 32x32 crops, flips) exactly. The randomness of an example is a pure
function of (seed, step, example id), like the host augmentation's (seed, epoch, example id),
so it does not depend on the number of hosts or devices or on where a run was resumed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def pad_crop_flip(
    images: jax.Array, example_ids: jax.Array, step: jax.Array, *, seed: int, pad: int, flip: bool
) -> jax.Array:
    """uint8 (N, H, W, C) -> uint8 (N, H, W, C), each example augmented on its own."""
    _, height, width, channels = images.shape
    base = jax.random.fold_in(jax.random.key(seed), step)

    def one(example_id, image):
        offset_key, flip_key = jax.random.split(jax.random.fold_in(base, example_id))
        dy, dx = jax.random.randint(offset_key, (2,), 0, 2 * pad + 1)
        padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
        crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), (height, width, channels))
        mirrored = jnp.logical_and(flip, jax.random.bernoulli(flip_key))
        return jnp.where(mirrored, crop[:, ::-1], crop)

    return jax.vmap(one)(example_ids, images)
