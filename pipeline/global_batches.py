"""Per-host batches into globally sharded `jax.Array`s, prefetched onto the devices."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from typing import Any

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
        assert index is not None  # typed Optional, but every device of a NamedSharding has one
        sl = index[0]
        start, stop, _ = sl.indices(global_batch_size)
        if start not in starts:  # replicated devices hold the same rows
            starts.add(start)
            rows.append(np.arange(start, stop))
    rows.sort(key=lambda r: r[0])
    return np.concatenate(rows)


def to_global(
    local_batch: dict[str, np.ndarray],
    sharding: NamedSharding,
    global_batch_size: int,
    fields: tuple[str, ...] | None = None,
) -> dict[str, jax.Array]:
    """Assembles one global array per field (all, or `fields`) from every host's local rows."""
    return {
        name: jax.make_array_from_process_local_data(
            sharding, value, (global_batch_size,) + value.shape[1:]
        )
        for name, value in local_batch.items()
        if fields is None or name in fields
    }


class DeviceIterator:
    """Global batches from a Grain iterator, `prefetch` steps ahead on the devices.

    Transfers are asynchronous, so keeping a couple of batches in flight hides the copy
    behind the running step without a thread. There is no iterator state to checkpoint: the
    datasets are indexed by global step, so a resumed run builds its iterator at the restored
    step (see `pipeline.dataset`).
    """

    def __init__(
        self,
        dataset: Any,
        sharding: NamedSharding,
        global_batch_size: int,
        prefetch: int = 2,
        fields: tuple[str, ...] | None = None,
    ):
        self._sharding = sharding
        self._global_batch = global_batch_size
        self._prefetch = max(prefetch, 1)
        self._fields = fields
        self._source = iter(dataset)
        self._queue: collections.deque = collections.deque()
        self._loader: threading.Thread | None = None
        self._first: list[Any] = []  # what the loader got: a host batch, or the error

    def start(self) -> None:
        """Loads the first host batch in the background (while, say, the step compiles)."""

        def load():
            try:
                self._first.append(next(self._source))
            except BaseException as e:  # pylint: disable=broad-except  # raised in __next__
                self._first.append(e)

        self._loader = threading.Thread(target=load, name="first-batch", daemon=True)
        self._loader.start()

    def _fill(self) -> None:
        if self._loader is not None:
            self._loader.join()
            self._loader = None
            for local in self._first:
                if isinstance(local, StopIteration):
                    return
                if isinstance(local, BaseException):
                    raise local
                self._queue.append(
                    to_global(local, self._sharding, self._global_batch, self._fields)
                )
            self._first = []
        while len(self._queue) < self._prefetch:
            try:
                local = next(self._source)
            except StopIteration:
                return
            self._queue.append(to_global(local, self._sharding, self._global_batch, self._fields))

    def __iter__(self) -> Iterator[dict[str, jax.Array]]:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        self._fill()
        if not self._queue:
            raise StopIteration
        batch = self._queue.popleft()
        self._fill()
        return batch

    def close(self) -> None:
        if self._loader is not None:
            self._loader.join()
        self._queue.clear()
        close = getattr(self._source, "close", None)
        if close is not None:
            close()
