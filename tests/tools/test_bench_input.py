"""tools.bench.input runs end to end on tiny images and reports figures; tools.bench.photo_like
makes the same files for the same seed, with ImageNet's shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest
from PIL import Image

from pipeline import conversion, dataset, records, transforms
from pipeline.conversion import images as conversion_images
from tools.bench import input as bench_input
from tools.bench import photo_like

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _bench(*args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    run = subprocess.run(
        [sys.executable, "-m", "tools.bench.input", *args],
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
def test_peer_mode_times_each_store_against_torchvision_on_the_same_jpegs():
    result = _bench(
        "--photo_like=16",
        "--photo_scale=0.15",
        "--image_size=24",
        "--batch_size=4",
        "--seconds=0.5",
        "--num_workers=1",
        "--shorter_side=40",
        "--full_decode",
        "--without_restarts",
        "--peer=torchvision",
        "--stage_sample=16",
    )
    names = [(r["name"], r["num_workers"]) for r in result["results"]]
    assert names == [
        ("original", 1),
        ("original_without_restarts", 1),
        ("bounded_40", 1),
        ("original_full_decode", 1),
        ("torchvision_original", 1),
        ("torchvision_bounded_40", 1),
        ("torchvision_source_files", 1),
    ]
    for r in result["results"]:
        _check(r)
    for key in (
        "bounded_40/torchvision_bounded_40 workers=1",
        "original/torchvision_original workers=1",
        "original/original_full_decode workers=1",
        "original/original_without_restarts workers=1",
        "original/torchvision_source_files workers=1",
    ):
        assert result["ratios"][key]["per_cpu_s"] > 0 and result["ratios"][key]["wall"] > 0
    assert result["photo_like"]["count"] == 16
    stores = result["stores"]
    assert stores["bounded_40"]["shorter_side"] == 40 and stores["bounded_40"]["jpeg_quality"] == 90
    assert stores["original"]["num_examples"] == stores["bounded_40"]["num_examples"] == 16
    assert result["load_average_before"] and result["image_size"] == 24
    # The breakdown covers every stage of our three pipelines, and the stages add up to at
    # most what the whole pipeline spent (the rest is Grain and glue).
    stages = result["stages_cpu_ms_per_image"]
    assert sorted(stages) == [
        "bounded_40 workers=1",
        "original workers=1",
        "original_full_decode workers=1",
        "original_without_restarts workers=1",
    ]
    for row in stages.values():
        assert row["decode"] > 0 and row["crop_and_resize"] > 0 and row["read"] > 0
        assert row["pipeline_total"] > 0
    # What decoding whole images would cost on the same sample.
    alternatives = result["alternatives_cpu_ms_per_image"]
    assert sorted(alternatives) == [
        "bounded_40",
        "original",
        "original_full_decode",
        "original_without_restarts",
    ]
    for row in alternatives.values():  # timed where partial decoding is built
        assert (row["whole_decode"] > 0) == transforms.window_decode_available()
        assert (row["window_decode"] > 0) == transforms.window_decode_available()
    # The stores hold JPEGs with restart markers, except the one converted without.
    marked = 2 if conversion_images.restarts_available() else None
    assert stores["original"]["jpeg_restart_mcus"] == marked
    assert stores["bounded_40"]["jpeg_restart_mcus"] == marked
    assert stores["original_without_restarts"]["jpeg_restart_mcus"] is None


def test_peer_jpegs_are_the_stored_bytes(tmp_path):
    """The peer reads exactly the bytes a bounded store holds, one file per record."""
    photo_like.make_photo_like(str(tmp_path / "jpeg"), 6, seed=1, classes=2, size_scale=0.1)
    store = str(tmp_path / "bounded")
    conversion.convert(
        "imagefolder", str(tmp_path / "jpeg"), store, progress=False, shorter_side=20
    )
    folder = bench_input.export_jpegs(store, str(tmp_path / "out"))
    files = [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]
    exported = sorted(open(path, "rb").read() for path in files)
    info = dataset.load_info(store)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    stored = sorted(records.decode_example(source[i]).image for i in range(len(source)))
    assert len(files) == 6 and exported == stored
    for path in files:
        with Image.open(path) as img:
            assert img.format == "JPEG" and min(img.size) == 20


@pytest.mark.slow  # runs the benchmark
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
