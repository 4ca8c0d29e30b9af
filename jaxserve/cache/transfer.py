"""Copies of KV pages between the device pool and pinned host memory, sized and issued for the link.

A PCIe link reaches its speed only on large DMA transfers from page-locked memory, and only
overlaps compute when the copy is asynchronous. So: gather every page of a request (K and V,
all layers) into one contiguous device buffer in a single jitted call, then move it with one
asynchronous `device_put` to the `pinned_host` memory kind (never through numpy, which is a
pageable, synchronous copy). Swap-in is the mirror: one asynchronous upload, then a scatter into
the (donated) pool. Or, `gather_to_host`: one jitted call whose output lives in pinned host
memory, so XLA issues the device-to-host copy itself right after the gather.
Works on any pool pytree whose leaves are [layers, pages, ...] (jaxserve.cache.paged_kv).
On an H100 (docs/benchmarks.md) 1 GB went 52 GB/s each way, the link's speed; the first copies
into fresh pinned memory ran at 6-8 GB/s while the host allocator pinned pages, so warm it once.
"""
from __future__ import annotations

import functools

import jax

HOST = "pinned_host"


def memory_kind_sharding(x, kind: str):
    """x's sharding, placed in memory `kind` (e.g. 'pinned_host' or 'device')."""
    return x.sharding.with_memory_kind(kind)


def device_memory_kind(x) -> str:
    """The default (device) memory kind of the devices x lives on."""
    return next(iter(x.sharding.device_set)).default_memory().kind


@jax.jit
def gather(pool: dict, pages) -> dict:
    """{name: [L, n, ...]}: pages `pages` [n] of every pool leaf, contiguous on the device."""
    return jax.tree.map(lambda a: a[:, pages], pool)


def scatter(pool: dict, pages, blocks: dict) -> dict:
    """Writes blocks {name: [L, n, ...]} into `pages` [n] of the donated pool, which keeps its
    sharding (so that the steps and transfers after it find the arrays they were compiled for).

    `pages` must not repeat (pad with distinct ids >= num_pages: those rows are dropped). Telling
    XLA so lets it write without guarding against colliding rows: 1 GB in 1.1 ms instead of 5.2.
    """
    names = tuple(sorted(pool))
    return _scatter_fn(names, tuple(pool[n].sharding for n in names))(pool, pages, blocks)


@functools.lru_cache(maxsize=None)
def _scatter_fn(names: tuple, shardings: tuple):
    def write(pool, pages, blocks):
        return jax.tree.map(lambda a, b: a.at[:, pages].set(b.astype(a.dtype), mode="drop", unique_indices=True),
                            pool, blocks)
    return jax.jit(write, donate_argnums=(0,), out_shardings=dict(zip(names, shardings)))


def to_host(blocks):
    """Starts the device->pinned-host copy of a tree of arrays, in one batched call; returns at
    once (the arrays are futures)."""
    return _put(blocks, lambda x: memory_kind_sharding(x, HOST))


def to_device(blocks):
    """Starts the pinned-host->device copy of a tree of arrays, in one batched call; returns at once."""
    return _put(blocks, lambda x: memory_kind_sharding(x, device_memory_kind(x)))


def _put(blocks, sharding_of):
    # one device_put over every leaf: a call per leaf cost about 0.3 ms of host time each
    # (the host tier's page-by-page copies, docs/benchmarks.md)
    leaves, treedef = jax.tree.flatten(blocks)
    return jax.tree.unflatten(treedef, jax.device_put(leaves, [sharding_of(x) for x in leaves]))


def swap_out(pool: dict, pages) -> dict:
    """Pages of the pool -> one pinned host buffer per leaf, asynchronously."""
    return to_host(gather(pool, pages))


def swap_in(pool: dict, pages, host_blocks: dict) -> dict:
    """Uploads host blocks and writes them into `pages` of the donated pool; returns the new pool."""
    return scatter(pool, pages, to_device(host_blocks))


@functools.lru_cache(maxsize=None)
def _gather_to_host_fn(names: tuple, shardings: tuple):
    return jax.jit(lambda pool, pages: {n: pool[n][:, pages] for n in names},
                   out_shardings=dict(zip(names, shardings)))


def gather_to_host(pool: dict, pages) -> dict:
    """swap_out as one XLA program: the gather's output buffer is in pinned host memory."""
    names = tuple(sorted(pool))
    return _gather_to_host_fn(names, tuple(memory_kind_sharding(pool[n], HOST) for n in names))(pool, pages)


@functools.lru_cache(maxsize=None)
def _pages_to_host_fn(names: tuple, shardings: tuple, n: int):
    def pages(pool, idx):
        return [{k: jax.lax.dynamic_slice_in_dim(pool[k], idx[i], 1, axis=1) for k in names} for i in range(n)]
    return jax.jit(pages, out_shardings=[dict(zip(names, shardings))] * n)


def pages_to_host(pool: dict, pages) -> list:
    """Each of `pages` [n] as its own {name: [L, 1, ...]} buffers in pinned host memory, in one
    XLA program (compiled per n): it is enqueued behind the step in flight like any other, where
    a device_put of the gathered pages would hold the host until that step had written them."""
    names = tuple(sorted(pool))
    return _pages_to_host_fn(names, tuple(memory_kind_sharding(pool[n], HOST) for n in names), len(pages))(pool, pages)
