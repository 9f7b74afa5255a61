"""The one checkpoint verdict (launch.checkpointing.judge_step), in-process on tiny pytrees
saved by the launcher's own Checkpointer: every way a step can be untrustworthy, and the same
verdict through restore (moved aside) and through read_trusted (skipped)."""

import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from launch import checkpointing
from tests import helpers

STATE = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((3,), jnp.int32)}


def _saved(root, steps=(4,)) -> epath.Path:
    ckpt = checkpointing.Checkpointer(
        str(root / "checkpoints"), max_to_keep=10, async_save=False, barrier_timeout_seconds=60
    )
    try:
        for step in steps:
            ckpt.save(step, STATE, {"model.name": "tiny"})
        ckpt.wait()
    finally:
        ckpt.close()
    return epath.Path(root) / "checkpoints"


def _restore(checkpoints) -> tuple[dict, int]:
    """(state, step) restored by the launcher's Checkpointer, which moves bad steps aside."""
    ckpt = checkpointing.Checkpointer(
        str(checkpoints), max_to_keep=10, async_save=False, barrier_timeout_seconds=60
    )
    try:
        abstract = {k: np.zeros(v.shape, v.dtype) for k, v in STATE.items()}
        restored, step, _ = ckpt.restore_latest(abstract, {"model.name": "tiny"})
    finally:
        ckpt.close()
    return restored, step


def _largest_file(folder: str) -> str:
    files = [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names]
    return max(files, key=os.path.getsize)


def _uncommitted(step_dir):
    (step_dir / checkpointing.COMMIT_MARKER).unlink()


def _garbled_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{not json")


def _foreign_meta(step_dir):
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    meta["format"] = "someone-else"
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


def _one_value_changed(step_dir):
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    first = next(iter(meta["digest"]))
    meta["digest"][first] = [x + 1 for x in meta["digest"][first]]
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


def _truncated(step_dir):
    os.truncate(_largest_file(str(step_dir / "state")), 10)


CASES = [
    pytest.param(_uncommitted, "uncommitted", id="uncommitted"),
    pytest.param(_garbled_meta, "unreadable-meta", id="garbled-meta"),
    pytest.param(_foreign_meta, "foreign", id="foreign"),
    pytest.param(_one_value_changed, "digest-mismatch", id="digest"),
    pytest.param(_truncated, "unreadable", id="truncated"),
]


def _read(step_dir):
    return lambda: checkpointing.read_numpy(step_dir / "state")


def test_a_saved_step_is_trusted(tmp_path):
    step_dir = _saved(tmp_path) / "4"
    verdict = checkpointing.judge_step(step_dir, _read(step_dir))
    assert verdict.trusted and verdict.meta["model.name"] == "tiny"
    np.testing.assert_array_equal(verdict.state["w"], STATE["w"])
    assert checkpointing.judge_step(step_dir).trusted  # metadata alone


@pytest.mark.parametrize("damage, reason", CASES)
def test_every_kind_of_damage_has_one_verdict(tmp_path, damage, reason):
    step_dir = _saved(tmp_path) / "4"
    damage(step_dir)
    verdict = checkpointing.judge_step(step_dir, _read(step_dir))
    assert verdict.reason == reason and not verdict.trusted
    assert verdict.describe().startswith(checkpointing.REASONS[reason])


@pytest.mark.parametrize("damage, reason", [c for c in CASES if c.id != "foreign"])
def test_restore_and_read_trusted_agree_and_fall_back(tmp_path, damage, reason):
    checkpoints = _saved(tmp_path, steps=(4, 8))
    damage(checkpoints / "8")
    copy = tmp_path / "copy"
    shutil.copytree(checkpoints, copy / "checkpoints")

    state, meta, step = checkpointing.read_trusted(str(copy))  # skips, moves nothing
    assert step == 4 and sorted(os.listdir(copy / "checkpoints")) == ["4", "8"]

    restored, restored_step = _restore(checkpoints)
    assert restored_step == 4
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert sorted(os.listdir(checkpoints)) == ["4", f"8.rejected-{reason}"]


def test_running_out_of_memory_is_not_damage(tmp_path):
    step_dir = _saved(tmp_path) / "4"

    def read():
        raise MemoryError

    with pytest.raises(MemoryError):  # the step is judged by no one, and moved nowhere
        checkpointing.judge_step(step_dir, read)
    assert os.listdir(step_dir.parent) == ["4"]


def test_a_step_of_another_configuration_is_refused_before_reading(tmp_path):
    step_dir = _saved(tmp_path) / "4"

    def never():
        raise AssertionError("read although the configuration differs")

    def other_config(meta):
        raise checkpointing.IncompatibleCheckpoint("another model")

    with pytest.raises(checkpointing.IncompatibleCheckpoint):
        checkpointing.judge_step(step_dir, never, other_config)


@pytest.mark.parametrize("broken", ["wrong digest", "raises"])
def test_compiled_checks_that_misbehave_never_reject_a_good_step(tmp_path, monkeypatch, broken):
    # Stands in for a stale or damaged entry of executables/: the plain digest decides.
    checkpoints = _saved(tmp_path)
    wrong = jnp.zeros_like(checkpointing.digest(STATE))

    def run(state):
        if broken == "raises":
            raise RuntimeError("this executable cannot run")
        return jnp.bool_(True), wrong

    monkeypatch.setattr(checkpointing.Checkpointer, "_checks_for", lambda self, state: run)
    restored, step = _restore(checkpoints)
    assert step == 4 and os.listdir(checkpoints) == ["4"]
    np.testing.assert_array_equal(restored["w"], STATE["w"])


def written_in_parts(root: str) -> None:
    """Saves and restores a large and a small replicated array over every device, counting
    the parts Orbax writes each in (run in a child process with several devices)."""
    from orbax.checkpoint._src.serialization import replica_slices

    parts: dict[tuple[int, ...], int] = {}
    get = replica_slices.get_replica_slices

    def counting(arr, *args, **kwargs):
        result = get(arr, *args, **kwargs)
        parts[arr.shape] = len(result.replica_slices)
        return result

    replica_slices.get_replica_slices = counting
    devices = jax.devices()
    replicated = NamedSharding(Mesh(np.array(devices), ("batch",)), PartitionSpec())
    large = checkpointing.MIN_REPLICA_SLICE_BYTES * len(devices) // 4  # float32: one MiB a part
    state = {
        "large": jax.device_put(jnp.arange(large, dtype=jnp.float32), replicated),
        "small": jax.device_put(jnp.arange(1000, dtype=jnp.float32), replicated),
    }
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), state
    )
    ckpt = checkpointing.Checkpointer(
        os.path.join(root, "checkpoints"),
        max_to_keep=2,
        async_save=True,
        barrier_timeout_seconds=60,
    )
    try:
        ckpt.save(1, state, {"model.name": "tiny"})
        ckpt.wait()
        restored, step, _ = ckpt.restore_latest(abstract, {"model.name": "tiny"})
    finally:
        ckpt.close()
    assert parts == {(large,): len(devices), (1000,): 1}, parts
    assert step == 1
    for key, value in state.items():  # read on the host, placed on every device
        assert isinstance(restored[key], jax.Array) and restored[key].sharding == replicated
        np.testing.assert_array_equal(np.asarray(restored[key]), np.asarray(value))

    # Another shape or another tree than the one asked for is no state to train on, and the
    # reason given is Orbax's own.
    ckpt = checkpointing.Checkpointer(
        os.path.join(root, "checkpoints"), max_to_keep=2, async_save=False,
        barrier_timeout_seconds=60, read_only=True,
    )  # fmt: skip
    step_dir = epath.Path(root) / "checkpoints" / "1"
    other_shape = dict(
        abstract, small=jax.ShapeDtypeStruct((999,), jnp.float32, sharding=replicated)
    )
    one_more = dict(abstract, more=jax.ShapeDtypeStruct((2,), jnp.float32, sharding=replicated))
    try:
        for wanted, says in [(other_shape, "not compatible"), (one_more, "do not match")]:
            read = functools.partial(ckpt._read_state, 1, wanted)
            verdict = checkpointing.judge_step(step_dir, read)
            assert verdict.reason == "unreadable" and says in verdict.detail, verdict
    finally:
        ckpt.close()


def test_only_large_replicated_arrays_are_written_in_parts(tmp_path):
    """Orbax writes a replicated array in one part per replica only where a part holds at
    least MIN_REPLICA_SLICE_BYTES: each part is sliced and copied to the host one by one, in
    the loop's stall. Both kinds restore exactly onto every device, and an array of another
    shape is not restored. Four devices, so in a child process."""
    code = f"from tests.launch import test_verdict as t; t.written_in_parts({str(tmp_path)!r})"
    child = subprocess.run(
        [sys.executable, "-c", code], env=helpers.child_env(4), capture_output=True, text=True
    )
    assert child.returncode == 0, child.stderr[-3000:]
