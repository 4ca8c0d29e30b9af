"""Moving a request's KV pages between the device pool and host memory.

Swap-out gathers the request's pages into one contiguous device buffer and `device_put`s it to
host memory (memory kind `pinned_host` where the backend has it, else plain host numpy); both
are asynchronous, so the step that follows is not held up. Swap-in uploads the host copy to a
device staging buffer (also asynchronous, so it overlaps the running step) and a later,
cheap device-side scatter writes it into freshly allocated pages.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence

import jax
import numpy as np

from jaxserve.cache import transfer
from jaxserve.cache.paged_kv import POOL_AXES
from jaxserve.parallel.sharding import logical_sharding
from jaxserve.scheduling.cost_model import bucket


def host_memory_kind(device) -> str | None:
    kinds = {m.kind for m in device.addressable_memories()}
    return "pinned_host" if "pinned_host" in kinds else None


@dataclasses.dataclass
class HostEntry:
    data: dict          # {"k", "v"}: [L, bucket(n), S, K, D] in host memory
    num_pages: int      # n: the request's pages
    allocated: int      # the pages the buffers hold (bucket(n)): what `used` counts


class HostPagePool:
    """Swapped-out KV of preempted requests, bounded by `capacity` pages of host memory
    (counted as allocated: a copy of n pages holds bucket(n))."""

    def __init__(self, capacity: int, mesh):
        self.capacity = capacity
        self.mesh = mesh
        self.memory_kind = host_memory_kind(mesh.devices.flat[0])
        self.entries: Dict[str, HostEntry] = {}
        self.used = 0

    @property
    def num_free(self) -> int:
        return self.capacity - self.used

    def _sharding(self, shape, memory_kind):
        s = logical_sharding(POOL_AXES, shape, self.mesh)
        return s.with_memory_kind(memory_kind) if memory_kind else s

    def put(self, request_id: str, pool: dict, pages: Sequence[int]) -> int:
        """Copies `pages` of the device pool to host memory; returns the bytes moved."""
        return self.store(request_id, gather_bucketed(pool, pages), len(pages))

    def store(self, request_id: str, data: dict, num_pages: int) -> int:
        """Keeps device buffers [L, >=num_pages, S, K, D] of a request in host memory."""
        allocated = data["k"].shape[1]
        if allocated > self.num_free:
            raise RuntimeError(f"host pool full: {allocated} pages asked ({num_pages} used), {self.num_free} free")
        if self.memory_kind:
            host = transfer.to_host(data)
        else:
            host = {name: np.asarray(x) for name, x in data.items()}  # backends without host memory spaces
        self.entries[request_id] = HostEntry(host, num_pages, allocated)
        self.used += allocated
        return num_pages * sum(x.nbytes // x.shape[1] for x in host.values())

    def upload(self, request_id: str) -> tuple:
        """Starts the host->device copy of a request's pages; returns (staged data, num_pages)."""
        entry = self.entries.pop(request_id)
        self.used -= entry.allocated
        kind = self.mesh.devices.flat[0].default_memory().kind
        staged = {name: jax.device_put(x, self._sharding(x.shape, kind)) for name, x in entry.data.items()}
        return staged, entry.num_pages

    def drop(self, request_id: str) -> None:
        entry = self.entries.pop(request_id, None)
        if entry is not None:
            self.used -= entry.allocated


def gather_bucketed(pool: dict, pages: Sequence[int]) -> dict:
    """The K and V of `pages` as [L, bucket(n), ...] device buffers: one compilation per bucket,
    not per page count (padding re-reads page 0: harmless for a gather)."""
    idx = np.zeros(bucket(len(pages)), np.int32)
    idx[:len(pages)] = pages
    return transfer.gather(pool, idx)


def write_staged(pool: dict, pages: Sequence[int], staged: dict) -> dict:
    """Scatters an uploaded staging buffer into `pages` of the donated pool (padding rows dropped)."""
    n_total = pool["k"].shape[1]
    idx = n_total + np.arange(staged["k"].shape[1], dtype=np.int32)  # distinct out-of-range padding
    idx[:len(pages)] = pages
    return transfer.scatter(pool, idx, staged)
