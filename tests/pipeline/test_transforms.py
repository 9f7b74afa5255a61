"""The batch path of the train transform (transforms.crop_into): libjpeg-turbo decode at the
reduced scale, OpenCV resize and flip straight into the batch slot, PIL for what it does not
take. It keeps random_resized_crop's draws exactly and its pixels within the PSNR bar."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from pipeline import conversion, dataset, transforms
from tools.bench import photo_like

PSNR_BAR = 35.0  # dB against the full decode through PIL (docs/measurements.md)

pytestmark = pytest.mark.skipif(
    not transforms.fast_path_available(), reason="simplejpeg/OpenCV not installed"
)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


@pytest.fixture(scope="module")
def photos():
    """Photo-like JPEGs: large ones (reduced decodes), ImageNet-sized ones, one grayscale."""
    seeds, _ = photo_like.load_seeds(0)
    rng = np.random.default_rng(5)
    sizes = [(1600, 1200), (1000, 1400), (500, 375), (333, 500), (500, 333), (180, 240)]
    blobs = [_jpeg(photo_like.make_image(rng, seeds, size)) for size in sizes]
    blobs.append(_jpeg(photo_like.make_image(rng, seeds, (640, 480)).convert("L")))
    return blobs


def _both(blob: bytes, aug: transforms.Augmentation, seed) -> tuple[np.ndarray, np.ndarray]:
    """crop_into's slot and PIL's full-decode crop for the same draws; the draws must match."""
    rng_fast, rng_pil = np.random.default_rng(seed), np.random.default_rng(seed)
    out = np.full((aug.image_size, aug.image_size, aug.channels), 7, np.uint8)
    transforms.crop_into(out, blob, aug, rng_fast)
    full = dataclasses.replace(aug, scaled_decode=False)
    reference = transforms.random_resized_crop(transforms.open_image(blob), full, rng_pil)
    # Same draws (box and flip): the generators end in the same state.
    assert rng_fast.bit_generator.state == rng_pil.bit_generator.state
    return out, reference


@pytest.mark.parametrize("channels", [3, 1])
def test_the_window_of_the_reduced_decode_matches_the_full_decode_within_the_bar(photos, channels):
    """Decode fidelity: at scale 1 the decode is PIL's to within 40 dB (the fast IDCT); the
    box of a reduced decode, resized by OpenCV, is within the bar of PIL's crop of the full
    decode."""
    aug = transforms.Augmentation(image_size=224, channels=channels, random_flip=False)
    full = dataclasses.replace(aug, scaled_decode=False)
    worst, reduced = np.inf, 0
    for i, blob in enumerate(photos):
        size = Image.open(io.BytesIO(blob)).size
        whole = transforms.stored_pixels(blob, channels)
        for k in range(8):
            box = transforms.random_box(*size, aug, np.random.default_rng((i, k)))
            scale = transforms.dct_scale((box[2] - box[0], box[3] - box[1]), 224)
            pixels = transforms.decode_scaled(blob, size, scale, channels)
            if scale == 1:  # the fast IDCT (and, in gray, libjpeg's luma against PIL's L)
                assert _psnr(pixels, whole) >= 40.0, _psnr(pixels, whole)
                continue
            reduced += 1
            window = np.empty((224, 224, channels), np.uint8)
            transforms.resize_reduced_into(window, pixels, box, scale)
            rng = np.random.default_rng((i, k))
            reference = transforms.random_resized_crop(transforms.open_image(blob), full, rng)
            worst = min(worst, _psnr(window, reference))
    assert reduced >= 4  # the large photos' big crops took the reduced decode
    assert worst >= PSNR_BAR, worst


@pytest.mark.parametrize("channels", [3, 1])
def test_the_batch_path_keeps_the_draws_and_is_close_to_pils_crop(photos, channels):
    """Same box and flip as random_resized_crop; only OpenCV's resampling differs from PIL's
    (area averaging, not a widened triangle, when reducing): on these photos at least 33 dB
    everywhere and 40 dB in the median."""
    aug = transforms.Augmentation(image_size=224, channels=channels)
    scores = []
    for i, blob in enumerate(photos):
        for k in range(8):
            out, reference = _both(blob, aug, (i, k))
            assert out.shape == reference.shape == (224, 224, channels)
            scores.append(_psnr(out, reference))
    assert min(scores) >= 33.0 and np.median(scores) >= 40.0, (min(scores), np.median(scores))


@pytest.mark.parametrize("size", [(1001, 750), (750, 1001), (1795, 1347)])
def test_a_reduced_decode_of_a_size_the_scale_does_not_divide_keeps_the_box_inside(size):
    """The reduced image is ceil(size / scale): the whole image as the box must map inside."""
    blob = _jpeg(Image.new("RGB", size, (90, 140, 200)))
    whole = transforms.Augmentation(image_size=224, crop_scale=(1.0, 1.0), random_flip=False)
    assert transforms.dct_scale(size, 224) > 1
    out = np.empty((224, 224, 3), np.uint8)
    transforms.crop_into(out, blob, whole, np.random.default_rng(0))
    assert np.abs(out.astype(int) - (90, 140, 200)).max() <= 2


def test_the_crop_geometry_is_random_resized_crops(photos):
    """Flip and box follow the same draws: a flipped crop is the mirror of the unflipped one."""
    aug = transforms.Augmentation(image_size=96)
    no_flip = dataclasses.replace(aug, random_flip=False)
    flipped = 0
    for k in range(12):
        seed = (3, k)
        out = np.empty((96, 96, 3), np.uint8)
        transforms.crop_into(out, photos[2], aug, np.random.default_rng(seed))
        plain = np.empty_like(out)
        transforms.crop_into(plain, photos[2], no_flip, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        transforms.random_box(500, 375, aug, rng)
        if rng.random() < 0.5:
            flipped += 1
            np.testing.assert_array_equal(out, plain[:, ::-1])
        else:
            np.testing.assert_array_equal(out, plain)
    assert 0 < flipped < 12


def test_what_the_fast_path_does_not_take_goes_through_pil_unchanged(photos):
    aug = transforms.Augmentation(image_size=64)
    png = io.BytesIO()
    Image.open(io.BytesIO(photos[2])).save(png, format="PNG")
    assert transforms.plan_crop(png.getvalue(), aug, np.random.default_rng(0)) is None
    out, reference = _both(png.getvalue(), dataclasses.replace(aug, scaled_decode=False), 1)
    np.testing.assert_array_equal(out, reference)


def test_a_cmyk_jpeg_is_read_and_converted_as_pil_does(photos, monkeypatch):
    """CMYK JPEGs are decoded (a window, as CMYK) and converted to RGB as PIL does, then
    resized like any other crop: the same draws, and as close to PIL's crop as RGB JPEGs'
    crops are (at least 33 dB); through PIL itself without partial decoding."""
    cmyk = _jpeg(Image.open(io.BytesIO(photos[3])).convert("CMYK"))
    aug = transforms.Augmentation(image_size=64)
    plan = transforms.plan_crop(cmyk, aug, np.random.default_rng(0))
    assert (plan is not None and plan.cmyk) == transforms.window_decode_available()
    scales = set()
    for seed in range(8):
        out, reference = _both(cmyk, aug, seed)
        # Without partial decoding PIL crops it (reducing as its draft does), near the full decode.
        assert _psnr(out, reference) >= 33.0, _psnr(out, reference)
        if transforms.window_decode_available():
            scales.add(transforms.plan_crop(cmyk, aug, np.random.default_rng(seed)).scale)
    # Full-scale and reduced decodes both (without partial decoding PIL takes them all).
    assert len(scales) > 1 or not transforms.window_decode_available(), scales
    monkeypatch.setattr(transforms, "_jpegcrop", None)
    out, reference = _both(cmyk, dataclasses.replace(aug, scaled_decode=False), 0)
    np.testing.assert_array_equal(out, reference)


def test_without_the_wheels_pil_does_everything(photos, monkeypatch):
    monkeypatch.setattr(transforms, "simplejpeg", None)
    aug = transforms.Augmentation(image_size=64, scaled_decode=False)
    out, reference = _both(photos[0], aug, 2)
    np.testing.assert_array_equal(out, reference)


def test_a_batch_holds_each_examples_crop_and_bad_bytes_name_the_record(photos, tmp_path):
    root = tmp_path / "in"
    for i, blob in enumerate(photos):
        (root / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"c{i % 2}" / f"{i}.jpg").write_bytes(blob)
    conversion.convert("imagefolder", str(root), str(tmp_path / "ds"), progress=False)
    info = dataset.load_info(str(tmp_path / "ds"))
    aug = transforms.Augmentation(image_size=32)
    batches = dataset.train_dataset(
        info, rows=np.arange(3), global_batch_size=3, num_steps=2, seed=4, augmentation=aug
    )
    by_id = {}
    for batch in batches:
        assert batch["image"].shape == (3, 32, 32, 3) and batch["image"].flags.c_contiguous
        by_id.update(zip(batch["example_id"].tolist(), batch["image"]))
    assert len(by_id) == 6
    # Each slot is crop_into of that example with its (seed, epoch, example id) generator.
    source = dataset._Records(info)  # pylint: disable=protected-access
    for position in range(info.num_examples):
        example = source.example(position)
        if example.example_id in by_id:
            rng = np.random.default_rng((4, dataset._AUGMENT_STREAM, 0, example.example_id))
            out = np.empty((32, 32, 3), np.uint8)
            transforms.crop_into(out, example.image, aug, rng)
            np.testing.assert_array_equal(by_id[example.example_id], out)
