"""Per-host batches into globally sharded `jax.Array`s, prefetched onto the devices."""

from __future__ import annotations

import collections
import json
from typing import Any, Iterator

import jax
import numpy as np
from jax.sharding import NamedSharding


def host_rows(sharding: NamedSharding, global_batch_size: int) -> np.ndarray:
    """The rows of a global batch that live on this process's devices, in global order.

    Read from the sharding rather than assumed from the process index, so that any device
    order the mesh uses (TPU meshes follow the physical torus) is fed correctly.
    """
    indices = sharding.addressable_devices_indices_map((global_batch_size,))
    starts = set()
    rows = []
    for index in indices.values():
        sl = index[0]
        start, stop, _ = sl.indices(global_batch_size)
        if start not in starts:  # replicated devices hold the same rows
            starts.add(start)
            rows.append(np.arange(start, stop))
    rows.sort(key=lambda r: r[0])
    return np.concatenate(rows)


def to_global(
    local_batch: dict[str, np.ndarray], sharding: NamedSharding, global_batch_size: int
) -> dict[str, jax.Array]:
    """Assembles one global array per field from every host's local rows."""
    return {
        name: jax.make_array_from_process_local_data(
            sharding, value, (global_batch_size,) + value.shape[1:]
        )
        for name, value in local_batch.items()
    }


class DeviceIterator:
    """Global batches from a Grain iterator, `prefetch` steps ahead on the devices.

    Transfers are asynchronous, so keeping a couple of batches in flight hides the copy
    behind the running step without a thread. The checkpointable state is the state of the
    Grain iterator just after the last batch *handed out*, not after the prefetched ones.

    `get_state`/`set_state` speak bytes (JSON) so that Grain's own Orbax handler
    (`grain.checkpoint.CheckpointSave`) stores one state file per process.
    """

    def __init__(
        self, dataset: Any, sharding: NamedSharding, global_batch_size: int, prefetch: int = 2
    ):
        self._dataset = dataset
        self._sharding = sharding
        self._global_batch = global_batch_size
        self._prefetch = max(prefetch, 1)
        self._source = iter(dataset)
        self._queue: collections.deque = collections.deque()
        self._state = self._source.get_state()  # after the last batch handed out

    def _fill(self) -> None:
        while len(self._queue) < self._prefetch:
            try:
                local = next(self._source)
            except StopIteration:
                return
            self._queue.append(
                (to_global(local, self._sharding, self._global_batch), self._source.get_state())
            )

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._fill()
        if not self._queue:
            raise StopIteration
        batch, self._state = self._queue.popleft()
        self._fill()
        return batch

    def get_state(self) -> bytes:
        return json.dumps(self._state, sort_keys=True).encode()

    def set_state(self, state: bytes) -> None:
        self.close()
        self._source = iter(self._dataset)
        self._state = json.loads(state)
        self._source.set_state(self._state)
        self._queue.clear()

    def start_prefetch(self) -> None:
        """Called by Grain's checkpoint handler after a restore; prefetching starts lazily."""

    def close(self) -> None:
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
