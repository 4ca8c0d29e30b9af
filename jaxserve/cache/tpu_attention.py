"""Attention on TPU: JAX's ragged paged attention kernel (`jax.experimental.pallas.ops.tpu`)
over one flattened step, decodes and prefill chunks in one call.

The kernel reads one pool of pages with keys and values interleaved by head
([pages, page_size, 2K, D]) and each sequence's queries as one contiguous range of rows. The
step's pages are gathered from jaxserve's pool (separate key and value arrays per layer) into
that form, so each layer copies the keys and values the step reads once more than it needs to;
a pool stored combined would remove the copy. jax 0.10's interpreters cannot run this kernel
on CPU (TPU interpret mode cannot read its reshaped VMEM refs; the HLO interpreter has no DMA
semaphores), so tests check this
module's side, the mapping of a step onto the kernel's contract, against JAX's reference of that
contract (`ref_ragged_paged_attention`); the kernel itself, its speed and tuned block sizes need
a TPU and are unchecked here.
"""
from __future__ import annotations

import jax.numpy as jnp


def sequence_ranges(layout):
    """(cu_q_lens [S+1], kv_lens [S], num_seqs [1]) of a step: sequence s's queries are rows
    cu_q_lens[s]..cu_q_lens[s+1] (decodes first, one row each, then the prefill chunks), over its
    first kv_lens[s] keys (the step's own included: they are written before attention)."""
    decoding = layout.decode_lens > 0
    q_lens = decoding.astype(jnp.int32)
    kv_lens = layout.decode_lens
    if layout.block_seq.shape[0]:
        q_lens = q_lens.at[layout.block_seq].add(layout.block_len)
        ends = jnp.where(layout.block_len > 0, layout.block_pos + layout.block_len, 0)
        kv_lens = kv_lens.at[layout.block_seq].max(ends)
    cu = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(q_lens).astype(jnp.int32)])
    num_seqs = jnp.sum(q_lens > 0).astype(jnp.int32)[None]  # active sequences are a prefix
    return cu, kv_lens.astype(jnp.int32), num_seqs


def combined_pages(k_pool, v_pool, layer, page_table):
    """The step's pages of `layer`, keys and values interleaved by head: ([S*P, page_size, 2K, D],
    page indices [S,P] into them)."""
    S, P = page_table.shape
    k, v = k_pool[layer, page_table], v_pool[layer, page_table]  # [S,P,ps,K,D]
    pages = jnp.stack([k, v], axis=-2)  # [S,P,ps,K,2,D]: K0 V0 K1 V1 ...
    pages = pages.reshape(S * P, pages.shape[2], -1, pages.shape[-1])
    return pages, jnp.arange(S * P, dtype=jnp.int32).reshape(S, P)


def attend(q, k_pool, v_pool, layer, layout, kernel=None):
    """q [N,H,D] (scaled) of a flattened step (layout: a paged_kv.StepLayout) -> [N,H,D]; rows
    outside every sequence get zeros. kernel: JAX's ragged_paged_attention, or a function of the
    same contract (tests pass its reference, `ref_ragged_paged_attention`)."""
    if kernel is None:
        from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention as kernel
    N = q.shape[0]
    cu, kv_lens, num_seqs = sequence_ranges(layout)
    pages, indices = combined_pages(k_pool, v_pool, layer, layout.page_table)
    out = kernel(q, pages.astype(q.dtype), kv_lens, indices, cu, num_seqs, sm_scale=1.0)
    out = jnp.pad(out, ((0, N - out.shape[0]), (0, 0), (0, 0)))  # the reference returns covered rows only
    covered = jnp.arange(N) < cu[num_seqs[0]]
    return jnp.where(covered[:, None, None], out, 0).astype(q.dtype)
