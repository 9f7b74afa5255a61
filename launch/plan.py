"""The run plan: every number the loop needs, resolved once from the config and the data.

Intervals are given in the unit the user thinks in: `every_steps` when it is > 0, otherwise
`every_epochs` converted with the real steps per epoch of this dataset and global batch, so
a config stays right when the batch size changes. Everything here is checked before anything
is set up; a problem is a `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import math

import ml_collections

from launch import distributed
from pipeline import dataset as dataset_lib
from pipeline import records


class ConfigError(ValueError):
    """A configuration that cannot run; raised before anything is compiled."""


@dataclasses.dataclass(frozen=True)
class Plan:
    global_batch: int
    eval_batch: int
    steps_per_epoch: int
    num_steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end and on preemption

    def describe(self) -> str:
        every = lambda n: (
            f"every {n} steps ({n / self.steps_per_epoch:.3g} epochs)" if n else "at the end"
        )
        return (
            f"{self.num_steps} steps ({self.num_steps / self.steps_per_epoch:.3g} epochs of "
            f"{self.steps_per_epoch} steps at global batch {self.global_batch}); "
            f"eval {every(self.eval_every)}, checkpoint {every(self.save_every)}"
        )


def interval_steps(section: ml_collections.ConfigDict, what: str, steps_per_epoch: int) -> int:
    """`section.every_steps` if > 0, else `section.every_epochs` in steps if > 0, else 0."""
    steps, epochs = section.every_steps, section.every_epochs
    if steps < 0 or epochs < 0:
        raise ConfigError(f"config.{what}.every_steps/every_epochs must not be negative")
    if steps > 0:
        return int(steps)
    if epochs > 0:
        return max(1, int(round(epochs * steps_per_epoch)))
    return 0


def total_steps(config, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    if config.train.num_epochs <= 0:
        raise ConfigError("config.train.num_epochs (or num_steps) must be positive")
    return max(1, int(math.ceil(config.train.num_epochs * steps_per_epoch)))


def eval_batch_size(config) -> int:
    size = config.eval.global_batch_size
    return config.train.global_batch_size if size <= 0 else size


def check_data(config, train: dataset_lib.DatasetInfo, eval_: dataset_lib.DatasetInfo | None):
    """The model and the input settings agree with the data."""
    if config.model.num_classes != train.num_classes:
        raise ConfigError(
            f"config.model.num_classes={config.model.num_classes} but the training data "
            f"({train.data_dir}) has {train.num_classes} classes"
        )
    if eval_ is not None:
        if eval_.num_classes != train.num_classes:
            raise ConfigError(
                f"the training data has {train.num_classes} classes, the eval data "
                f"{eval_.num_classes} ({train.data_dir} vs {eval_.data_dir})"
            )
        if train.class_names and eval_.class_names and train.class_names != eval_.class_names:
            diff = next(
                i for i, (a, b) in enumerate(zip(train.class_names, eval_.class_names)) if a != b
            )
            raise ConfigError(
                f"train and eval data name their classes differently: class {diff} is "
                f"{train.class_names[diff]!r} in {train.data_dir} and "
                f"{eval_.class_names[diff]!r} in {eval_.data_dir}"
            )
        if eval_.channels != train.channels:
            raise ConfigError(
                f"train images have {train.channels} channel(s), eval images {eval_.channels}"
            )
    for field in ("mean", "std"):
        if len(config.data[field]) != train.channels:
            raise ConfigError(
                f"config.data.{field} has {len(config.data[field])} values for "
                f"images with {train.channels} channel(s)"
            )
    if config.data.image_size <= 0:
        raise ConfigError(f"config.data.image_size={config.data.image_size} must be positive")
    if config.data.augment_on_device:
        shape = train.image_shape
        if train.encoding != records.RAW or shape is None:
            raise ConfigError(
                f"config.data.augment_on_device needs raw records of one image size; "
                f"{train.data_dir} is {train.encoding!r} (convert it with --encoding=raw)"
            )
        if tuple(shape[:2]) != (config.data.image_size,) * 2:
            raise ConfigError(
                f"config.data.augment_on_device crops back to the stored size, "
                f"{shape[0]}x{shape[1]} in {train.data_dir}: set config.data.image_size="
                f"{shape[0]} (square images only)"
            )
        if config.data.device_crop_padding < 0:
            raise ConfigError("config.data.device_crop_padding must not be negative")


def make_plan(config, train: dataset_lib.DatasetInfo, eval_: dataset_lib.DatasetInfo | None):
    check_data(config, train, eval_)
    global_batch = config.train.global_batch_size
    try:
        distributed.check_batch_size(global_batch)
        distributed.check_batch_size(eval_batch_size(config), "eval.global_batch_size")
        steps_per_epoch = dataset_lib.steps_per_epoch(train.num_examples, global_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name in ("stall_timeout_seconds",):
        if config.train[name] < 0:
            raise ConfigError(f"config.train.{name} must not be negative")
    profile = tuple(config.train.profile_steps)
    if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
        raise ConfigError(
            f"config.train.profile_steps={profile}: give (first, last) steps, 1 <= first <= last"
        )
    return Plan(
        global_batch=global_batch,
        eval_batch=eval_batch_size(config),
        steps_per_epoch=steps_per_epoch,
        num_steps=total_steps(config, steps_per_epoch),
        log_every=max(int(config.train.log_every_steps), 1),
        eval_every=interval_steps(config.eval, "eval", steps_per_epoch),
        save_every=interval_steps(config.checkpoint, "checkpoint", steps_per_epoch),
    )
