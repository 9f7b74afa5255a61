"""TensorBoard event files (process 0 only) and the progress log line."""

from __future__ import annotations

import json
import os
import sys
import time

import jax
import numpy as np
from absl import logging
from etils import epath

METRICS_FILE = "metrics.jsonl"


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported without torch where torch is not loaded yet.

    tensorboardX imports torch wherever it is installed, only to accept torch tensors; this
    writer is given floats and numpy arrays, and that import adds over a second to process
    0's start-up, which every host then waits for at the first step.
    """
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

        return SummaryWriter
    sys.modules["torch"] = None  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class Writer:
    """Process 0 only: TensorBoard events under WORKDIR/tensorboard, and WORKDIR/metrics.jsonl.

    metrics.jsonl holds one JSON object per log interval and per eval (`{"step": ..., "kind":
    "train"|"eval"|"startup", figures...}`): what scripts and tests read instead of log text.
    """

    def __init__(self, workdir: str):
        self._writer = None
        self._workdir = workdir
        self._jsonl = epath.Path(workdir) / METRICS_FILE
        self._lines: list[str] = []  # gs:// objects cannot be appended to: rewritten whole
        self._active = jax.process_index() == 0
        self._opened = not self._active  # the event file is opened at the first write

    @property
    def active(self) -> bool:
        """Whether this process writes (process 0)."""
        return self._active

    def _tensorboard(self):
        """The SummaryWriter while its writer thread lives, else None; opened at the first
        write (in training: an evaluation at the start, or else once the first step runs).

        tensorboardX writes from a thread that dies at its first write error (a full disk);
        every later call would then block on its full queue and hang the run. Events stop
        instead, with one error; the next checkpoint save reports the disk.
        """
        if not self._opened:
            self._opened = True
            try:
                self._writer = _summary_writer_class()(
                    os.path.join(self._workdir, "tensorboard"), flush_secs=10, max_queue=1000
                )
            except OSError as e:  # metrics are not worth a run, as below
                logging.error("TensorBoard events are not written: %s", e)
        if self._writer is None:
            return None
        file_writer = getattr(self._writer, "file_writer", None)
        worker = getattr(getattr(file_writer, "event_writer", None), "_worker", None)
        if worker is not None and not worker.is_alive():
            logging.error("TensorBoard events are no longer written: their writer stopped.")
            self._writer = None
        return self._writer

    def scalars(self, step: int, values: dict[str, float], kind: str) -> None:
        if not self._active:
            return
        if tensorboard := self._tensorboard():
            for tag, value in values.items():
                tensorboard.add_scalar(tag, float(value), step)
        record = {"step": step, "kind": kind, **{k: float(v) for k, v in values.items()}}
        line = json.dumps(record) + "\n"
        try:
            if str(self._jsonl).startswith("gs://"):
                self._lines.append(line)
                self._jsonl.write_text("".join(self._lines))
            else:
                with open(self._jsonl, "a") as f:
                    f.write(line)
        except OSError as e:  # metrics are not worth a run; a full disk stops the next save
            logging.error("Could not write %s: %s", self._jsonl, e)

    def text(self, tag: str, text: str) -> None:
        if tensorboard := self._tensorboard():
            tensorboard.add_text(tag, text, 0)

    def images(self, tag: str, step: int, images: np.ndarray) -> None:
        """A grid of NHWC uint8 images."""
        if (tensorboard := self._tensorboard()) and len(images):
            tensorboard.add_images(tag, images, step, dataformats="NHWC")

    def flush(self) -> None:
        if self._opened and (tensorboard := self._tensorboard()):
            try:
                tensorboard.flush()
            except OSError as e:
                logging.error("Could not flush the TensorBoard events: %s", e)

    def close(self) -> None:
        if self._opened and (tensorboard := self._tensorboard()):
            try:
                tensorboard.close()
            except OSError as e:  # must not replace the error that is stopping the run
                logging.error("Could not flush the TensorBoard events: %s", e)


def image_grid_input(local_images: np.ndarray, count: int) -> np.ndarray:
    images = np.asarray(local_images[:count])
    if images.shape[-1] == 1:  # TensorBoard wants 3 channels
        images = np.repeat(images, 3, axis=-1)
    return images


def format_duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


class ProgressMeter:
    """Times the intervals between log lines: throughput, step time, data wait, ETA."""

    def __init__(self, global_batch_size: int, total_steps: int, start_step: int):
        self._global_batch = global_batch_size
        self._total = total_steps
        self._reset(start_step)

    def _reset(self, step: int) -> None:
        self._start_time = time.perf_counter()
        self._start_step = step
        self._data_wait = 0.0

    def add_data_wait(self, seconds: float) -> None:
        self._data_wait += seconds

    def summarize(self, step: int) -> dict[str, float]:
        """Figures for the interval since the last call; `step` must already be synchronised."""
        elapsed = time.perf_counter() - self._start_time
        steps = max(step - self._start_step, 1)
        step_time = elapsed / steps
        images_per_second = self._global_batch * steps / max(elapsed, 1e-9)
        figures = {
            "train/images_per_second": images_per_second,
            "train/images_per_second_per_device": images_per_second / jax.device_count(),
            "train/step_time": step_time,
            "train/data_wait_fraction": min(self._data_wait / max(elapsed, 1e-9), 1.0),
            "eta_seconds": step_time * (self._total - step),
        }
        self._reset(step)
        return figures


def log_progress(step: int, total: int, figures: dict[str, float]) -> None:
    logging.info(
        "step %d/%d  loss %.4f  top1 %.4f  lr %.5f  %.0f img/s (%.0f/device)  "
        "step %.3fs  data wait %.0f%%  skipped %d  ETA %s",
        step,
        total,
        figures["train/loss"],
        figures["train/top1"],
        figures["train/learning_rate"],
        figures["train/images_per_second"],
        figures["train/images_per_second_per_device"],
        figures["train/step_time"],
        100 * figures["train/data_wait_fraction"],
        figures["train/skipped_nonfinite_steps"],
        format_duration(figures["eta_seconds"]),
    )


class Profile:
    """A jax.profiler trace of steps [first, last] on process 0, into WORKDIR/tensorboard."""

    def __init__(self, steps, workdir: str):
        self.first, self.last = (int(steps[0]) - 1, int(steps[1])) if steps else (-1, -1)
        self._directory = str(epath.Path(workdir) / "tensorboard")
        self._on = False

    def start(self) -> None:
        if jax.process_index() == 0:
            jax.profiler.start_trace(self._directory)
            self._on = True

    def stop(self, state) -> None:
        if self._on:
            jax.block_until_ready(state)  # the traced steps must have run
            jax.profiler.stop_trace()
            self._on = False
            logging.info(
                "Profile of steps %d-%d written under %s",
                self.first + 1,
                self.last,
                self._directory,
            )
