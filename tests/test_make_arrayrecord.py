"""Tests for pipeline/conversion.py and its command line tools/make_arrayrecord.py, on tiny
datasets written by the tests themselves."""

import gzip
import io
import os
import pickle
import struct
import subprocess
import sys

from array_record.python.array_record_data_source import ArrayRecordDataSource
import numpy as np
from PIL import Image
import pytest

from pipeline import records
from pipeline import conversion as mar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    with Image.open(io.BytesIO(image_bytes)) as img:
        return np.asarray(img)


def all_bytes(folder):
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


# ------------------------------------------------------------------------ round trips


def test_imagefolder_round_trip(tmp_path):
    expected = make_imagefolder(tmp_path / "in")
    meta = mar.convert("imagefolder", str(tmp_path / "in"), str(tmp_path / "out"), progress=True)
    assert meta == read_all(tmp_path / "out")[0]
    meta, examples = read_all(tmp_path / "out")
    assert meta["class_names"] == ["bird", "cat", "dog"] and meta["num_classes"] == 3
    assert meta["num_examples"] == len(expected) == len(examples)
    assert meta["image_format"] == "mixed" and meta["image_shape"] is None
    assert meta["skipped"] == {"count": 0, "files": []} and meta["source"] == "in"
    assert meta["writer_options"] == mar.WRITER_OPTIONS and "group_size:1" in mar.WRITER_OPTIONS
    for i, (rel, (kind, want)) in enumerate(sorted(expected.items())):
        ex = examples[i]
        assert (ex.example_id, ex.label) == (i, ["bird", "cat", "dog"].index(rel.split("/")[0]))
        if kind == "bytes":
            assert ex.image == want  # JPEG kept byte for byte
        else:
            assert ex.image.startswith(b"\x89PNG")  # PNG as is, BMP re-encoded as PNG
            np.testing.assert_array_equal(decode_pixels(ex.image), want)


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_round_trip(tmp_path, gz):
    images, labels = make_mnist(tmp_path / "in", prefix="train", gz=gz)
    meta, examples = (
        mar.convert("mnist", str(tmp_path / "in"), str(tmp_path / "out"), progress=False),
        read_all(tmp_path / "out")[1],
    )
    assert meta["split"] == "train"  # the only split present
    assert meta["num_examples"] == 20 and meta["class_names"] == [str(d) for d in range(10)]
    assert meta["image_shape"] == [28, 28, 1] and meta["image_format"] == "png"
    assert [e.example_id for e in examples] == list(range(20))
    assert [e.label for e in examples] == labels.tolist()
    for e in examples:
        np.testing.assert_array_equal(decode_pixels(e.image), images[e.example_id])


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


@pytest.mark.parametrize("fmt", ["cifar10", "cifar100"])
def test_cifar_round_trip(tmp_path, fmt):
    fine = fmt == "cifar100"
    inner = tmp_path / "in" / ("cifar-100-python" if fine else "cifar-10-batches-py")
    data = make_cifar(inner, fine)
    for split in ("train", "test"):
        # cifar10 from the parent of the extracted folder, cifar100 from the folder itself.
        src = tmp_path / "in" if not fine else inner
        out = tmp_path / f"out-{split}"
        meta = mar.convert(fmt, str(src), str(out), split=split, progress=False)
        _, examples = read_all(out)
        hwc, labels = data[split]
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
    monkeypatch.setattr(mar.logging, "warning", lambda msg, *a: warnings.append(msg % a))
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
        assert result.returncode != 0, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr, result.stderr
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
    make_mnist(tmp_path / "mnist")
    for fmt, src in (("imagefolder", "imgs"), ("mnist", "mnist")):
        outs = []
        for run, workers in enumerate((1, 1, 2)):
            out = tmp_path / f"{fmt}-{run}"
            mar.convert(
                fmt,
                str(tmp_path / src),
                str(out),
                num_shards=3,
                num_workers=workers,
                progress=False,
            )
            outs.append(all_bytes(out))
        assert len(outs[0]) == 4 and outs[0] == outs[1] == outs[2], fmt


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
