"""The run plan: every number the loop needs, resolved once from the config and the data.

Intervals are given in the unit the user thinks in: `every_steps` when it is > 0, otherwise
`every_epochs` converted with the real steps per epoch of this dataset and global batch, so
a config stays right when the batch size changes. Everything here is checked before anything
is set up; a problem is a `ConfigError` naming the field and its value.

`check_config` needs no data and no devices: the launcher calls it before `jax.distributed`,
so a bad value costs nothing and touches no workdir. `make_plan` checks what depends on the
data and the topology.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import ml_collections

from launch import distributed
from pipeline import dataset as dataset_lib
from pipeline import records


class ConfigError(ValueError):
    """A configuration that cannot run; raised before anything is compiled."""


# The step counter and the data position are int32 on the devices.
MAX_STEPS = 2**31 - 1
AUTO_SAVES = -1  # Plan.save_every when the interval sets itself (launch.interval)


@dataclasses.dataclass(frozen=True)
class _Range:
    """The values a numeric field accepts: [low, high] (low excluded if `open_low`), plus
    `also` (sentinels such as -1), whole numbers only if `whole`."""

    low: float
    high: float = MAX_STEPS
    whole: bool = True
    open_low: bool = False
    open_high: bool = False
    also: tuple[int, ...] = ()
    meaning: str = ""

    def problem(self, value) -> str | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"must be a number, not {type(value).__name__}"
        if value in self.also:
            return None
        if self.whole and not isinstance(value, numbers.Integral):
            return f"must be a whole number{self._bounds()}"
        number = float(value)
        too_low = number <= self.low if self.open_low else number < self.low
        too_high = number >= self.high if self.open_high else number > self.high
        if not math.isfinite(number) or too_low or too_high:
            return f"must be {'a whole number' if self.whole else 'a number'}{self._bounds()}"
        return None

    def _bounds(self) -> str:
        number = lambda x: str(int(x)) if float(x).is_integer() else f"{x:g}"
        low = f" > {number(self.low)}" if self.open_low else f" >= {number(self.low)}"
        high = f" and {'<' if self.open_high else '<='} {number(self.high)}"
        high = "" if math.isinf(self.high) else high
        sentinels = "".join(f" (or {a})" for a in self.also)
        return f"{low}{high}{sentinels}{': ' + self.meaning if self.meaning else ''}"


def _count(low: int, meaning: str = "", high: float = MAX_STEPS, also=()) -> _Range:
    return _Range(low, high, meaning=meaning, also=also)


def _real(low: float, high: float = math.inf, *, open_low=False, open_high=False, meaning=""):
    return _Range(low, high, False, open_low, open_high, meaning=meaning)


def _fraction() -> _Range:
    """[0, 1): momenta and label smoothing (1 would never move)."""
    return _real(0.0, 1.0, open_high=True)


_RANGES: dict[str, _Range] = {
    "model.num_classes": _count(1),
    "model.bn_momentum": _fraction(),
    "model.bn_epsilon": _real(0.0, open_low=True),
    "model.bn_group_size": _count(0, meaning="0 takes each micro-batch as one group"),
    "model.init_from_step": _count(0, also=(-1,), meaning="-1 takes the newest step"),
    "data.image_size": _count(1, high=8192),
    "data.min_image_size": _count(0, high=8192, meaning="0 turns progressive resizing off"),
    "data.max_image_size": _count(0, high=8192),
    "data.resize_start_epoch": _real(0.0),
    "data.resize_end_epoch": _real(0.0),
    "data.resize_multiple": _count(1, high=8192),
    "data.eval_crop_fraction": _real(0.0, 1.0, open_low=True),
    "data.device_crop_padding": _count(0, high=1024),
    "data.num_workers": _count(0, high=1024),
    "data.num_threads": _count(1, high=1024),
    "data.prefetch": _count(1, high=1024),
    "train.global_batch_size": _count(1),
    "train.microbatches": _count(1),
    "train.num_epochs": _real(0.0),
    "train.num_steps": _count(1, also=(-1,), meaning="-1 trains for train.num_epochs"),
    "train.seed": _count(0),
    "train.base_learning_rate": _real(0.0),
    "train.warmup_epochs": _real(0.0),
    "train.momentum": _fraction(),
    "train.weight_decay": _real(0.0),
    "train.polynomial_power": _real(0.0, open_low=True),
    "train.end_learning_rate": _real(0.0),
    "train.lars_trust_coefficient": _real(0.0, open_low=True),
    "train.lars_epsilon": _real(0.0),
    "train.label_smoothing": _fraction(),
    "train.ema_decay": _real(0.0, 1.0, open_high=True, meaning="0 keeps no average"),
    "train.log_every_steps": _count(1),
    "train.max_nonfinite_in_a_row": _count(0),
    "train.num_image_summaries": _count(0, high=1024),
    "train.stall_timeout_seconds": _real(0.0, meaning="0 turns the watchdog off"),
    "eval.every_steps": _count(0, meaning="0 uses eval.every_epochs"),
    "eval.every_epochs": _real(0.0, meaning="0 evaluates at the end only"),
    "eval.global_batch_size": _count(1, also=(-1,), meaning="-1 uses the training batch size"),
    "checkpoint.every_steps": _count(
        0, meaning="0 uses checkpoint.every_epochs; 'auto' sets it from the save cost and faults"
    ),
    "checkpoint.every_epochs": _real(
        0.0, meaning="0 saves at the end and on preemption only; 'auto' sets it itself"
    ),
    "checkpoint.expected_fault_interval_seconds": _real(0.0, open_low=True),
    "checkpoint.max_to_keep": _count(
        1, meaning="how many checkpoints to keep; a run needs at least its newest to resume"
    ),
    "checkpoint.barrier_timeout_seconds": _real(0.0, open_low=True),
    "distributed.heartbeat_timeout_seconds": _real(0.0, open_low=True),
    "distributed.initialization_timeout_seconds": _real(0.0, open_low=True),
    "distributed.preemption_grace_seconds": _real(0.0, open_low=True),
}


def _field(config, key: str):
    section, name = key.split(".")
    return config.get(section, {}).get(name)


def check_config(config) -> None:
    """Every numeric field within its range, and the pairs and tuples well formed.

    Needs neither data nor devices: run it first, before anything else is set up.
    """
    for key, accepted in _RANGES.items():
        value = _field(config, key)
        if value is None or (key.startswith("checkpoint.every_") and value == "auto"):
            continue
        problem = accepted.problem(value)
        if problem:
            raise ConfigError(f"config.{key}={value!r}: {problem}")
    if _field(config, "eval.use_ema") and not _field(config, "train.ema_decay"):
        raise ConfigError(
            "config.eval.use_ema=True: the run keeps no average to evaluate; set "
            "config.train.ema_decay > 0"
        )
    _check_pair(config, "data.crop_scale", high=1.0)
    _check_pair(config, "data.crop_ratio", high=math.inf)
    _check_resize_ramp(config)
    for key, positive in (("data.mean", False), ("data.std", True)):
        values = _field(config, key)
        if values is None:
            continue
        finite = all(_is_real(v) and math.isfinite(v) for v in values)
        if not values or not finite or (positive and min(values) <= 0):
            need = "positive numbers" if positive else "finite numbers"
            raise ConfigError(f"config.{key}={tuple(values)!r}: give one of {need} per channel")
    _check_batch_split(config)


def micro_batch_size(config) -> int:
    """Examples in one forward pass: the global batch / train.microbatches."""
    return config.train.global_batch_size // config.train.microbatches


def bn_group_size(config) -> int:
    """Examples per BatchNorm statistics group in training: model.bn_group_size, or (0) a
    whole micro-batch, which is the global batch when train.microbatches is 1."""
    return config.model.bn_group_size or micro_batch_size(config)


def _check_batch_split(config) -> None:
    """Micro-batches and BatchNorm groups divide the global batch (any topology)."""
    fields = ("train.microbatches", "model.bn_group_size", "train.global_batch_size")
    if any(_field(config, key) is None for key in fields):
        return
    batch, k = config.train.global_batch_size, config.train.microbatches
    if batch % k:
        raise ConfigError(
            f"config.train.microbatches={k}: must divide train.global_batch_size={batch}"
        )
    micro, group = micro_batch_size(config), config.model.bn_group_size
    if group and micro % group:
        raise ConfigError(
            f"config.model.bn_group_size={group}: must divide the micro-batch of {micro} "
            "examples (train.global_batch_size / train.microbatches); a BatchNorm group "
            "cannot span micro-batches"
        )
    if group and group < micro and config.model.batch_norm != "fused":
        raise ConfigError(
            f"config.model.bn_group_size={group}: groups smaller than the micro-batch of "
            f"{micro} need model.batch_norm='fused' (nnx.BatchNorm normalises its whole input)"
        )


def check_batch_split_over(config, devices: int) -> None:
    """Every micro-batch and every BatchNorm group takes the same number of rows from each of
    `devices` devices, so each stays split over all of them and none depends on the topology."""
    micro, group = micro_batch_size(config), bn_group_size(config)
    if micro % devices:
        raise ConfigError(
            f"config.train.microbatches={config.train.microbatches}: a micro-batch of {micro} "
            f"examples must split evenly over the {devices} devices; the count must divide "
            f"the {config.train.global_batch_size // devices} examples per device"
        )
    if group % devices:
        raise ConfigError(
            f"config.model.bn_group_size={group}: must be a multiple of the {devices} devices "
            "(each BatchNorm group takes the same number of examples from every device)"
        )


def _check_resize_ramp(config) -> None:
    """Progressive resizing: both sizes or neither, in order, and on the host's crop."""
    low, high = _field(config, "data.min_image_size"), _field(config, "data.max_image_size")
    if not low and not high:
        return
    if not low:
        raise ConfigError(
            f"config.data.max_image_size={high!r} needs data.min_image_size (the ramp's first "
            "size); set both for progressive resizing, or neither"
        )
    if high < low:
        raise ConfigError(
            f"config.data.max_image_size={high!r}: must be >= data.min_image_size={low!r} "
            "(progressive resizing ramps the training size up)"
        )
    start, end = _field(config, "data.resize_start_epoch"), _field(config, "data.resize_end_epoch")
    if end < start:
        raise ConfigError(
            f"config.data.resize_end_epoch={end!r}: must be >= data.resize_start_epoch={start!r}"
        )
    if _field(config, "data.augment_on_device"):
        raise ConfigError(
            f"config.data.min_image_size={low!r}: progressive resizing needs the host's "
            "random-resized crop, but data.augment_on_device=True crops back to the stored size; "
            "set min_image_size=0 or augment_on_device=False"
        )


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_pair(config, key: str, high: float) -> None:
    pair = _field(config, key)
    if pair is None:
        return
    ok = len(pair) == 2 and all(_is_real(v) and math.isfinite(v) for v in pair)
    if not (ok and 0 < pair[0] <= pair[1] <= high):
        bound = "" if math.isinf(high) else f" <= {high:g}"
        raise ConfigError(
            f"config.{key}={tuple(pair)!r}: give (low, high) with 0 < low <= high{bound}"
        )


@dataclasses.dataclass(frozen=True)
class Plan:
    global_batch: int
    eval_batch: int
    steps_per_epoch: int
    num_steps: int
    log_every: int
    eval_every: int  # 0: only at the end
    save_every: int  # 0: only at the end and on preemption; AUTO_SAVES: launch.interval
    microbatches: int = 1
    bn_group_size: int = 0  # resolved: examples per BatchNorm statistics group

    def describe(self) -> str:
        every = lambda n: (
            f"every {n} steps ({n / self.steps_per_epoch:.3g} epochs)"
            if n > 0
            else ("at an interval that sets itself" if n == AUTO_SAVES else "at the end")
        )
        return (
            f"{self.num_steps} steps ({self.num_steps / self.steps_per_epoch:.3g} epochs of "
            f"{self.steps_per_epoch} steps at global batch {self.global_batch}"
            f"{self._split()}); "
            f"eval {every(self.eval_every)}, checkpoint {every(self.save_every)}"
        )

    def _split(self) -> str:
        micro = self.global_batch // self.microbatches
        split = f" in {self.microbatches} micro-batches of {micro}" if self.microbatches > 1 else ""
        if self.bn_group_size and self.bn_group_size != self.global_batch:
            split += f", BatchNorm groups of {self.bn_group_size}"
        return split


def interval_steps(section: ml_collections.ConfigDict, what: str, steps_per_epoch: int) -> int:
    """`section.every_steps` if > 0, else `section.every_epochs` in steps if > 0, else 0;
    AUTO_SAVES where the one that applies is "auto"."""
    steps, epochs = section.every_steps, section.every_epochs
    if steps == "auto" or (epochs == "auto" and not steps):
        return AUTO_SAVES
    epochs = 0.0 if epochs == "auto" else epochs  # every_steps > 0 wins
    if steps < 0 or epochs < 0:
        raise ConfigError(f"config.{what}.every_steps/every_epochs must not be negative")
    if steps > 0:
        return int(steps)
    if epochs > 0:
        steps = max(1, int(round(epochs * steps_per_epoch)))
        return _countable(steps, f"{what}.every_epochs", epochs, steps_per_epoch)
    return 0


def _countable(steps: int, key: str, epochs: float, steps_per_epoch: int) -> int:
    """`steps`, if the step counter can reach it."""
    if steps > MAX_STEPS:
        raise ConfigError(
            f"config.{key}={epochs!r}: {steps} steps of {steps_per_epoch} per epoch, more than "
            f"the {MAX_STEPS} a run can count"
        )
    return steps


def total_steps(config, steps_per_epoch: int) -> int:
    if config.train.num_steps > 0:
        return int(config.train.num_steps)
    if config.train.num_epochs <= 0:
        raise ConfigError("config.train.num_epochs (or num_steps) must be positive")
    epochs = config.train.num_epochs
    steps = max(1, int(math.ceil(epochs * steps_per_epoch)))
    return _countable(steps, "train.num_epochs", epochs, steps_per_epoch)


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


def make_plan(config, train: dataset_lib.DatasetInfo, eval_: dataset_lib.DatasetInfo | None):
    check_config(config)
    check_data(config, train, eval_)
    global_batch = config.train.global_batch_size
    try:
        distributed.check_batch_size(global_batch)
        distributed.check_batch_size(eval_batch_size(config), "eval.global_batch_size")
        check_batch_split_over(config, jax.device_count())
        steps_per_epoch = dataset_lib.steps_per_epoch(train.num_examples, global_batch)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    profile = tuple(config.train.profile_steps)
    if profile and not (len(profile) == 2 and 1 <= profile[0] <= profile[1]):
        raise ConfigError(
            f"config.train.profile_steps={profile}: give (first, last) steps, 1 <= first <= last"
        )
    num_steps = total_steps(config, steps_per_epoch)
    if profile and profile[1] > num_steps:
        raise ConfigError(
            f"config.train.profile_steps={profile}: the run has only {num_steps} steps, so the "
            "trace would never be written"
        )
    return Plan(
        global_batch=global_batch,
        eval_batch=eval_batch_size(config),
        steps_per_epoch=steps_per_epoch,
        num_steps=num_steps,
        log_every=int(config.train.log_every_steps),
        eval_every=interval_steps(config.eval, "eval", steps_per_epoch),
        save_every=interval_steps(config.checkpoint, "checkpoint", steps_per_epoch),
        microbatches=config.train.microbatches,
        bn_group_size=bn_group_size(config),
    )
