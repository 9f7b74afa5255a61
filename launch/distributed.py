"""Joining the hosts with `jax.distributed`, and the global 'batch' mesh."""

from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXIS = "batch"


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    *,
    heartbeat_timeout_seconds: int,
    initialization_timeout_seconds: int,
) -> None:
    """Initialises `jax.distributed` before anything touches a device.

    Explicit flags (GPU clusters, local simulation) win; without them JAX auto-detects TPU
    pod slices and Slurm; where nothing is detected the run is a plain single process.
    """
    timeouts = dict(
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        initialization_timeout=initialization_timeout_seconds,
    )
    if coordinator_address or num_processes or process_id is not None:
        if not (coordinator_address and num_processes and process_id is not None):
            raise ValueError("--coordinator_address, --num_processes and --process_id go together")
        jax.distributed.initialize(coordinator_address, num_processes, process_id, **timeouts)
        return
    try:
        jax.distributed.initialize(**timeouts)
    except ValueError as e:
        if "coordinator_address" not in str(e):
            raise
        logging.info("No cluster detected (%s): running as a single process.", e)


def is_distributed() -> bool:
    return jax.process_count() > 1


def make_mesh() -> Mesh:
    """One mesh over every device of every host; make_mesh orders devices for the topology."""
    return jax.make_mesh((jax.device_count(),), (BATCH_AXIS,), devices=jax.devices())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch_size: int, what: str = "train.global_batch_size") -> int:
    """Returns the per-device batch, or says why the global batch does not divide."""
    devices, processes = jax.device_count(), jax.process_count()
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"{what}={global_batch_size} must be a positive multiple of the number of devices, "
            f"{devices} ({processes} processes x {jax.local_device_count()} devices), so that "
            "every device gets the same number of examples; nearest valid values: "
            f"{max(devices, global_batch_size // devices * devices)} or "
            f"{(global_batch_size // devices + 1) * devices}"
        )
    return global_batch_size // devices


def describe_topology(global_batch_size: int) -> str:
    return (
        f"{jax.process_count()} process(es) x {jax.local_device_count()} "
        f"{jax.devices()[0].platform} device(s) = {jax.device_count()} devices; "
        f"global batch {global_batch_size}, per device "
        f"{global_batch_size // jax.device_count()}; this is process {jax.process_index()}"
    )


class PreemptionWatch:
    """Tells every host, at the same step, that some host was asked to stop.

    Distributed: JAX's preemption service (the coordinator relays one host's SIGTERM, and
    `reached_preemption_sync_point` turns true on every host at one agreed step; every host
    must ask at every step). Single process: that function is always False, so a SIGTERM
    handler sets a flag instead.
    """

    def __init__(self):
        self._signalled = threading.Event()
        if not is_distributed():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._signalled.set())

    def should_stop(self, step: int) -> bool:
        if is_distributed():
            return multihost_utils.reached_preemption_sync_point(step)
        return self._signalled.is_set()


def all_hosts_agree(flag: bool) -> bool:
    """True where any host says True (a host-side all-reduce; call it on every host)."""
    if not is_distributed():
        return flag
    flags = multihost_utils.process_allgather(np.asarray(flag, np.int32))
    return bool(np.any(flags))
