"""Hostile cases for the training input's JPEG batch path, one row per case.

A damaged JPEG in a converted dataset reaches the batch path (libjpeg-turbo decode, OpenCV
resize into the batch array). What the user gets must be what PIL's path gives: a JPEG PIL
refuses ends the run with exit status 2 and one `error:` line naming the dataset, shard,
record and example id; a JPEG PIL decodes with libjpeg's warnings trains. The dataset's files
are never changed.
"""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
from array_record.python import array_record_module
from PIL import Image

from launch import main as launch_main
from launch.status import ExitStatus
from pipeline import conversion, dataset, records, transforms
from tests.hostile.harness import assert_one_clear_line, tree_digest
from tools.bench import photo_like

DAMAGED = 2  # the record replaced in the one shard


def _jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=90)
    return out.getvalue()


def _truncated(good: bytes) -> bytes:
    return good[: len(good) // 2]


def _not_an_image(good: bytes) -> bytes:
    return good[:2] + bytes(range(256)) * 4  # a JPEG's first marker, then noise


def _zeroed_scan_data(good: bytes) -> bytes:
    middle = len(good) // 2  # inside the entropy-coded data: libjpeg warns, decodes on
    return good[:middle] + bytes(200) + good[middle + 200 :]


def _cmyk(good: bytes) -> bytes:
    return _jpeg(Image.open(io.BytesIO(good)).convert("CMYK"))


def _png(good: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(good)).save(out, format="PNG")
    return out.getvalue()


CASES = [
    # (case, damage, exit status, words of the error line or None when it trains)
    ("truncated JPEG", _truncated, ExitStatus.BAD_INPUT, ["cannot decode the image", "OSError"]),
    ("JPEG marker then noise", _not_an_image, ExitStatus.BAD_INPUT, ["cannot decode the image"]),
    ("zeroed scan data (libjpeg warns)", _zeroed_scan_data, ExitStatus.FINISHED, None),
    ("CMYK JPEG", _cmyk, ExitStatus.FINISHED, None),
    ("PNG among JPEGs", _png, ExitStatus.FINISHED, None),
]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Six photo-like JPEGs converted into a one-shard dataset; returns its folder."""
    root = tmp_path_factory.mktemp("photos")
    seeds, _ = photo_like.load_seeds(0)
    rng = np.random.default_rng(8)
    for i in range(6):
        (root / "in" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        image = photo_like.make_image(rng, seeds, (160, 120))
        (root / "in" / f"c{i % 2}" / f"{i}.jpg").write_bytes(_jpeg(image))
    conversion.convert("imagefolder", str(root / "in"), str(root / "ds"), progress=False)
    return str(root / "ds")


def _damaged_copy(source: str, target: str, damage) -> str:
    """A copy of the dataset whose record DAMAGED holds damaged image bytes."""
    os.makedirs(target)
    for name in os.listdir(source):
        with open(os.path.join(source, name), "rb") as f:
            data = f.read()
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    info = dataset.load_info(target)
    (path,) = info.shard_paths
    reader = array_record_module.ArrayRecordReader(path)
    all_records = list(reader.read_all())
    reader.close()
    example = records.decode_example(all_records[DAMAGED])
    all_records[DAMAGED] = records.encode_example(
        example.example_id, example.label, damage(example.image)
    )
    writer = array_record_module.ArrayRecordWriter(path, conversion.WRITER_OPTIONS)
    for record in all_records:
        writer.write(record)
    writer.close()
    return target


def _one_epoch(info: dataset.DatasetInfo) -> ExitStatus:
    """What the launcher's input does: every record once, through the batch path."""
    aug = transforms.Augmentation(image_size=64)
    batches = dataset.train_dataset(
        info, rows=np.arange(3), global_batch_size=3, num_steps=2, seed=0, augmentation=aug
    )
    for batch in batches:
        assert batch["image"].shape == (3, 64, 64, 3)
    return ExitStatus.FINISHED


@pytest.mark.parametrize("case, damage, status, words", CASES, ids=[c[0] for c in CASES])
def test_damaged_jpegs_end_as_pils_path_ends(photos, tmp_path, capfd, case, damage, status, words):
    del case
    data_dir = _damaged_copy(photos, str(tmp_path / "ds"), damage)
    info = dataset.load_info(data_dir)
    before = tree_digest(data_dir)
    with pytest.raises(SystemExit) as exit_:
        launch_main.exit_with_status(lambda: _one_epoch(info))
    stderr = capfd.readouterr().err
    assert exit_.value.code == int(status), stderr[-2000:]
    if words is None:
        assert "error:" not in stderr
    else:
        shard = os.path.basename(info.shard_paths[0])
        line = assert_one_clear_line(stderr, data_dir, f"shard {shard} record {DAMAGED}", *words)
        assert "example id" in line
    assert tree_digest(data_dir) == before
