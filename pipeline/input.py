"""The front door of the input: train and eval batches as global arrays, from a data config.

    train = input.train_batches(info, config.data, sharding, global_batch_size=1024,
                                num_steps=112590, start_step=restored_step, seed=0)
    for batch in train: ...            # {"image": uint8 NHWC, "label": int32}, sharded
    for batch in input.eval_batches(eval_info, config.data, sharding, global_batch_size=1024):
        ...                            # plus "mask" (0 for the padding of the last batch)

Each host reads only the rows of every global batch that its devices hold (read from the
sharding), and the position in the data is the global step alone, so the batches do not
depend on how many hosts or devices there are, nor on where a run was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding

from pipeline import dataset, global_batches, resizing, transforms

# What the devices need; example ids stay on the host (int64, and no use to the step).
TRAIN_FIELDS = ("image", "label")
EVAL_FIELDS = ("image", "label", "mask")


def train_batches(
    info: dataset.DatasetInfo,
    data_config,
    sharding: NamedSharding,
    *,
    global_batch_size: int,
    num_steps: int,
    start_step: int,
    seed: int,
) -> global_batches.DeviceIterator:
    """Global training batches for steps start_step .. num_steps-1, prefetched on device.

    With a resizing ramp (data.min_image_size > 0) each step's images have its epoch's size
    (pipeline.resizing); batches of several sizes may be in flight at once.
    """
    augmentation = transforms.Augmentation(
        image_size=data_config.image_size,
        channels=info.channels,
        crop_scale=tuple(data_config.crop_scale),
        crop_ratio=tuple(data_config.crop_ratio),
        random_flip=data_config.random_flip,
        scaled_decode=data_config.scaled_decode,
    )
    host_data = dataset.train_dataset(
        info,
        rows=global_batches.host_rows(sharding, global_batch_size),
        global_batch_size=global_batch_size,
        num_steps=num_steps,
        start_step=start_step,
        seed=seed,
        augmentation=augmentation,
        num_workers=data_config.num_workers,
        num_threads=data_config.num_threads,
        augment=not data_config.augment_on_device,
        ramp=resizing.ramp(data_config),
    )
    fields: tuple[str, ...] = TRAIN_FIELDS
    if data_config.augment_on_device:  # the step needs the ids: its randomness is per example
        host_data = host_data.map(_int32_ids)
        fields += ("example_id",)
    return global_batches.DeviceIterator(
        host_data, sharding, global_batch_size, data_config.prefetch, fields
    )


def _int32_ids(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return dict(batch, example_id=batch["example_id"].astype(np.int32))  # jax has no int64


class EvalBatches:
    """Every eval example exactly once per iteration; the last batch is padded (mask 0)."""

    def __init__(
        self, info: dataset.DatasetInfo, data_config, sharding: NamedSharding, global_batch_size
    ):
        self.num_batches = dataset.num_eval_batches(info.num_examples, global_batch_size)
        self._sharding = sharding
        self._global_batch = global_batch_size
        self._prefetch = data_config.prefetch
        self._host_data = dataset.eval_dataset(
            info,
            rows=global_batches.host_rows(sharding, global_batch_size),
            global_batch_size=global_batch_size,
            image_size=data_config.image_size,
            crop_fraction=data_config.eval_crop_fraction,
            scaled_decode=data_config.scaled_decode,
            num_workers=data_config.num_workers,
            num_threads=data_config.num_threads,
        )

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        batches = global_batches.DeviceIterator(
            self._host_data, self._sharding, self._global_batch, self._prefetch, EVAL_FIELDS
        )
        try:
            yield from batches
        finally:
            batches.close()


def eval_batches(
    info: dataset.DatasetInfo, data_config, sharding: NamedSharding, *, global_batch_size: int
) -> EvalBatches:
    return EvalBatches(info, data_config, sharding, global_batch_size)
