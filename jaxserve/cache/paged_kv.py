"""The device KV page pool and paged attention.

Pool: per layer K and V of shape [num_pages + 1, page_size, kv_heads, head_dim], stacked over
layers, sharded over `kv_heads` on the mesh's model axis. A request owns a list of pages (its
page table); token at position p lives in page table[p // page_size], slot p % page_size. The
last page belongs to no one: padding tokens write there, so that cache writes need no bounds
checks.

A step runs every scheduled token, decodes and prefill chunks together, as one flat list
(`StepLayout`). `paged_attend` writes the new keys and values, then attends: decode rows and
prefill query blocks each through the pure-JAX reference (gather pages, dense attention; every
backend) or, with `impl="pallas"`, the Pallas kernels that read the pool in place
(jaxserve.cache.attention_kernels).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxserve.cache import attention_kernels, tpu_attention
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import attention_scores_softmax
from jaxserve.scheduling.cost_model import QUERY_BLOCK
from jaxserve.model.sharding import bytes_per_device, logical_sharding

POOL_AXES = ("layers", "pages", "page_slot", "kv_heads", "head_dim")


def pool_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple:
    """num_pages for requests plus the scratch page that padding tokens write to."""
    return (cfg.num_layers, num_pages + 1, page_size, cfg.num_kv_heads, cfg.head_dim)


def pool_sharding(cfg: ModelConfig, num_pages: int, page_size: int, mesh):
    return logical_sharding(POOL_AXES, pool_shape(cfg, num_pages, page_size), mesh)


def pool_bytes_per_device(cfg: ModelConfig, num_pages: int, page_size: int, model: int = 1) -> int:
    """What each device of a replica with tensor-parallel degree `model` holds of its pool (k and v)."""
    shape = pool_shape(cfg, num_pages, page_size)
    return 2 * bytes_per_device(POOL_AXES, shape, jnp.dtype(cfg.jnp_dtype).itemsize, 1, model)


def init_pool(cfg: ModelConfig, num_pages: int, page_size: int, mesh) -> dict:
    shape = pool_shape(cfg, num_pages, page_size)
    sharding = pool_sharding(cfg, num_pages, page_size, mesh)
    zeros = jax.jit(lambda: jnp.zeros(shape, cfg.jnp_dtype), out_shardings=sharding)
    return {"k": zeros(), "v": zeros()}


def pool_bytes_per_page(cfg: ModelConfig, page_size: int) -> int:
    return 2 * cfg.num_layers * page_size * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(cfg.jnp_dtype).itemsize


class StepLayout(NamedTuple):
    """Where one step's flattened tokens [N] go in the pool and what they attend to.

    A step's tokens are one flat list: the decode tokens of sequences 0..D-1 first (token i is
    sequence i's), then the prefill chunks. Sequence s attends through page_table[s]. Decode rows
    attend to `decode_lens` keys (0 for non-decode rows); prefill chunks are cut into query blocks
    of up to QUERY_BLOCK tokens of one sequence: block b holds tokens block_start[b] ..
    + block_len[b] (0 = unused block) at positions block_pos[b] onwards, of sequence block_seq[b].
    """
    kv_page: jax.Array      # [N] pool page each token's key/value is written to (scratch for padding)
    kv_offset: jax.Array    # [N] its slot in that page
    page_table: jax.Array   # [S,P]
    decode_lens: jax.Array  # [S]
    block_seq: jax.Array    # [NB] (NB = 0 in decode-only steps)
    block_start: jax.Array  # [NB]
    block_len: jax.Array    # [NB]
    block_pos: jax.Array    # [NB]


def _reference_decode(q, k_pool, v_pool, layer, page_table, lengths):
    """q [S,H,D] (scaled) -> [S,H,D]: each row over its first lengths[s] keys (0: zeros)."""
    S, P = page_table.shape
    page_size = k_pool.shape[2]
    gather = lambda pool: pool[layer, page_table].reshape(S, P * page_size, *pool.shape[3:])
    mask = (jnp.arange(P * page_size)[None, :] < lengths[:, None])[:, None, :]
    out = attention_scores_softmax(q[:, None], gather(k_pool), gather(v_pool), mask, scale=1.0)[:, 0]
    return jnp.where((lengths > 0)[:, None, None], out, 0).astype(q.dtype)


def _reference_prefill(q, k_pool, v_pool, layer, block_tables, block_start, block_len, block_pos, query_block):
    """q [N,H,D] (scaled) -> [NB*query_block, H, D]: each block's tokens over its causal keys."""
    NB, P = block_tables.shape
    page_size = k_pool.shape[2]
    rows = block_start[:, None] + jnp.arange(query_block)[None, :]  # [NB, QB]
    qb = q[jnp.minimum(rows, q.shape[0] - 1)]
    gather = lambda pool: pool[layer, block_tables].reshape(NB, P * page_size, *pool.shape[3:])
    qpos = block_pos[:, None] + jnp.arange(query_block)[None, :]
    mask = jnp.arange(P * page_size)[None, None, :] <= qpos[:, :, None]
    out = attention_scores_softmax(qb, gather(k_pool), gather(v_pool), mask, scale=1.0)
    return out.reshape(NB * query_block, *q.shape[1:])


def paged_attend(q, k, v, cache, layer, positions, *, layout: StepLayout, impl: str = "reference", mesh=None):
    """Writes k, v [1,N,K,D] of a flattened step into their pages, then attends (see StepLayout).

    impl: "reference" (pure JAX, every backend), "pallas" (the GPU kernels of
    jaxserve.cache.attention_kernels, interpreted off GPU), "mgpu" (the same, with the Mosaic GPU
    decode kernel on Hopper) or "tpu" (jaxserve.cache.tpu_attention, one
    device only: it takes no mesh). mesh: where the pool lives, for the GPU kernels' per-shard call.
    Padding tokens write to the scratch page and get zeros.
    """
    q, k, v = q[0], k[0], v[0]
    N, H, D = q.shape
    L = layout

    # Index the pool directly by (layer, page, offset): no reshapes or whole-layer slices, so XLA
    # updates the pool in place. Every index is in bounds (padding goes to the scratch page), and
    # only padding shares one (the scratch page's, which nothing reads): declared unique, so that
    # the GPU scatter stores plainly instead of in atomic compare-and-swap loops.
    def write(pool, new):
        return pool.at[layer, L.kv_page, L.kv_offset].set(new.astype(pool.dtype), mode="promise_in_bounds",
                                                          unique_indices=True)

    S = L.page_table.shape[0]
    NB = L.block_seq.shape[0]
    # In a decode-step (no prefill blocks) the GPU kernels write the new keys and values
    # themselves (attention_kernels.decode_attention's new_kv): two fewer kernels a layer.
    fused_write = impl in attention_kernels.PALLAS_IMPLS and not NB
    if not fused_write:
        cache = {"k": write(cache["k"], k), "v": write(cache["v"], v)}
    scaled = (q.astype(jnp.float32) * D ** -0.5).astype(q.dtype)
    if impl == "tpu":  # decodes and prefill chunks in one kernel call
        out = tpu_attention.attend(scaled, cache["k"], cache["v"], layer, L)
        return out[None], cache
    # A decode-only step's rows are its sequences (and GEMM padding, zeros); in a mixed step only
    # the first S rows can be decodes, and the merge below places them.
    dec_rows = N if not NB else S
    if impl in attention_kernels.PALLAS_IMPLS:
        out = attention_kernels.decode_attention(scaled[:S], cache["k"], cache["v"], layer, L.page_table,
                                                 L.decode_lens,
                                                 (jnp.stack([k, v], axis=2), L.kv_page, L.kv_offset) if fused_write else None,
                                                 mesh=mesh, out_rows=dec_rows,
                                                 kernel_impl="mgpu" if impl == "mgpu" else "triton")
        if fused_write:
            out, k_pool, v_pool = out
            cache = {"k": k_pool, "v": v_pool}
    else:
        dec = _reference_decode(scaled[:S], cache["k"], cache["v"], layer, L.page_table, L.decode_lens)
        out = jnp.pad(dec, ((0, dec_rows - S), (0, 0), (0, 0)))
    if NB:
        QB = QUERY_BLOCK
        tables = L.page_table[L.block_seq]
        if impl in attention_kernels.PALLAS_IMPLS:
            blocks = attention_kernels.prefill_attention(scaled, cache["k"], cache["v"], layer, tables, L.block_start,
                                                         L.block_len, L.block_pos, query_block=QB, mesh=mesh)
        else:
            blocks = _reference_prefill(scaled, cache["k"], cache["v"], layer, tables, L.block_start, L.block_len,
                                        L.block_pos, QB)
        # Each token takes its row, of the blocks' output or of the decodes', by a gather: a
        # scatter of the big rows would run as atomic compare-and-swap loops on GPU (bf16). Only
        # the small index map token -> block row is scattered.
        t = jnp.arange(QB)[None, :]
        rows = jnp.where(t < L.block_len[:, None], L.block_start[:, None] + t, N).reshape(-1)  # N: dropped
        source = jnp.full((N,), -1, jnp.int32).at[rows].set(jnp.arange(NB * QB, dtype=jnp.int32), mode="drop")
        token = jnp.arange(N)
        decoded = jnp.where((token < S)[:, None, None], out[jnp.minimum(token, S - 1)], 0)
        taken = blocks[jnp.maximum(source, 0)].astype(out.dtype)
        out = jnp.where((source >= 0)[:, None, None], taken, decoded)
    return out[None], cache
