"""Joining the hosts with `jax.distributed`, and the global 'batch' mesh."""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import os
import re
import socket
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from orbax.checkpoint import multihost as ocp_multihost

BATCH_AXIS = "batch"


class ClusterError(Exception):
    """This process cannot use the devices the cluster allocated to it: retrying cannot help."""


@dataclasses.dataclass(frozen=True)
class SlurmDevices:
    """The GPUs one process of a Slurm job step should use, read from its environment."""

    local_device_ids: list[int] | None  # CUDA ordinals for jax.distributed (None: JAX chooses)
    expected: int  # GPUs Slurm allocated to this process (0: none, nothing to check)


# What JAX's own Slurm detection (jax/_src/clusters/slurm_cluster.py) requires: a job step.
_SLURM_STEP_VARIABLES = (
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
)  # fmt: skip


def _slurm_tasks_on_this_node(env: dict[str, str]) -> int:
    """This node's task count in the step: SLURM_STEP_TASKS_PER_NODE is e.g. "8", "2(x3),1"."""
    counts: list[int] = []
    for group in env.get("SLURM_STEP_TASKS_PER_NODE", "1").split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", group.strip())
        if not match:
            raise ClusterError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={group!r}")
        counts += [int(match[1])] * int(match[2] or 1)
    node = int(env.get("SLURM_NODEID", "0"))
    return counts[node] if node < len(counts) else counts[-1]


def slurm_devices(env: dict[str, str]) -> SlurmDevices | None:
    """Which GPUs this process uses under Slurm; None outside a Slurm job step.

    Without help JAX gives each Slurm task one GPU, the one numbered SLURM_LOCALID, so one
    launcher per node would train on 1 of its 8 GPUs. Slurm's environment for a task (checked
    on a real slurmd, see tests/integration/test_slurm.py):
      SLURM_STEP_GPUS       the GPUs of this task; all of the node's step GPUs, or only its own
                            under --gpus-per-task / --gpu-bind
      SLURM_GPUS_ON_NODE    the step's GPU count on this node
      CUDA_VISIBLE_DEVICES  what this task's CUDA sees, so the ordinals are 0..n-1 (the IDs
                            listed are global unless the cluster constrains devices by cgroup)
    Layouts: one task per node (tools/cluster/slurm_train.sbatch) uses every GPU it sees; tasks
    bound to their own GPUs use theirs; several tasks that all see the node's GPUs split them evenly
    (one each with one task per GPU, as JAX itself does). No GPUs allocated: JAX's choice,
    unchanged.
    """
    if not all(name in env for name in _SLURM_STEP_VARIABLES):
        return None
    task_gpus = [g for g in env.get("SLURM_STEP_GPUS", "").split(",") if g.strip()]
    node_gpus = int(env.get("SLURM_GPUS_ON_NODE") or len(task_gpus))
    if not node_gpus:
        return SlurmDevices(None, 0)
    if not task_gpus:  # an older Slurm: only the count
        task_gpus = [str(i) for i in range(node_gpus)]
    if "CUDA_VISIBLE_DEVICES" in env:
        visible = [g for g in env["CUDA_VISIBLE_DEVICES"].split(",") if g.strip()]
        ordinals = list(range(len(visible)))
    else:  # nothing hides devices: CUDA numbers the node's GPUs as Slurm does
        ordinals = [int(g) for g in task_gpus]
    tasks = _slurm_tasks_on_this_node(env)
    if tasks == 1 or len(task_gpus) < node_gpus:  # alone on the node, or bound to its own GPUs
        return SlurmDevices(ordinals, len(task_gpus))
    if len(ordinals) % tasks:
        raise ClusterError(
            f"{tasks} Slurm tasks on this node share {len(ordinals)} GPUs, which does not "
            "divide; run one task per node (srun --ntasks-per-node=1) or one per GPU"
        )
    share = len(ordinals) // tasks
    local = int(env["SLURM_LOCALID"])
    return SlurmDevices(ordinals[local * share : (local + 1) * share], share)


def _check_and_log_devices(expected: int, what: str) -> None:
    """Logs this process's devices; ClusterError when it sees fewer GPUs than `expected`."""
    local = jax.local_devices()
    platform = local[0].platform if local else "no"
    logging.info(
        "Process %d of %d: %d local %s device(s)%s.",
        jax.process_index(), jax.process_count(), len(local), platform, what,
    )  # fmt: skip
    gpus = sum(d.platform == "gpu" for d in local)
    if gpus < expected:
        raise ClusterError(
            f"process {jax.process_index()} sees {gpus} GPU(s) but Slurm allocated {expected} "
            f"to it ({len(local)} {platform} device(s) visible): check that jax[cuda12] is "
            "installed (pip install '.[gpu]') and that the node's GPUs work (nvidia-smi)"
        )


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    heartbeat_timeout_seconds: int,
    initialization_timeout_seconds: int,
) -> None:
    """Initialises `jax.distributed` before anything touches a device, logs the devices, and
    learns which slice each host is in (`_join_slices`).

    Explicit flags (GPU clusters, local simulation) win; without them JAX auto-detects TPU
    pod slices and Slurm; where nothing is detected the run is a plain single process. Under
    Slurm each process gets the GPUs Slurm allocated to it (`slurm_devices`), and raises
    ClusterError when it sees fewer.
    """
    _join_jax(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout_seconds=initialization_timeout_seconds,
    )
    _join_slices(dict(os.environ), initialization_timeout_seconds)


def _join_jax(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    heartbeat_timeout_seconds: int,
    initialization_timeout_seconds: int,
) -> None:
    init = functools.partial(
        jax.distributed.initialize,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout_seconds,
    )
    if coordinator_address or num_processes or process_id is not None:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        if num_processes == 1:
            # No other process to reach: the devices reduce among themselves in memory. Gloo
            # (JAX's default once jax.distributed is up) would carry even those collectives
            # over TCP, one rank per device: the demo's step on 1x4 takes twice as long.
            jax.config.update("jax_cpu_collectives_implementation", None)
        timeout = initialization_timeout_seconds
        if process_id != 0:
            timeout -= _wait_for_coordinator(coordinator_address, timeout)
        init(coordinator_address, num_processes, process_id, initialization_timeout=max(1, timeout))
        _check_and_log_devices(0, "")
        return
    # JAX_LOCAL_DEVICE_IDS: the user's own choice, which JAX reads itself.
    slurm = None if "JAX_LOCAL_DEVICE_IDS" in os.environ else slurm_devices(dict(os.environ))
    try:
        init(local_device_ids=None if slurm is None else slurm.local_device_ids)
    except ValueError as e:
        if "coordinator_address" not in str(e):
            raise
        logging.info("No cluster detected (%s): running as a single process.", e)
        _check_and_log_devices(0, "")
        return
    if slurm is None or not slurm.expected:
        _check_and_log_devices(0, "")
        return
    _check_and_log_devices(
        slurm.expected,
        f" (Slurm allocated {slurm.expected} GPU(s) to it: CUDA ordinals {slurm.local_device_ids})",
    )


def _wait_for_coordinator(address: str, timeout_seconds: float) -> int:
    """Waits until process 0 listens on `address` (host:port), at most `timeout_seconds`;
    returns the whole seconds waited.

    A process that asks before the coordinator listens tries again only after gRPC's
    reconnect backoff (a second, then longer), so a host that starts first would idle.
    """
    host, _, port = address.rpartition(":")
    if not port.isdigit() or "/" in host:  # a gRPC target (dns:///h:p): left to JAX
        return 0
    start = time.monotonic()
    while time.monotonic() - start < timeout_seconds:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                break
        except OSError:
            time.sleep(0.1)
    return int(time.monotonic() - start)


def is_distributed() -> bool:
    return jax.process_count() > 1


def coordination_client():
    """jax.distributed's coordination-service client (key-value store, barriers)."""
    return ocp_multihost.get_jax_distributed_client()


def from_process_0(key: str, value: Callable[[], str], what: str, timeout_seconds: float) -> str:
    """`value()` as process 0 computed it, on every process (through the coordination
    service); raises HostsNotReady, naming `what`, where it does not come within the deadline.
    Without jax.distributed, `value()`."""
    if not is_distributed():
        return value()
    client = coordination_client()
    if jax.process_index() == 0:
        client.key_value_set(key, value())
    try:
        return client.blocking_key_value_get(key, int(timeout_seconds * 1000))
    except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError: deadline
        raise HostsNotReady(
            f"process 0 did not publish {what} within {timeout_seconds:.0f}s "
            f"({str(e).splitlines()[0] if str(e) else 'no details'})"
        ) from None


def make_mesh() -> Mesh:
    """One 'batch' axis over every device of every host (and of every slice), logged.

    Within a slice JAX orders the devices for the ICI topology; with several slices each
    slice's devices are contiguous on the axis (`slice_major_devices`).
    """
    devices = _devices_with_slices(jax.devices())
    slices = count_slices(devices)
    axis_types = (jax.sharding.AxisType.Explicit,)  # what jax.make_mesh gives one slice
    if slices == 1:
        mesh = jax.make_mesh(
            (len(devices),), (BATCH_AXIS,), axis_types, devices=[_untagged(d) for d in devices]
        )
    else:
        mesh = Mesh(slice_major_devices(devices), (BATCH_AXIS,), axis_types=axis_types)
    logging.info(
        "Mesh: %r axis of %d devices = %d slice(s) x %d device(s)%s.",
        BATCH_AXIS, mesh.devices.size, slices, mesh.devices.size // slices,
        " (ICI within a slice, DCN across slices)" if slices > 1 else "",
    )  # fmt: skip
    return mesh


# TPU multislice sets these on every host (GKE, queued resources); launch.local_cluster
# --slices sets them for the CPU simulation, whose devices carry no slice_index.
SLICE_COUNT_VARIABLE = "MEGASCALE_NUM_SLICES"
SLICE_ID_VARIABLE = "MEGASCALE_SLICE_ID"
_SLICE_KEY = "resnet_multihost/slice_of_process/"
# process index -> slice, where the hosts declared their slices (devices that cannot tell).
_process_slices: dict[int, int] | None = None


@dataclasses.dataclass(frozen=True)
class SliceTaggedDevice:
    """A device that cannot tell its slice, with the slice its process declared."""

    device: Any
    slice_index: int

    def __getattr__(self, name: str) -> Any:
        return getattr(self.device, name)


def _untagged(device: Any) -> Any:
    return device.device if isinstance(device, SliceTaggedDevice) else device


def _devices_with_slices(devices: list) -> list:
    if _process_slices is None:
        return devices
    return [SliceTaggedDevice(d, _process_slices[d.process_index]) for d in devices]


def count_slices(devices: list) -> int:
    """How many slices `devices` span (1 where they carry no slice_index)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def slice_major_devices(devices: list) -> np.ndarray:
    """`devices` as one axis: slice 0's devices, then slice 1's, ...; within a slice in JAX's
    order for its ICI topology. A batch-axis all-reduce then sums within each slice over ICI
    and crosses the DCN between slices once (jax's create_hybrid_device_mesh).
    """
    slices = count_slices(devices)
    if len(devices) % slices:
        raise ClusterError(f"{len(devices)} devices do not split evenly into {slices} slices")
    ordered = mesh_utils.create_hybrid_device_mesh((len(devices) // slices,), (slices,), devices)
    return np.vectorize(_untagged, otypes=[object])(ordered)


def declared_slice(env: dict[str, str]) -> tuple[int, int] | None:
    """(slice count, this host's slice) from MEGASCALE_NUM_SLICES / MEGASCALE_SLICE_ID;
    None where the environment declares no more than one slice."""
    count_text = env.get(SLICE_COUNT_VARIABLE, "").strip()
    id_text = env.get(SLICE_ID_VARIABLE, "").strip()
    if not count_text:
        if id_text:
            raise ClusterError(
                f"{SLICE_ID_VARIABLE}={id_text} is set without {SLICE_COUNT_VARIABLE}"
            )
        return None
    if not count_text.isdigit() or int(count_text) < 1:
        raise ClusterError(
            f"{SLICE_COUNT_VARIABLE}={count_text!r} must be a whole number of slices, at least 1"
        )
    count = int(count_text)
    if count == 1 and not id_text:
        return None
    if not id_text.isdigit() or int(id_text) >= count:
        raise ClusterError(
            f"{SLICE_ID_VARIABLE}={id_text!r} must be this host's slice, 0 to {count - 1} "
            f"({SLICE_COUNT_VARIABLE}={count})"
        )
    return None if count == 1 else (count, int(id_text))


def check_slices(
    declared: dict[int, tuple[int, int]], devices_per_process: dict[int, int]
) -> dict[int, int]:
    """Every process's declared (slice count, slice) -> process index -> slice, or ClusterError
    naming what disagrees: the counts, an empty slice, slices of unequal size."""
    counts = {count for count, _ in declared.values()}
    if len(counts) != 1:
        detail = ", ".join(f"process {p}: {c}" for p, (c, _) in sorted(declared.items()))
        raise ClusterError(f"the hosts declare different {SLICE_COUNT_VARIABLE} ({detail})")
    (count,) = counts
    members: dict[int, list[int]] = {s: [] for s in range(count)}
    for process, (_, slice_id) in sorted(declared.items()):
        members[slice_id].append(process)
    empty = [s for s, processes in members.items() if not processes]
    if empty:
        raise ClusterError(
            f"{SLICE_COUNT_VARIABLE}={count} but slice(s) {', '.join(map(str, empty))} have no "
            f"process ({len(declared)} process(es) in all); every slice needs at least one host"
        )
    sizes = {s: sum(devices_per_process[p] for p in ps) for s, ps in members.items()}
    if len(set(sizes.values())) > 1:
        detail = ", ".join(f"slice {s}: {n}" for s, n in sizes.items())
        raise ClusterError(f"slices must have equal numbers of devices, got {detail}")
    return {p: slice_id for p, (_, slice_id) in declared.items()}


def _exchange_declared_slices(
    mine: tuple[int, int] | None, timeout_seconds: float
) -> dict[int, tuple[int, int]]:
    """Every process's declared (slice count, slice), through the coordination service."""
    own = mine or (1, 0)
    if not is_distributed():
        return {0: own}
    client = coordination_client()
    client.key_value_set(f"{_SLICE_KEY}{jax.process_index()}", f"{own[0]} {own[1]}", True)
    declared = {}
    for process in range(jax.process_count()):
        try:
            text = client.blocking_key_value_get(
                f"{_SLICE_KEY}{process}", int(timeout_seconds * 1000)
            )
        except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError: deadline
            # A host lost after joining: transient, unlike a wrong declaration.
            raise HostsNotReady(
                f"process {process} did not say its slice within {timeout_seconds:.0f}s "
                f"({str(e).splitlines()[0] if str(e) else 'no details'})"
            ) from None
        count, slice_id = text.split()
        declared[process] = (int(count), int(slice_id))
    return declared


def _join_slices(env: dict[str, str], timeout_seconds: float) -> None:
    """Reads this host's slice from the environment and learns every host's, for make_mesh.

    TPU devices know their slice (slice_index) and are trusted as they are; CPU and GPU
    devices report slice 0 everywhere, so their hosts declare it.
    """
    global _process_slices
    _process_slices = None
    mine = declared_slice(env)
    devices = jax.devices()
    if devices[0].platform == "tpu" or count_slices(devices) > 1:
        return
    declared = _exchange_declared_slices(mine, timeout_seconds)
    if all(count == 1 for count, _ in declared.values()):
        return
    per_process = collections.Counter(d.process_index for d in devices)
    _process_slices = check_slices(declared, dict(per_process))
    mine_now = _process_slices[jax.process_index()]
    logging.info("Process %d is in slice %d of %d.", jax.process_index(), mine_now, declared[0][0])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, what: str = "train.global_batch_size") -> int:
    """Returns the per-device batch, or says why the global batch does not divide."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size <= 0 or global_batch_size % devices:
        below = global_batch_size // devices * devices
        valid = sorted({max(devices, below), max(devices, below + devices)})
        raise ValueError(
            f"{what}={global_batch_size} must be a positive multiple of the number of devices, "
            f"{devices} ({processes} processes x {jax.local_device_count()} devices), so that "
            f"every device gets the same number of examples; nearest valid: "
            f"{' or '.join(map(str, valid))}"
        )
    return global_batch_size // devices


def describe_topology(global_batch_size: int) -> str:
    return (
        f"{jax.process_count()} process(es) x {jax.local_device_count()} "
        f"{jax.devices()[0].platform} device(s) = {jax.device_count()} devices; "
        f"global batch {global_batch_size}, per device "
        f"{global_batch_size // jax.device_count()}; this is process {jax.process_index()}"
    )


class HostsNotReady(Exception):
    """Some host did not reach a barrier in time (stuck, or far slower than the rest)."""


def wait_for_all_hosts(name: str, timeout_seconds: float) -> float:
    """Blocks until every process reaches barrier `name`; returns the seconds waited.

    A coordination-service barrier, not a device collective: it has a deadline, so a host
    that never arrives raises HostsNotReady here instead of hanging the others.
    """
    if not is_distributed():
        return 0.0
    start = time.monotonic()
    try:
        coordination_client().wait_at_barrier(name, timeout_in_ms=int(timeout_seconds * 1000))
    except Exception as e:  # pylint: disable=broad-except  # XlaRuntimeError, DEADLINE_EXCEEDED
        raise HostsNotReady(
            f"not every host reached {name!r} within {timeout_seconds:.0f}s "
            f"({_barrier_summary(str(e))})"
        ) from None
    return time.monotonic() - start


def _barrier_summary(error: str) -> str:
    """One line out of the coordination service's several-line barrier error."""
    arrived = re.search(r"reached the barrier: (\d+)/(\d+)", error)
    missing = re.search(r"timed out task names:\s*([\d\s,]+)", error)
    if not arrived:
        return error.splitlines()[0] if error else "no details"
    summary = f"{arrived[1]} of {arrived[2]} arrived"
    if missing:
        summary += "; missing process(es) " + ", ".join(re.findall(r"\d+", missing[1]))
    return summary


_agreements = itertools.count()  # any_host calls so far: the same sequence on every host

# How long `any_host` waits for the other hosts: far longer than any start-up phase between
# two agreements (they come at set points of the start-up), yet not forever.
AGREE_TIMEOUT_SECONDS = 1800.0


def any_host(flag: bool, timeout_seconds: float = AGREE_TIMEOUT_SECONDS) -> bool:
    """True where any host says True; every host calls it, at the same points of its run.

    Through the coordination service (the hosts saying True leave a key, all meet at a
    barrier, each then lists the keys), not a device collective: nothing is compiled (a
    jitted all-gather would be, on every start), and a host that never comes raises
    HostsNotReady instead of hanging the others.
    """
    if not is_distributed():
        return flag
    name = f"launch/any_host/{next(_agreements)}"
    client = coordination_client()
    try:
        if flag:
            client.key_value_set(f"{name}/{jax.process_index()}", "1")
        wait_for_all_hosts(name, timeout_seconds)
        return bool(client.key_value_dir_get(name))
    except HostsNotReady:
        raise
    except Exception as e:  # pylint: disable=broad-except  # the coordination service is gone
        raise HostsNotReady(f"hosts could not agree on {name!r}: {e}") from None
