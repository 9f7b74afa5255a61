"""tools/bench_input.py runs end to end on tiny images and reports figures; tools/photo_like.py
makes the same files for the same seed, with ImageNet's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tools import photo_like

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "tools.bench_input", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _check(figures: dict) -> None:
    assert figures["images"] > 0
    assert figures["images_per_s"] > 0 and figures["images_per_cpu_s"] > 0


@pytest.mark.slow
def test_peer_mode_times_both_sides_on_the_same_jpegs_with_the_same_workers():
    result = _bench(
        "--photo_like=16",
        "--photo_scale=0.15",
        "--image_size=24",
        "--batch_size=4",
        "--seconds=0.5",
        "--num_workers=1",
        "--shorter_side=40",
        "--full_decode",
        "--peer=torchvision",
    )
    names = [(r["name"], r["num_workers"]) for r in result["results"]]
    assert names == [
        ("original", 1),
        ("bounded", 1),
        ("original_full_decode", 1),
        ("torchvision", 1),
    ]
    for r in result["results"]:
        _check(r)
    for key in (
        "bounded/torchvision workers=1",
        "original/torchvision workers=1",
        "original/original_full_decode workers=1",
    ):
        assert result["ratios"][key]["per_cpu_s"] > 0 and result["ratios"][key]["wall"] > 0
    assert result["photo_like"]["count"] == 16
    stores = result["stores"]
    assert stores["bounded"]["shorter_side"] == 40 and stores["bounded"]["jpeg_quality"] == 90
    assert stores["original"]["num_examples"] == stores["bounded"]["num_examples"] == 16
    assert result["load_average_before"] and result["image_size"] == 24


def test_cifar_sized_images_raw_against_png():
    result = _bench(
        "--cifar_like=48",
        "--image_size=8",
        "--batch_size=8",
        "--seconds=0.3",
        "--num_workers=0",
    )
    assert [r["name"] for r in result["results"]] == ["png", "raw", "raw_handover"]
    for r in result["results"]:
        _check(r)
    assert result["stores"]["raw"]["encoding"] == "raw"
    assert result["stores"]["png"]["encoding"] == "encoded"
    assert result["ratios"]["raw/png workers=0"]["per_cpu_s"] > 0
    assert result["ratios"]["raw_handover/png workers=0"]["per_cpu_s"] > 0


def test_photo_like_is_deterministic_and_photo_shaped(tmp_path):
    a = photo_like.make_photo_like(str(tmp_path / "a"), 12, seed=3, classes=3, size_scale=0.1)
    b = photo_like.make_photo_like(str(tmp_path / "b"), 12, seed=3, classes=3, size_scale=0.1)
    c = photo_like.make_photo_like(str(tmp_path / "c"), 12, seed=4, classes=3, size_scale=0.1)
    files = lambda root: {  # noqa: E731
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, names in os.walk(root)
        for f in names
    }
    assert files(tmp_path / "a") == files(tmp_path / "b") and a == b
    assert files(tmp_path / "a") != files(tmp_path / "c") and c["count"] == 12
    assert sorted(os.listdir(tmp_path / "a")) == [
        "class_00",
        "class_01",
        "class_02",
        "manifest.json",
    ]
    assert a["sources"]  # real photos when scikit-image/scikit-learn are installed, else 1/f
    with Image.open(tmp_path / "a" / "class_00" / "img_00000.jpg") as img:
        assert img.format == "JPEG" and img.size == (50, 38)  # 500x375 scaled by 0.1
    # Photo-like, not noise: neighbouring pixels are strongly correlated.
    seeds, _ = photo_like.load_seeds(0)
    image = photo_like.make_image(np.random.default_rng(0), seeds, (500, 375))
    pixels = np.asarray(image.convert("L"), np.float64)
    assert np.corrcoef(pixels[:, :-1].ravel(), pixels[:, 1:].ravel())[0, 1] > 0.8
    # ImageNet's shape, from many draws: median 500x375, a few percent multi-megapixel,
    # a few grayscale and CMYK images.
    rng = np.random.default_rng(0)
    sizes = np.array([photo_like.draw_size(rng) for _ in range(20000)])
    assert tuple(np.median(sizes, axis=0)) == (500, 375)
    assert 0.01 < np.mean(sizes[:, 0] * sizes[:, 1] >= 1_000_000) < 0.04
    modes = [photo_like.draw_mode(rng) for _ in range(20000)]
    assert 0.01 < modes.count("L") / 20000 < 0.04 and 0.002 < modes.count("CMYK") / 20000 < 0.01
