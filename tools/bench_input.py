"""Input pipeline throughput: decode + augment images per CPU-second, against plain PIL.

    python -m tools.bench_input --data_dir=/data/imagenet_ar/train \
        --source_dir=/data/imagenet/train --num_workers=0,8,16
    python -m tools.bench_input --seconds=10    # synthetic JPEGs: runs anywhere, no download

For each --num_workers it times the real train pipeline (pipeline.dataset.train_dataset:
ArrayRecord read, JPEG decode, random-resized-crop, flip, batching) and, as a baseline, a plain
single-process PIL loop doing the same work per image. Wall-clock images/s depends on how many
cores the run got; images per CPU-second (user + system time of this process and its live
worker processes over the timed window) does not, so that is the per-core figure compared.
The last line printed is a JSON object with every figure.
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import tempfile
import time

from absl import app
from absl import flags
import grain
import numpy as np
from PIL import Image
import psutil  # a dependency of orbax-checkpoint and portpicker

from pipeline import dataset
from pipeline import records
from pipeline import transforms
from pipeline import conversion

# Commonly cited per-core decode + augment rates for ImageNet JPEGs at 224 px.
REFERENCES = {"tf.data": 250, "FFCV": 330}
SYNTHETIC_SIZE = (500, 375)  # about the average ImageNet image
SYNTHETIC_CLASSES = 10


def _cpu_seconds() -> dict[int, float]:
    """user + system CPU seconds of this process and every live descendant, by pid.

    resource.getrusage(RUSAGE_CHILDREN) only counts children that have exited and been waited
    for, so it misses Grain's workers, which live through the timed window.
    """
    me = psutil.Process()
    times = {}
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
            times[proc.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return times


def _cpu_delta(start: dict[int, float], end: dict[int, float]) -> float:
    return sum(t - start.get(pid, 0.0) for pid, t in end.items())


def _figures(images: int, wall: float, cpu: float) -> dict:
    return {
        "images": images,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_s": round(images / wall, 1),
        "images_per_cpu_s": round(images / max(cpu, 1e-9), 1),
        "busy_cores": round(cpu / wall, 2),
    }


def make_synthetic_imagefolder(root: str, count: int, seed: int) -> str:
    """`count` JPEGs of smooth gradients and waves plus noise: decodes like a photo, not a blank."""
    rng = np.random.default_rng(seed)
    width, height = SYNTHETIC_SIZE
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) / max(width, height)
    for i in range(count):
        label = i % SYNTHETIC_CLASSES
        folder = os.path.join(root, f"class_{label:02d}")
        os.makedirs(folder, exist_ok=True)
        pixels = np.empty((height, width, 3), np.float32)
        for c in range(3):
            gx, gy, base = rng.uniform(-120, 120), rng.uniform(-120, 120), rng.uniform(60, 200)
            fx, fy, phase = rng.uniform(2, 30), rng.uniform(2, 30), rng.uniform(0, 2 * math.pi)
            pixels[..., c] = base + gx * x + gy * y + 40 * np.sin(fx * x + fy * y + phase)
        # Noise is what makes the entropy-coded size (and decode cost) photo-like.
        pixels += rng.normal(0, 20, pixels.shape).astype(np.float32)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        image.save(os.path.join(folder, f"img_{i:05d}.jpg"), format="JPEG", quality=90)
    return root


def bench_pipeline(
    info: dataset.DatasetInfo,
    image_size: int,
    batch_size: int,
    num_workers: int,
    num_threads: int,
    seconds: float,
    seed: int,
) -> dict:
    aug = transforms.Augmentation(image_size=image_size, channels=info.channels)
    ds = dataset.train_dataset(
        info,
        rows=np.arange(batch_size),
        global_batch_size=batch_size,
        num_steps=10**9 // batch_size,
        seed=seed,
        augmentation=aug,
        num_workers=num_workers,
        num_threads=num_threads,
    )
    it = iter(ds)
    try:
        # Warm-up: worker start-up and the first batch of each worker are not steady state.
        for _ in range(2 * max(1, num_workers) + 1):
            batch = next(it)
        assert batch["image"].shape == (batch_size, image_size, image_size, info.channels)
        cpu0, t0, images = _cpu_seconds(), time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            images += len(next(it)["image"])
        wall, cpu = time.perf_counter() - t0, _cpu_delta(cpu0, _cpu_seconds())
    finally:
        if hasattr(it, "close"):
            it.close()  # stops the worker processes before the next configuration runs
    return {"num_workers": num_workers, "num_threads": num_threads, **_figures(images, wall, cpu)}


def _pil_random_resized_crop(image: Image.Image, size: int, rng: random.Random) -> np.ndarray:
    """torchvision-style RandomResizedCrop(scale=(0.08, 1), ratio=(3/4, 4/3)) + flip, in PIL."""
    width, height = image.size
    box = (0, 0, width, height)
    for _ in range(10):
        area = width * height * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        w, h = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            box = (left, top, left + w, top + h)
            break
    image = image.crop(box).resize((size, size), Image.BILINEAR)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(image)


def bench_pil(load, count: int, image_size: int, seconds: float, seed: int) -> dict:
    """`load(i)` gives a file path or encoded bytes; the loop is what a plain loader does."""
    rng = random.Random(seed)
    order = list(range(count))
    rng.shuffle(order)

    def one(i: int) -> None:
        source = load(order[i % count])
        if isinstance(source, bytes):
            source = io.BytesIO(source)
        with Image.open(source) as image:
            _pil_random_resized_crop(image.convert("RGB"), image_size, rng)

    for i in range(min(count, 8)):  # warm-up: file cache, PIL plug-in imports
        one(i)
    cpu0, t0, images = _cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        one(images)
        images += 1
    wall, cpu = time.perf_counter() - t0, _cpu_delta(cpu0, _cpu_seconds())
    return _figures(images, wall, cpu)


def _list_images(root: str) -> list[str]:
    paths = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        paths += [
            os.path.join(dirpath, f)
            for f in files
            if os.path.splitext(f)[1].lower() in (".jpg", ".jpeg", ".png")
        ]
    if not paths:
        raise app.UsageError(f"no .jpg/.jpeg/.png files under --source_dir={root!r}")
    return sorted(paths)


def run(
    data_dir: str,
    source_dir: str | None,
    image_size: int,
    batch_size: int,
    worker_counts: list[int],
    num_threads: int,
    seconds: float,
    seed: int,
) -> dict:
    info = dataset.load_info(data_dir)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    sample = [records.decode_example(source[i]).image for i in range(min(len(source), 64))]
    sizes = [Image.open(io.BytesIO(b)).size for b in sample]  # header only, no decode
    result = {
        "data_dir": data_dir,
        "num_examples": info.num_examples,
        "image_size": image_size,
        "batch_size": batch_size,
        "mean_encoded_kb": round(float(np.mean([len(b) for b in sample])) / 1e3, 1),
        "mean_source_wh": [round(float(np.mean([s[k] for s in sizes]))) for k in (0, 1)],
        "pipeline": [],
        "references_images_per_s_per_core": REFERENCES,
    }
    print(
        f"data: {info.num_examples} examples in {data_dir}, mean "
        f"{result['mean_encoded_kb']} kB, mean size {result['mean_source_wh']} px"
    )

    for workers in worker_counts:
        r = bench_pipeline(info, image_size, batch_size, workers, num_threads, seconds, seed)
        result["pipeline"].append(r)
        print(
            f"pipeline  workers={workers} threads={num_threads}: {r['images_per_s']:8.1f} img/s "
            f"wall, {r['images_per_cpu_s']:7.1f} img/CPU-s ({r['busy_cores']} cores busy)"
        )

    if source_dir:
        paths = _list_images(source_dir)
        load, count, what = paths.__getitem__, len(paths), f"files in {source_dir}"
    else:
        # Record bytes read once up front: the baseline decodes exactly the pipeline's inputs.
        blobs = [records.decode_example(source[i]).image for i in range(len(source))]
        load, count, what = blobs.__getitem__, len(blobs), "record bytes in memory"
    pil = bench_pil(load, count, image_size, seconds, seed)
    result["pil"] = {"source": what, **pil}
    print(
        f"PIL loop  1 process ({what}): {pil['images_per_s']:8.1f} img/s wall, "
        f"{pil['images_per_cpu_s']:7.1f} img/CPU-s ({pil['busy_cores']} cores busy)"
    )

    result["ratio_per_cpu_s"] = {
        str(r["num_workers"]): round(r["images_per_cpu_s"] / pil["images_per_cpu_s"], 2)
        for r in result["pipeline"]
    }
    for workers, ratio in result["ratio_per_cpu_s"].items():
        print(f"ratio pipeline/PIL per CPU-second, workers={workers}: {ratio:.2f}")
    print(
        "published per-core references at 224 px on ImageNet JPEGs (images/s/core): "
        + ", ".join(f"{k} ~{v}" for k, v in REFERENCES.items())
    )
    return result


def _define_flags() -> None:
    flags.DEFINE_string(
        "data_dir",
        None,
        "ArrayRecord dataset (tools.make_arrayrecord output). "
        "Without it, a synthetic JPEG set is generated and converted.",
    )
    flags.DEFINE_string(
        "source_dir",
        None,
        "Imagefolder of JPEGs the PIL baseline reads from "
        "disk (default: it decodes the record bytes of --data_dir).",
    )
    flags.DEFINE_integer(
        "synthetic_jpeg", 512, "Synthetic JPEGs to make without --data_dir.", lower_bound=1
    )
    flags.DEFINE_integer("image_size", 224, "Output crop size.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Examples per batch.", lower_bound=1)
    flags.DEFINE_list(
        "num_workers",
        ["0", "1", "2"],
        "Grain worker counts to time (0: decode in threads of this process).",
    )
    flags.DEFINE_integer(
        "num_threads",
        4,
        "Grain reading threads per process (the configs/default.py value).",
        lower_bound=1,
    )
    flags.DEFINE_float("seconds", 10.0, "Timed window per configuration, after warm-up.")
    flags.DEFINE_integer("seed", 0, "Seed for synthetic images, shuffling and augmentation.")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    worker_counts = [int(w) for w in f.num_workers]
    with tempfile.TemporaryDirectory(prefix="bench_input-") as tmp:
        data_dir = f.data_dir
        if data_dir is None:
            started = time.perf_counter()
            folder = make_synthetic_imagefolder(os.path.join(tmp, "jpeg"), f.synthetic_jpeg, f.seed)
            data_dir = os.path.join(tmp, "arrayrecord")
            conversion.convert("imagefolder", folder, data_dir, progress=False)
            print(
                f"synthetic: {f.synthetic_jpeg} JPEGs {SYNTHETIC_SIZE[0]}x{SYNTHETIC_SIZE[1]} "
                f"made and converted in {time.perf_counter() - started:.1f} s"
            )
        result = run(
            data_dir,
            f.source_dir,
            f.image_size,
            f.batch_size,
            worker_counts,
            f.num_threads,
            f.seconds,
            f.seed,
        )
        result["synthetic_jpeg"] = f.synthetic_jpeg if f.data_dir is None else 0
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
