"""The device KV page pool and paged attention.

Pool: per layer K and V of shape [num_pages + 1, page_size, kv_heads, head_dim], stacked over
layers, sharded over `kv_heads` on the mesh's model axis. A request owns a list of pages (its
page table); token at position p lives in page table[p // page_size], slot p % page_size. The
last page belongs to no one: padding tokens write there, so that cache writes need no bounds
checks.

`paged_attend` writes the new keys and values, then attends: with the pure-JAX reference
(gather pages by page table, then dense attention; every backend, every chunk length) or, for
one-token decode steps with `impl="pallas"`, JAX's Pallas kernel reading the pool in place
(jaxserve.cache.attention_kernels).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxserve.cache import attention_kernels
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import attention_scores_softmax
from jaxserve.parallel.sharding import logical_sharding

POOL_AXES = ("layers", "pages", "page_slot", "kv_heads", "head_dim")


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple:
    """num_pages for requests plus the scratch page that padding tokens write to."""
    return (cfg.num_layers, num_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim)


def pool_sharding(cfg: ModelConfig, num_pages: int, page_size: int, mesh):
    return logical_sharding(POOL_AXES, pool_shape(cfg, num_pages, page_size), mesh)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, mesh) -> dict:
    shape = pool_shape(cfg, num_pages, page_size)
    sharding = pool_sharding(cfg, num_pages, page_size, mesh)
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.jnp_dtype), out_shardings=sharding)
    return {"k": zeros(), "v": zeros()}


def pool_bytes_per_page(cfg: ModelConfig, page_size: int) -> int:
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize


class TokenSlots(NamedTuple):
    """Where a step's tokens live in the pool: the same in every layer."""
    page: jax.Array     # [B,T] pool page of each token (the scratch page for padding)
    offset: jax.Array   # [B,T] its slot in that page
    lengths: jax.Array  # [B] keys a one-token step's query attends to (p + 1; 0 for padding)


def token_slots(positions, page_table, cache) -> TokenSlots:
    """The slots of tokens at positions [B,T] (-1 = padding) given each sequence's page_table [B,P].

    A step computes them once, before its layer loop: left to `paged_attend`, XLA recomputed
    them in every layer (3 small kernels a layer on an H100).
    """
    scratch, page_size = cache["k"].shape[1] - 1, cache["k"].shape[2]
    # clip: the index is in the table for every real token (no fill value, no bounds select)
    page = jnp.take_along_axis(page_table, jnp.maximum(positions, 0) // page_size, axis=1, mode="clip")
    page = jnp.where(positions >= 0, page, scratch)  # padding writes land in the scratch page
    return TokenSlots(page, positions % page_size, positions[:, -1] + 1)


def paged_attend(q, k, v, cache, layer, positions, *, page_table, impl: str = "reference", mesh=None,
                 slots: Optional[TokenSlots] = None):
    """Writes k, v [B,T,K,D] into their pages, then attends over each sequence's pages.

    page_table [B,P] lists each sequence's pages (padding entries may be any page: they hold
    positions later than every query, so the causal mask hides them). positions [B,T]: -1 = pad.
    impl: "reference" or "pallas" (decode steps, T == 1, only; longer chunks use the reference);
    mesh: where the pool lives, for the kernel's per-shard call. slots: `token_slots` of these
    positions and page table (computed here when not given).
    """
    B, P = page_table.shape
    rows = q.shape[0]
    if rows > B:
        # Rows past the page table's are the step's GEMM padding (model_runner.GEMM_ROWS_GPU):
        # they write nothing and attention never sees them; their outputs are zeros.
        q, k, v, positions = q[:B], k[:B], v[:B], positions[:B]
    if slots is None:
        slots = token_slots(positions, page_table, cache)
    page, offset, page_size = slots.page, slots.offset, cache["k"].shape[2]

    # Index the pool directly by (layer, page, offset): no reshapes or whole-layer slices, so
    # XLA updates the scan-carried pool in place and reads only the pages in the table. Every
    # index is in bounds (padding goes to the scratch page).
    def write(pool, new):
        if page.size == 1:
            # One token (a batch-1 decode step): a plain in-place update. XLA turns a one-row
            # scatter into the same update plus a bounds check and a read-back of the old
            # values, 3 more small kernels a layer on GPU (the index here is always in bounds).
            start = (layer, page[0, 0], offset[0, 0], 0, 0)
            return jax.lax.dynamic_update_slice(pool, new.astype(pool.dtype).reshape(1, 1, 1, *new.shape[2:]), start)
        return pool.at[layer, page, offset].set(new.astype(pool.dtype), mode="promise_in_bounds")

    cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}

    if impl == "pallas" and q.shape[1] == 1:
        # A decode token at position p attends to p + 1 tokens; padding rows (p = -1) to none.
        lengths = slots.lengths
        scaled = (q[:, 0].astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
        out = attention_kernels.decode_attention(scaled, cache["k"], cache["v"], layer, page_table,
                                                 lengths, mesh=mesh, out_rows=rows)
        return out[:, None], cache

    def gather(pool):
        pages = pool[layer, page_table]  # [B,P,page_size,K,D]
        return pages.reshape(B, P * page_size, *pages.shape[3:])

    kv_pos = jnp.arange(P * page_size)
    mask = kv_pos[None, None, :] <= positions[:, :, None]
    out = attention_scores_softmax(q, gather(cache["k"]), gather(cache["v"]), mask)
    return jnp.pad(out, ((0, rows - B),) + ((0, 0),) * (out.ndim - 1)), cache
