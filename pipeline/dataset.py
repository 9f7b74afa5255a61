"""Grain datasets over ArrayRecord shards, sharded per host by record.

How examples reach hosts. Every epoch has one global order, a permutation of all records
drawn from (seed, epoch). Global step `s` of epoch `e` consumes positions
[j * B, (j + 1) * B) of that order (j = s mod steps_per_epoch, B = global batch size); row `r`
of the global batch is position j * B + r. A host loads exactly the rows that its devices
hold in the global array (`rows`, from the mesh), so

* hosts are disjoint and together cover every position of the epoch;
* the global batch is the same whatever the number of hosts, devices or workers;
* the only dropped examples are the last `num_records mod B` positions of each epoch's
  order (a different set each epoch);
* augmentation randomness comes from (seed, epoch, example id) alone, so it does not depend
  on worker count or on where a run was resumed.

The dataset is indexed by (step, row), so its position is a plain integer that Grain
checkpoints and restores exactly. This module does not import jax: Grain worker processes
unpickle it and must never touch `jax.distributed`.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np
from absl import flags

from pipeline import records
from pipeline import transforms

_SHUFFLE_STREAM = 1
_AUGMENT_STREAM = 2


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the rest of the program needs to know about a converted dataset."""

    data_dir: str
    num_examples: int
    num_classes: int
    class_names: tuple[str, ...]
    channels: int
    shard_paths: tuple[str, ...]


def load_info(data_dir: str) -> DatasetInfo:
    metadata = records.read_metadata(data_dir)
    shape = metadata.get("image_shape")
    return DatasetInfo(
        data_dir=data_dir,
        num_examples=int(metadata["num_examples"]),
        num_classes=int(metadata["num_classes"]),
        class_names=tuple(metadata.get("class_names") or ()),
        channels=int(shape[2]) if shape else 3,
        shard_paths=tuple(records.shard_paths(data_dir, metadata)),
    )


def _open_source(info: DatasetInfo) -> grain.sources.ArrayRecordDataSource:
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    if len(source) != info.num_examples:
        raise ValueError(
            f"{info.data_dir!r}: metadata.json says {info.num_examples} examples but the shards "
            f"hold {len(source)}; the dataset is damaged, convert it again"
        )
    return source


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    steps = num_examples // global_batch_size
    if steps == 0:
        raise ValueError(
            f"the dataset has {num_examples} examples, fewer than one global "
            f"batch of {global_batch_size}"
        )
    return steps


def _check_rows(rows: np.ndarray, global_batch_size: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= global_batch_size:
        raise ValueError(f"host rows {rows} do not fit a global batch of {global_batch_size}")
    return rows


class _TrainExample:
    """Maps a flat (step, row) index to an augmented example. Picklable for workers."""

    def __init__(
        self,
        info: DatasetInfo,
        rows: np.ndarray,
        global_batch_size: int,
        seed: int,
        augmentation: transforms.Augmentation,
    ):
        self._source = _open_source(info)
        self._rows = rows
        self._global_batch = global_batch_size
        self._steps_per_epoch = steps_per_epoch(info.num_examples, global_batch_size)
        self._num_records = info.num_examples
        self._seed = seed
        self._aug = augmentation

    @functools.lru_cache(maxsize=2)
    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng((self._seed, _SHUFFLE_STREAM, epoch))
        return rng.permutation(self._num_records)

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        step, row = divmod(int(index), len(self._rows))
        epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
        position = step_in_epoch * self._global_batch + int(self._rows[row])
        example = records.decode_example(self._source[int(self._order(epoch)[position])])
        rng = np.random.default_rng((self._seed, _AUGMENT_STREAM, epoch, example.example_id))
        image = transforms.decode_image(example.image, self._aug.channels)
        return {
            "image": transforms.random_resized_crop(image, self._aug, rng),
            "label": np.int32(example.label),
            "example_id": np.int64(example.example_id),
        }


class _EvalExample:
    """Maps a flat (batch, row) index to an eval example, or to padding past the end."""

    def __init__(
        self,
        info: DatasetInfo,
        rows: np.ndarray,
        global_batch_size: int,
        image_size: int,
        crop_fraction: float,
    ):
        self._source = _open_source(info)
        self._rows = rows
        self._global_batch = global_batch_size
        self._num_records = info.num_examples
        self._channels = info.channels
        self._image_size = image_size
        self._crop_fraction = crop_fraction

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        batch, row = divmod(int(index), len(self._rows))
        position = batch * self._global_batch + int(self._rows[row])
        if position >= self._num_records:  # padding: counted by nobody
            shape = (self._image_size, self._image_size, self._channels)
            return {
                "image": np.zeros(shape, np.uint8),
                "label": np.int32(0),
                "example_id": np.int64(-1),
                "mask": np.float32(0),
            }
        example = records.decode_example(self._source[position])
        image = transforms.decode_image(example.image, self._channels)
        return {
            "image": transforms.center_crop(
                image, self._image_size, self._channels, self._crop_fraction
            ),
            "label": np.int32(example.label),
            "example_id": np.int64(example.example_id),
            "mask": np.float32(1),
        }


def _batched(
    examples: grain.MapDataset, local_batch: int, num_workers: int, num_threads: int
) -> grain.IterDataset:
    dataset = examples.batch(local_batch, drop_remainder=True).to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=4 * local_batch)
    )
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain reads its absl flags when starting workers; programs that are not absl apps
            # (notebooks, tests) never parsed them, and the defaults are what they need.
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return dataset


def train_dataset(
    info: DatasetInfo,
    *,
    rows: np.ndarray,
    global_batch_size: int,
    num_steps: int,
    seed: int,
    augmentation: transforms.Augmentation,
    num_workers: int = 0,
    num_threads: int = 4,
) -> grain.IterDataset:
    """This host's local batches for global steps 0 .. num_steps-1."""
    rows = _check_rows(rows, global_batch_size)
    example = _TrainExample(info, rows, global_batch_size, seed, augmentation)
    flat = grain.MapDataset.range(num_steps * len(rows)).map(example)
    return _batched(flat, len(rows), num_workers, num_threads)


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    return -(-num_examples // global_batch_size)


def eval_dataset(
    info: DatasetInfo,
    *,
    rows: np.ndarray,
    global_batch_size: int,
    image_size: int,
    crop_fraction: float,
    num_workers: int = 0,
    num_threads: int = 4,
) -> grain.IterDataset:
    """This host's local eval batches: every example once, the last batch padded (mask 0)."""
    rows = _check_rows(rows, global_batch_size)
    example = _EvalExample(info, rows, global_batch_size, image_size, crop_fraction)
    num_batches = num_eval_batches(info.num_examples, global_batch_size)
    flat = grain.MapDataset.range(num_batches * len(rows)).map(example)
    return _batched(flat, len(rows), num_workers, num_threads)
