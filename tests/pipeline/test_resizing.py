"""Progressive resizing: the ramp as a function of the step, and the input it drives (each
step's batch at its epoch's size, the same on resume and on any split over hosts)."""

import dataclasses

import jax
import ml_collections
import numpy as np
import pytest

from configs import default
from launch import checkpointing, distributed
from pipeline import dataset, global_batches, resizing, transforms
from tests import helpers

FFCV_RN50 = resizing.Ramp(min_size=160, max_size=192, start_epoch=65, end_epoch=76)


def _data_config(**ramp) -> ml_collections.ConfigDict:
    data = default.get_config().data
    data.image_size = 24
    data.update(ramp)
    return data


TINY_RAMP = dict(
    min_image_size=16,
    max_image_size=24,
    resize_start_epoch=1.0,
    resize_end_epoch=3.0,
    resize_multiple=4,
)


@pytest.mark.parametrize(
    "ramp, sizes_by_epoch",
    [
        # FFCV's ResNet-50 88-epoch settings: 160 up to epoch 70 (interpolated sizes round
        # down to 160 while under 176), 192 from epoch 71 (177.5 rounds up).
        (FFCV_RN50, {0: 160, 65: 160, 66: 160, 70: 160, 71: 192, 75: 192, 76: 192, 87: 192}),
        # Halves round to even, as numpy rounds: 18/4 = 4.5 -> 4 (16); 22/4 = 5.5 -> 6 (24).
        (resizing.Ramp(16, 24, 0, 4, multiple=4), {0: 16, 1: 16, 2: 20, 3: 24, 4: 24}),
        # Rounding below min_size or above max_size is clamped: 16/32 rounds to 0 px, 118/32
        # to 128 px.
        (resizing.Ramp(8, 40, 0, 4, multiple=32), {1: 8, 2: 32, 3: 32, 4: 40}),
        (resizing.Ramp(100, 120, 0, 10, multiple=32), {1: 100, 5: 100, 9: 120, 10: 120}),
        # multiple=1: every pixel of the line.
        (resizing.Ramp(10, 20, 0, 10, multiple=1), {e: 10 + e for e in range(11)}),
        # A ramp of no length jumps at its epoch; a fixed size never moves.
        (resizing.Ramp(16, 32, 2, 2, multiple=16), {0: 16, 2: 16, 3: 32}),
        (resizing.Ramp(24, 24, 0, 5, multiple=32), {0: 24, 3: 24, 9: 24}),
        # Fractional epochs: the epoch index is compared with them.
        (resizing.Ramp(16, 32, 0.5, 1.5, multiple=16), {0: 16, 1: 32, 2: 32}),
    ],
)
def test_the_ramp_gives_each_epoch_its_size(ramp, sizes_by_epoch):
    assert {e: ramp.size(e) for e in sizes_by_epoch} == sizes_by_epoch


def test_the_size_of_a_step_is_its_epochs():
    config = _data_config(**TINY_RAMP)  # sizes 16, 16, 20, 24 for epochs 0..3
    by_step = [resizing.size_at_step(config, step, steps_per_epoch=3) for step in range(12)]
    assert by_step == [16] * 6 + [20] * 3 + [24] * 3
    assert resizing.changes(config, 3, 0, 12) == [(0, 16), (6, 20), (9, 24)]
    assert resizing.changes(config, 3, 7, 12) == [(7, 20), (9, 24)]
    assert resizing.sizes(config, 3, 0, 12) == [16, 20, 24]
    assert resizing.sizes(config, 3, 7, 12) == [20, 24]  # resumed mid-ramp
    assert resizing.sizes(config, 3, 9, 12) == [24]
    assert resizing.sizes(config, 3, 0, 5) == [16]  # a run that ends before the ramp
    off = _data_config()
    assert resizing.ramp(off) is None
    assert resizing.size_at_step(off, 10**6, 3) == 24
    assert resizing.sizes(off, 3, 0, 12) == [24]


def test_the_sizes_of_a_run_are_every_size_its_epochs_use_in_order():
    rng = np.random.default_rng(0)
    for _ in range(200):
        low = int(rng.integers(1, 64))
        start = float(rng.integers(0, 8) + rng.choice([0, 0.5]))
        ramp = resizing.Ramp(
            low,
            low + int(rng.integers(0, 64)),
            start,
            start + float(rng.integers(0, 12)),
            multiple=int(rng.integers(1, 40)),
        )
        config = _data_config(
            min_image_size=ramp.min_size,
            max_image_size=ramp.max_size,
            resize_start_epoch=ramp.start_epoch,
            resize_end_epoch=ramp.end_epoch,
            resize_multiple=ramp.multiple,
        )
        spe, first, last = (int(rng.integers(*bounds)) for bounds in ((1, 5), (0, 30), (1, 90)))
        walked = [resizing.size_at_step(config, s, spe) for s in range(first, last)]
        expected = [
            (first + i, size) for i, size in enumerate(walked) if i == 0 or size != walked[i - 1]
        ] or [(first, 24)]
        assert resizing.changes(config, spe, first, last) == expected, (ramp, spe, first, last)
        assert resizing.sizes(config, spe, first, last) == [size for _, size in expected]
        assert walked == sorted(walked)  # a ramp never shrinks


def test_the_sizes_of_a_very_long_run_come_from_the_ramp_not_a_walk_over_its_steps():
    # 2**31 steps: walking them one by one would not finish (no timer needed to tell).
    config = _data_config(
        min_image_size=128,
        max_image_size=1024,
        resize_start_epoch=0.0,
        resize_end_epoch=2.0e9,
        resize_multiple=1,
    )
    assert resizing.sizes(config, 1, 0, 2**31 - 1) == list(range(128, 1025))


def test_the_ramp_is_part_of_the_run_signature():
    config = helpers.tiny_config("t", "e", **{f"data.{k}": v for k, v in TINY_RAMP.items()})
    ramped = checkpointing.run_signature(config, 48, 1, "digest")
    assert ramped["resize_ramp"] == dataclasses.asdict(resizing.ramp(config.data))
    config.data.min_image_size = 0
    assert checkpointing.run_signature(config, 48, 1, "digest")["resize_ramp"] is None


# ------------------------------------------------------------------------ the input


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """48 digits: 3 steps of 16 per epoch."""
    return helpers.make_mnist_subset(str(tmp_path_factory.mktemp("digits") / "train"), 0, 48)


AUG = transforms.Augmentation(image_size=24, channels=1, crop_scale=(0.5, 1.0), random_flip=False)
RAMP = resizing.ramp(_data_config(**TINY_RAMP))


def _batches(info, *, rows=None, start=0, ramp=RAMP, aug=AUG, steps=12):
    return list(
        dataset.train_dataset(
            info,
            rows=np.arange(16) if rows is None else rows,
            global_batch_size=16,
            num_steps=steps,
            start_step=start,
            seed=3,
            augmentation=aug,
            ramp=ramp,
        )
    )


def test_each_step_reads_its_batch_at_its_epochs_size(digits):
    info = dataset.load_info(digits)
    ramped = _batches(info)
    sizes = [16] * 6 + [20] * 3 + [24] * 3
    assert [b["image"].shape for b in ramped] == [(16, s, s, 1) for s in sizes]
    # The same examples, crops and pixels as a fixed-size input at that step's size.
    for size in (16, 20, 24):
        fixed = _batches(info, ramp=None, aug=dataclasses.replace(AUG, image_size=size))
        for step, batch in enumerate(ramped):
            np.testing.assert_array_equal(batch["example_id"], fixed[step]["example_id"])
            if batch["image"].shape[1] == size:
                np.testing.assert_array_equal(batch["image"], fixed[step]["image"])


def test_a_run_resumed_mid_ramp_or_split_over_hosts_reads_the_same_batches(digits):
    info = dataset.load_info(digits)
    whole = _batches(info)
    for start in (5, 6, 7, 9):  # before, at and after the first change of size (step 6)
        for a, b in zip(whole[start:], _batches(info, start=start), strict=True):
            np.testing.assert_array_equal(a["image"], b["image"])
            np.testing.assert_array_equal(a["label"], b["label"])
    halves = [_batches(info, rows=np.arange(8)), _batches(info, rows=np.arange(8, 16))]
    for step, batch in enumerate(whole):
        joined = np.concatenate([halves[0][step]["image"], halves[1][step]["image"]])
        np.testing.assert_array_equal(joined, batch["image"])


def test_batches_of_several_sizes_are_in_flight_across_a_change(digits):
    info = dataset.load_info(digits)
    sharding = distributed.batch_sharding(distributed.make_mesh())
    host = dataset.train_dataset(
        info,
        rows=global_batches.host_rows(sharding, 16),
        global_batch_size=16,
        num_steps=12,
        start_step=4,
        seed=3,
        augmentation=AUG,
        ramp=RAMP,
    )
    expected = _batches(info, start=4)
    batches = global_batches.DeviceIterator(host, sharding, 16, prefetch=3)
    batches.start()
    try:
        for want, got in zip(expected, batches, strict=True):
            assert isinstance(got["image"], jax.Array)
            np.testing.assert_array_equal(np.asarray(got["image"]), want["image"])
    finally:
        batches.close()


def test_a_ramp_needs_the_hosts_crop(digits):
    with pytest.raises(ValueError, match="a resizing ramp needs augment=True"):
        dataset.train_dataset(
            dataset.load_info(digits),
            rows=np.arange(16),
            global_batch_size=16,
            num_steps=2,
            seed=0,
            augmentation=AUG,
            augment=False,
            ramp=RAMP,
        )
