"""Input pipeline throughput: decode + augment images per CPU-second, side by side.

    # photo-like JPEGs with ImageNet's shape: the originals and stores bounded to a 256 and a
    # 320 px shorter side, each against torchvision's loader on the same JPEG bytes, in this
    # one process (0 worker processes), with the per-stage breakdown:
    python -m tools.bench.input --peer=torchvision
    python -m tools.bench.input --photo_like=2000 --shorter_side=256,320 --full_decode \\
        --peer=torchvision --num_workers=2 --seconds=20 --rounds=2
    # CIFAR-sized images: raw records against PNG records
    python -m tools.bench.input --cifar_like=10000 --image_size=32 --num_workers=1
    # a converted dataset (and, for the peer, its JPEG folder):
    python -m tools.bench.input --data_dir=/data/imagenet_ar/train \\
        --source_dir=/data/imagenet/train --peer=torchvision --num_workers=8,16

Every configuration is timed in this one process, on the same images: our train pipeline
(pipeline.dataset.train_dataset: ArrayRecord read, decode, random-resized-crop, flip,
batching) on each store, and with --peer=torchvision, torchvision's loader (`ImageFolder` +
`RandomResizedCrop` + `RandomHorizontalFlip` + `PILToTensor`, `DataLoader` with the same batch
size and the same number of worker processes) on the same JPEG bytes as each store: its
records written back out as files (`torchvision_<store>`), and the source files themselves
(`torchvision_source_files`; the stores hold them re-encoded losslessly with restart markers,
the same pixels: pipeline/conversion/images.py). --without_restarts also times the originals
stored as they are (`original_without_restarts`). Wall-clock
images/s depends on how many cores the run got; images per CPU-second (user + system time of
this process and every live child process, Grain's and DataLoader's workers included, over
the timed window) does not, so that is the per-core figure compared. --rounds splits each
timed window into rounds run in alternating order, so that a change in the machine's load
affects every configuration alike.

The per-stage breakdown times, on one thread without Grain, each stage of our train
transform (transforms.crop_into) on a sample of every store: record read, JPEG header and
crop box, decode, crop and resize, flip, batch assembly, and PIL's path for the images the
fast path does not take; Grain's own overhead and the per-example glue are what the timed
pipeline spent per image beyond those. The last line printed is a JSON object with every
figure.
"""

from __future__ import annotations

import json
import math
import os
import random
import tempfile
import time

import grain
import numpy as np
import psutil  # a dependency of orbax-checkpoint and portpicker
from absl import app, flags, logging
from PIL import Image

from pipeline import conversion, dataset, records, transforms
from tools.bench import photo_like

# Commonly cited per-core decode + augment rates for ImageNet JPEGs at 224 px.
REFERENCES = {"tf.data": 250, "FFCV": 330}
PEERS = ("none", "torchvision")
# Ratios printed when both sides were timed, besides each store against torchvision on the
# same files: (numerator, denominator).
RATIOS = (
    ("original_full_decode", "torchvision_original"),
    ("original", "original_full_decode"),
    ("original", "original_without_restarts"),
    ("original", "torchvision_source_files"),
    ("raw", "png"),
    ("raw_handover", "png"),
)
PEER_PREFIX = "torchvision_"
STAGES = (
    "read",
    "header_and_box",
    "decode",
    "crop_and_resize",
    "flip",
    "batching",
    "pil_fallback",
)
# The decode and resize stages against what they would cost done otherwise, timed on the same
# images (the JPEGs partial decoding takes as RGB or gray) and not part of the stages' sum: the
# window decoded as the pipeline does; the whole image decoded (simplejpeg); the reduced crops
# resized by OpenCV's area averaging in one step.
ALTERNATIVES = ("window_decode", "whole_decode", "area_resize")


def _cpu_seconds() -> dict[int, float]:
    """user + system CPU seconds of this process and every live descendant, by pid.

    resource.getrusage(RUSAGE_CHILDREN) only counts children that have exited and been waited
    for, so it misses Grain's and DataLoader's workers, which live through the timed window.
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


def _quiesce(timeout: float = 30.0) -> None:
    """Waits until this process and its children are idle: the work a closed iterator still
    had in flight (Grain's threads finish the batches they started) must not be charged to the
    next configuration or stage."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = sum(_cpu_seconds().values())
        time.sleep(0.2)
        if sum(_cpu_seconds().values()) - before < 0.01:
            return


def _figures(images: int, wall: float, cpu: float) -> dict:
    return {
        "images": images,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 3),
        "images_per_s": round(images / max(wall, 1e-9), 1),
        "images_per_cpu_s": round(images / max(cpu, 1e-9), 1),
        "busy_cores": round(cpu / max(wall, 1e-9), 2),
    }


def _timed(batches, warmup: int, seconds: float) -> tuple[int, float, float]:
    """Takes `warmup` batches untimed, then counts images for `seconds`: (images, wall, cpu)."""
    for _ in range(warmup):
        next(batches)
    cpu0, t0, images = _cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        images += len(next(batches)["image"])
    return images, time.perf_counter() - t0, _cpu_delta(cpu0, _cpu_seconds())


class Pipeline:
    """Our train pipeline on one store."""

    def __init__(self, name: str, data_dir: str, *, scaled_decode=True, augment=True):
        self.name, self.info = name, dataset.load_info(data_dir)
        self.scaled_decode, self.augment = scaled_decode, augment
        self.epoch = 0

    def run(self, args, num_workers: int, seconds: float) -> tuple[int, float, float]:
        aug = transforms.Augmentation(
            image_size=args["image_size"],
            channels=self.info.channels,
            scaled_decode=self.scaled_decode,
        )
        self.epoch += 1  # each round draws another order and other crops
        ds = dataset.train_dataset(
            self.info,
            rows=np.arange(args["batch_size"]),
            global_batch_size=args["batch_size"],
            num_steps=10**9 // args["batch_size"],
            seed=args["seed"] * 1000 + self.epoch,
            augmentation=aug,
            num_workers=num_workers,
            num_threads=args["num_threads"],
            augment=self.augment,
        )
        it = iter(ds)
        try:
            # Warm-up: worker start-up and the first batch of each worker are not steady state.
            return _timed(it, 2 * max(1, num_workers) + 1, seconds)
        finally:
            if hasattr(it, "close"):
                it.close()  # stops the worker processes before the next configuration runs


class Torchvision:
    """torchvision's ImageFolder + RandomResizedCrop + flip + PILToTensor in a DataLoader."""

    def __init__(self, name: str, folder: str):
        self.name, self.folder = name, folder
        self.epoch = 0

    def run(self, args, num_workers: int, seconds: float) -> tuple[int, float, float]:
        import torch  # pylint: disable=g-import-not-at-top
        from torchvision import datasets  # pylint: disable=g-import-not-at-top
        from torchvision import transforms as tv  # pylint: disable=g-import-not-at-top

        size = args["image_size"]
        images = datasets.ImageFolder(
            self.folder,
            transform=tv.Compose(
                [tv.RandomResizedCrop(size), tv.RandomHorizontalFlip(), tv.PILToTensor()]
            ),
        )
        self.epoch += 1
        generator = torch.Generator().manual_seed(args["seed"] * 1000 + self.epoch)
        sampler = torch.utils.data.RandomSampler(images, num_samples=10**8, generator=generator)
        loader = torch.utils.data.DataLoader(
            images,
            batch_size=args["batch_size"],
            sampler=sampler,
            num_workers=num_workers,
            drop_last=True,
        )
        batches = ({"image": x} for x, _ in loader)
        threads = torch.get_num_threads()
        # DataLoader's workers run torch single-threaded; in this process, do the same (its
        # intra-op pool's spinning would otherwise count against the peer).
        torch.set_num_threads(1)
        try:
            return _timed(batches, 2 * max(1, num_workers) + 1, seconds)
        finally:
            batches.close()  # ends the DataLoader iterator, which stops its workers
            torch.set_num_threads(threads)


class PilLoop:
    """A plain single-process PIL loop on the JPEG files: open, convert, crop, flip."""

    name = "pil_loop"

    def __init__(self, paths: list[str]):
        self.paths = paths

    def run(self, args, num_workers: int, seconds: float) -> tuple[int, float, float]:
        del num_workers  # always this one process
        rng = random.Random(args["seed"])
        size = args["image_size"]

        def batches():
            while True:
                for _ in range(args["batch_size"]):
                    with Image.open(self.paths[rng.randrange(len(self.paths))]) as image:
                        _pil_random_resized_crop(image.convert("RGB"), size, rng)
                yield {"image": range(args["batch_size"])}

        return _timed(batches(), 1, seconds)


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


def _list_images(root: str) -> list[str]:
    paths = []
    for dirpath, _, files in os.walk(root, followlinks=True):
        paths += [
            os.path.join(dirpath, f)
            for f in files
            if os.path.splitext(f)[1].lower() in (".jpg", ".jpeg", ".png")
        ]
    if not paths:
        raise app.UsageError(f"no .jpg/.jpeg/.png files under {root!r}")
    return sorted(paths)


def describe_store(data_dir: str, sample: int = 256) -> dict:
    """Mean stored bytes and size of (up to) `sample` records, from their headers."""
    info = dataset.load_info(data_dir)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    step = max(1, len(source) // sample)
    blobs = [records.decode_example(source[i]).image for i in range(0, len(source), step)]
    sizes = [transforms.open_image(b).size for b in blobs]  # headers only
    return {
        "data_dir": data_dir,
        "num_examples": info.num_examples,
        "encoding": info.encoding,
        "jpeg_restart_mcus": records.read_metadata(data_dir).get("jpeg_restart_mcus"),
        "mean_stored_kb": round(float(np.mean([len(b) for b in blobs])) / 1e3, 1),
        "mean_stored_wh": [round(float(np.mean([s[k] for s in sizes]))) for k in (0, 1)],
        "mean_stored_megapixels": round(float(np.mean([w * h for w, h in sizes])) / 1e6, 3),
    }


def export_jpegs(data_dir: str, folder: str) -> str:
    """Writes every record's stored image bytes to folder/class_XXXX/ID.(jpg|png), as they are
    (for the peer to read the same bytes); returns folder."""
    info = dataset.load_info(data_dir)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    for i in range(len(source)):
        example = records.decode_example(source[i])
        suffix = ".png" if example.image[:4] == b"\x89PNG" else ".jpg"
        class_dir = os.path.join(folder, f"class_{example.label:04d}")
        os.makedirs(class_dir, exist_ok=True)
        with open(os.path.join(class_dir, f"{example.example_id}{suffix}"), "wb") as f:
            f.write(example.image)
    return folder


class _StageClock:
    """CPU seconds per stage, accumulated."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)
        self.alternatives = dict.fromkeys(ALTERNATIVES, 0.0)
        self._last = time.process_time()

    def time_alternative(self, name: str, run) -> None:
        started = time.process_time()
        run()
        self._last = time.process_time()
        self.alternatives[name] += self._last - started

    def lap(self, stage: str) -> None:
        now = time.process_time()
        self.seconds[stage] += now - self._last
        self._last = now


def _crop_in_stages(clock, out, image, aug, rng) -> None:
    """transforms.crop_into, its steps one by one, each charged to its stage."""
    plan = transforms.plan_crop(image, aug, rng)
    if plan is None:
        out[...] = transforms.random_resized_crop(transforms.open_image(image), aug, rng)
        clock.lap("pil_fallback")
        return
    clock.lap("header_and_box")
    pixels, x0, y0 = transforms.decode_window(image, plan, aug.channels)
    clock.lap("decode")
    transforms.resize_planned(out, pixels, x0, y0, plan)
    clock.lap("crop_and_resize")
    if aug.random_flip and rng.random() < 0.5:
        transforms.cv2.flip(out, 1, dst=out)
    clock.lap("flip")
    _time_alternatives(clock, image, plan, aug.channels, pixels, x0, y0, out)


def _time_alternatives(clock, image, plan, channels, pixels, x0, y0, out) -> None:
    if plan.cmyk or not transforms.window_decode_available():
        return
    clock.time_alternative("window_decode", lambda: transforms.decode_window(image, plan, channels))
    clock.time_alternative(
        "whole_decode", lambda: transforms.decode_scaled(image, plan.size, plan.scale, channels)
    )
    left, top, right, bottom = plan.box_in(x0, y0)
    crop = pixels[top:bottom, left:right]
    size = out.shape[0]
    if plan.scale == 1 and crop.shape[0] > size and crop.shape[1] > size:
        scratch = np.empty_like(out)
        clock.time_alternative(
            "area_resize",
            lambda: transforms.cv2.resize(
                crop, (size, size), dst=scratch, interpolation=transforms.cv2.INTER_AREA
            ),
        )


def stage_breakdown(data_dir: str, args: dict, scaled_decode: bool, sample: int) -> dict:
    """CPU milliseconds per image of each stage of our train transform, on one thread, over
    (up to) `sample` records of the store, in batches of args["batch_size"]."""
    info = dataset.load_info(data_dir)
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    aug = transforms.Augmentation(
        image_size=args["image_size"], channels=info.channels, scaled_decode=scaled_decode
    )
    positions = np.random.default_rng(args["seed"]).permutation(len(source))[:sample]
    _quiesce()
    clock, batch = _StageClock(), args["batch_size"]
    for start in range(0, len(positions), batch):
        chunk = positions[start : start + batch]
        images = np.empty((len(chunk), aug.image_size, aug.image_size, aug.channels), np.uint8)
        labels = np.empty(len(chunk), np.int32)
        clock.lap("batching")
        for i, position in enumerate(chunk.tolist()):
            example = records.decode_example(source[position])
            clock.lap("read")
            labels[i] = example.label
            rng = np.random.default_rng((args["seed"], example.example_id))
            clock.lap("batching")
            _crop_in_stages(clock, images[i], example.image, aug, rng)
    per_image = {k: 1e3 * v / len(positions) for k, v in clock.seconds.items()}
    alternatives = {k: 1e3 * v / len(positions) for k, v in clock.alternatives.items()}
    return {
        "stages": {k: round(v, 4) for k, v in per_image.items()},
        "alternatives": {k: round(v, 4) for k, v in alternatives.items()},
    }


def print_breakdown(breakdowns: dict, results: list[dict]) -> dict:
    """Prints CPU-ms per image by stage for each store, with Grain's overhead and the glue
    (the timed pipeline's CPU per image minus the stages), per worker count."""
    out = {}
    header = "".join(f"{k:>16}" for k in (*STAGES, "grain_and_glue", "pipeline_total"))
    print(f"per-stage CPU-ms per image (one thread; see the module docstring)\n{'':>24}{header}")
    for r in results:
        breakdown = breakdowns.get(r["name"])
        if breakdown is None:
            continue
        stages = breakdown["stages"]
        total = 1e3 / max(r["images_per_cpu_s"], 1e-9)
        row = {**stages, "grain_and_glue": round(total - sum(stages.values()), 4)}
        row["pipeline_total"] = round(total, 4)
        out[f"{r['name']} workers={r['num_workers']}"] = row
        label = f"{r['name']} w={r['num_workers']}"
        print(f"{label:>24}" + "".join(f"{v:16.3f}" for v in row.values()), flush=True)
    header = "".join(f"{k:>16}" for k in ALTERNATIVES)
    print(
        f"alternatives, CPU-ms per image of the same sample (not in the stages)\n{'':>24}{header}"
    )
    for name, breakdown in breakdowns.items():
        values = breakdown["alternatives"].values()
        print(f"{name:>24}" + "".join(f"{v:16.3f}" for v in values), flush=True)
    return out


def run_configs(configs: list, args: dict, worker_counts: list[int], rounds: int) -> list[dict]:
    """Times every configuration at every worker count, in `rounds` alternating-order rounds."""
    results = []
    for workers in worker_counts:
        totals = {c.name: [0, 0.0, 0.0] for c in configs}
        for r in range(rounds):
            for config in configs if r % 2 == 0 else configs[::-1]:
                _quiesce()
                images, wall, cpu = config.run(args, workers, args["seconds"] / rounds)
                total = totals[config.name]
                total[0] += images
                total[1] += wall
                total[2] += cpu
        for config in configs:
            figures = _figures(*totals[config.name])
            results.append({"name": config.name, "num_workers": workers, **figures})
            print(
                f"{config.name:>22}  workers={workers}: {figures['images_per_s']:8.1f} img/s "
                f"wall, {figures['images_per_cpu_s']:7.1f} img/CPU-s "
                f"({figures['busy_cores']} cores busy)",
                flush=True,
            )
    return results


def ratios(results: list[dict]) -> dict:
    """images/CPU-s ratios between configurations timed at the same worker count: each store
    against torchvision on its files, and RATIOS."""
    by = {(r["name"], r["num_workers"]): r for r in results}
    names = {r["name"] for r in results}
    peers = [(n[len(PEER_PREFIX) :], n) for n in sorted(names) if n.startswith(PEER_PREFIX)]
    out = {}
    for num, den in [*peers, *RATIOS]:
        for (name, workers), r in by.items():
            if name == num and (den, workers) in by:
                d = by[(den, workers)]
                out[f"{num}/{den} workers={workers}"] = {
                    "per_cpu_s": round(r["images_per_cpu_s"] / d["images_per_cpu_s"], 2),
                    "wall": round(r["images_per_s"] / d["images_per_s"], 2),
                }
    return out


def _define_flags() -> None:
    flags.DEFINE_string(
        "data_dir", None, "A converted dataset to time (tools.make_arrayrecord output)."
    )
    flags.DEFINE_string(
        "source_dir",
        None,
        "An imagefolder of JPEGs: the peer and the PIL loop read it; without --data_dir it is "
        "also converted (as it is, and bounded with --shorter_side/--max_side) and timed.",
    )
    flags.DEFINE_integer(
        "photo_like",
        512,
        "Without --data_dir and --source_dir: photo-like JPEGs with ImageNet's shape "
        "(tools/bench/photo_like.py) to make and time.",
        lower_bound=1,
    )
    flags.DEFINE_float(
        "photo_scale",
        1.0,
        "Scale the photo-like sizes by this (tests use small images).",
        lower_bound=0.01,
    )
    flags.DEFINE_integer(
        "cifar_like",
        0,
        "Instead: this many 32x32 images in CIFAR-10's format, converted to PNG records and "
        "to raw records, timed side by side (and the raw hand-over without augmentation).",
        lower_bound=0,
    )
    flags.DEFINE_list(
        "shorter_side",
        ["256", "320"],
        "Also time a store bounded to each of these shorter sides ('' for none).",
    )
    flags.DEFINE_integer(
        "max_side", None, "Also time a store bounded to this longer side.", lower_bound=1
    )
    flags.DEFINE_integer("jpeg_quality", 90, "JPEG quality of the bounded store.")
    flags.DEFINE_bool(
        "full_decode", False, "Also time the original store with scaled JPEG decoding off."
    )
    flags.DEFINE_bool(
        "jpeg_restarts",
        True,
        "Convert the stores with restart markers (tools.make_arrayrecord's default).",
    )
    flags.DEFINE_bool(
        "without_restarts",
        False,
        "Also time the originals converted without restart markers (their bytes as they are).",
    )
    flags.DEFINE_enum("peer", "none", PEERS, "Time this peer's loader on the same JPEG files.")
    flags.DEFINE_bool("pil_loop", False, "Also time a plain one-process PIL loop on the JPEGs.")
    flags.DEFINE_integer("image_size", 224, "Output crop size.", lower_bound=1)
    flags.DEFINE_integer("batch_size", 64, "Examples per batch.", lower_bound=1)
    flags.DEFINE_integer(
        "stage_sample",
        256,
        "Records of each store timed stage by stage (0: no breakdown).",
        lower_bound=0,
    )
    flags.DEFINE_list(
        "num_workers",
        ["0"],
        "Worker process counts to time, for every side (0: ours decode in threads of this "
        "process, the peer in this process).",
    )
    flags.DEFINE_integer(
        "num_threads",
        4,
        "Grain reading threads per process (the configs/default.py value).",
        lower_bound=1,
    )
    flags.DEFINE_float("seconds", 10.0, "Timed seconds per configuration, after warm-up.")
    flags.DEFINE_integer("rounds", 1, "Rounds per configuration, alternating order.", lower_bound=1)
    flags.DEFINE_integer("convert_workers", 1, "Processes converting the stores.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Seed for the images, shuffling and augmentation.")


def _convert(fmt: str, source: str, out: str, **options) -> tuple[str, float]:
    started = time.perf_counter()
    verbosity = logging.get_verbosity()
    logging.set_verbosity(logging.WARNING)  # not a line per downscaled image
    try:
        conversion.convert(fmt, source, out, progress=False, **options)
    finally:
        logging.set_verbosity(verbosity)
    return out, time.perf_counter() - started


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    f = flags.FLAGS
    args = {
        "image_size": f.image_size,
        "batch_size": f.batch_size,
        "num_threads": f.num_threads,
        "seconds": f.seconds,
        "seed": f.seed,
    }
    worker_counts = [int(w) for w in f.num_workers]
    result = {**args, "num_workers": worker_counts, "rounds": f.rounds, "stores": {}}
    configs, folder, peer_folders = [], None, {}
    with tempfile.TemporaryDirectory(prefix="bench_input-") as tmp:
        if f.cifar_like:
            source = photo_like.make_cifar_like(os.path.join(tmp, "cifar"), f.cifar_like, f.seed)
            for name, encoding in (("png", "encoded"), ("raw", "raw")):
                out, secs = _convert("cifar10", source, os.path.join(tmp, name), encoding=encoding)
                result["stores"][name] = {**describe_store(out), "convert_s": round(secs, 2)}
                configs.append(Pipeline(name, out))
            configs.append(Pipeline("raw_handover", os.path.join(tmp, "raw"), augment=False))
        elif f.data_dir:
            result["stores"]["dataset"] = describe_store(f.data_dir)
            configs.append(Pipeline("dataset", f.data_dir))
            folder = f.source_dir
            if folder:
                peer_folders["dataset"] = folder
        else:
            folder = f.source_dir
            if folder is None:
                folder = os.path.join(tmp, "jpeg")
                started = time.perf_counter()
                manifest = photo_like.make_photo_like(
                    folder, f.photo_like, f.seed, size_scale=f.photo_scale
                )
                manifest["made_s"] = round(time.perf_counter() - started, 1)
                result["photo_like"] = manifest
                print(f"photo-like JPEGs: {json.dumps(manifest, sort_keys=True)}")
            restarts = {"jpeg_restarts": f.jpeg_restarts}
            stores = [("original", restarts)]
            if f.without_restarts:
                stores.append(("original_without_restarts", {"jpeg_restarts": False}))
            for side in [int(s) for s in f.shorter_side] or ([None] if f.max_side else []):
                bound = {"shorter_side": side, "max_side": f.max_side}
                name = f"bounded_{side}" if side else f"bounded_max_{f.max_side}"
                stores.append((name, {**bound, "jpeg_quality": f.jpeg_quality, **restarts}))
            for name, options in stores:
                out, secs = _convert(
                    "imagefolder",
                    folder,
                    os.path.join(tmp, name),
                    num_workers=f.convert_workers,
                    **options,
                )
                result["stores"][name] = {
                    **describe_store(out),
                    **options,
                    "convert_s": round(secs, 2),
                }
                configs.append(Pipeline(name, out))
                if name != "original_without_restarts":  # its bytes are the source files
                    peer_folders[name] = export_jpegs(out, out + "_jpeg")
            # The files themselves: the original store holds them re-encoded with restart markers.
            peer_folders["source_files"] = folder
            if f.full_decode:
                configs.append(
                    Pipeline(
                        "original_full_decode", os.path.join(tmp, "original"), scaled_decode=False
                    )
                )
        for name, store in result["stores"].items():
            print(f"store {name}: {json.dumps(store, sort_keys=True)}")
        if f.peer == "torchvision":
            if not peer_folders:
                raise app.UsageError("--peer needs JPEG files: give --source_dir")
            configs += [Torchvision(PEER_PREFIX + n, d) for n, d in peer_folders.items()]
        if f.pil_loop:
            if folder is None:
                raise app.UsageError("--pil_loop needs JPEG files: give --source_dir")
            configs.append(PilLoop(_list_images(folder)))
        result["load_average_before"] = [round(x, 2) for x in os.getloadavg()]
        result["results"] = run_configs(configs, args, worker_counts, f.rounds)
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        if f.stage_sample and transforms.fast_path_available():
            breakdowns = {
                c.name: stage_breakdown(c.info.data_dir, args, c.scaled_decode, f.stage_sample)
                for c in configs
                if isinstance(c, Pipeline) and c.augment
            }
            result["stages_cpu_ms_per_image"] = print_breakdown(breakdowns, result["results"])
            result["alternatives_cpu_ms_per_image"] = {
                name: breakdown["alternatives"] for name, breakdown in breakdowns.items()
            }
    result["ratios"] = ratios(result["results"])
    for key, value in result["ratios"].items():
        print(f"ratio {key}: {value['per_cpu_s']:.2f} per CPU-second, {value['wall']:.2f} wall")
    print(
        "load average before/after: "
        f"{result['load_average_before']} / {result['load_average_after']}; published per-core "
        "references at 224 px on ImageNet JPEGs (images/s/core): "
        + ", ".join(f"{k} ~{v}" for k, v in REFERENCES.items())
    )
    result["references_images_per_s_per_core"] = REFERENCES
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
