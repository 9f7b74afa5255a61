"""Progressive resizing: the training image size of every step, FFCV's linear ramp.

Epoch e (counted from 0) trains at `min_size` while e <= start_epoch, at `max_size` once
e >= end_epoch, and in between at the linear interpolation rounded to the nearest multiple
of `multiple` (halves to even, as numpy rounds), kept within [min_size, max_size]. These
are the rules of FFCV's ImageNet example (`get_resolution`, which rounds to 32), so its
settings carry over as they are: 160 to 192 px over epochs 65 to 76 of 88.

The size is a pure function of the global step (its epoch), like everything else the input
reads, so a resumed run, or one resumed on another number of hosts, reads the same batches.
Evaluation is not resized: it stays at `data.image_size`. No jax here: Grain worker
processes use it.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Ramp:
    """The training size of each epoch (see the module docstring). Picklable."""

    min_size: int
    max_size: int
    start_epoch: float
    end_epoch: float
    multiple: int = 32

    def size(self, epoch: int) -> int:
        if epoch <= self.start_epoch:
            return self.min_size
        if epoch >= self.end_epoch:
            return self.max_size
        fraction = (epoch - self.start_epoch) / (self.end_epoch - self.start_epoch)
        size = self.min_size + fraction * (self.max_size - self.min_size)
        rounded = round(size / self.multiple) * self.multiple
        return min(max(rounded, self.min_size), self.max_size)

    def describe(self) -> str:
        return (
            f"{self.min_size} px to {self.max_size} px over epochs {self.start_epoch:g} to "
            f"{self.end_epoch:g}, in multiples of {self.multiple}"
        )


def ramp(data_config) -> Ramp | None:
    """The config's ramp (`data.min_image_size` and the fields after it); None when off."""
    if not data_config.min_image_size:
        return None
    return Ramp(
        min_size=int(data_config.min_image_size),
        max_size=int(data_config.max_image_size),
        start_epoch=float(data_config.resize_start_epoch),
        end_epoch=float(data_config.resize_end_epoch),
        multiple=int(data_config.resize_multiple),
    )


def size_at_step(data_config, step: int, steps_per_epoch: int) -> int:
    """The side of the training images of global step `step` (0-based)."""
    schedule = ramp(data_config)
    if schedule is None:
        return int(data_config.image_size)
    return schedule.size(step // steps_per_epoch)


def changes(data_config, steps_per_epoch: int, start_step: int, num_steps: int):
    """(first step, size) of each training size of steps start_step .. num_steps-1, in order."""
    schedule = ramp(data_config)
    if schedule is None or start_step >= num_steps:
        return [(start_step, int(data_config.image_size))]
    epoch, last = start_step // steps_per_epoch, (num_steps - 1) // steps_per_epoch
    found = [(start_step, schedule.size(epoch))]
    while True:
        # A ramp never shrinks: bisect for the first later epoch with a larger size, so a
        # run of millions of epochs costs a few comparisons per size.
        low, high = epoch + 1, last + 1
        while low < high:
            middle = (low + high) // 2
            if schedule.size(middle) > found[-1][1]:
                high = middle
            else:
                low = middle + 1
        if low > last:
            return found
        epoch = low
        found.append((epoch * steps_per_epoch, schedule.size(epoch)))


def sizes(data_config, steps_per_epoch: int, start_step: int, num_steps: int) -> list[int]:
    """The distinct training sizes of steps start_step .. num_steps-1, in the order used."""
    return [size for _, size in changes(data_config, steps_per_epoch, start_step, num_steps)]
