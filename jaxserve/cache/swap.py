"""Moving KV pages between the device pool and host memory: swapped requests, cached prefix pages.

Swap-out gathers the request's pages into one contiguous device buffer and `device_put`s it to
host memory (memory kind `pinned_host` where the backend has it, else plain host numpy); both
are asynchronous, so the step that follows is not held up. Swap-in uploads the host copy to a
device staging buffer (also asynchronous, so it overlaps the running step) and a later,
cheap device-side scatter writes it into freshly allocated pages.

The same pool is the prefix cache's host tier: named pages evicted from the device are kept
here, by name and one by one, in the room swapped requests leave, and go first (least recently
used) when a swap-out needs that room.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cache import transfer
from jaxserve.cache.paged_kv import POOL_AXES
from jaxserve.cache.prefix_cache import leading_run
from jaxserve.model.sharding import logical_sharding
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
    (counted as allocated: a copy of n pages holds bucket(n)), and named prefix pages in the
    room they leave (evicted first, LRU, when a swap-out needs it). Cached pages are kept one
    by one, so that a hit uploads the pages it needs and nothing else."""

    def __init__(self, capacity: int, mesh):
        self.capacity = capacity
        self.mesh = mesh
        self.memory_kind = host_memory_kind(mesh.devices.flat[0])
        self.entries: Dict[str, HostEntry] = {}
        self.used = 0  # pages of swapped requests' entries
        # named prefix pages: name -> {"k", "v"} [L, 1, S, K, D] in host memory, LRU first
        self._cached: "collections.OrderedDict[bytes, dict]" = collections.OrderedDict()
        self.stats = {"cached_pages_dropped": 0}

    @property
    def num_free(self) -> int:
        """Room for swap-outs: cached prefix pages give theirs up."""
        return self.capacity - self.used

    @property
    def num_cached(self) -> int:
        """Named prefix pages held (each one page; always <= capacity - used)."""
        return len(self._cached)

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
        self._make_room(allocated)
        host = self._to_host(data)
        self.entries[request_id] = HostEntry(host, num_pages, allocated)
        self.used += allocated
        return num_pages * sum(x.nbytes // x.shape[1] for x in host.values())

    def _to_host(self, data: dict) -> dict:
        if self.memory_kind:
            return transfer.to_host(data)
        return {name: np.asarray(x) for name, x in data.items()}  # backends without host memory spaces

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

    # -- the prefix cache's host tier ----------------------------------------------------------
    def has_cached(self, name: bytes) -> bool:
        return name in self._cached

    def cached_prefix(self, names: Sequence[bytes]) -> int:
        """How many of `names`, from the first, this pool holds."""
        return leading_run(names, self._cached)

    def cache_pages(self, names: Sequence[bytes], data: dict) -> int:
        """Keeps the pages of device buffers [L, >= len(names), ...], one per name, in the room
        swapped requests' entries leave; older cached pages make room. Returns how many it kept."""
        n = min(len(names), self.num_free)
        self.stats["cached_pages_dropped"] += len(names) - n
        if n == 0:
            return 0
        self._make_room(n)
        pages = split_pages(data)
        for i, name in enumerate(names[:n]):
            self._cached[name] = self._to_host(pages[i])
        return n

    def touch(self, names: Sequence[bytes]) -> None:
        for name in names:
            self._cached.move_to_end(name)

    def upload_cached(self, names: Sequence[bytes]) -> dict:
        """Starts the upload of named pages: {"k", "v"} device buffers [L, bucket(len(names)), ...]
        holding them in order (their host copies stay cached)."""
        kind = self.mesh.devices.flat[0].default_memory().kind
        pages = []
        for name in names:
            self._cached.move_to_end(name)
            pages.append({n: jax.device_put(x, self._sharding(x.shape, kind)) for n, x in self._cached[name].items()})
        return stack_pages(tuple(pages + pages[:1] * (bucket(len(pages)) - len(pages))))

    def forget_cached(self) -> None:
        self._cached.clear()

    def _make_room(self, pages: int) -> None:
        """Drops cached pages, least recently used first, until `pages` more fit."""
        while self.capacity - self.used - len(self._cached) < pages and self._cached:
            self._cached.popitem(last=False)
            self.stats["cached_pages_dropped"] += 1


@jax.jit
def split_pages(blocks: dict) -> list:
    """[L, n, ...] buffers -> n single-page [L, 1, ...] buffers (one compilation per bucket of n)."""
    n = blocks["k"].shape[1]
    return [{name: x[:, i:i + 1] for name, x in blocks.items()} for i in range(n)]


@jax.jit
def stack_pages(pages: tuple) -> dict:
    """Single-page buffers -> one [L, len(pages), ...] buffer per name."""
    return {name: jnp.concatenate([p[name] for p in pages], axis=1) for name in pages[0]}


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
