"""The device KV page pool and paged attention.

Pool: per layer K and V of shape [num_pages, page_size, kv_heads, head_dim], stacked over
layers, sharded over `kv_heads` on the mesh's model axis. A request owns a list of pages (its
page table); token at position p lives in page table[p // page_size], slot p % page_size.

`paged_attend` writes the new keys and values, then attends: with the pure-JAX reference
(gather pages by page table, then dense attention; every backend, every chunk length) or, for
one-token decode steps with `impl="pallas"`, JAX's Pallas kernel reading the pool in place
(jaxserve.cache.attention_kernels).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxserve.cache import attention_kernels
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import attention_scores_softmax
from jaxserve.parallel.sharding import logical_sharding

POOL_AXES = ("layers", "pages", "page_slot", "kv_heads", "head_dim")


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple:
    return (cfg.num_layers, num_pages, page_size, cfg.num_kv_heads, cfg.head_dim)


def pool_sharding(cfg: ModelConfig, num_pages: int, page_size: int, mesh):
    return logical_sharding(POOL_AXES, pool_shape(cfg, num_pages, page_size), mesh)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, mesh) -> dict:
    shape = pool_shape(cfg, num_pages, page_size)
    sharding = pool_sharding(cfg, num_pages, page_size, mesh)
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.jnp_dtype), out_shardings=sharding)
    return {"k": zeros(), "v": zeros()}


def pool_bytes_per_page(cfg: ModelConfig, page_size: int) -> int:
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize


def paged_attend(q, k, v, cache, layer, positions, *, page_table, impl: str = "reference", mesh=None):
    """Writes k, v [B,T,K,D] into their pages, then attends over each sequence's pages.

    page_table [B,P] lists each sequence's pages (padding entries may be any page: they hold
    positions later than every query, so the causal mask hides them). positions [B,T]: -1 = pad.
    impl: "reference" or "pallas" (decode steps, T == 1, only; longer chunks use the reference);
    mesh: where the pool lives, for the kernel's per-shard call.
    """
    B, P = page_table.shape
    extra = q.shape[0] - B
    if extra > 0:
        # Rows past the page table's are the step's GEMM padding (model_runner.GEMM_ROWS_GPU):
        # they write nothing and their outputs are unused, so attention never sees them.
        out, cache = paged_attend(q[:B], k[:B], v[:B], cache, layer, positions[:B], page_table=page_table,
                                  impl=impl, mesh=mesh)
        return jnp.pad(out, ((0, extra),) + ((0, 0),) * (out.ndim - 1)), cache
    _, num_pages, page_size = cache["k"].shape[:3]
    page = jnp.take_along_axis(page_table, jnp.maximum(positions, 0) // page_size, axis=1)
    page = jnp.where(positions >= 0, page, num_pages)  # padding: out of range, dropped
    offset = positions % page_size

    # Index the pool directly by (layer, page, offset): no reshapes or whole-layer slices, so
    # XLA updates the scan-carried pool in place and reads only the pages in the table.
    def write(pool, new):
        return pool.at[layer, page, offset].set(new.astype(pool.dtype), mode="drop")

    cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}

    if impl == "pallas" and q.shape[1] == 1:
        # A decode token at position p attends to p + 1 tokens; padding rows (p = -1) to none.
        lengths = positions[:, 0] + 1
        scaled = (q[:, 0].astype(jnp.float32) * q.shape[-1] ** -0.5).astype(q.dtype)
        out = attention_kernels.decode_attention(scaled, cache["k"], cache["v"], layer, page_table,
                                                 lengths, mesh=mesh)
        return out[:, None], cache

    def gather(pool):
        pages = pool[layer, page_table]  # [B,P,page_size,K,D]
        return pages.reshape(B, P * page_size, *pages.shape[3:])

    kv_pos = jnp.arange(P * page_size)
    mask = kv_pos[None, None, :] <= positions[:, :, None]
    return attention_scores_softmax(q, gather(cache["k"]), gather(cache["v"]), mask), cache
