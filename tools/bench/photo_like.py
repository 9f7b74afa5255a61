"""Photo-like JPEGs with ImageNet's shape, for input benchmarks that need no download.

    python -m tools.bench.photo_like --output=/tmp/photos --count=2000 [--seed=0] [--classes=10]

Content: crops and rescales of real photographs that ship inside installable packages
(scikit-image's `skimage/data` and scikit-learn's `load_sample_images` files, read as files,
without importing either package), sharpened after the rescale, with a colour and exposure
jitter and a little sensor-like noise, so that the JPEGs have the statistics (smooth
regions, edges, texture) and so the entropy-coded size and decode cost of photos, unlike
noise or gradients. Without either package, seeds are procedural 1/f ("pink") noise fields
with a few hard-edged shapes: natural images have a roughly 1/f amplitude spectrum, which
white noise does not. `sources` in the manifest says which were used.

Shape (a stand-in for ImageNet train, not measured from it; see docs/measurements.md): most
images have a longer side of 500 px (500x375, 500x333 and portraits), some are smaller,
SQUARE_FRACTION are squares, MULTI_MEGAPIXEL_FRACTION are 1-12 megapixels, GRAYSCALE_FRACTION
are grayscale JPEGs and CMYK_FRACTION are CMYK JPEGs. The multi-megapixel tail holds about a
third of all pixels, so it sets much of the decode cost; ImageNet's own tail is not measured
here. JPEG qualities vary between 75 and 95
with 4:2:0 chroma (PIL's default).

Deterministic: the same seed, count and seed sources give byte-identical files.
`manifest.json` in the output folder lists the sources and the size distribution.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle

import numpy as np
from absl import app, flags
from PIL import Image, ImageFilter

# Real photographs shipped inside packages: (package, path inside it).
SEED_PHOTOS = (
    ("skimage", "data/astronaut.png"),
    ("skimage", "data/chelsea.png"),
    ("skimage", "data/coffee.png"),
    ("skimage", "data/rocket.jpg"),
    ("skimage", "data/motorcycle_left.png"),
    ("skimage", "data/motorcycle_right.png"),
    ("skimage", "data/camera.png"),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
)
# (width, height, weight) of the ordinary images: Flickr-style, longer side mostly 500.
COMMON_SIZES = (
    (500, 375, 36),
    (500, 333, 18),
    (375, 500, 10),
    (333, 500, 8),
    (500, 281, 3),
    (500, 400, 3),
    (400, 300, 2),
    (500, 500, 0),  # squares are drawn separately
)
SMALL_FRACTION = 0.10  # random sizes between 150 and 500 px a side
SQUARE_FRACTION = 0.04
MULTI_MEGAPIXEL_FRACTION = 0.02  # 1 to 10 megapixels, 4:3 or 3:2, either orientation
GRAYSCALE_FRACTION = 0.02
CMYK_FRACTION = 0.005
QUALITIES = ((75, 0.2), (85, 0.25), (90, 0.3), (95, 0.25))
NOISE_SIGMA = 4.0  # sensor-like noise (0..255 scale) added at the output resolution
# Restores the edge contrast that upscaling a seed crop smooths away.
SHARPEN = ImageFilter.UnsharpMask(radius=1.5, percent=80, threshold=2)
PROCEDURAL_SEEDS = 8
PROCEDURAL_SIZE = 768


def _package_file(package: str, relpath: str) -> str | None:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, relpath)
        if os.path.isfile(path):
            return path
    return None


def _pink_noise(rng: np.random.Generator, size: int) -> np.ndarray:
    """A size x size x 3 image with a 1/f amplitude spectrum and a few hard-edged shapes."""
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / size)
    channels = []
    shared = rng.standard_normal((size, size // 2 + 1)) + 1j * rng.standard_normal(
        (size, size // 2 + 1)
    )
    for _ in range(3):  # correlated channels, as in photos
        own = rng.standard_normal(shared.shape) + 1j * rng.standard_normal(shared.shape)
        field = np.fft.irfft2(amplitude * (shared + 0.5 * own), s=(size, size))
        channels.append((field - field.mean()) / (field.std() + 1e-9))
    image = np.stack(channels, axis=-1) * 40 + rng.uniform(70, 180, 3)
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(6):  # objects: edges are what JPEG spends bits on
        cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(size / 20, size / 4)]
        if rng.random() < 0.5:
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 < r * r
        else:
            mask = (abs(xx - cx) < r) & (abs(yy - cy) < r * rng.uniform(0.3, 1.5))
        image[mask] = image[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    return np.clip(image, 0, 255).astype(np.uint8)


def load_seeds(seed: int) -> tuple[list[Image.Image], list[str]]:
    """The seed photos (RGB), and where they came from."""
    images, sources = [], []
    for package, relpath in SEED_PHOTOS:
        path = _package_file(package, relpath)
        if path is None:
            continue
        with Image.open(path) as img:
            images.append(img.convert("RGB"))
        sources.append(f"{package}/{relpath}")
    if not images:
        rng = np.random.default_rng((seed, 99))
        for i in range(PROCEDURAL_SEEDS):
            images.append(Image.fromarray(_pink_noise(rng, PROCEDURAL_SIZE)))
            sources.append(f"procedural 1/f noise #{i}")
    return images, sources


def _pick(rng: np.random.Generator, weighted) -> object:
    values, weights = zip(*[(w[:-1] if len(w) > 2 else w[0], w[-1]) for w in weighted])
    weights = np.asarray(weights, np.float64)
    return values[int(rng.choice(len(values), p=weights / weights.sum()))]


def draw_size(rng: np.random.Generator) -> tuple[int, int]:
    u = rng.random()
    if u < MULTI_MEGAPIXEL_FRACTION:
        megapixels = math.exp(rng.uniform(math.log(1.0), math.log(10.0)))
        aspect = 4 / 3 if rng.random() < 0.6 else 3 / 2
        long_side = math.sqrt(megapixels * 1e6 * aspect)
        size = (round(long_side), round(long_side / aspect))
        return size if rng.random() < 0.7 else size[::-1]
    u -= MULTI_MEGAPIXEL_FRACTION
    if u < SQUARE_FRACTION:
        side = int(rng.choice([500, 500, 400, 300]))
        return side, side
    u -= SQUARE_FRACTION
    if u < SMALL_FRACTION:
        return int(rng.integers(150, 501)), int(rng.integers(150, 501))
    return _pick(rng, COMMON_SIZES)


def draw_mode(rng: np.random.Generator) -> str:
    u = rng.random()
    if u < GRAYSCALE_FRACTION:
        return "L"
    if u < GRAYSCALE_FRACTION + CMYK_FRACTION:
        return "CMYK"
    return "RGB"


def make_image(
    rng: np.random.Generator, seeds: list[Image.Image], size: tuple[int, int]
) -> Image.Image:
    """A random crop of a random seed photo, resized to `size`, jittered, with a little noise."""
    photo = seeds[int(rng.integers(len(seeds)))]
    width, height = size
    pw, ph = photo.size
    aspect = width / height
    # The largest crop of the target aspect, times a random area fraction.
    crop_w = min(pw, ph * aspect)
    scale = math.sqrt(rng.uniform(0.6, 1.0))
    crop_w, crop_h = crop_w * scale, crop_w * scale / aspect
    left, top = rng.uniform(0, pw - crop_w), rng.uniform(0, ph - crop_h)
    box = (left, top, left + crop_w, top + crop_h)
    image = photo.resize(size, Image.Resampling.BICUBIC, box=box).filter(SHARPEN)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = np.asarray(image, np.float32)
    gain = rng.uniform(0.85, 1.15, 3) * rng.uniform(0.8, 1.2)  # white balance and exposure
    gamma = rng.uniform(0.8, 1.25)
    pixels = 255.0 * (np.clip(pixels * gain, 0, 255) / 255.0) ** gamma
    pixels += rng.normal(0.0, NOISE_SIGMA, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8))


def make_photo_like(
    root: str, count: int, seed: int = 0, *, classes: int = 10, size_scale: float = 1.0
) -> dict:
    """Writes `count` JPEGs into root/class_XX/img_XXXXX.jpg; returns the manifest.

    size_scale shrinks every size (tests use small images); 1.0 is ImageNet's shape.
    """
    seeds, sources = load_seeds(seed)
    rng = np.random.default_rng((seed, 1))
    sizes, file_bytes, modes = [], [], {"RGB": 0, "L": 0, "CMYK": 0}
    for i in range(count):
        width, height = draw_size(rng)
        size = (max(16, round(width * size_scale)), max(16, round(height * size_scale)))
        image = make_image(rng, seeds, size)
        mode = draw_mode(rng)
        if mode != "RGB":
            image = image.convert(mode)
        quality = int(_pick(rng, QUALITIES))
        folder = os.path.join(root, f"class_{i % classes:02d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img_{i:05d}.jpg")
        image.save(path, format="JPEG", quality=quality)
        sizes.append(size)
        file_bytes.append(os.path.getsize(path))
        modes[mode] += 1
    widths, heights = np.array([s[0] for s in sizes]), np.array([s[1] for s in sizes])
    pixels = widths * heights
    manifest = {
        "count": count,
        "seed": seed,
        "classes": classes,
        "size_scale": size_scale,
        "sources": sources,
        "modes": modes,
        "median_wh": [int(np.median(widths)), int(np.median(heights))],
        "mean_wh": [round(float(widths.mean())), round(float(heights.mean()))],
        "multi_megapixel": int((pixels >= 1_000_000).sum()),
        "max_megapixels": round(float(pixels.max()) / 1e6, 2),
        "mean_kb": round(float(np.mean(file_bytes)) / 1e3, 1),
        "median_kb": round(float(np.median(file_bytes)) / 1e3, 1),
        "pixel_share_of_multi_megapixel": round(
            float(pixels[pixels >= 1_000_000].sum() / pixels.sum()), 3
        ),
    }
    with open(os.path.join(root, "manifest.json"), "w") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def make_cifar_like(root: str, count: int, seed: int = 0, *, classes: int = 10) -> str:
    """`count` 32x32 RGB images in CIFAR-10's python format (root/data_batch_1 plus
    batches.meta): photo crops downscaled to 32 px, as CIFAR's images are. Returns root."""
    seeds, _ = load_seeds(seed)
    rng = np.random.default_rng((seed, 2))
    pixels = np.empty((count, 32, 32, 3), np.uint8)
    for i in range(count):
        side = int(rng.integers(96, 257))  # a crop of an object-sized region, then 32 px
        image = make_image(rng, seeds, (side, side))
        pixels[i] = np.asarray(image.resize((32, 32), Image.Resampling.LANCZOS))
    labels = [int(x) for x in rng.integers(0, classes, count)]
    os.makedirs(root, exist_ok=True)
    batch = {b"data": pixels.transpose(0, 3, 1, 2).reshape(count, 3072), b"labels": labels}
    with open(os.path.join(root, "data_batch_1"), "wb") as f:
        pickle.dump(batch, f, protocol=4)
    meta = {b"label_names": [f"class{c}".encode() for c in range(classes)]}
    with open(os.path.join(root, "batches.meta"), "wb") as f:
        pickle.dump(meta, f, protocol=4)
    return root


def _define_flags() -> None:
    flags.DEFINE_string("output", None, "Folder to write (class_XX/img_XXXXX.jpg).")
    flags.DEFINE_integer("count", 1000, "Images to make.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed: the same seed gives the same files.")
    flags.DEFINE_integer("classes", 10, "Class folders.", lower_bound=1)
    flags.DEFINE_float("size_scale", 1.0, "Scale every image size by this.", lower_bound=0.01)
    flags.mark_flags_as_required(["output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    manifest = make_photo_like(
        f.output, f.count, f.seed, classes=f.classes, size_scale=f.size_scale
    )
    print(json.dumps(manifest, sort_keys=True))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
