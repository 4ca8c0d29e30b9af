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

    def reserve(self, pool: dict) -> None:
        """Allocates the whole pool's worth of host memory once and frees it, so that the host
        allocator holds that much pinned memory from then on: pinning fresh memory while serving
        took milliseconds a copy, and a tier that grows all along kept pinning."""
        if not self.memory_kind or not self.capacity:
            return
        blocks = {}
        for name, x in pool.items():
            shape = (x.shape[0], self.capacity) + x.shape[2:]
            blocks[name] = jax.jit(lambda shape=shape, dtype=x.dtype: jnp.zeros(shape, dtype),
                                   out_shardings=self._sharding(shape, self.memory_kind))()
        jax.block_until_ready(blocks)
        for x in blocks.values():
            x.delete()

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

    def _to_host(self, data):
        """A tree of device buffers in host memory, copied in one batched call."""
        if self.memory_kind:
            return transfer.to_host(data)
        return jax.device_get(data)  # backends without host memory spaces: numpy

    def _to_device(self, data):
        """A tree of host buffers on the devices, in the pool's layout, copied in one batched call."""
        kind = self.mesh.devices.flat[0].default_memory().kind
        leaves, treedef = jax.tree.flatten(data)
        return jax.tree.unflatten(treedef, jax.device_put(leaves, [self._sharding(x.shape, kind) for x in leaves]))

    def upload(self, request_id: str) -> tuple:
        """Starts the host->device copy of a request's pages; returns (staged data, num_pages)."""
        entry = self.entries.pop(request_id)
        self.used -= entry.allocated
        return self._to_device(entry.data), entry.num_pages

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

    def cache_pages(self, names: Sequence[bytes], pool: dict, pages: Sequence[int]) -> int:
        """Keeps `pages` of the device pool, one per name, in the room swapped requests' entries
        leave; older cached pages make room. Returns how many it kept. The copy is queued behind
        the steps dispatched so far, so it reads the pages as they leave them."""
        n = min(len(names), self.num_free)
        self.stats["cached_pages_dropped"] += len(names) - n
        if n == 0:
            return 0
        self._make_room(n)
        idx = np.zeros(bucket(n), np.int32)  # bucketed: one compilation per bucket
        idx[:n] = pages[:n]
        if self.memory_kind:
            copies = transfer.pages_to_host(pool, idx)
        else:
            copies = jax.device_get(split_pages(transfer.gather(pool, idx)))
        for name, page in zip(names[:n], copies):
            self._cached[name] = page
        return n

    def touch(self, names: Sequence[bytes]) -> None:
        for name in names:
            self._cached.move_to_end(name)

    def upload_cached(self, names: Sequence[bytes]) -> dict:
        """Starts the upload of named pages: {"k", "v"} device buffers [L, bucket(len(names)), ...]
        holding them in order (their host copies stay cached)."""
        for name in names:
            self._cached.move_to_end(name)
        pages = self._to_device([self._cached[name] for name in names])
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
