"""The input pipeline: per-host sharding, global arrays, eval padding, resumable iterators."""

import dataclasses
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from pipeline import conversion, dataset, records, transforms
from tests import helpers

AUG = transforms.Augmentation(image_size=12, channels=1, crop_scale=(0.5, 1.0), random_flip=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    # 50 train examples: 6 steps of 8 per epoch, 2 dropped; 21 eval: 3 batches, 3 padded.
    return (
        helpers.make_mnist_subset(str(root / "train"), 0, 50),
        helpers.make_mnist_subset(str(root / "eval"), 100, 21),
    )


def _ids(ds):
    return [b["example_id"].tolist() for b in ds]


def test_every_epoch_sees_each_example_once_reshuffled(data):
    info = dataset.load_info(data[0])
    ds = dataset.train_dataset(
        info, rows=np.arange(8), global_batch_size=8, num_steps=18, seed=1, augmentation=AUG
    )
    steps = _ids(ds)
    epochs = [sum(steps[e * 6 : (e + 1) * 6], []) for e in range(3)]
    for epoch in epochs:
        assert len(epoch) == len(set(epoch)) == 48  # 50 - (50 mod 8) dropped
        assert set(epoch) <= set(range(50))
    assert epochs[0] != epochs[1] != epochs[2]  # reshuffled each epoch


def test_same_seed_same_batches_other_seed_differs(data):
    info = dataset.load_info(data[0])
    make = lambda seed: dataset.train_dataset(
        info, rows=np.arange(8), global_batch_size=8, num_steps=3, seed=seed, augmentation=AUG
    )
    first, again, other = list(make(5)), list(make(5)), list(make(6))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])
    assert _ids(first) != [b["example_id"].tolist() for b in other]


@pytest.mark.slow  # Grain worker processes
def test_worker_processes_do_not_change_the_batches(data):
    info = dataset.load_info(data[0])
    make = lambda workers: list(
        dataset.train_dataset(
            info,
            rows=np.arange(8),
            global_batch_size=8,
            num_steps=4,
            seed=2,
            augmentation=AUG,
            num_workers=workers,
        )
    )
    for a, b in zip(make(0), make(2), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["example_id"], b["example_id"])


def test_augmentation_depends_on_example_not_position(data):
    """Hosts with other rows still see identical pixels for the same (epoch, example)."""
    info = dataset.load_info(data[0])
    whole = next(
        iter(
            dataset.train_dataset(
                info, rows=np.arange(8), global_batch_size=8, num_steps=1, seed=4, augmentation=AUG
            )
        )
    )
    half = next(
        iter(
            dataset.train_dataset(
                info,
                rows=np.arange(4, 8),
                global_batch_size=8,
                num_steps=1,
                seed=4,
                augmentation=AUG,
            )
        )
    )
    np.testing.assert_array_equal(half["example_id"], whole["example_id"][4:])
    np.testing.assert_array_equal(half["image"], whole["image"][4:])


def test_eval_pads_last_batch_with_zero_mask(data):
    info = dataset.load_info(data[1])
    batches = list(
        dataset.eval_dataset(
            info, rows=np.arange(8), global_batch_size=8, image_size=12, crop_fraction=1.0
        )
    )
    assert len(batches) == 3
    mask = np.concatenate([b["mask"] for b in batches])
    ids = np.concatenate([b["example_id"] for b in batches])
    assert mask.sum() == 21 and sorted(ids[mask > 0]) == list(range(100, 121))
    assert (ids[mask == 0] == -1).all()


def test_too_small_dataset_and_bad_rows_are_clear_errors(data):
    info = dataset.load_info(data[1])
    with pytest.raises(ValueError, match="fewer than one global batch"):
        dataset.train_dataset(
            info, rows=np.arange(32), global_batch_size=32, num_steps=1, seed=0, augmentation=AUG
        )
    with pytest.raises(ValueError, match="do not fit"):
        dataset.train_dataset(
            info, rows=np.arange(4, 12), global_batch_size=8, num_steps=1, seed=0, augmentation=AUG
        )
    with pytest.raises(FileNotFoundError, match="metadata.json"):
        dataset.load_info(os.path.dirname(data[1]))


def _probe(data, out, processes, devices):
    cmd = [
        sys.executable,
        "-m",
        "launch.local_cluster",
        f"--num_processes={processes}",
        f"--devices_per_process={devices}",
        "--module=tests.multihost_probe",
        "--",
        f"--train_dir={data[0]}",
        f"--eval_dir={data[1]}",
        f"--out={out}",
        "--num_steps=9",
    ]
    run = subprocess.run(
        cmd,
        cwd=helpers.REPO,
        env=helpers.child_env(devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [json.load(open(os.path.join(out, f"process_{i}.json"))) for i in range(processes)]


@pytest.mark.slow
def test_two_hosts_feed_disjoint_shards_into_one_global_array(data, tmp_path):
    hosts = _probe(data, str(tmp_path / "two"), processes=2, devices=2)
    assert [h["process_count"] for h in hosts] == [2, 2]
    assert hosts[0]["rows"] == [0, 1, 2, 3] and hosts[1]["rows"] == [4, 5, 6, 7]
    for step in range(9):
        a, b = hosts[0]["loaded"][step], hosts[1]["loaded"][step]
        assert not set(a) & set(b)  # disjoint
        for h in hosts:  # the global array's rows are exactly what each host loaded
            assert h["global_ids"][step] == a + b
            assert h["shapes"][step] == [8, 12, 12, 1]
            assert h["specs"][step] == ["batch"]
    epoch0 = sum((h["loaded"][s] for h in hosts for s in range(6)), [])
    assert len(epoch0) == len(set(epoch0)) == 48  # the hosts together cover the epoch
    for h in hosts:  # eval: every example exactly once, padding masked out
        assert sorted(h["eval_ids"]) == list(range(100, 121))
        assert h["mask_total"] == 21

    # The same global batches as one process with all four devices.
    single = _probe(data, str(tmp_path / "one"), processes=1, devices=4)[0]
    assert single["global_ids"] == hosts[0]["global_ids"]


@pytest.mark.parametrize(
    "workers", [0, pytest.param(2, marks=pytest.mark.slow)]
)  # 2: Grain worker processes
def test_a_run_resumed_at_a_step_reads_exactly_what_the_whole_run_reads(data, workers):
    """The data position is the global step: nothing to checkpoint, nothing to lose."""
    info = dataset.load_info(data[0])
    make = lambda start: list(
        dataset.train_dataset(
            info,
            rows=np.arange(8),
            global_batch_size=8,
            num_steps=12,
            start_step=start,
            seed=7,
            augmentation=AUG,
            num_workers=workers,
        )
    )
    whole, resumed = make(0), make(4)
    assert len(resumed) == 8  # 12 steps, resumed after 4 (the second epoch starts at step 6)
    for a, b in zip(whole[4:], resumed, strict=True):
        np.testing.assert_array_equal(a["example_id"], b["example_id"])
        np.testing.assert_array_equal(a["image"], b["image"])


# ------------------------------------------------------------------------ damaged datasets


def _two_shards(directory):
    """MNIST examples 0..19 in two shards of 10 (shard 1, record 3 is example 13)."""
    conversion.convert(
        "mnist", helpers.MNIST, str(directory), num_shards=2, keep=lambda i: i < 20, progress=False
    )
    return str(directory)


def _edit_metadata(directory, edit):
    path = os.path.join(directory, "metadata.json")
    with open(path) as f:
        metadata = json.load(f)
    with open(path, "w") as f:
        f.write(edit(metadata))


def _set(key, value):
    return lambda m: json.dumps({**m, key: value})


def _drop(key):
    return lambda m: json.dumps({k: v for k, v in m.items() if k != key})


SHARD0, SHARD1 = "data-00000-of-00002.array_record", "data-00001-of-00002.array_record"


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: _edit_metadata(d, lambda m: json.dumps([m])), "holds a JSON list, not an"),
        (lambda d: _edit_metadata(d, lambda m: json.dumps(m)[:-20]), "is not valid JSON"),
        (lambda d: _edit_metadata(d, _drop("num_classes")), "lacks num_classes"),
        (lambda d: _edit_metadata(d, _drop("class_names")), "lacks class_names"),
        (lambda d: _edit_metadata(d, _set("schema_version", 3)), "schema version 3"),
        (lambda d: _edit_metadata(d, _set("encoding", "zip")), "encoding is 'zip'"),
        (lambda d: _edit_metadata(d, _drop("encoding")), "lacks encoding"),
        (lambda d: _edit_metadata(d, _set("schema_version", 2)), "schema version 2"),
        (lambda d: _edit_metadata(d, _set("num_classes", "10")), "num_classes is '10', expected"),
        (lambda d: _edit_metadata(d, _set("num_examples", True)), "num_examples is True"),
        (lambda d: _edit_metadata(d, _set("class_names", list("abc"))), "3 class_names for"),
        (lambda d: _edit_metadata(d, _set("shards", ["../x", SHARD1])), "shards is"),
        (lambda d: _edit_metadata(d, _set("image_shape", [28, 28, 2])), "image_shape is"),
        # Hand-edited counts: the shards' own record counts disagree.
        (
            lambda d: _edit_metadata(d, _set("num_examples", 25)),
            "metadata.json says 25 examples but the shards hold 20",
        ),
        (
            lambda d: _edit_metadata(d, _set("shard_sizes", [12, 8])),
            f"says shard {SHARD0} holds 12 records, it holds 10",
        ),
        (lambda d: os.remove(os.path.join(d, SHARD1)), "lacks shard files"),
        (
            lambda d: open(os.path.join(d, SHARD1), "r+b").truncate(100),
            f"shard {SHARD1} is not a readable ArrayRecord file (",
        ),
        (
            lambda d: open(os.path.join(d, SHARD1), "wb").write(os.urandom(1 << 17)),
            f"shard {SHARD1} is not a readable ArrayRecord file (",
        ),
    ],
)
def test_load_info_rejects_malformed_datasets_in_one_line(tmp_path, damage, message):
    directory = _two_shards(tmp_path / "ds")
    assert dataset.load_info(directory).shard_sizes == (10, 10)
    damage(directory)
    with pytest.raises(records.DatasetError) as error:
        dataset.load_info(directory)
    assert message in str(error.value) and directory in str(error.value)
    assert "\n" not in str(error.value)


def test_missing_dataset_is_a_dataset_error_and_a_file_not_found_error(tmp_path):
    for missing in (tmp_path / "nothing", tmp_path):
        with pytest.raises(records.DatasetNotFoundError) as error:
            dataset.load_info(str(missing))
        assert isinstance(error.value, records.DatasetError)
        assert isinstance(error.value, FileNotFoundError)


def _rewrite_record(directory, shard, index, change):
    """Replaces one record of a shard, rewriting the shard as the converter writes it."""
    path = os.path.join(directory, shard)
    reader = array_record_module.ArrayRecordReader(path)
    all_records = list(reader.read_all())
    reader.close()
    all_records[index] = change(all_records[index])
    writer = array_record_module.ArrayRecordWriter(path, conversion.WRITER_OPTIONS)
    for record in all_records:
        writer.write(record)
    writer.close()


def _relabel(label):
    return lambda r: records.encode_example(13, label, records.decode_example(r).image)


_RECORD = f"shard {SHARD1} record 3"


def _png_of(record):
    """The record's digit as PNG bytes (the demo data is stored raw)."""
    out = io.BytesIO()
    transforms.decode_image(records.decode_example(record).image, 1).save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    "change, message",
    [
        (_relabel(10), f"{_RECORD} (example id 13): label 10 is outside 0..9"),
        (_relabel(-1), f"{_RECORD} (example id 13): label -1 is outside 0..9"),
        (lambda r: b"XXXX" + r[4:], f"{_RECORD}: not a dataset record (starts with b'XXXX'"),
        (
            lambda r: records.encode_example(13, 3, b"plain text, not an image"),
            f"{_RECORD} (example id 13): cannot decode the image (UnidentifiedImageError",
        ),
        (
            lambda r: r[:-30],  # raw pixels cut short
            f"{_RECORD} (example id 13): cannot decode the image (ValueError: raw image header",
        ),
        (
            lambda r: records.encode_example(13, 3, _png_of(r)[:-30]),  # PIL fails only when
            f"{_RECORD} (example id 13): cannot decode the image (",  # it decodes the pixels
        ),
    ],
)
def test_bad_records_name_dataset_shard_record_and_example(tmp_path, change, message):
    directory = _two_shards(tmp_path / "ds")
    _rewrite_record(directory, SHARD1, 3, change)
    info = dataset.load_info(directory)
    readers = {
        "train": lambda: dataset.train_dataset(
            info, rows=np.arange(4), global_batch_size=4, num_steps=5, seed=0, augmentation=AUG
        ),
        "eval": lambda: dataset.eval_dataset(
            info, rows=np.arange(4), global_batch_size=4, image_size=12, crop_fraction=1.0
        ),
    }
    for name, make in readers.items():
        with pytest.raises(records.DatasetError) as error:
            list(make())  # one epoch: every record is read
        assert str(error.value).startswith(f"{directory!r}: {message}"), (name, error.value)
        assert "\n" not in str(error.value)


@pytest.mark.slow  # Grain worker processes
def test_bad_record_error_crosses_grain_worker_processes(tmp_path):
    directory = _two_shards(tmp_path / "ds")
    _rewrite_record(directory, SHARD1, 3, _relabel(12))
    ds = dataset.train_dataset(
        dataset.load_info(directory),
        rows=np.arange(4),
        global_batch_size=4,
        num_steps=5,
        seed=0,
        augmentation=AUG,
        num_workers=2,
    )
    with pytest.raises(records.DatasetError, match="example id 13.: label 12 is outside 0..9"):
        list(ds)


# ------------------------------------------------------------------------ encodings


@pytest.fixture(scope="module")
def png_and_raw(tmp_path_factory):
    """The same 24 MNIST digits as PNG records and as raw records."""
    root = tmp_path_factory.mktemp("encodings")
    keep = lambda i: i < 24  # noqa: E731
    out = {}
    for encoding in ("encoded", "raw"):
        out[encoding] = str(root / encoding)
        conversion.convert(
            "mnist", helpers.MNIST, out[encoding], keep=keep, progress=False, encoding=encoding
        )
    return out


def test_raw_records_augment_to_the_same_pixels_as_png_records(png_and_raw):
    png, raw = (dataset.load_info(png_and_raw[e]) for e in ("encoded", "raw"))
    assert (png.encoding, raw.encoding) == ("encoded", "raw")
    assert png.image_shape == raw.image_shape == (28, 28, 1)
    aug = transforms.Augmentation(image_size=20, channels=1)  # flips and crops, as ImageNet's
    make = lambda info: list(  # noqa: E731
        dataset.train_dataset(
            info, rows=np.arange(8), global_batch_size=8, num_steps=6, seed=3, augmentation=aug
        )
    )
    for a, b in zip(make(png), make(raw), strict=True):
        np.testing.assert_array_equal(a["example_id"], b["example_id"])
        np.testing.assert_array_equal(a["image"], b["image"])  # PNG is lossless: identical
    make_eval = lambda info: list(  # noqa: E731
        dataset.eval_dataset(
            info, rows=np.arange(8), global_batch_size=8, image_size=20, crop_fraction=0.875
        )
    )
    for a, b in zip(make_eval(png), make_eval(raw), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_one_decode_function_reads_every_encoding(png_and_raw):
    source = {
        e: dataset.grain.sources.ArrayRecordDataSource(list(dataset.load_info(d).shard_paths))
        for e, d in png_and_raw.items()
    }
    for i in (0, 5):
        png = records.decode_example(source["encoded"][i]).image
        raw = records.decode_example(source["raw"][i]).image
        assert png.startswith(b"\x89PNG") and raw.startswith(b"RAW8")
        for channels, mode in ((1, "L"), (3, "RGB")):
            a, b = transforms.decode_image(png, channels), transforms.decode_image(raw, channels)
            assert a.mode == b.mode == mode and a.size == b.size == (28, 28)
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # The stored array of a raw record, without PIL: a view of the record's bytes.
        pixels = transforms.raw_pixels(raw)
        assert pixels.shape == (28, 28, 1) and pixels.base is not None
        np.testing.assert_array_equal(pixels[:, :, 0], np.asarray(transforms.decode_image(png, 1)))
        np.testing.assert_array_equal(transforms.stored_pixels(png, 1), pixels)
    with pytest.raises(ValueError, match="raw image header says 28x28x1"):
        transforms.raw_pixels(raw[:-1])


@pytest.mark.parametrize(
    "workers", [0, pytest.param(2, marks=pytest.mark.slow)]
)  # 2: Grain worker processes
def test_raw_records_are_handed_over_unaugmented_a_batch_at_a_time(png_and_raw, workers):
    info = dataset.load_info(png_and_raw["raw"])
    aug = transforms.Augmentation(image_size=28, channels=1)
    make = lambda **kw: list(  # noqa: E731
        dataset.train_dataset(
            info,
            rows=np.arange(4, 8),
            global_batch_size=8,
            num_steps=7,
            seed=5,
            augmentation=aug,
            augment=False,
            **kw,
        )
    )
    batches = make(num_workers=workers)
    assert len(batches) == 7
    source = dataset.grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    by_id = {e.example_id: e for e in (records.decode_example(r) for r in source)}
    for batch in batches:
        assert batch["image"].shape == (4, 28, 28, 1) and batch["image"].dtype == np.uint8
        for image, label, example_id in zip(batch["image"], batch["label"], batch["example_id"]):
            np.testing.assert_array_equal(image, transforms.raw_pixels(by_id[example_id].image))
            assert label == by_id[example_id].label
    # The same rows, order and ids as the augmented path; resumable at any step.
    augmented = list(
        dataset.train_dataset(
            info, rows=np.arange(4, 8), global_batch_size=8, num_steps=7, seed=5, augmentation=aug
        )
    )
    assert [b["example_id"].tolist() for b in batches] == [
        b["example_id"].tolist() for b in augmented
    ]
    for a, b in zip(batches[3:], make(start_step=3), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
    # The per-example path (PNG records) hands over the same arrays.
    png = dataset.load_info(png_and_raw["encoded"])
    from_png = list(
        dataset.train_dataset(
            png,
            rows=np.arange(4, 8),
            global_batch_size=8,
            num_steps=7,
            seed=5,
            augmentation=aug,
            augment=False,
        )
    )
    for a, b in zip(batches, from_png, strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["label"].dtype == b["label"].dtype and a["example_id"].dtype == np.int64


def test_hand_over_needs_a_fixed_image_size(tmp_path):
    folder = tmp_path / "imgs" / "a"
    os.makedirs(folder)
    for i, size in enumerate([(5, 6), (7, 6)]):
        Image.new("RGB", size).save(folder / f"{i}.png")
    conversion.convert("imagefolder", str(tmp_path / "imgs"), str(tmp_path / "ds"), progress=False)
    with pytest.raises(ValueError, match="no fixed image_shape.*--encoding=raw"):
        dataset.train_dataset(
            dataset.load_info(str(tmp_path / "ds")),
            rows=np.arange(2),
            global_batch_size=2,
            num_steps=1,
            seed=0,
            augmentation=transforms.Augmentation(image_size=4),
            augment=False,
        )


# ------------------------------------------------------------------------ scaled JPEG decode


def _psnr(a, b):
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return 10 * np.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def large_jpegs(tmp_path_factory):
    """Photo-like JPEGs large enough for reduced decoding, in an imagefolder and converted."""
    from tools.bench import photo_like  # pylint: disable=g-import-not-at-top

    root = tmp_path_factory.mktemp("jpegs")
    seeds, _ = photo_like.load_seeds(0)
    rng = np.random.default_rng(0)
    blobs = []
    for i, size in enumerate([(1200, 900), (900, 1200), (1600, 1000), (700, 520)] * 3):
        image = photo_like.make_image(rng, seeds, size)
        if i == 5:
            image = image.convert("L")  # grayscale JPEGs take the reduced path too
        os.makedirs(root / "in" / f"c{i % 2}", exist_ok=True)
        path = root / "in" / f"c{i % 2}" / f"{i:02d}.jpg"
        image.save(path, quality=90)
        blobs.append(path.read_bytes())
    conversion.convert("imagefolder", str(root / "in"), str(root / "ds"), progress=False)
    return blobs, str(root / "ds")


def test_scaled_decode_keeps_the_crop_and_is_close_to_the_full_decode(large_jpegs, monkeypatch):
    blobs, _ = large_jpegs
    drafts = []
    real_draft = transforms.JpegImagePlugin.JpegImageFile.draft
    monkeypatch.setattr(
        transforms.JpegImagePlugin.JpegImageFile,
        "draft",
        lambda self, mode, size: drafts.append(size) or real_draft(self, mode, size),
    )
    aug = transforms.Augmentation(image_size=224)
    full = dataclasses.replace(aug, scaled_decode=False)
    worst, reduced = np.inf, 0
    for i, blob in enumerate(blobs):
        for k in range(6):
            rng_a, rng_b = np.random.default_rng((i, k)), np.random.default_rng((i, k))
            before = len(drafts)
            a = transforms.random_resized_crop(transforms.open_image(blob), aug, rng_a)
            reduced += len(drafts) > before
            b = transforms.random_resized_crop(transforms.open_image(blob), full, rng_b)
            # Same draws (crop box and flip), so the generators end in the same state.
            assert rng_a.bit_generator.state == rng_b.bit_generator.state
            assert a.shape == b.shape == (224, 224, 3)
            worst = min(worst, _psnr(a, b))
        a = transforms.center_crop(transforms.open_image(blob), 224, 3, 0.875)
        b = transforms.center_crop(transforms.open_image(blob), 224, 3, 0.875, scaled_decode=False)
        worst = min(worst, _psnr(a, b))
    assert reduced >= 20  # most of these crops were decoded at a reduced scale
    assert len(drafts) - reduced == 9  # every centre crop but those of the 700x520 images
    assert worst >= 35.0, worst


def test_scaled_decode_picks_the_largest_reduction_the_crop_allows():
    m = transforms.DCT_SCALE_MARGIN
    assert transforms.dct_scale((1000, 1000), 224) == 2
    assert transforms.dct_scale((8 * m * 224, 8 * m * 224), 224) == 8
    assert transforms.dct_scale((8 * m * 224, 4 * m * 224 - 1), 224) == 2
    assert transforms.dct_scale((2 * m * 224 - 1, 5000), 224) == 1
    # Small crops never draft: the same pixels as a full decode.
    blob = io.BytesIO()
    Image.new("RGB", (400, 300), (10, 200, 30)).save(blob, format="JPEG")
    image = transforms.open_image(blob.getvalue())
    out = transforms.center_crop(image, 224, 3, 0.875)
    assert image.size == (400, 300) and out.shape == (224, 224, 3)


@pytest.mark.parametrize(
    "workers", [0, pytest.param(2, marks=pytest.mark.slow)]
)  # 2: Grain worker processes
def test_scaled_decode_is_deterministic_and_resumable(large_jpegs, workers):
    info = dataset.load_info(large_jpegs[1])
    aug = transforms.Augmentation(image_size=64)
    make = lambda start, w: list(  # noqa: E731
        dataset.train_dataset(
            info,
            rows=np.arange(4),
            global_batch_size=4,
            num_steps=8,
            start_step=start,
            seed=11,
            augmentation=aug,
            num_workers=w,
        )
    )
    whole, resumed = make(0, 0), make(3, workers)
    assert len(resumed) == 5
    for a, b in zip(whole[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["example_id"], b["example_id"])
        np.testing.assert_array_equal(a["image"], b["image"])
