"""The input pipeline: per-host sharding, global arrays, eval padding, resumable iterators."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline import dataset
from pipeline import transforms
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


_RESUME_SCRIPT = """
import hashlib, json, sys
import jax, numpy as np
from launch import distributed
from pipeline import dataset, global_batches, transforms
mode, data_dir, state_file = sys.argv[1:4]
mesh = distributed.make_mesh()
sharding = distributed.batch_sharding(mesh)
aug = transforms.Augmentation(image_size=12, channels=1, crop_scale=(0.5, 1.0))
ds = dataset.train_dataset(dataset.load_info(data_dir), rows=np.arange(8),
                           global_batch_size=8, num_steps=12, seed=7, augmentation=aug,
                           num_workers=int(sys.argv[4]))
it = global_batches.DeviceIterator(ds, sharding, 8, prefetch=3)
if mode == "save":
  for _ in range(4):
    next(it)
  open(state_file, "wb").write(it.get_state())
else:
  it.set_state(open(state_file, "rb").read())
digest = lambda b: hashlib.sha256(np.asarray(b["image"]).tobytes()).hexdigest()
print(json.dumps([[np.asarray(b["example_id"]).tolist(), digest(b)] for b in it]))
it.close()
"""


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_state_restores_in_a_fresh_process(data, tmp_path, workers):
    state = str(tmp_path / "state.json")
    run = lambda mode: subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, mode, data[0], state, str(workers)],
        cwd=helpers.REPO,
        env=helpers.child_env(1),
        capture_output=True,
        text=True,
        timeout=120,
    )
    saved, restored = run("save"), run("restore")
    assert saved.returncode == 0, saved.stderr[-3000:]
    assert restored.returncode == 0, restored.stderr[-3000:]
    remaining = json.loads(saved.stdout.strip().splitlines()[-1])
    assert len(remaining) == 8  # 12 steps, 4 consumed (prefetched ones are not lost)
    assert json.loads(restored.stdout.strip().splitlines()[-1]) == remaining
