"""Per-example image transforms: decode, random-resized-crop, flip, centre crop.

Transforms run on the host and return uint8 HWC arrays. Normalisation (mean/std) happens on
the accelerator inside the jitted step: a uint8 batch is a quarter of the host-to-device
bytes of a float32 one, and XLA fuses the arithmetic into the first convolution.
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
from PIL import Image


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation settings (Inception-style random-resized-crop)."""

    image_size: int
    channels: int = 3
    crop_scale: tuple[float, float] = (0.08, 1.0)  # fraction of the source area
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect ratio range
    random_flip: bool = True


def decode_image(image_bytes: bytes, channels: int) -> Image.Image:
    image = Image.open(io.BytesIO(image_bytes))
    mode = "L" if channels == 1 else "RGB"
    if image.mode != mode:
        image = image.convert(mode)
    return image


def _to_array(image: Image.Image, channels: int) -> np.ndarray:
    array = np.asarray(image, dtype=np.uint8)
    return array[:, :, None] if channels == 1 else array


def random_resized_crop(
    image: Image.Image, aug: Augmentation, rng: np.random.Generator
) -> np.ndarray:
    """Crops a random area and aspect ratio, resizes to `image_size`, maybe flips."""
    width, height = image.size
    area = width * height
    box = (0, 0, width, height)  # fallback: the whole image
    log_ratio = (math.log(aug.crop_ratio[0]), math.log(aug.crop_ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*aug.crop_scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        crop_w = int(round(math.sqrt(target_area * ratio)))
        crop_h = int(round(math.sqrt(target_area / ratio)))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            left = int(rng.integers(0, width - crop_w + 1))
            top = int(rng.integers(0, height - crop_h + 1))
            box = (left, top, left + crop_w, top + crop_h)
            break
    # `box` makes PIL crop and resize in one resampling pass.
    out = image.resize((aug.image_size, aug.image_size), Image.BILINEAR, box=box)
    array = _to_array(out, aug.channels)
    if aug.random_flip and rng.random() < 0.5:
        array = array[:, ::-1]
    return np.ascontiguousarray(array)


def center_crop(
    image: Image.Image, image_size: int, channels: int, crop_fraction: float
) -> np.ndarray:
    """Eval transform: the centre `crop_fraction` of the shorter side, resized to `image_size`.

    crop_fraction=0.875 is the usual ImageNet "resize to 256, crop 224"; 1.0 keeps the whole
    (square) image, as for MNIST and CIFAR.
    """
    width, height = image.size
    side = min(width, height) * crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    out = image.resize(
        (image_size, image_size), Image.BILINEAR, box=(left, top, left + side, top + side)
    )
    return np.ascontiguousarray(_to_array(out, channels))
