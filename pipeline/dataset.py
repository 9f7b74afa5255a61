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
import os

import grain
import numpy as np
from absl import flags
from array_record.python import array_record_module

from pipeline import records, resizing, transforms

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
    shard_sizes: tuple[int, ...] = ()  # records per shard, as counted by load_info
    encoding: str = records.ENCODED  # records.ENCODED (PNG/JPEG) or records.RAW
    image_shape: tuple[int, int, int] | None = None  # (h, w, c) when every image has one


def _count_records(data_dir: str, paths: list[str]) -> list[int]:
    """Records per shard, from each file's index (no record is read)."""
    counts = []
    for path in paths:
        try:
            reader = array_record_module.ArrayRecordReader(path)
            # Some damage raises; the rest shows only in ok().
            problem = None if reader.ok() else "truncated or damaged"
            count = reader.num_records()
            reader.close()
        except (OSError, RuntimeError, ValueError) as e:
            problem = str(e)
        if problem:
            raise records.DatasetError(
                f"{data_dir!r}: shard {os.path.basename(path)} is not a readable ArrayRecord "
                f"file ({problem}); convert the dataset again"
            )
        counts.append(count)
    return counts


def load_info(data_dir: str) -> DatasetInfo:
    """Reads and checks a dataset's metadata and its shards' record counts.

    Raises records.DatasetError (records.DatasetNotFoundError, also a FileNotFoundError, when
    the directory, metadata.json or a shard is missing) with a one-line message.
    """
    metadata = records.read_metadata(data_dir)
    paths = records.shard_paths(data_dir, metadata)
    counts = _count_records(data_dir, paths)
    damaged = "; the dataset was edited or damaged, convert it again"
    if sum(counts) != metadata["num_examples"]:
        raise records.DatasetError(
            f"{data_dir!r}: metadata.json says {metadata['num_examples']} examples but the "
            f"shards hold {sum(counts)}{damaged}"
        )
    for name, want, got in zip(metadata["shards"], metadata["shard_sizes"], counts):
        if want != got:
            raise records.DatasetError(
                f"{data_dir!r}: metadata.json says shard {name} holds {want} records, "
                f"it holds {got}{damaged}"
            )
    shape = metadata.get("image_shape")
    return DatasetInfo(
        data_dir=data_dir,
        num_examples=metadata["num_examples"],
        num_classes=metadata["num_classes"],
        class_names=tuple(metadata["class_names"]),
        channels=shape[2] if shape else 3,
        shard_paths=tuple(paths),
        shard_sizes=tuple(counts),
        encoding=metadata.get("encoding", records.ENCODED),
        image_shape=tuple(shape) if shape else None,
    )


def _open_source(info: DatasetInfo) -> grain.sources.ArrayRecordDataSource:
    source = grain.sources.ArrayRecordDataSource(list(info.shard_paths))
    if len(source) != info.num_examples:  # changed since load_info
        raise records.DatasetError(
            f"{info.data_dir!r}: metadata.json says {info.num_examples} examples but the shards "
            f"hold {len(source)}; the dataset is damaged, convert it again"
        )
    return source


class _Records:
    """Reads records by global position and checks them; errors name shard, record and id.

    Picklable (Grain sends it to worker processes).
    """

    def __init__(self, info: DatasetInfo):
        self._info = info
        self._source = _open_source(info)
        self._ends = np.cumsum(info.shard_sizes) if info.shard_sizes else None

    def where(self, position: int, example_id: int | None = None) -> str:
        info = self._info
        if self._ends is None:
            place = f"record {position}"
        else:
            shard = int(np.searchsorted(self._ends, position, side="right"))
            first = int(self._ends[shard - 1]) if shard else 0
            name = os.path.basename(info.shard_paths[shard])
            place = f"shard {name} record {position - first}"
        known = "" if example_id is None else f" (example id {example_id})"
        return f"{info.data_dir!r}: {place}{known}"

    def example(self, position: int) -> records.Example:
        try:
            record = self._source[position]
        except Exception as e:  # the reader raises assorted types for damaged chunks
            raise records.DatasetError(
                f"{self.where(position)}: cannot read the record ({type(e).__name__}: {e})"
            ) from None
        try:
            example = records.decode_example(record)
        except records.DatasetError as e:
            raise records.DatasetError(f"{self.where(position)}: {e}") from None
        if not 0 <= example.label < self._info.num_classes:
            raise records.DatasetError(
                f"{self.where(position, example.example_id)}: label {example.label} is outside "
                f"0..{self._info.num_classes - 1} (num_classes in metadata.json)"
            )
        return example

    def image_error(self, position: int, example: records.Example, e: Exception):
        message = f"{type(e).__name__}: {e}".replace("\n", " ")
        return records.DatasetError(
            f"{self.where(position, example.example_id)}: cannot decode the image ({message})"
        )

    def raw_batch(self, positions: np.ndarray, shape: tuple[int, int, int]):
        """Records at `positions` as (images N x H x W x C uint8, labels, example ids), read
        in one call and copied once into the batch; every record checked as example() does."""
        try:
            raw = self._source.__getitems__([int(p) for p in positions])
        except Exception:  # find the damaged record and name it
            for position in positions:
                self.example(int(position))
            raise
        images = np.empty((len(positions), *shape), np.uint8)
        labels = np.empty(len(positions), np.int32)
        ids = np.empty(len(positions), np.int64)
        header = records.HEADER_SIZE
        size = records.RAW_HEADER_SIZE + int(np.prod(shape))
        for i, (position, record) in enumerate(zip(positions, raw)):
            image = record[header:]
            ok = (
                record[:4] == records.MAGIC
                and len(image) == size
                and records.is_raw(image)
                and records.raw_shape(image) == shape
            )
            if not ok:  # the slow path says precisely what is wrong
                example = self.example(int(position))
                raise self.image_error(
                    int(position),
                    example,
                    ValueError(f"not a raw {'x'.join(map(str, shape))} image"),
                )
            _, ids[i], labels[i] = records.unpack_header(record)
            if not 0 <= labels[i] < self._info.num_classes:
                self.example(int(position))  # raises the label error
            images[i] = np.frombuffer(
                record,
                np.uint8,
                count=size - records.RAW_HEADER_SIZE,
                offset=header + records.RAW_HEADER_SIZE,
            ).reshape(shape)
        return images, labels, ids


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


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, num_records: int) -> np.ndarray:
    """The epoch's global order of records: a permutation drawn from (seed, epoch)."""
    return np.random.default_rng((seed, _SHUFFLE_STREAM, epoch)).permutation(num_records)


class _StoredExample:
    """Maps a flat (step, row) index to a stored image, unaugmented, at the fixed stored size
    with the requested channels (the hand-over for augmentation on the device). Picklable."""

    def __init__(
        self, info: DatasetInfo, rows: np.ndarray, global_batch_size: int, seed: int, channels: int
    ):
        if info.image_shape is None:
            raise ValueError(
                f"{info.data_dir!r} has no fixed image_shape: its images cannot be handed "
                "over unaugmented as one array; convert it with --encoding=raw"
            )
        self._shape = (*info.image_shape[:2], channels)
        self._records = _Records(info)
        self._rows = rows
        self._global_batch = global_batch_size
        self._steps_per_epoch = steps_per_epoch(info.num_examples, global_batch_size)
        self._num_records = info.num_examples
        self._seed = seed

    def __call__(self, index: int) -> dict[str, np.ndarray | np.generic]:
        step, row = divmod(int(index), len(self._rows))
        epoch, step_in_epoch = divmod(step, self._steps_per_epoch)
        position = step_in_epoch * self._global_batch + int(self._rows[row])
        record = int(_epoch_order(self._seed, epoch, self._num_records)[position])
        example = self._records.example(record)
        try:
            image = transforms.stored_pixels(example.image, self._shape[2])
            if image.shape != self._shape:
                raise ValueError(
                    f"image is {'x'.join(map(str, image.shape))}, metadata.json says "
                    f"{'x'.join(map(str, self._shape))}"
                )
        except Exception as e:  # PIL raises many types for bad bytes; PIL decodes lazily
            raise self._records.image_error(record, example, e) from None
        return {
            "image": image,
            "label": np.int32(example.label),
            "example_id": np.int64(example.example_id),
        }


class _AugmentedTrainBatch:
    """Maps a step to this host's augmented batch: one Grain element per batch, each crop
    written straight into a preallocated batch array (transforms.crop_into), at the step's
    size: `augmentation.image_size`, or the epoch's size on a resizing ramp.

    The same examples, boxes and flips as transforms.random_resized_crop per example. Picklable."""

    def __init__(
        self,
        info: DatasetInfo,
        rows: np.ndarray,
        global_batch_size: int,
        seed: int,
        augmentation: transforms.Augmentation,
        ramp: resizing.Ramp | None = None,
    ):
        self._records = _Records(info)
        self._rows = np.asarray(rows, np.int64)
        self._global_batch = global_batch_size
        self._steps_per_epoch = steps_per_epoch(info.num_examples, global_batch_size)
        self._num_records = info.num_examples
        self._seed = seed
        self._aug = augmentation
        self._ramp = ramp

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, step_in_epoch = divmod(int(step), self._steps_per_epoch)
        order = _epoch_order(self._seed, epoch, self._num_records)
        positions = order[step_in_epoch * self._global_batch + self._rows]
        aug = self._aug
        if self._ramp is not None:
            aug = dataclasses.replace(aug, image_size=self._ramp.size(epoch))
        size, channels = aug.image_size, aug.channels
        images = np.empty((len(positions), size, size, channels), np.uint8)
        labels = np.empty(len(positions), np.int32)
        ids = np.empty(len(positions), np.int64)
        for i, position in enumerate(positions.tolist()):
            example = self._records.example(position)
            labels[i], ids[i] = example.label, example.example_id
            rng = np.random.default_rng((self._seed, _AUGMENT_STREAM, epoch, example.example_id))
            try:
                transforms.crop_into(images[i], example.image, aug, rng)
            except Exception as e:  # the decoders raise many types for bad bytes
                raise self._records.image_error(position, example, e) from None
        return {"image": images, "label": labels, "example_id": ids}


class _RawTrainBatch:
    """Maps a step to this host's unaugmented batch of a raw dataset, read and copied per
    batch rather than per example (the cheap hand-over for augmentation on the device).

    The same batches as _StoredExample through Grain's batching."""

    def __init__(self, info: DatasetInfo, rows: np.ndarray, global_batch_size: int, seed: int):
        self._records = _Records(info)
        self._rows = np.asarray(rows, np.int64)
        self._global_batch = global_batch_size
        self._steps_per_epoch = steps_per_epoch(info.num_examples, global_batch_size)
        self._num_records = info.num_examples
        self._seed = seed
        assert info.image_shape is not None  # raw datasets have one (records.read_metadata)
        self._shape = info.image_shape

    def _order(self, epoch: int) -> np.ndarray:
        return _epoch_order(self._seed, epoch, self._num_records)

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        epoch, step_in_epoch = divmod(int(step), self._steps_per_epoch)
        positions = self._order(epoch)[step_in_epoch * self._global_batch + self._rows]
        images, labels, ids = self._records.raw_batch(positions, self._shape)
        return {"image": images, "label": labels, "example_id": ids}


class _EvalExample:
    """Maps a flat (batch, row) index to an eval example, or to padding past the end."""

    def __init__(
        self,
        info: DatasetInfo,
        rows: np.ndarray,
        global_batch_size: int,
        image_size: int,
        crop_fraction: float,
        scaled_decode: bool = True,
    ):
        self._records = _Records(info)
        self._scaled_decode = scaled_decode
        self._rows = rows
        self._global_batch = global_batch_size
        self._num_records = info.num_examples
        self._channels = info.channels
        self._image_size = image_size
        self._crop_fraction = crop_fraction

    def __call__(self, index: int) -> dict[str, np.ndarray | np.generic]:
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
        example = self._records.example(position)
        try:
            image = transforms.center_crop(
                transforms.open_image(example.image),
                self._image_size,
                self._channels,
                self._crop_fraction,
                scaled_decode=self._scaled_decode,
            )
        except Exception as e:  # PIL raises many types for bad bytes; PIL decodes lazily
            raise self._records.image_error(position, example, e) from None
        return {
            "image": image,
            "label": np.int32(example.label),
            "example_id": np.int64(example.example_id),
            "mask": np.float32(1),
        }


def _batched(
    examples: grain.MapDataset, local_batch: int, num_workers: int, num_threads: int
) -> grain.IterDataset:
    return _prefetched(examples.batch(local_batch, drop_remainder=True), num_workers, num_threads)


def _prefetched(batches: grain.MapDataset, num_workers: int, num_threads: int) -> grain.IterDataset:
    # The elements here are whole batches: keep every thread busy and no more. (A buffer of
    # 4 x the batch size would hold that many *batches*: memory grows by a batch per step
    # read ahead, 2.5 GB for batches of 64 at 224 px.)
    dataset = batches.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
    )
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # Grain reads its absl flags when starting workers. Parsing them is the program's
            # business, not a library's: absl apps have, others must say so.
            raise RuntimeError(
                "num_workers > 0 needs absl flags parsed (Grain reads its flags when starting "
                "workers): run under absl.app.run, or call absl.flags.FLAGS.mark_as_parsed()"
            )
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
    start_step: int = 0,
    num_workers: int = 0,
    num_threads: int = 4,
    augment: bool = True,
    ramp: resizing.Ramp | None = None,
) -> grain.IterDataset:
    """This host's local batches for global steps start_step .. num_steps-1.

    The data position is the global step alone: a resumed run starts here at its restored
    step, on any number of hosts, and reads exactly what the uninterrupted run would have.

    augment=False hands the stored images over unaugmented, as fixed-size uint8 arrays
    (`info.image_shape`, with `augmentation.channels` channels), for augmentation on the
    device: for raw records (--encoding=raw) no image is decoded or copied before batching.
    Only the image size and channels of `augmentation` are used then.

    ramp: progressive resizing, each step's images at its epoch's size (pipeline.resizing);
    batches of one step always share one size. It needs augment=True.
    """
    rows = _check_rows(rows, global_batch_size)
    if ramp is not None and not augment:
        raise ValueError("a resizing ramp needs augment=True (the host's random-resized crop)")
    if not augment and info.encoding == records.RAW and info.channels == augmentation.channels:
        # Raw pixels: read and copied a batch at a time, no per-example work at all.
        steps_per_epoch(info.num_examples, global_batch_size)  # checks the dataset is big enough
        batch = _RawTrainBatch(info, rows, global_batch_size, seed)
        batches = grain.MapDataset.range(start_step, num_steps).map(batch)
        return _prefetched(batches, num_workers, num_threads)
    if augment:  # a batch per Grain element: no per-example Grain overhead, no np.stack
        augmented = _AugmentedTrainBatch(info, rows, global_batch_size, seed, augmentation, ramp)
        batches = grain.MapDataset.range(start_step, num_steps).map(augmented)
        return _prefetched(batches, num_workers, num_threads)
    example = _StoredExample(info, rows, global_batch_size, seed, augmentation.channels)
    flat = grain.MapDataset.range(start_step * len(rows), num_steps * len(rows)).map(example)
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
    scaled_decode: bool = True,
) -> grain.IterDataset:
    """This host's local eval batches: every example once, the last batch padded (mask 0).

    scaled_decode: JPEGs are decoded at a reduced scale when the centre crop allows
    (transforms.center_crop).
    """
    rows = _check_rows(rows, global_batch_size)
    example = _EvalExample(info, rows, global_batch_size, image_size, crop_fraction, scaled_decode)
    num_batches = num_eval_batches(info.num_examples, global_batch_size)
    flat = grain.MapDataset.range(num_batches * len(rows)).map(example)
    return _batched(flat, len(rows), num_workers, num_threads)
