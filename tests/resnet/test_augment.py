"""Augmentation on the device for raw fixed-size datasets: what it computes, that it depends on
(seed, step, example id) alone, and that a run using it is deterministic and resumes exactly."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from launch import train
from launch.status import ExitStatus
from resnet.augment import pad_crop_flip
from tests import helpers


def _augment(images, ids, step, flip=True):
    return np.asarray(
        pad_crop_flip(
            jnp.asarray(images), jnp.asarray(ids), jnp.int32(step), seed=5, pad=4, flip=flip
        )
    )


def test_each_output_is_a_crop_of_the_padded_image_maybe_flipped():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (16, 12, 10, 3), dtype=np.uint8)  # no zeros: padding shows
    out = _augment(images, np.arange(16), step=3)
    offsets, flips = set(), 0
    for image, got in zip(images, out):
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        matches = [
            (dy, dx, mirrored)
            for dy in range(9)
            for dx in range(9)
            for mirrored in (False, True)
            if np.array_equal(
                got, (lambda c: c[:, ::-1] if mirrored else c)(padded[dy : dy + 12, dx : dx + 10])
            )
        ]
        assert matches, "not a crop of the padded image"
        offsets.add(matches[0][:2])
        flips += matches[0][2]
    assert len(offsets) > 8 and 0 < flips < 16  # the draws vary


def test_randomness_comes_from_seed_step_and_example_id_only():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    ids = np.arange(100, 108)
    first = _augment(images, ids, step=7)
    np.testing.assert_array_equal(first, _augment(images, ids, step=7))
    order = rng.permutation(8)  # another split of the batch: the same example, the same crop
    np.testing.assert_array_equal(_augment(images[order], ids[order], step=7), first[order])
    assert not np.array_equal(_augment(images, ids, step=8), first)
    assert not np.array_equal(_augment(images, ids + 1, step=7), first)
    unflipped = _augment(images, ids, step=7, flip=False)
    for image, got in zip(images, unflipped):  # never mirrored when flips are off
        padded = np.pad(image, ((4, 4), (4, 4), (0, 0)))
        assert any(
            np.array_equal(got, padded[dy : dy + 8, dx : dx + 8])
            for dy in range(9)
            for dx in range(9)
        )


def test_it_runs_sharded_over_devices_as_in_the_train_step():
    mesh = jax.make_mesh((jax.device_count(),), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    images = np.random.default_rng(2).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
    fn = jax.jit(lambda x, i, s: pad_crop_flip(x, i, s, seed=5, pad=4, flip=True))
    got = fn(jax.device_put(images, sharding), jax.device_put(np.arange(8), sharding), jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(got), _augment(images, np.arange(8), step=3))


ON_DEVICE = {
    "data.augment_on_device": True,
    "data.image_size": 28,
    "data.random_flip": True,
    "train.num_steps": 16,
}


@pytest.mark.slow
def test_a_run_augmenting_on_the_device_resumes_bit_identically(data, tmp_path):
    reference = str(tmp_path / "reference")
    run = helpers.launch(helpers.tiny_run_args(*data, reference, **ON_DEVICE))
    assert run.returncode == 0, run.stderr[-3000:]
    workdir = str(tmp_path / "w")
    args = helpers.tiny_run_args(*data, workdir, **ON_DEVICE)
    proc = helpers.start(args)
    seen = []
    assert helpers.wait_for_line(proc, "step 6/16", seen), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGTERM)
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert proc.returncode == ExitStatus.PREEMPTED, "".join(seen)[-3000:]
    resumed = helpers.launch(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = helpers.flat_arrays(helpers.load_state(reference, 16))
    b = helpers.flat_arrays(helpers.load_state(workdir, 16))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    finished = json.load(open(os.path.join(workdir, train.FINISHED_MARKER)))
    assert finished["eval"]["eval/count"] == 37


def test_it_needs_raw_records_of_the_configured_size(data, tmp_path):
    from launch.plan import ConfigError  # pylint: disable=g-import-not-at-top

    config = helpers.tiny_config(*data, **dict(ON_DEVICE, **{"data.image_size": 16}))
    with pytest.raises(ConfigError, match="crops back to the stored size, 28x28"):
        train.train_and_evaluate(config, str(tmp_path / "w"))
