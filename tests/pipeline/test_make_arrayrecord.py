"""Tests for pipeline/conversion/ and its command line tools/make_arrayrecord.py, on tiny
datasets written by the tests themselves."""

import gzip
import io
import os
import pickle
import resource
import shutil
import signal
import struct
import subprocess
import sys
import types
import zlib

import numpy as np
import pytest
from absl import logging
from array_record.python.array_record_data_source import ArrayRecordDataSource
from PIL import Image

from launch.status import ExitStatus
from pipeline import conversion as mar
from pipeline import records, transforms
from pipeline.conversion import images as images_lib
from pipeline.conversion import progress
from pipeline.conversion.images import ImageOptions, stored_size
from tests import helpers
from tests.hostile.harness import assert_one_clear_line

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------ tiny inputs


def _pixels(seed, shape):
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def make_imagefolder(root):
    """3 classes of PNG, JPEG, grayscale and BMP images; returns {relpath: expected}."""
    expected = {}  # relpath -> ("pixels", array) or ("bytes", file bytes)
    layout = {
        "bird": ["a.png", "b.jpg", "c.bmp"],
        "cat": ["a.jpeg", "b.png"],
        "dog": ["x.png", "y.JPG"],
    }
    for c, (cls, names) in enumerate(sorted(layout.items())):
        os.makedirs(root / cls)
        for i, name in enumerate(names):
            path = root / cls / name
            gray = cls == "cat" and name.endswith(".png")
            pixels = _pixels(10 * c + i, (6, 5) if gray else (6, 5, 3))
            ext = name.lower().rsplit(".", 1)[1]
            fmt = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "bmp": "BMP"}[ext]
            Image.fromarray(pixels).save(path, format=fmt)
            expected[f"{cls}/{name}"] = (
                ("bytes", path.read_bytes()) if fmt == "JPEG" else ("pixels", pixels)
            )
    return expected


def write_idx(path, magic, array, gz=True):
    data = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)


def make_mnist(folder, prefix="t10k", n=20, gz=True):
    os.makedirs(folder, exist_ok=True)
    images, labels = _pixels(1, (n, 28, 28)), np.arange(n, dtype=np.uint8) % 10
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", 2051, images, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", 2049, labels, gz)
    return images, labels


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar(folder, fine):
    """cifar10: 2 train batches of 3 + test batch of 2; cifar100: train 4 + test 2."""
    os.makedirs(folder)
    key = b"fine_labels" if fine else b"labels"
    batches = {"train": [4], "test": [2]} if fine else {"data_batch_": [3, 3], "test_batch": [2]}
    out, seed = {}, 0
    for name, sizes in batches.items():
        for b, size in enumerate(sizes):
            seed += 1
            hwc = _pixels(seed, (size, 32, 32, 3))
            labels = [(seed * 7 + i) % (100 if fine else 10) for i in range(size)]
            fname = f"{name}{b + 1}" if name == "data_batch_" else name
            _dump(
                folder / fname,
                {
                    b"data": hwc.transpose(0, 3, 1, 2).reshape(size, 3072),
                    key: labels,
                    b"batch_label": b"x",
                },
            )
            out.setdefault("test" if "test" in name else "train", []).append((hwc, labels))
    names = [f"class{i}".encode() for i in range(100 if fine else 10)]
    _dump(
        folder / ("meta" if fine else "batches.meta"),
        {b"fine_label_names" if fine else b"label_names": names},
    )
    return {
        s: (np.concatenate([h for h, _ in v]), sum((labels for _, labels in v), []))
        for s, v in out.items()
    }


def read_all(out_dir):
    metadata = records.read_metadata(str(out_dir))
    source = ArrayRecordDataSource(records.shard_paths(str(out_dir), metadata))
    return metadata, [records.decode_example(source[i]) for i in range(len(source))]


def decode_pixels(image_bytes):
    """The stored pixels of any encoding: HxW for grayscale, HxWx3 for RGB."""
    if records.is_raw(image_bytes):
        pixels = transforms.raw_pixels(image_bytes)
        return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
    with Image.open(io.BytesIO(image_bytes)) as img:
        return np.asarray(img)


def all_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("jpeg_restarts", [True, False])
def test_imagefolder_round_trip(tmp_path, jpeg_restarts):
    """JPEGs are stored with restart markers, the same pixels (with jpeg_restarts=False, or
    where pipeline._jpegcrop is not built, byte for byte); PNG as it is; BMP as PNG."""
    jpeg_restarts = jpeg_restarts and images_lib.restarts_available()
    expected = make_imagefolder(tmp_path / "in")
    meta = mar.convert(
        "imagefolder",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        progress=True,
        jpeg_restarts=jpeg_restarts,
    )
    assert meta == read_all(tmp_path / "out")[0]
    meta, examples = read_all(tmp_path / "out")
    assert meta["class_names"] == ["bird", "cat", "dog"] and meta["num_classes"] == 3
    assert meta["num_examples"] == len(expected) == len(examples)
    assert meta["image_format"] == "mixed" and meta["image_shape"] is None
    assert meta["skipped"] == {"count": 0, "files": []} and meta["source"] == "in"
    assert meta["writer_options"] == mar.WRITER_OPTIONS and "group_size:1" in mar.WRITER_OPTIONS
    assert meta["jpeg_restart_mcus"] == (2 if jpeg_restarts else None)
    for i, (rel, (kind, want)) in enumerate(sorted(expected.items())):
        ex = examples[i]
        assert (ex.example_id, ex.label) == (i, ["bird", "cat", "dog"].index(rel.split("/")[0]))
        if kind == "bytes" and not jpeg_restarts:
            assert ex.image == want
        elif kind == "bytes":
            assert ex.image != want and helpers.jpeg_restart_interval(ex.image) in (1, 2)
            np.testing.assert_array_equal(decode_pixels(ex.image), decode_pixels(want))
        else:
            assert ex.image.startswith(b"\x89PNG")  # PNG as is, BMP re-encoded as PNG
            np.testing.assert_array_equal(decode_pixels(ex.image), want)


@pytest.mark.skipif(not images_lib.restarts_available(), reason="pipeline._jpegcrop not built")
def test_a_re_encoding_that_decodes_otherwise_is_not_kept(tmp_path, monkeypatch):
    """The markers are kept only where PIL decodes the re-encoding to the original's very
    pixels: a re-encoding one grey level off, one that raises anything at all, and a host
    without the module all store the bytes as they are."""
    image = Image.fromarray(_pixels(3, (24, 64, 3)))  # 4 MCUs a row: intervals of 2
    original = io.BytesIO()
    image.save(original, format="JPEG", quality=90)
    data = original.getvalue()
    assert helpers.jpeg_restart_interval(images_lib.restart_indexed(data)) == 2

    def off_by_one(blob, _):
        out = io.BytesIO()
        pixels = np.asarray(Image.open(io.BytesIO(blob))).astype(np.int16) + 1
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(out, format="JPEG")
        return out.getvalue()

    def fails(blob, _):
        raise MemoryError("no room")

    for fake in (off_by_one, fails):
        monkeypatch.setattr(images_lib, "_jpegcrop", types.SimpleNamespace(restart_index=fake))
        assert images_lib.restart_indexed(data) == data
    monkeypatch.setattr(images_lib, "_jpegcrop", None)
    assert images_lib.restart_indexed(data) == data
    os.makedirs(tmp_path / "in" / "a")
    (tmp_path / "in" / "a" / "x.jpg").write_bytes(data)
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    assert meta["jpeg_restart_mcus"] is None
    assert read_all(tmp_path / "out")[1][0].image == data


@pytest.mark.skipif(not images_lib.restarts_available(), reason="pipeline._jpegcrop not built")
def test_an_mpo_is_stored_as_its_first_frame(tmp_path):
    """A camera's MPO (JPEG frames one after another, indexed in an APP2 segment): readers
    decode its first frame, and that is what the re-encoding keeps, without the index."""
    frames = [Image.fromarray(_pixels(seed, (32, 48, 3))) for seed in (4, 5)]
    path = tmp_path / "in" / "a" / "x.jpg"
    os.makedirs(path.parent)
    frames[0].save(path, format="MPO", save_all=True, append_images=frames[1:])
    with Image.open(path) as mpo:
        assert mpo.format == "MPO" and mpo.n_frames == 2
        first = np.asarray(mpo)
    mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    stored = read_all(tmp_path / "out")[1][0].image
    with Image.open(io.BytesIO(stored)) as img:
        assert img.format == "JPEG" and getattr(img, "n_frames", 1) == 1
        np.testing.assert_array_equal(np.asarray(img), first)
    assert helpers.jpeg_restart_interval(stored) in (1, 2) and b"MPF\0" not in stored


@pytest.mark.parametrize("gz, encoding", [(True, None), (False, "raw"), (True, "encoded")])
def test_mnist_round_trip(tmp_path, gz, encoding):
    images, labels = make_mnist(tmp_path / "in", prefix="train", gz=gz)
    meta, examples = (
        mar.convert(
            "mnist", str(tmp_path / "in"), str(tmp_path / "out"), progress=False, encoding=encoding
        ),
        read_all(tmp_path / "out")[1],
    )
    raw = encoding != "encoded"  # raw pixels are mnist's default
    assert meta["split"] == "train"  # the only split present
    assert meta["num_examples"] == 20 and meta["class_names"] == [str(d) for d in range(10)]
    assert meta["image_shape"] == [28, 28, 1]
    assert meta["encoding"] == ("raw" if raw else "encoded")
    assert meta["image_format"] == ("raw" if raw else "png")
    assert meta["schema_version"] == 1
    assert [e.example_id for e in examples] == list(range(20))
    assert [e.label for e in examples] == labels.tolist()
    for e in examples:
        assert e.image.startswith(b"RAW8" if raw else b"\x89PNG")
        np.testing.assert_array_equal(decode_pixels(e.image), images[e.example_id])
    stats = meta["stored_size"]
    assert stats["width"]["p50"] == stats["height"]["p100"] == 28
    assert stats["bytes"]["p50"] == (12 + 784 if raw else stats["bytes"]["p50"])


def test_mnist_split_choice_and_bad_headers(tmp_path):
    make_mnist(tmp_path / "in", prefix="train")
    make_mnist(tmp_path / "in", prefix="t10k", n=10)
    with pytest.raises(mar.ConversionError, match="--split"):
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    meta = mar.convert(
        "mnist", str(tmp_path / "in"), str(tmp_path / "out"), split="test", progress=False
    )
    assert meta["num_examples"] == 10 and meta["split"] == "test"
    # Label count disagreeing with the image count, then a wrong magic number.
    write_idx(tmp_path / "in" / "t10k-labels-idx1-ubyte.gz", 2049, np.zeros(9, np.uint8))
    with pytest.raises(mar.ConversionError, match="10 images but .* 9 labels"):
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "o2"), split="test")
    write_idx(tmp_path / "in" / "t10k-labels-idx1-ubyte.gz", 2051, np.zeros(10, np.uint8))
    with pytest.raises(mar.ConversionError, match="magic number is 2051, expected 2049"):
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "o3"), split="test")
    assert not (tmp_path / "o2").exists() and not (tmp_path / "o3").exists()


@pytest.mark.parametrize("fmt, encoding", [("cifar10", None), ("cifar100", "encoded")])
def test_cifar_round_trip(tmp_path, fmt, encoding):
    fine = fmt == "cifar100"
    inner = tmp_path / "in" / ("cifar-100-python" if fine else "cifar-10-batches-py")
    data = make_cifar(inner, fine)
    for split in ("train", "test"):
        # cifar10 from the parent of the extracted folder, cifar100 from the folder itself.
        src = tmp_path / "in" if not fine else inner
        out = tmp_path / f"out-{split}"
        meta = mar.convert(fmt, str(src), str(out), split=split, progress=False, encoding=encoding)
        _, examples = read_all(out)
        hwc, labels = data[split]
        assert meta["encoding"] == ("encoded" if encoding else "raw")
        assert all(e.image.startswith(b"\x89PNG" if encoding else b"RAW8") for e in examples)
        assert meta["num_examples"] == len(labels) and meta["image_shape"] == [32, 32, 3]
        assert meta["num_classes"] == (100 if fine else 10) and meta["class_names"][3] == "class3"
        assert [e.example_id for e in examples] == list(range(len(labels)))
        assert [e.label for e in examples] == labels
        for e in examples:
            np.testing.assert_array_equal(decode_pixels(e.image), hwc[e.example_id])
    with pytest.raises(mar.ConversionError, match="--split"):
        mar.convert(fmt, str(inner), str(tmp_path / "o"))


# ------------------------------------------------------------------------ bad files


def _add_bad_files(root):
    good_jpeg = (root / "bird" / "b.jpg").read_bytes()
    (root / "bird" / "b2_truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    good_png = (root / "dog" / "x.png").read_bytes()
    (root / "dog" / "x2_truncated.png").write_bytes(good_png[: len(good_png) - 30])
    (root / "cat" / "garbage.jpg").write_bytes(b"this is not a jpeg" * 10)
    (root / "cat" / "notes.txt").write_text("not an image")
    return ["bird/b2_truncated.jpg", "cat/garbage.jpg", "cat/notes.txt", "dog/x2_truncated.png"]


def test_bad_files_are_skipped_with_warning(tmp_path, monkeypatch):
    make_imagefolder(tmp_path / "in")
    bad = _add_bad_files(tmp_path / "in")
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    assert meta["skipped"] == {"count": 4, "files": bad}
    assert meta["num_examples"] == 7 and meta["num_source_examples"] == 11
    for name in bad:
        assert any(name in w for w in warnings), (name, warnings)
    # Ids are positions among all candidates: skipped files leave gaps, others keep theirs.
    candidates = sorted(
        bad
        + [
            f"{c}/{n}"
            for c, ns in {
                "bird": ["a.png", "b.jpg", "c.bmp"],
                "cat": ["a.jpeg", "b.png"],
                "dog": ["x.png", "y.JPG"],
            }.items()
            for n in ns
        ]
    )
    _, examples = read_all(tmp_path / "out")
    assert [e.example_id for e in examples] == [
        i for i, rel in enumerate(candidates) if rel not in bad
    ]


def test_fifos_and_devices_are_skipped_not_read(tmp_path, monkeypatch):
    """A FIFO blocks whoever opens it; a link to /dev/zero never ends: neither is an image."""
    make_imagefolder(tmp_path / "in")
    os.mkfifo(tmp_path / "in" / "cat" / "pipe.png")
    os.symlink("/dev/zero", tmp_path / "in" / "dog" / "zero.jpg")
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    assert meta["skipped"] == {"count": 2, "files": ["cat/pipe.png", "dog/zero.jpg"]}
    assert sum("not a regular file" in w for w in warnings) == 2, warnings


def test_strict_fails_naming_file_and_leaves_nothing(tmp_path):
    make_imagefolder(tmp_path / "in")
    (tmp_path / "in" / "dog" / "z_garbage.jpg").write_bytes(b"garbage")
    # Several shards, the bad file last: the failure comes after shards were written.
    with pytest.raises(mar.ConversionError, match="dog/z_garbage.jpg"):
        mar.convert(
            "imagefolder",
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            strict=True,
            num_shards=3,
            progress=False,
        )
    assert os.listdir(tmp_path) == ["in"]  # no output, no temporary folder
    # A failing --overwrite conversion keeps the old dataset intact.
    (tmp_path / "in" / "dog" / "z_garbage.jpg").rename(tmp_path / "garbage.jpg")
    mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    before = all_bytes(tmp_path / "out")
    (tmp_path / "garbage.jpg").rename(tmp_path / "in" / "cat" / "z.jpg")
    with pytest.raises(mar.ConversionError, match="cat/z.jpg"):
        mar.convert(
            "imagefolder",
            str(tmp_path / "in"),
            str(tmp_path / "out"),
            strict=True,
            overwrite=True,
            progress=False,
        )
    assert all_bytes(tmp_path / "out") == before
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]


def test_existing_output_needs_overwrite(tmp_path):
    make_mnist(tmp_path / "in")
    (tmp_path / "out").mkdir()  # an empty folder is fine
    mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    with pytest.raises(mar.ConversionError, match="already exists.*--overwrite"):
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    meta = mar.convert(
        "mnist",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        num_shards=2,
        overwrite=True,
        progress=False,
    )
    assert sorted(os.listdir(tmp_path / "out")) == sorted(meta["shards"] + ["metadata.json"])


# ------------------------------------------------------------------------ CLI errors


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tools.make_arrayrecord", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_expected_errors(tmp_path):
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    make_imagefolder(tmp_path / "imgs")
    (tmp_path / "imgs" / "cat" / "bad.png").write_bytes(b"\x89PNG broken")
    cases = [
        (["--format=imagefolder", f"--input={tmp_path / 'empty'}"], "no files in the class"),
        (["--format=mnist", f"--input={tmp_path / 'nope'}"], "does not exist"),
        (["--format=mnist", f"--input={tmp_path / 'empty'}"], "no mnist files"),
        (["--format=jpegs", f"--input={tmp_path}"], "value should be one of"),
        (["--format=imagefolder", f"--input={tmp_path / 'imgs'}", "--strict"], "cat/bad.png"),
    ]
    for args, message in cases:
        result = run_cli(*args, f"--output={tmp_path / 'out'}")
        assert result.returncode == ExitStatus.BAD_INPUT, args
        assert_one_clear_line(result.stderr, message)
        assert not (tmp_path / "out").exists()
    result = run_cli(
        "--format=imagefolder", f"--input={tmp_path / 'imgs'}", f"--output={tmp_path / 'out'}"
    )
    assert result.returncode == 0, result.stderr
    assert "skipping cat/bad.png" in result.stderr
    assert records.read_metadata(str(tmp_path / "out"))["skipped"]["count"] == 1


# ------------------------------------------------------------------------ determinism, order


def test_deterministic_across_runs_and_worker_counts(tmp_path):
    make_imagefolder(tmp_path / "imgs")
    _add_bad_files(tmp_path / "imgs")
    _photo(0, 90, 60).save(tmp_path / "imgs" / "dog" / "z_big.jpg")
    make_mnist(tmp_path / "mnist")
    for fmt, src, options in (
        ("imagefolder", "imgs", {}),
        ("imagefolder", "imgs", {"shorter_side": 5, "jpeg_quality": 85}),
        ("mnist", "mnist", {}),
        ("mnist", "mnist", {"encoding": "encoded"}),
    ):
        outs = []
        for run, workers in enumerate((1, 1, 2)):
            out = tmp_path / f"{fmt}-{len(options)}-{run}"
            mar.convert(
                fmt,
                str(tmp_path / src),
                str(out),
                num_shards=3,
                num_workers=workers,
                progress=False,
                **options,
            )
            outs.append(all_bytes(out))
        assert len(outs[0]) == 4 and outs[0] == outs[1] == outs[2], (fmt, options)


def test_keep_filter_and_shard_order(tmp_path):
    images, labels = make_mnist(tmp_path / "in")
    meta = mar.convert(
        "mnist",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        num_shards=3,
        keep=lambda i: i % 3 != 0,
        progress=False,
    )
    kept = [i for i in range(20) if i % 3 != 0]
    assert meta["num_examples"] == len(kept) == sum(meta["shard_sizes"])
    assert meta["skipped"]["count"] == 0 and meta["num_source_examples"] == 20
    assert meta["shards"] == [f"data-0000{i}-of-00003.array_record" for i in range(3)]
    assert meta["class_counts"] == np.bincount(labels[kept], minlength=10).tolist()
    # Global record order across the shard files is example order; each shard is a block.
    _, examples = read_all(tmp_path / "out")
    assert [e.example_id for e in examples] == kept
    assert [e.label for e in examples] == labels[kept].tolist()
    start = 0
    for name, size in zip(meta["shards"], meta["shard_sizes"]):
        shard = ArrayRecordDataSource([str(tmp_path / "out" / name)])
        ids = [records.decode_example(shard[i]).example_id for i in range(len(shard))]
        assert ids == kept[start : start + size]
        start += size
    with pytest.raises(mar.ConversionError, match="keep filter"):
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "o2"), keep=lambda i: False)


# ------------------------------------------------------------------------ output safety


def tree_bytes(root):
    """{relpath: bytes} of every file under root (symlinks not followed)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = open(path, "rb").read()
    return out


def test_output_never_is_holds_or_lies_in_the_input(tmp_path):
    make_imagefolder(tmp_path / "data" / "in")
    before = tree_bytes(tmp_path)
    cases = [
        (tmp_path / "data" / "in", True, "is the input"),
        (tmp_path / "data", True, "contains the input"),
        (tmp_path, True, "contains the input"),
        # Inside the input: the next conversion would read it as a class.
        (tmp_path / "data" / "in" / "converted", False, "lies inside the input"),
    ]
    for output, overwrite, message in cases:
        with pytest.raises(mar.ConversionError, match=message):
            mar.convert(
                "imagefolder",
                str(tmp_path / "data" / "in"),
                str(output),
                overwrite=overwrite,
                progress=False,
            )
        assert tree_bytes(tmp_path) == before, output
    # Compared as real paths: the same folder through a symlinked parent.
    os.symlink(tmp_path / "data", tmp_path / "alias")
    with pytest.raises(mar.ConversionError, match="is the input"):
        mar.convert(
            "imagefolder",
            str(tmp_path / "data" / "in"),
            str(tmp_path / "alias" / "in"),
            overwrite=True,
            progress=False,
        )
    assert tree_bytes(tmp_path / "data") == tree_bytes(tmp_path / "alias") != {}
    assert {f"data/{k}": v for k, v in tree_bytes(tmp_path / "data").items()} == before


def test_overwrite_replaces_only_datasets_this_tool_wrote(tmp_path):
    make_mnist(tmp_path / "in")
    convert = lambda out: mar.convert(
        "mnist", str(tmp_path / "in"), str(out), overwrite=True, progress=False
    )
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("\\chapter{Results}")
    with pytest.raises(mar.ConversionError, match="not a dataset written by make_arrayrecord"):
        convert(tmp_path / "thesis")
    assert (tmp_path / "thesis" / "thesis.tex").read_text() == "\\chapter{Results}"
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(mar.ConversionError, match="is a file"):
        convert(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    # A dataset with something else in it (hidden files too): that may be someone's work.
    convert(tmp_path / "ds")
    for extra in ("README.md", ".notes", "sub/x"):
        os.makedirs(os.path.dirname(tmp_path / "ds" / extra), exist_ok=True)
        (tmp_path / "ds" / extra).write_text("mine")
        with pytest.raises(mar.ConversionError, match="did not write"):
            convert(tmp_path / "ds")
        assert (tmp_path / "ds" / extra).read_text() == "mine"
        os.remove(tmp_path / "ds" / extra)
    os.rmdir(tmp_path / "ds" / "sub")
    # The dataset alone is replaced, leaving no .old-* or .tmp-* folder.
    meta = mar.convert(
        "mnist", str(tmp_path / "in"), str(tmp_path / "ds"), num_shards=2, overwrite=True
    )
    assert sorted(os.listdir(tmp_path / "ds")) == sorted(meta["shards"] + ["metadata.json"])
    assert sorted(os.listdir(tmp_path)) == ["ds", "in", "notes.txt", "thesis"]


def test_overwrite_onto_a_symlink_replaces_the_link(tmp_path):
    make_mnist(tmp_path / "in")
    mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "v1"), progress=False)
    v1 = all_bytes(tmp_path / "v1")
    (tmp_path / "thesis").mkdir()
    (tmp_path / "thesis" / "thesis.tex").write_text("x")
    for target in ("v1", "thesis"):
        os.symlink(tmp_path / target, tmp_path / "current")
        result = run_cli(
            "--format=mnist",
            f"--input={tmp_path / 'in'}",
            f"--output={tmp_path / 'current'}",
            "--num_shards=2",
            "--overwrite",
        )
        assert result.returncode == 0, result.stderr
        assert "Traceback" not in result.stderr
        assert not os.path.islink(tmp_path / "current")  # a real folder replaced the link
        assert records.read_metadata(str(tmp_path / "current"))["shard_sizes"] == [10, 10]
        assert all_bytes(tmp_path / "v1") == v1  # what the link pointed at is untouched
        assert (tmp_path / "thesis" / "thesis.tex").read_text() == "x"
        assert sorted(os.listdir(tmp_path)) == ["current", "in", "thesis", "v1"]
        shutil.rmtree(tmp_path / "current")


# ------------------------------------------------------------------------ symlinks


def _labels_by_content(out_dir):
    """{image bytes: [labels]} of a converted dataset."""
    found = {}
    for e in read_all(out_dir)[1]:
        found.setdefault(e.image, []).append(e.label)
    return found


def test_symlinks_never_duplicate_a_file_or_give_it_two_labels(tmp_path):
    root, ext = tmp_path / "in", tmp_path / "elsewhere"
    content = {}  # name -> PNG bytes
    for folder, names in {
        root / "a": ["a0", "a1"],
        root / "b": ["b0", "b1"],
        root / "c": ["c0", "c1"],
        root / "c" / ".hidden": ["h0"],
        ext / "shared": ["s0"],
        ext / "only_b": ["o0"],
        ext / "d": ["d0", "d1"],
    }.items():
        os.makedirs(folder)
        for name in names:
            Image.fromarray(_pixels(len(content), (4, 4))).save(folder / f"{name}.png")
            content[name] = (folder / f"{name}.png").read_bytes()
    links = {
        "a/loop": "..",  # the input folder itself: a loop through every class
        "b/to_c": "../c",  # another class's folder
        "b/c0_copy.png": "../c/c0.png",  # a file of another class
        "a/h0.png": "../c/.hidden/h0.png",  # in class c's folder, where c's walk does not go
        "c/h0_alias.png": ".hidden/h0.png",  # ... and linked from c itself: c gets it
        "a/shared": str(ext / "shared"),  # the same outside folder linked from two classes
        "b/shared": str(ext / "shared"),
        "b/only_b": str(ext / "only_b"),  # an outside folder linked from one class
        "b/o0_again.png": str(ext / "only_b" / "o0.png"),  # ... and one of its files again
        "d": str(ext / "d"),  # a class folder that is a symlink
    }
    for link, target in links.items():
        os.symlink(target, root / link)
    outputs = []
    for run in range(2):
        meta = mar.convert("imagefolder", str(root), str(tmp_path / f"out{run}"), progress=False)
        outputs.append(all_bytes(tmp_path / f"out{run}"))
    assert outputs[0] == outputs[1]  # deterministic
    assert meta["class_names"] == ["a", "b", "c", "d"]
    labels = _labels_by_content(tmp_path / "out0")
    want = {
        **{f"{c}{i}": [label] for label, c in enumerate("abc") for i in range(2)},
        "d0": [3],
        "d1": [3],
        "h0": [2],
        "o0": [1],
    }
    assert {name: labels.get(content[name]) for name in content} == {**want, "s0": None}
    assert meta["num_examples"] == 10 and meta["class_counts"] == [2, 3, 3, 2]
    assert meta["skipped"]["files"] == [
        "a/h0.png",
        "a/shared/s0.png",
        "b/c0_copy.png",
        "b/only_b/o0.png",
        "b/shared/s0.png",
    ]


def test_class_folders_that_overlap_are_refused(tmp_path):
    make_imagefolder(tmp_path / "in")
    os.symlink("dog", tmp_path / "in" / "wolf")
    with pytest.raises(mar.ConversionError, match="'dog' and 'wolf' .* same directory"):
        mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    os.remove(tmp_path / "in" / "wolf")
    os.mkdir(tmp_path / "in" / "dog" / "puppy")
    os.symlink("dog/puppy", tmp_path / "in" / "puppy")
    with pytest.raises(mar.ConversionError, match="'dog' and 'puppy' .* holds the other"):
        mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------ pixel depth


def png_file(width, height, bit_depth, color_type, rows):
    """A PNG written chunk by chunk (PIL writes neither 48-bit RGB nor what we need here)."""

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    compress = zlib.compressobj()
    idat = b"".join(compress.compress(b"\0" + row) for row in rows) + compress.flush()
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def png16(array):
    """A real 16-bit PNG (gray, or RGB 48-bit) of a uint16 HxW or HxWx3 array."""
    rows = [row.astype(">u2").tobytes() for row in array]
    return png_file(array.shape[1], array.shape[0], 16, 0 if array.ndim == 2 else 2, rows)


def test_16_bit_images_are_scaled_by_their_full_range(tmp_path):
    # A photo-like gradient over the whole 16-bit range (clipping at 255 made it white).
    gray = np.linspace(0, 65535, 48 * 40).reshape(48, 40).astype(np.uint16)
    rgb = np.random.default_rng(0).integers(0, 65536, (6, 5, 3), dtype=np.uint16)
    os.makedirs(tmp_path / "in" / "x")
    Image.fromarray(gray).save(tmp_path / "in" / "x" / "gray.png")  # mode I;16
    Image.fromarray(gray).save(tmp_path / "in" / "x" / "gray.tif")
    (tmp_path / "in" / "x" / "gray16.pgm").write_bytes(  # PIL opens it as mode I
        b"P5\n40 48\n65535\n" + gray.astype(">u2").tobytes()
    )
    (tmp_path / "in" / "x" / "rgb48.png").write_bytes(png16(rgb))
    Image.fromarray(gray.astype(np.float32) / 65535).save(tmp_path / "in" / "x" / "z_float.tif")
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "in" / "x" / "z_int32.tif")
    warnings = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
        meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    examples = read_all(tmp_path / "out")[1]
    assert meta["skipped"]["files"] == ["x/z_float.tif", "x/z_int32.tif"]
    assert any("z_float.tif: floating-point pixels" in w for w in warnings), warnings
    assert any("z_int32.tif: integer pixels span 70000..70000" in w for w in warnings)
    for e in examples[:3]:  # gray.pgm, gray.png, gray.tif
        assert e.image[24] == 8  # an 8-bit PNG
        pixels = decode_pixels(e.image)
        np.testing.assert_array_equal(pixels, gray >> 8)
        assert 126 < pixels.mean() < 129
    assert examples[3].image[24] == 8  # 48-bit RGB rewritten at 8 bits, same values
    np.testing.assert_array_equal(decode_pixels(examples[3].image), rgb >> 8)
    with pytest.raises(mar.ConversionError, match="z_float.tif: floating-point"):
        mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "o2"), strict=True)


# ------------------------------------------------------------------------ huge images


def test_images_over_max_pixels_are_downscaled(tmp_path):
    os.makedirs(tmp_path / "in" / "x")
    big = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "in" / "x" / "big.jpg", quality=90)
    Image.fromarray(big).save(tmp_path / "in" / "x" / "big.png")
    Image.fromarray(big[:100, :100]).save(tmp_path / "in" / "x" / "small.png")
    meta = mar.convert(
        "imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), max_pixels=20_000
    )
    assert meta["max_pixels"] == 20_000
    assert meta["downscaled"] == {"count": 2, "files": ["x/big.jpg", "x/big.png"]}
    jpeg, png, small = read_all(tmp_path / "out")[1]
    for e, fmt in ((jpeg, "JPEG"), (png, "PNG")):
        with Image.open(io.BytesIO(e.image)) as img:
            assert img.format == fmt and img.size == (182, 109)  # aspect kept, <= 20,000 px
    assert small.image == (tmp_path / "in" / "x" / "small.png").read_bytes()
    # The default: 40 megapixels (a 45-megapixel PNG of 40 kB is cut down to it).
    Image.new("L", (7000, 6500)).save(tmp_path / "in" / "x" / "huge.png")
    shutil.rmtree(tmp_path / "out")
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    assert meta["downscaled"]["files"] == ["x/huge.png"]
    with Image.open(io.BytesIO(read_all(tmp_path / "out")[1][2].image)) as img:
        assert img.width * img.height <= mar.DEFAULT_MAX_PIXELS == 40_000_000
        assert img.size == (6563, 6094)


def test_decompression_bombs_are_skipped_with_a_clear_reason(tmp_path, monkeypatch):
    os.makedirs(tmp_path / "in" / "x")
    Image.new("L", (8, 8)).save(tmp_path / "in" / "x" / "a.png")
    # A valid 200-megapixel black 1-bit PNG of 25 kB: over twice PIL's bomb threshold.
    bomb = png_file(20000, 10000, 1, 0, [bytes(2500)] * 10000)
    (tmp_path / "in" / "x" / "bomb.png").write_bytes(bomb)
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    assert meta["skipped"]["files"] == ["x/bomb.png"]
    assert any("bomb.png: too many pixels to decode safely" in w for w in warnings), warnings
    with pytest.raises(mar.ConversionError, match="max_pixels"):
        mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "o"), max_pixels=10**9)


# ------------------------------------------------------------------------ empty classes


def test_empty_classes_keep_their_label_and_are_listed(tmp_path, monkeypatch):
    make_imagefolder(tmp_path / "in")
    os.mkdir(tmp_path / "in" / "ant")  # no files
    os.mkdir(tmp_path / "in" / "bee")
    (tmp_path / "in" / "bee" / "broken.png").write_bytes(b"\x89PNG broken")  # nothing readable
    warnings = []
    monkeypatch.setattr(logging, "warning", lambda msg, *a: warnings.append(msg % a))
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    assert meta["class_names"] == ["ant", "bee", "bird", "cat", "dog"]
    assert meta["empty_classes"] == ["ant", "bee"] and meta["class_counts"] == [0, 0, 3, 2, 2]
    assert sorted({e.label for e in read_all(tmp_path / "out")[1]}) == [2, 3, 4]
    assert any("'ant' has no files" in w for w in warnings), warnings
    assert any("class 'bee' has no examples" in w for w in warnings), warnings


# ------------------------------------------------------------------------ I/O failures


def _no_traceback_nothing_left(result, folder, expected):
    assert result.returncode == ExitStatus.FAILED, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write"), result.stderr
    assert sorted(os.listdir(folder)) == expected  # no output, no .tmp-* folder
    return errors[0]


def test_full_disk_is_one_line_and_leaves_nothing(tmp_path):
    make_mnist(tmp_path / "in", n=200)

    def small_files():  # a file-size limit: writes past 64 kB fail with EFBIG, like a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    result = subprocess.run(
        [sys.executable, "-m", "tools.make_arrayrecord", "--format=mnist"]
        + [f"--input={tmp_path / 'in'}", f"--output={tmp_path / 'out'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=small_files,
    )
    line = _no_traceback_nothing_left(result, tmp_path, ["in"])
    assert "File too large" in line and str(tmp_path / "out") in line


def test_unwritable_output_is_one_line(tmp_path):
    make_mnist(tmp_path / "in")
    (tmp_path / "file").write_text("")
    result = run_cli("--format=mnist", f"--input={tmp_path / 'in'}", f"--output={tmp_path}/file/x")
    assert "Not a directory" in _no_traceback_nothing_left(result, tmp_path, ["file", "in"])
    if os.geteuid() != 0:  # root writes whatever the mode bits say
        os.mkdir(tmp_path / "ro", 0o555)
        result = run_cli(
            "--format=mnist", f"--input={tmp_path / 'in'}", f"--output={tmp_path}/ro/x"
        )
        assert "Permission denied" in _no_traceback_nothing_left(result, tmp_path / "ro", [])


# ------------------------------------------------------------------------ CIFAR pickles


def py2_cifar_pickle(data, labels, labels_key=b"labels"):
    """A batch as the original CIFAR files are: Python 2 cPickle, protocol 2, of a dict with
    str (bytes) keys, a numpy uint8 array (numpy.core.multiarray._reconstruct) and int lists.
    Written opcode by opcode: Python 3 cannot produce Python 2 strings. U/T: short/long
    string, K/M: 1/2-byte int, c: global, \\x85-\\x87: 1-3 tuple, R: call, b: setstate."""
    string = lambda b: (
        (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b
    )
    small_int = lambda i: b"K" + bytes([i]) if i < 256 else b"M" + struct.pack("<H", i)
    dtype = b"cnumpy\ndtype\n" + string(b"u1") + b"K\x00K\x01\x87R"
    dtype += b"(K\x03" + string(b"|") + b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85" + string(b"b")
    array += b"\x87R(K\x01" + small_int(data.shape[0]) + small_int(data.shape[1]) + b"\x86"
    array += dtype + b"\x89" + string(data.tobytes()) + b"tb"
    ints = b"](" + b"".join(small_int(i) for i in labels) + b"e"
    names = b"](" + b"".join(string(b"img_%d.png" % i) for i in range(len(labels))) + b"e"
    return (
        b"\x80\x02}("
        + string(b"batch_label") + string(b"training batch 1 of 5")
        + string(labels_key) + ints
        + string(b"data") + array
        + string(b"filenames") + names
        + b"u."
    )  # fmt: skip


def test_cifar_reads_original_python2_pickles(tmp_path):
    folder = tmp_path / "in"
    os.makedirs(folder)
    hwc = _pixels(3, (4, 32, 32, 3))
    data = np.ascontiguousarray(hwc.transpose(0, 3, 1, 2).reshape(4, 3072))
    batch = py2_cifar_pickle(data, [3, 1, 4, 1])
    unpickled = pickle.loads(batch, encoding="bytes")  # the builder is a faithful pickle
    assert unpickled[b"labels"] == [3, 1, 4, 1] and unpickled[b"filenames"][0] == b"img_0.png"
    np.testing.assert_array_equal(unpickled[b"data"], data)
    (folder / "test_batch").write_bytes(batch)
    mar.convert("cifar10", str(folder), str(tmp_path / "out"))
    examples = read_all(tmp_path / "out")[1]
    assert [e.label for e in examples] == [3, 1, 4, 1]
    for e in examples:
        np.testing.assert_array_equal(decode_pixels(e.image), hwc[e.example_id])


class _RunsCode:
    def __init__(self, call, argument):
        self.call, self.argument = call, argument

    def __reduce__(self):
        return self.call, (self.argument,)


@pytest.mark.parametrize("how", ["os.system", "builtins.eval"])
def test_cifar_refuses_pickles_that_would_run_code(tmp_path, how):
    marker = tmp_path / "ran"
    payload = (
        _RunsCode(os.system, f"touch {marker}")
        if how == "os.system"
        else _RunsCode(eval, f"open({str(marker)!r}, 'w').close()")
    )
    evil = pickle.dumps({b"data": payload, b"labels": [0]}, protocol=2)
    pickle.loads(evil)  # it does run code when unpickled plainly
    assert marker.exists()
    marker.unlink()
    os.makedirs(tmp_path / "in")
    (tmp_path / "in" / "test_batch").write_bytes(evil)
    # Protocol 2 spells builtins the Python 2 way.
    name = "posix.system" if how == "os.system" else "__builtin__.eval"
    with pytest.raises(mar.ConversionError, match=f"refusing .* references {name}, which no"):
        mar.convert("cifar10", str(tmp_path / "in"), str(tmp_path / "out"))
    assert not marker.exists() and not (tmp_path / "out").exists()
    result = run_cli("--format=cifar10", f"--input={tmp_path / 'in'}", f"--output={tmp_path}/o")
    assert result.returncode == ExitStatus.BAD_INPUT and "Traceback" not in result.stderr
    assert f"references {name}" in result.stderr and not marker.exists()


# ------------------------------------------------------------------------ bounded size


def _photo(seed, width, height):
    """A smooth, photo-like RGB image (a JPEG of noise would be all artefacts)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def test_stored_size_meets_every_bound_and_keeps_smaller_images():
    opts = ImageOptions
    assert stored_size(500, 375, opts()) is None  # the default: lossless pass-through
    assert stored_size(500, 375, opts(shorter_side=256)) == (341, 256)
    assert stored_size(375, 500, opts(shorter_side=256)) == (256, 341)
    assert stored_size(500, 375, opts(shorter_side=400)) is None  # smaller: untouched
    assert stored_size(500, 375, opts(max_side=320)) == (320, 240)
    assert stored_size(300, 500, opts(max_side=320)) == (192, 320)
    # Several bounds: the tightest wins, and every bound holds.
    assert stored_size(4000, 1000, opts(shorter_side=256, max_side=512)) == (512, 128)
    assert stored_size(4000, 3000, opts(shorter_side=256, max_side=512)) == (341, 256)
    assert stored_size(4000, 3000, opts(max_pixels=20_000, shorter_side=256)) == (163, 122)
    for w, h in [(4001, 2999), (333, 500), (17, 9000), (9000, 17)]:
        for o in (opts(shorter_side=100), opts(max_side=100), opts(max_pixels=5000, max_side=90)):
            size = stored_size(w, h, o) or (w, h)  # None: kept as it is
            assert min(size) <= (o.shorter_side or 10**9) and max(size) <= (o.max_side or 10**9)
            assert size[0] * size[1] <= o.max_pixels and min(size) >= 1


def test_bounded_size_resizes_larger_images_once_and_stores_smaller_ones_untouched(tmp_path):
    os.makedirs(tmp_path / "in" / "x")
    _photo(0, 300, 200).save(tmp_path / "in" / "x" / "a_big.jpg", quality=92)
    _photo(1, 200, 300).save(tmp_path / "in" / "x" / "b_big.png")
    _photo(2, 120, 90).save(tmp_path / "in" / "x" / "c_small.jpg", quality=92)
    _photo(3, 400, 100).convert("L").save(tmp_path / "in" / "x" / "d_wide_gray.jpg")
    meta = mar.convert(
        "imagefolder",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        shorter_side=100,
        max_side=320,
        jpeg_quality=80,
    )
    assert (meta["shorter_side"], meta["max_side"], meta["jpeg_quality"]) == (100, 320, 80)
    assert meta["downscaled"]["files"] == ["x/a_big.jpg", "x/b_big.png", "x/d_wide_gray.jpg"]
    big_jpeg, big_png, small, gray = read_all(tmp_path / "out")[1]
    for e, fmt, size in ((big_jpeg, "JPEG", (150, 100)), (big_png, "PNG", (100, 150))):
        with Image.open(io.BytesIO(e.image)) as img:
            assert img.format == fmt and img.size == size
    # Re-encoded at the requested quality: the same quantisation tables as PIL's quality 80.
    reference = io.BytesIO()
    Image.open(io.BytesIO(big_jpeg.image)).save(reference, format="JPEG", quality=80)
    assert Image.open(io.BytesIO(big_jpeg.image)).quantization == (
        Image.open(reference).quantization
    )
    # A high-quality (Lanczos) resize of the original: close to resizing it directly.
    direct = Image.open(tmp_path / "in" / "x" / "a_big.jpg").resize((150, 100), Image.LANCZOS)
    error = np.abs(decode_pixels(big_jpeg.image).astype(int) - np.asarray(direct, int))
    assert error.mean() < 3
    # Not resized: the original's pixels, its coefficients re-encoded with restart markers.
    original = (tmp_path / "in" / "x" / "c_small.jpg").read_bytes()
    interval = helpers.jpeg_restart_interval
    marked = images_lib.restarts_available()
    assert bool(interval(small.image)) == marked and not interval(original)
    np.testing.assert_array_equal(decode_pixels(small.image), decode_pixels(original))
    # Downscaled, written by PIL with markers that tile the rows (what the window decode uses).
    for e in (small, big_jpeg, gray):
        assert bool(interval(e.image)) == marked
        assert not marked or helpers.jpeg_mcus_per_row(e.image) % interval(e.image) == 0
    with Image.open(io.BytesIO(gray.image)) as img:
        assert img.size == (320, 80) and img.mode == "L"  # max_side binds; gray stays gray
    stats = meta["stored_size"]
    assert stats["width"] == {
        "p0": 100, "p5": 100, "p25": 120, "p50": 150, "p75": 150, "p95": 320, "p100": 320,
        "mean": 172.5,
    }  # fmt: skip
    assert stats["height"]["p0"] == 80 and stats["height"]["p100"] == 150
    assert stats["bytes"]["p100"] == max(len(e.image) for e in (big_jpeg, big_png, small, gray))
    assert stats["total_bytes"] == sum(len(e.image) for e in (big_jpeg, big_png, small, gray))
    # The default stays lossless, and says so.
    shutil.rmtree(tmp_path / "out")
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"))
    assert meta["shorter_side"] is None and meta["max_side"] is None
    assert meta["downscaled"]["count"] == 0 and meta["encoding"] == "encoded"
    np.testing.assert_array_equal(
        decode_pixels(read_all(tmp_path / "out")[1][0].image),
        decode_pixels((tmp_path / "in/x/a_big.jpg").read_bytes()),
    )


def test_bad_size_options_are_expected_errors(tmp_path):
    make_imagefolder(tmp_path / "in")
    make_mnist(tmp_path / "mnist")
    cases = [
        (dict(shorter_side=300, max_side=200), "max_side=200 is below shorter_side=300"),
        (dict(jpeg_quality=0), "jpeg_quality=0 must be in 1..100"),
        (dict(shorter_side=0), "shorter_side=0 must be in"),
        (dict(encoding="zip"), "unknown encoding 'zip'"),
    ]
    for options, message in cases:
        with pytest.raises(mar.ConversionError, match=message):
            mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "o"), **options)
    with pytest.raises(mar.ConversionError, match="bound imagefolder images"):
        mar.convert("mnist", str(tmp_path / "mnist"), str(tmp_path / "o"), shorter_side=20)
    assert not (tmp_path / "o").exists()
    result = run_cli(
        "--format=imagefolder",
        f"--input={tmp_path / 'in'}",
        f"--output={tmp_path / 'o'}",
        "--shorter_side=4",
        "--max_side=5",
        "--jpeg_quality=70",
        "--encoding=encoded",
    )
    assert result.returncode == 0, result.stderr
    meta = records.read_metadata(str(tmp_path / "o"))
    assert (meta["shorter_side"], meta["max_side"], meta["jpeg_quality"]) == (4, 5, 70)
    assert meta["stored_size"]["width"]["p100"] <= 5 and meta["downscaled"]["count"] == 7


# ------------------------------------------------------------------------ raw pixels


def test_imagefolder_raw_needs_one_size_and_stores_rgb_pixels(tmp_path):
    os.makedirs(tmp_path / "in" / "a")
    os.makedirs(tmp_path / "in" / "b")
    rgb = _pixels(0, (6, 5, 3))
    gray = _pixels(1, (6, 5))
    Image.fromarray(rgb).save(tmp_path / "in" / "a" / "rgb.png")
    Image.fromarray(gray).save(tmp_path / "in" / "b" / "gray.png")
    _photo(2, 5, 6).save(tmp_path / "in" / "b" / "photo.jpg")
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), encoding="raw")
    assert meta["encoding"] == meta["image_format"] == "raw" and meta["schema_version"] == 1
    assert meta["image_shape"] == [6, 5, 3]  # RGB, as imagefolder datasets are read
    first, second, third = read_all(tmp_path / "out")[1]
    np.testing.assert_array_equal(decode_pixels(first.image), rgb)
    np.testing.assert_array_equal(decode_pixels(second.image), np.stack([gray] * 3, -1))
    with Image.open(tmp_path / "in" / "b" / "photo.jpg") as img:
        np.testing.assert_array_equal(decode_pixels(third.image), np.asarray(img.convert("RGB")))
    # Another size: a clear error naming both files, and nothing written.
    Image.fromarray(_pixels(3, (7, 5, 3))).save(tmp_path / "in" / "b" / "z_tall.png")
    with pytest.raises(mar.ConversionError) as error:
        mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "o2"), encoding="raw")
    assert "b/z_tall.png is 5x7 RGB and a/rgb.png is 5x6 RGB" in str(error.value)
    assert "--encoding=encoded" in str(error.value)
    assert not (tmp_path / "o2").exists()


# ------------------------------------------------------------------------ progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_is_one_redrawn_line_on_a_terminal_and_log_lines_otherwise(tmp_path):
    make_mnist(tmp_path / "in", n=300)
    terminal = _Terminal()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progress, "TTY_PROGRESS_INTERVAL_S", 0.0)
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "o1"), progress_stream=terminal)
    text = terminal.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line, redrawn with \r
    assert text.count("\r") >= 300  # redrawn at every example with a zero interval
    last = text.rstrip("\n").rsplit("\r", 1)[1]
    assert last.startswith("[####################] mnist o1: 300/300 (100%), ")
    assert "images/s" in last and "ETA 0:00:00" in last and last.endswith("0 skipped\x1b[K")
    # Not a terminal: log lines, never a carriage return.
    logged, pipe = [], io.StringIO()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)
        patch.setattr(logging, "info", lambda msg, *a: logged.append(msg % a))
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "o2"), progress_stream=pipe)
    assert pipe.getvalue() == ""
    lines = [line for line in logged if line.startswith("mnist o2: ")]
    assert len(lines) >= 300 and "ETA" in lines[0] and "images/s" in lines[0]
    assert lines[-1].startswith("mnist o2: 300/300 (100%)")
    assert any("images/s with 1 worker(s)" in line for line in logged)
    # progress=False: silent.
    quiet = _Terminal()
    mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "o3"), progress=False,
                progress_stream=quiet)  # fmt: skip
    assert quiet.getvalue() == ""
