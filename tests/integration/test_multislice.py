"""Multislice: the slice-major 'batch' mesh, the slice declarations, and runs on several slices.

The fast tests check the device order and the checks on what hosts declare. The slow ones run
the real launcher in several processes grouped into slices by `launch.local_cluster --slices`
(the CPU devices carry no slice_index: each process reads its slice from MEGASCALE_SLICE_ID).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.experimental import mesh_utils

from launch import distributed, train
from launch.status import ExitStatus
from tests import helpers


@dataclasses.dataclass(frozen=True)
class FakeTpuChip:
    """What JAX's mesh builder reads from a TPU device. Real TPU devices cannot be created on
    this machine, so this ORDER test alone uses these descriptions; every other test here
    uses real devices."""

    id: int
    slice_index: int
    process_index: int
    coords: tuple[int, int, int]
    core_on_chip: int = 0
    platform: str = "tpu"
    device_kind: str = "TPU v6 lite"


def two_slices_of_two_hosts_of_four_chips() -> list[FakeTpuChip]:
    """Two v6e 2x4 slices, each on two 4-chip hosts (ct6e-standard-4t), numbered as JAX's
    TPU cluster numbers processes: slice * hosts_per_slice + worker."""
    chips = []
    for slice_index in range(2):
        for host in range(2):
            for chip in range(4):
                coords = (chip % 2, 2 * host + chip // 2, 0)
                chips.append(FakeTpuChip(len(chips), slice_index, 2 * slice_index + host, coords))
    return chips


def describe(devices) -> list[tuple[int, int, tuple[int, int, int]]]:
    return [(d.slice_index, d.process_index, d.coords) for d in devices]


def test_mesh_order_for_two_slices_of_two_hosts_of_four_chips():
    chips = two_slices_of_two_hosts_of_four_chips()
    order = distributed.slice_major_devices(chips)
    assert order.shape == (16,)
    # Each slice contiguous: the axis crosses the DCN once, between position 7 and 8.
    assert [d.slice_index for d in order] == [0] * 8 + [1] * 8
    # Within a slice, JAX's own order for that slice's ICI topology.
    for s in range(2):
        alone = mesh_utils.create_device_mesh((8,), [c for c in chips if c.slice_index == s])
        assert list(order[8 * s : 8 * s + 8]) == list(alone)
    assert describe(order)[:8] == [
        (0, 0, (0, 0, 0)), (0, 0, (1, 0, 0)), (0, 0, (0, 1, 0)), (0, 0, (1, 1, 0)),
        (0, 1, (1, 3, 0)), (0, 1, (0, 3, 0)), (0, 1, (1, 2, 0)), (0, 1, (0, 2, 0)),
    ]  # fmt: skip
    # The order follows slice_index, not the order the devices are listed in.
    shuffled = chips[8:] + chips[:8]
    assert list(distributed.slice_major_devices(shuffled)) == list(order)


# Run in a child with 4 simulated CPU devices (this process has one).
_TAGGED_CPU_MESH = """
import jax, numpy as np
from launch import distributed
devices = jax.devices()
assert len(devices) == 4
tagged = [distributed.SliceTaggedDevice(d, 1 - i // 2) for i, d in enumerate(devices)]
assert distributed.count_slices(tagged) == 2
order = distributed.slice_major_devices(tagged)
assert list(order) == devices[2:] + devices[:2], order  # slice 0 first
mesh = jax.sharding.Mesh(order, ("batch",))
x = jax.device_put(np.arange(8.0), distributed.batch_sharding(mesh))
assert float(jax.jit(lambda v: v.sum())(x)) == 28.0
print("ok")
"""


@pytest.mark.slow
def test_cpu_devices_tagged_with_slices_make_a_real_mesh():
    """The CPU simulation's path: real devices tagged with their process's slice."""
    run = subprocess.run(
        [sys.executable, "-c", _TAGGED_CPU_MESH], cwd=helpers.REPO, env=helpers.child_env(4),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_one_slice_keeps_jax_make_mesh():
    mesh = distributed.make_mesh()
    plain = jax.make_mesh((jax.device_count(),), ("batch",), devices=jax.devices())
    assert list(mesh.devices.flat) == list(plain.devices.flat)
    assert mesh.axis_names == plain.axis_names and mesh.axis_types == plain.axis_types


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"MEGASCALE_NUM_SLICES": "1"}, None),
        ({"MEGASCALE_NUM_SLICES": "1", "MEGASCALE_SLICE_ID": "0"}, None),
        ({"MEGASCALE_NUM_SLICES": "4", "MEGASCALE_SLICE_ID": "3"}, (4, 3)),
        ({"MEGASCALE_NUM_SLICES": " 2 ", "MEGASCALE_SLICE_ID": "0"}, (2, 0)),
    ],
)
def test_declared_slice(env, expected):
    assert distributed.declared_slice(env) == expected


def test_check_slices_maps_processes_to_slices():
    declared = {0: (2, 0), 1: (2, 0), 2: (2, 1), 3: (2, 1)}
    assert distributed.check_slices(declared, {p: 2 for p in range(4)}) == {
        0: 0, 1: 0, 2: 1, 3: 1
    }  # fmt: skip


# -------------------------------------------------------------- real runs on slices --


def launch_on_slices(args, *, processes: int, devices: int, slices: int):
    """The real launcher through local_cluster, its processes grouped into `slices`."""
    cmd = helpers.launcher_command(args, processes, devices, cluster_flags=(f"--slices={slices}",))
    return subprocess.run(
        cmd, cwd=helpers.REPO, env=helpers.child_env(devices), capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip


def _final_state(workdir: str, step: int) -> dict[str, np.ndarray]:
    return helpers.flat_arrays(helpers.load_state(workdir, step))


@pytest.mark.slow
def test_two_slices_train_exactly_as_one_slice(data, tmp_path):
    """2 processes x 2 devices as 2 slices against the same layout as 1 slice: the same mesh
    order, so the same global batches and a bit-identical final state."""
    runs = {}
    for slices in (1, 2):
        workdir = str(tmp_path / f"slices-{slices}")
        args = helpers.tiny_run_args(*data, workdir, **{"train.num_steps": 4})
        run = launch_on_slices(args, processes=2, devices=2, slices=slices)
        assert run.returncode == 0, run.stdout[-3000:]
        runs[slices] = (workdir, run.stdout)
    assert "2 slice(s) x 2 device(s) (ICI within a slice, DCN across slices)" in runs[2][1]
    assert "Process 0 is in slice 0 of 2." in runs[2][1]  # process 0 logs its progress
    assert "1 slice(s) x 4 device(s)" in runs[1][1]
    one, two = _final_state(runs[1][0], 4), _final_state(runs[2][0], 4)
    assert one.keys() == two.keys()
    for key in one:
        np.testing.assert_array_equal(one[key], two[key], err_msg=key)
    metrics = [
        [json.loads(line) for line in open(os.path.join(w, "metrics.jsonl"))]
        for w, _ in runs.values()
    ]
    assert [m.get("train/loss") for m in metrics[0]] == [m.get("train/loss") for m in metrics[1]]


@pytest.mark.slow
def test_a_run_that_loses_a_slice_continues_on_the_one_left(data, reference_16, tmp_path):
    """4 processes x 1 device as 2 slices, preempted at step 4; resumed on the slice that is
    left (2 processes, 1 slice); equal to the uninterrupted 1x4 run within test_elastic's
    tolerance."""
    workdir = str(tmp_path / "lost-a-slice")
    args = helpers.tiny_run_args(
        *data, workdir, **{"train.num_steps": 16, "checkpoint.every_steps": 4}
    )
    proc = helpers.start(args, processes=4, devices=1, cluster_flags=("--slices=2",))
    seen: list[str] = []
    assert helpers.wait_for_line(proc, "step 4/16", seen), "".join(seen)[-3000:]
    proc.send_signal(signal.SIGINT)
    seen += proc.stdout.readlines()
    proc.wait(timeout=120)
    assert proc.returncode == ExitStatus.PREEMPTED, "".join(seen)[-3000:]
    assert "2 slice(s) x 2 device(s)" in "".join(seen)

    last = launch_on_slices(args, processes=2, devices=2, slices=1)
    assert last.returncode == 0, last.stdout[-3000:]
    assert "Resuming a 4x1 checkpoint on 2x2" in last.stdout
    finished = json.load(open(os.path.join(workdir, train.FINISHED_MARKER)))
    layouts = [(t["processes"], t["devices_per_process"]) for t in finished["topology_history"]]
    assert layouts == [(4, 1), (2, 2)]
    one, moved = _final_state(reference_16, 16), _final_state(workdir, 16)
    for key in one:
        if key.startswith("['params']") or key.startswith("['batch_stats']"):
            np.testing.assert_allclose(one[key], moved[key], rtol=5e-3, atol=3e-3, err_msg=key)
    np.testing.assert_array_equal(one["['step']"], moved["['step']"])
