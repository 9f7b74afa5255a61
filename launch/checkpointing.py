"""Asynchronous Orbax checkpoints that a resumed run can trust.

A step directory WORKDIR/checkpoints/<step>/ holds three items:
  state  the TrainState (parameters, BatchNorm statistics, optimizer state, step, counters)
  data   each host's Grain iterator state, one JSON file per process (Grain's own handler)
  meta   what the run must match to resume it, and a fingerprint of `state`

A step counts only when Orbax committed it (`commit_success.txt`) and its restored state
matches the fingerprint taken when it was saved. Anything else (a save torn by SIGKILL, a
file damaged by hand) is moved aside to `<step>.rejected-<reason>` with a warning, so it is
never trained on, never deleted, and the step can be saved again.
"""

from __future__ import annotations

import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from launch import distributed
from resnet import steps

COMMIT_MARKER = "commit_success.txt"


class IncompatibleCheckpoint(ValueError):
    """The workdir's checkpoints belong to a different run configuration."""


class CheckpointSaveError(RuntimeError):
    """A save failed; the run stops rather than train on unprotected."""


class NoUsableCheckpoint(RuntimeError):
    """Checkpoints exist but none can be trusted; refuse to start over on top of them."""


@jax.jit
def fingerprint(tree: Any) -> jax.Array:
    """One float32 sum per leaf: cheap, and any damaged or foreign array changes it."""
    return jnp.stack([jnp.sum(jnp.asarray(x, jnp.float32)) for x in jax.tree.leaves(tree)])


@jax.jit
def _pre_save_checks(state: Any) -> tuple[jax.Array, jax.Array]:
    return steps.all_finite(state), fingerprint(state)


class Checkpointer:
    """Owns WORKDIR/checkpoints: save asynchronously, restore the newest trustworthy step."""

    def __init__(
        self, directory: str, *, max_to_keep: int, async_save: bool, barrier_timeout_seconds: int
    ):
        self.directory = epath.Path(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            # Creating the step directory in the foreground costs a little stall per save, but
            # a directory that cannot be written then fails the save at once, instead of after
            # a barrier timeout in a background thread.
            async_options=ocp.AsyncOptions(
                timeout_secs=barrier_timeout_seconds, create_directories_asynchronously=False
            ),
            cleanup_tmp_directories=True,  # leftovers of saves that never finished
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pre_save_checks = _pre_save_checks
        self._pending_step: int | None = None  # saved, commit not yet confirmed

    def prepare(self, state: Any) -> None:
        """Compiles the pre-save checks now, so that the first save does not stall on it."""
        self._pre_save_checks = _pre_save_checks.lower(state).compile()

    # --- saving ---------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_iterator: Any, meta: dict[str, Any]) -> float:
        """Starts saving `step`; returns the seconds the save held up the training loop.

        The clock starts once the device has finished computing `state` (queued steps are
        not the save's cost; the host would have waited for them at the next sync anyway).
        """
        jax.block_until_ready(state)
        start = time.perf_counter()
        finite, prints = jax.device_get(self._pre_save_checks(state))
        if not finite:
            raise FloatingPointError(
                f"refusing to checkpoint step {step}: the state holds non-finite values"
            )
        meta = dict(meta, step=step, fingerprint=np.asarray(prints).tolist())
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(data_iterator),
                    meta=ocp.args.JsonSave(meta),
                ),
                force=True,
            )
        except Exception as e:  # pylint: disable=broad-except
            raise CheckpointSaveError(
                f"saving the checkpoint of step {step} under {self.directory} failed: {e!r}"
            ) from e
        self._pending_step = step
        return time.perf_counter() - start

    def check_for_errors(self) -> None:
        """Raises once a background save has failed: never train on without checkpoints.

        Orbax logs some background failures and skips the step's finalization without raising
        (orbax #605), so a finished save also has to have left its commit marker.
        """
        self._manager.check_for_errors()
        if self._pending_step is not None and not self._manager.is_saving_in_progress():
            step, self._pending_step = self._pending_step, None
            if not (self.directory / str(step) / COMMIT_MARKER).exists():
                raise CheckpointSaveError(
                    f"the checkpoint of step {step} was not committed under {self.directory} (see "
                    "the errors logged above); stopping instead of training on without checkpoints"
                )

    def wait(self) -> None:
        self._manager.wait_until_finished()
        self.check_for_errors()

    def close(self) -> None:
        self._manager.close()

    # --- restoring ------------------------------------------------------------------------

    def _reject(self, step: int, reason: str) -> None:
        """Moves a step aside (process 0 only) so that it is neither restored nor overwritten."""
        logging.warning("Checkpoint step %d is not usable (%s); moving it aside.", step, reason)
        if jax.process_index() == 0:
            source = self.directory / str(step)
            target = self.directory / f"{step}.rejected-{reason.split(':')[0].replace(' ', '-')}"
            suffix = 0
            while target.exists():
                suffix += 1
                target = epath.Path(f"{target}-{suffix}")
            source.rename(target)
        if distributed.is_distributed():
            from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

            multihost_utils.sync_global_devices(f"reject_checkpoint_{step}")
        self._manager.reload()

    def restore_latest(
        self, abstract_state: Any, data_iterator: Any, expected_meta: dict[str, Any]
    ) -> tuple[Any, int] | None:
        """Restores the newest trustworthy step into `data_iterator`; None if there are none.

        Raises IncompatibleCheckpoint (config mismatch) or NoUsableCheckpoint (all damaged)
        before any training step, leaving every checkpoint on disk.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        rejected = []
        for step in steps:
            if not (self.directory / str(step) / COMMIT_MARKER).exists():
                self._reject(step, "uncommitted")
                rejected.append(step)
                continue
            try:
                meta = self._manager.restore(
                    step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())
                )["meta"]
            except Exception as e:  # pylint: disable=broad-except
                self._reject(step, f"unreadable meta: {e}")
                rejected.append(step)
                continue
            _check_compatible(meta, expected_meta, str(self.directory / str(step)))
            restored, problem = self._restore_step(step, abstract_state, data_iterator, meta)
            if distributed.all_hosts_agree(problem is not None):
                self._reject(step, problem or "damaged on another host")
                rejected.append(step)
                continue
            if rejected:
                logging.warning(
                    "Resuming from step %d, older than the rejected steps %s.", step, rejected
                )
            return restored, step
        rejected += [p.name for p in self.directory.glob("*.rejected-*")]
        if rejected:
            # Starting from scratch here would quietly throw away a run: make the user decide.
            raise NoUsableCheckpoint(
                f"no usable checkpoint in {self.directory}: {rejected} are damaged or incomplete "
                "(moved aside as *.rejected-*); inspect them, or start in a new workdir"
            )
        return None

    def _restore_step(self, step, abstract_state, data_iterator, meta):
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=grain.checkpoint.CheckpointRestore(data_iterator),
                ),
            )["state"]
        except Exception as e:  # pylint: disable=broad-except
            logging.warning("Restoring step %d failed: %s", step, e)
            return None, "unreadable"
        saved = np.asarray(meta.get("fingerprint", []), np.float32)
        actual = np.asarray(fingerprint(restored))
        if saved.shape != actual.shape or not np.allclose(saved, actual, rtol=1e-5, atol=1e-6):
            return None, "fingerprint mismatch"
        return restored, None


def _check_compatible(saved: dict, expected: dict, where: str) -> None:
    diffs = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
    if diffs:
        detail = "; ".join(
            f"{k}: checkpoint has {a!r}, this run has {b!r}" for k, (a, b) in sorted(diffs.items())
        )
        raise IncompatibleCheckpoint(
            f"the checkpoint {where} was written by an incompatible run ({detail}). Resume with "
            "the original settings, or use a new --workdir; the checkpoints were left untouched."
        )


def run_signature(config, process_count: int, train_examples: int) -> dict[str, Any]:
    """What a resumed run must share with the run that wrote the checkpoint."""
    return {
        "model.name": config.model.name,
        "model.num_classes": config.model.num_classes,
        "train.global_batch_size": config.train.global_batch_size,
        "train.seed": config.train.seed,
        "process_count": process_count,  # each host's data iterator state is per process
        "train_examples": train_examples,
    }
