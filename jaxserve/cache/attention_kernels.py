"""Paged attention kernels (Pallas on GPU): decode rows and prefill query blocks, and picking an impl.

`paged_kv.paged_attend` calls `decode_attention` for a step's decode rows and
`prefill_attention` for its prefill query blocks when the engine's `attention_impl` resolves
to 'pallas' or 'mgpu' (decode rows by the Mosaic GPU kernel of `mgpu_decode` on Hopper); the
'reference' impl keeps the pure-JAX gather path.

Decode (`_decode_kernel`, ours): one program per (sequence, kv head, split) reads the engine's
pool layout [layers, pages, page_size, kv_heads, head_dim] in place: the pool is viewed as
[layers*pages, page_size, kv_heads, head_dim] (a free reshape), each program picks one kv head
as a strided slice and adds the layer's offset to each page number it loads (no per-layer op
outside the kernel). The next block of pages is loaded before the current one's math: the
kernel is bound by load latency, not by bandwidth, without it. After it, one small kernel
merges the sequence splits (`_combine`). JAX's shipped GPU paged attention wants a head-major
[kv_heads, pages, page_size, head_dim] array (a transpose of a whole layer of the pool on every
step) and loads each block only when its math needs it.

Prefill (`_prefill_kernel`, ours): one program per (query block, kv head) holds the block's
tokens times the kv head's query heads as rows, so one pass over the sequence's pages serves
the whole group; the causal mask compares each row's position with each key's.
"""
from __future__ import annotations

import functools
import inspect
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from jaxserve.cache import mgpu_decode

IMPLS = ("auto", "reference", "pallas", "mgpu", "tpu")
PALLAS_IMPLS = ("pallas", "mgpu")  # 'mgpu': the Pallas kernels, decode by the Mosaic GPU kernel on Hopper


def resolve_impl(impl: str, backend: Optional[str] = None) -> str:
    """'auto' -> 'mgpu' on GPU (these kernels, decode by the Mosaic GPU kernel where
    `mgpu_decode.supported`, else as 'pallas': the Triton kernels only), 'tpu' on TPU (JAX's ragged paged attention,
    jaxserve.cache.tpu_attention), else 'reference'. 'pallas' off GPU runs interpreted (slow; for
    tests); 'tpu' runs on TPU only (no interpreter of this JAX runs that kernel), and on a
    one-device mesh (model_runner.step_settings falls back to 'reference' on larger ones)."""
    if impl not in IMPLS:
        raise ValueError(f"engine.attention_impl={impl!r} is not one of {IMPLS}")
    backend = backend or jax.default_backend()
    if impl == "auto":
        return {"gpu": "mgpu", "tpu": "tpu"}.get(backend, "reference")
    if impl == "tpu" and backend != "tpu":
        raise ValueError(f"engine.attention_impl='tpu' needs a TPU (this backend is {backend!r}); "
                         "use 'auto' or 'reference'")
    return impl


SPLIT_PAGES = 32  # most pages one decode program reads (see decode_params)


def decode_params(batch: int, pages_per_seq: int, num_kv_heads: int, page_size: int = 16) -> tuple:
    """(pages_per_compute_block, k_splits, num_warps) for a decode step of this bucketed shape.

    The grid is batch x kv_heads x k_splits programs. The sequence is split until there are about
    1024 programs and no split holds more than SPLIT_PAGES pages: with ragged lengths the longest
    rows would otherwise run alone at the end (a split past a row's end exits at once), and each
    split costs a partial output and a combine. From 16 sequences up, one warp per program on 16
    tokens (a page of 16) at a time keeps the most loads in flight; a lone sequence is better
    served by 4 warps on 4 pages. Either way each thread holds 128 bytes of a block's K (and of
    V) at head_dim 128: a bigger block, or a second one prefetched, spills registers. The fastest
    of H200 sweeps at batch 1-128, uniform and ragged lengths (docs/benchmarks.md).
    """
    # a block holds at least 16 tokens: Triton's dot needs 16 along each side
    ppcb, warps = (max(1, 16 // page_size), 1) if batch * num_kv_heads >= 128 else (min(4, pages_per_seq), 4)
    k_splits = 1
    while ((batch * num_kv_heads * k_splits < 1024 or pages_per_seq // k_splits > SPLIT_PAGES)
           and pages_per_seq // (2 * k_splits) >= ppcb and k_splits < 32):
        k_splits *= 2
    return ppcb, k_splits, warps


_MASK = -0.7 * float(jnp.finfo(jnp.float32).max)


def _page_block_loader(k_ref, v_ref, table_ref, offset, ppcb: int, num_blocks):
    """j -> (K, V) [ppcb*page_size, head_dim] of the j-th block of pages in `table_ref` (offset:
    the layer's first page in the flattened pool). Past the last block it reloads that one: a
    prefetch beyond the end stays in bounds and is never used."""
    from jax.experimental import pallas as pl

    D = k_ref.shape[-1]
    rows = ppcb * k_ref.shape[-2]

    def load(j):
        pages = table_ref[pl.ds(jnp.minimum(j, num_blocks - 1) * ppcb, ppcb)] + offset
        return k_ref[pages].reshape(rows, D), v_ref[pages].reshape(rows, D)
    return load


def _online_softmax(q, load, num_blocks, visible, prefetch: int):
    """(o unnormalized, m, l) of q's rows over blocks 0..num_blocks-1 of keys and values: `load(j)`
    gives block j's (K, V), `visible(j)` which of its keys each row may attend to. Blocks are
    loaded `prefetch` blocks ahead of the math, so that their loads' latency hides behind it
    (decode, which is bound by that latency: 1.4x; prefill: 2%)."""
    from jax.experimental.pallas import triton as plgpu

    rows, D = q.shape

    def body(j, carry):
        o, m, l, ahead = carry
        ahead = ahead + (load(j + prefetch),)
        k, v = ahead[0]
        logits = jnp.where(visible(j), plgpu.dot(q, k.T), _MASK)  # [rows, block_k]
        m_next = jnp.maximum(m, logits.max(axis=-1))
        correction = jnp.exp(m - m_next)
        s = jnp.exp(logits - m_next[:, None])
        o = correction[:, None] * o + plgpu.dot(s.astype(v.dtype), v)
        return o, m_next, correction * l + s.sum(axis=-1), ahead[1:]

    init = (jnp.zeros((rows, D), jnp.float32), jnp.full((rows,), _MASK, jnp.float32), jnp.zeros((rows,), jnp.float32),
            tuple(load(j) for j in range(prefetch)))
    o, m, l, _ = jax.lax.fori_loop(0, num_blocks, body, init)
    return o, m, l


def _decode_kernel(q_ref, k_ref, v_ref, table_ref, len_ref, layer_ref, o_ref, l_ref, m_ref, *, num_pages: int,
                   pages_per_compute_block: int, prefetch: int, group: int, exclude_newest: bool):
    """One (sequence, kv head, split): the kv head's query rows (the group, padded to Triton's 16)
    over the split's pages, an online softmax over blocks of pages (`_online_softmax`); o is left
    unnormalized for the combine, and only the group's rows of it are stored (the padding rows'
    would be most of the partials' traffic). exclude_newest: one key fewer than the row's length
    (the combine merges the newest)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    ppcb = pages_per_compute_block
    page_size = k_ref.shape[-2]
    block_k = ppcb * page_size
    per_split = table_ref.shape[0]
    first = pl.program_id(2) * per_split
    length = jnp.maximum(len_ref[0] - 1, 0) if exclude_newest else len_ref[0]
    offset = layer_ref[0] * num_pages  # the layer's pages of the flattened pool
    end = jnp.minimum(pl.cdiv(length, page_size), first + per_split)
    num_blocks = jnp.maximum(pl.cdiv(end - first, ppcb), 0)
    load = _page_block_loader(k_ref, v_ref, table_ref, offset, ppcb, per_split // ppcb)

    def visible(j):  # the block's keys within the sequence's length
        kv_pos = (first + j * ppcb) * page_size + jnp.arange(block_k, dtype=jnp.int32)
        return (kv_pos < length)[None, :]

    o, m, l = _online_softmax(q_ref[...], load, num_blocks, visible, prefetch)
    real = jnp.arange(o.shape[0], dtype=jnp.int32) < group
    plgpu.store(o_ref, o, mask=real[:, None])
    plgpu.store(l_ref, l, mask=real)
    plgpu.store(m_ref, m, mask=real)


def _combine_kernel(o_ref, l_ref, m_ref, *refs, batch: int, num_pages: int, fresh: bool):
    """One (row, kv head): merges the k_splits partial softmax results (o unnormalized).

    Rows past `batch` are the step's GEMM padding (model_runner.GEMM_ROWS_GPU): they get zeros,
    so the padded output needs no pad op after the kernel. Rows of length 0 have l == 0 and o == 0
    in every split: zeros too, not NaN.

    With `fresh` the partials leave out each row's newest token: its key and value come in
    (with the row's scaled q), join the merge as one more split, and are stored into the pool
    in place (the refs after the output), so that a decode step needs no scatter of them.
    """
    from jax.experimental import pallas as pl

    if fresh:
        q_ref, k_ref, v_ref, len_ref, page_ref, slot_ref, layer_ref, _, _, out_ref, k_pool, v_pool = refs
    else:
        (out_ref,) = refs
    real = pl.program_id(0) < batch
    m = m_ref[...]                                     # [k_splits, G]
    m_max = jnp.max(m, axis=0)
    if fresh:  # the newest key as stored (pool dtype), as the partials' keys were
        live = real & (len_ref[0] > 0)
        k = k_ref[...].astype(k_pool.dtype)
        v = v_ref[...].astype(v_pool.dtype)
        s_new = jnp.sum(q_ref[...].astype(jnp.float32) * k.astype(jnp.float32)[None, :], axis=1)  # [G]
        m_max = jnp.maximum(m_max, jnp.where(live, s_new, _MASK))
    w = jnp.exp(m - m_max[None, :])
    l_sum = jnp.sum(l_ref[...] * w, axis=0)
    o_sum = jnp.sum(o_ref[...] * w[:, :, None], axis=0)  # [G, D]
    if fresh:
        w_new = jnp.where(live, jnp.exp(s_new - m_max), 0.0)
        l_sum = l_sum + w_new
        o_sum = o_sum + w_new[:, None] * v.astype(jnp.float32)[None, :]

        @pl.when(live)
        def _():
            row, slot = layer_ref[0] * num_pages + page_ref[0], slot_ref[0]
            k_pool[row, slot, :] = k
            v_pool[row, slot, :] = v
    out = o_sum / jnp.where(l_sum > 0, l_sum, 1.0)[:, None]
    out_ref[...] = jnp.where(real, out, 0.0).astype(out_ref.dtype)


def _combine(o, l, m, out_rows: int, num_heads: int, dtype, interpret: bool, shared_tile: bool = False,
             fresh: Optional[tuple] = None):
    """[k_splits, B, K, block_h(, D)] partials -> [out_rows, K*num_heads, D] in one small kernel
    (as XLA ops, the merge and the row padding took three kernels a layer). Each kv head's group
    is the first rows of its block, or with `shared_tile` (the Mosaic GPU kernel's 8-row tiles of
    consecutive query heads) rows (h * num_heads) % block_h onwards.

    fresh: (packed [B, K, T, D] (`pack_newest`: scaled q, newest key and value), lengths [B]
    (the newest token included), kv_page and kv_offset [>=out_rows], layer, k_pool, v_pool): the
    rows' newest tokens, left out of the partials, are merged in and written to the pool, which
    is updated in place; then returns (out, k_pool, v_pool).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton

    ks, B, K, block_h, D = o.shape
    g = 1 << (num_heads - 1).bit_length()  # Triton blocks are powers of two
    last = B - 1
    per_tile = block_h // g if shared_tile else 1  # groups a block holds
    part = lambda b, h: (0, jnp.minimum(b, last), h, h % per_tile)
    in_specs = [pl.BlockSpec((ks, None, None, g, D), lambda b, h: part(b, h) + (0,)),
                pl.BlockSpec((ks, None, None, g), part),
                pl.BlockSpec((ks, None, None, g), part)]
    out_specs = [pl.BlockSpec((None, None, g, D), lambda b, h: (b, h, 0, 0))]
    out_shape = [jax.ShapeDtypeStruct((out_rows, K, g, D), dtype)]
    args, aliases, num_pages = (o, l, m), {}, 0
    if fresh is not None:
        packed, lengths, kv_page, kv_offset, layer, k_pool, v_pool = fresh
        L, num_pages, S = k_pool.shape[:3]
        # q, k and v are rows of one operand, which one fusion before the kernels makes (g <= T:
        # rows past the group's are read and dropped)
        row = lambda i: pl.BlockSpec((None, None, None, D), lambda b, h: (jnp.minimum(b, last), h, i, 0))
        seq = pl.BlockSpec((1,), lambda b, h: (jnp.minimum(b, last),))
        token = pl.BlockSpec((1,), lambda b, h: (b,))
        pool_spec = pl.BlockSpec((L * num_pages, S, None, D), lambda b, h: (0, 0, h, 0))
        in_specs += [pl.BlockSpec((None, None, g, D), lambda b, h: (jnp.minimum(b, last), h, 0, 0)),
                     row(num_heads), row(num_heads + 1),
                     seq, token, token, pl.BlockSpec((1,), lambda b, h: (0,)), pool_spec, pool_spec]
        out_specs += [pool_spec, pool_spec]
        out_shape += [jax.ShapeDtypeStruct((L * num_pages, S, K, D), k_pool.dtype)] * 2
        n = len(in_specs)
        aliases = {n - 2: 1, n - 1: 2}
        args += (packed, packed, packed, lengths.astype(jnp.int32), kv_page.astype(jnp.int32), kv_offset.astype(jnp.int32),
                 jnp.reshape(layer, (1,)).astype(jnp.int32),
                 k_pool.reshape(L * num_pages, S, K, D), v_pool.reshape(L * num_pages, S, K, D))
    outs = pl.pallas_call(
        functools.partial(_combine_kernel, batch=B, num_pages=num_pages, fresh=fresh is not None),
        grid=(out_rows, K),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        # pinned to Triton: without compiler params JAX 0.10 sends a pallas_call to Mosaic GPU,
        # which refuses these small blocks
        compiler_params=pltriton.CompilerParams(num_warps=4),
        interpret=interpret,
        name="jaxserve_paged_decode_combine" + ("_write" if fresh is not None else ""),
    )(*args)
    out = outs[0]
    if g != num_heads:
        out = out[:, :, :num_heads]
    out = out.reshape(out_rows, K * num_heads, D)
    if fresh is None:
        return out
    return out, outs[1].reshape(k_pool.shape), outs[2].reshape(v_pool.shape)


# The kernels are jitted with their parameters static so that an unrolled step (a call per layer)
# traces and lowers each kernel once: a Mosaic GPU kernel lowered 32 times took most of a step's
# 13 s of lowering.
def _kernel_jit(fn):
    """jax.jit with every keyword-only parameter of fn static."""
    kw = [n for n, p in inspect.signature(fn).parameters.items() if p.kind == p.KEYWORD_ONLY]
    return jax.jit(fn, static_argnames=kw)


@_kernel_jit
def pallas_decode_attention(q, k_pool, v_pool, layer, page_table, lengths, new_kv=None, *,
                            pages_per_compute_block: int, k_splits: int, out_rows: Optional[int] = None,
                            num_warps: int = 4, num_stages: int = 2, prefetch: int = 1, interpret: bool = False):
    """Attention of one query token per sequence over its pages, for one layer.

    q [B,H,D] (already scaled by 1/sqrt(D): the kernel does not scale); k_pool, v_pool
    [L, num_pages, page_size, K, D]; layer: scalar index; page_table [B,P] int32 (P divisible by
    k_splits); lengths [B] int32 (tokens to attend, 0 = padding row). Returns [B,H,D] in q.dtype,
    or with new_kv (see `decode_attention`) (out, k_pool, v_pool).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    L, NP, S, K, D = k_pool.shape
    B, H, _ = q.shape
    G = H // K
    block_h = max(16, 1 << (G - 1).bit_length())  # Triton's dot needs >= 16 rows
    num_p = page_table.shape[1]
    if num_p % k_splits:
        raise ValueError(f"pages per sequence {num_p} is not divisible by k_splits={k_splits}")
    per_split = num_p // k_splits
    ppcb = min(pages_per_compute_block, per_split)
    if per_split % ppcb:
        raise ValueError(f"{per_split} pages per split is not divisible by {ppcb} pages per block")

    qg = q.reshape(B, K, G, D)
    if block_h != G:
        qg = jnp.pad(qg, ((0, 0), (0, 0), (0, block_h - G), (0, 0)))
    k_flat = k_pool.reshape(L * NP, S, K, D)  # merges leading dims: a bitcast, no copy
    v_flat = v_pool.reshape(L * NP, S, K, D)
    tables = page_table.astype(jnp.int32).reshape(B, k_splits, per_split)

    kernel = functools.partial(_decode_kernel, num_pages=NP, pages_per_compute_block=ppcb, prefetch=prefetch,
                               group=G, exclude_newest=new_kv is not None)
    # Grid (batch, kv head, split): the kernel reads its split index as program_id(2).
    pool_spec = pl.BlockSpec((L * NP, S, None, D), lambda b, h, s: (0, 0, h, 0))
    o, l, m = pl.pallas_call(
        kernel,
        grid=(B, K, k_splits),
        in_specs=[
            pl.BlockSpec((None, None, block_h, D), lambda b, h, s: (b, h, 0, 0)),
            pool_spec, pool_spec,
            pl.BlockSpec((None, None, per_split), lambda b, h, s: (b, s, 0)),
            pl.BlockSpec((1,), lambda b, h, s: (b,)),
            pl.BlockSpec((1,), lambda b, h, s: (0,)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, block_h, D), lambda b, h, s: (s, b, h, 0, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (s, b, h, 0)),
            pl.BlockSpec((None, None, None, block_h), lambda b, h, s: (s, b, h, 0)),
        ],
        # partial outputs stay float32 until the combine: they are tiny next to the pages
        out_shape=[jax.ShapeDtypeStruct((k_splits, B, K, block_h, D), jnp.float32),
                   jax.ShapeDtypeStruct((k_splits, B, K, block_h), jnp.float32),
                   jax.ShapeDtypeStruct((k_splits, B, K, block_h), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"jaxserve_paged_decode_ppcb{ppcb}_ks{k_splits}_w{num_warps}",
    )(qg, k_flat, v_flat, tables, lengths.astype(jnp.int32), jnp.reshape(layer, (1,)).astype(jnp.int32))
    return _combine(o, l, m, out_rows or B, G, q.dtype, interpret,
                    fresh=_fresh(q, lengths, new_kv, layer, k_pool, v_pool, G))


@_kernel_jit
def _mgpu_decode_attention(q, k_pool, v_pool, layer, page_table, lengths, new_kv=None, *, k_splits: int,
                           stages: int = 4,
                           ctas_per_sm: int = 1, num_sms: Optional[int] = None, out_rows: Optional[int] = None,
                           interpret: bool = False):
    """The Mosaic GPU kernel's partials (mgpu_decode), merged: [out_rows, H, D] in q.dtype (with
    new_kv, as `pallas_decode_attention`)."""
    G = q.shape[1] // k_pool.shape[3]
    fresh = _fresh(q, lengths, new_kv, layer, k_pool, v_pool, G)
    # with the newest tokens the kernel reads q from the packed rows the merge reads them from
    o, l, m = mgpu_decode.mgpu_decode_partials(q if fresh is None else fresh[0], k_pool, v_pool, layer, page_table,
                                               lengths, interpret=interpret, k_splits=k_splits, stages=stages,
                                               ctas_per_sm=ctas_per_sm, num_sms=num_sms,
                                               exclude_newest=fresh is not None)
    return _combine(o, l, m, out_rows or q.shape[0], G, q.dtype, interpret, shared_tile=fresh is None, fresh=fresh)


def pack_newest(q, kv, group: int):
    """[B, K, T, D] of q [B, H, D] (scaled) and kv [>=B, K, 2, D]: kv head h's `group` query
    rows, then its newest key and value, then zeros to T, the next multiple of the Mosaic GPU
    kernel's 8-row tile. One fusion makes it from the layer's qkv product, RoPE included, so a
    decode step's q and new KV take one kernel, not two (and no slice of q's rows)."""
    B, H, D = q.shape
    K = H // group
    T = -(-(group + 2) // mgpu_decode.TILE_ROWS) * mgpu_decode.TILE_ROWS
    parts = [q.reshape(B, K, group, D), kv[:B].astype(q.dtype)]
    if T > group + 2:
        parts.append(jnp.zeros((B, K, T - group - 2, D), q.dtype))
    return jnp.concatenate(parts, axis=2)


def _fresh(q, lengths, new_kv, layer, k_pool, v_pool, group: int):
    if new_kv is None:
        return None
    kv, kv_page, kv_offset = new_kv
    return (pack_newest(q, kv, group), lengths, kv_page, kv_offset, layer, k_pool, v_pool)


DECODE_KERNELS = ("triton", "mgpu")


def decode_attention(q, k_pool, v_pool, layer, page_table, lengths, new_kv=None, *, mesh: Optional[Mesh] = None,
                     out_rows: Optional[int] = None, pages_per_compute_block: Optional[int] = None,
                     k_splits: Optional[int] = None, kernel_impl: str = "triton"):
    """A decode kernel with shape-picked parameters, per model shard: 'triton'
    (`pallas_decode_attention`) or 'mgpu' (Mosaic GPU, where `mgpu_decode.supported`, else
    'triton'). On the H200 the Mosaic GPU kernel streams the KV 15-30% faster and the engine's
    batch-64 decode runs 6% faster with it, but its steps compile 2x longer (docs/benchmarks.md):
    `engine.attention_impl=pallas` keeps the Triton kernel.

    On a mesh whose `model` axis shards the kv heads, each device runs the kernel on its own
    heads (shard_map): a pallas_call has no partitioning rule, and XLA would otherwise gather
    the whole pool onto every device.

    new_kv: (kv [>=out_rows, K, 2, D], kv_page, kv_offset [>=out_rows]), row b's newest key and
    value (kv[b, :, 0] and kv[b, :, 1]) and where they go: the kernels attend to them without reading them back, and write
    them into the pool in place (a decode step's KV write, fused); lengths count them. Returns
    (out, k_pool, v_pool) then.
    """
    L, NP, S, K, D = k_pool.shape
    B, num_p = page_table.shape
    if kernel_impl not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {kernel_impl!r} is not one of {DECODE_KERNELS}")
    model = 1 if mesh is None else mesh.shape.get("model", 1)
    shards = model if model > 1 and K % model == 0 else 1
    if kernel_impl == "mgpu" and not mgpu_decode.supported(q.shape[1] // shards, K // shards, D, S, k_pool.dtype):
        kernel_impl = "triton"  # the shapes one shard's kernel sees are not the Mosaic GPU kernel's
    common = dict(out_rows=out_rows, interpret=jax.default_backend() != "gpu")
    if kernel_impl == "mgpu":
        ks, stages, ctas = mgpu_decode.mgpu_params(B, num_p, K)
        kernel = functools.partial(_mgpu_decode_attention, k_splits=k_splits or ks, stages=stages,
                                   ctas_per_sm=ctas, **common)
    else:
        ppcb, ks, warps = decode_params(B, num_p, K, S)
        kernel = functools.partial(pallas_decode_attention, pages_per_compute_block=pages_per_compute_block or ppcb,
                                   k_splits=k_splits or ks, num_warps=warps, **common)
    args = (q, k_pool, v_pool, layer, page_table, lengths) + ((new_kv,) if new_kv is not None else ())
    if shards == 1:
        return kernel(*args)
    heads = P(None, "model", None)
    pool = P(None, None, None, "model", None)
    in_specs = (heads, pool, pool, P(), P(), P()) + (((P(None, "model", None, None), P(), P()),)
                                                      if new_kv is not None else ())
    return jax.shard_map(kernel, mesh=mesh, in_specs=in_specs, check_vma=False,
                         out_specs=heads if new_kv is None else (heads, pool, pool))(*args)


def _prefill_kernel(q_ref, k_ref, v_ref, table_ref, start_ref, len_ref, pos_ref, layer_ref, o_ref, *,
                    num_pages: int, group: int, pages_per_compute_block: int, prefetch: int):
    """One (query block, kv head): up to `block` tokens of one sequence, each with the `group`
    query heads of this kv head (rows token-major), over the sequence's keys up to each token
    (causal), with an online softmax over blocks of pages (`_online_softmax`)."""
    from jax.experimental import pallas as pl

    rows = o_ref.shape[0]
    ppcb = pages_per_compute_block
    block_k = ppcb * k_ref.shape[-2]
    n, pos0 = len_ref[0], pos_ref[0]
    q = q_ref[pl.ds(start_ref[0] * group, rows), :]
    row_pos = pos0 + jax.lax.shift_right_logical(jnp.arange(rows, dtype=jnp.int32), group.bit_length() - 1)
    load = _page_block_loader(k_ref, v_ref, table_ref, layer_ref[0] * num_pages, ppcb, table_ref.shape[0] // ppcb)

    def visible(j):  # causal: each row sees the keys up to its own position
        kv_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
        return kv_pos[None, :] <= row_pos[:, None]

    num_blocks = jnp.where(n > 0, pl.cdiv(pos0 + n, block_k), 0)
    o, _, l = _online_softmax(q, load, num_blocks, visible, prefetch)
    o_ref[...] = (o / jnp.where(l > 0, l, 1.0)[:, None]).astype(o_ref.dtype)


@_kernel_jit
def pallas_prefill_attention(q, k_pool, v_pool, layer, block_tables, block_start, block_len, block_pos, *,
                             query_block: int, pages_per_compute_block: int = 4, num_warps: int = 4,
                             num_stages: int = 2, prefetch: int = 1, interpret: bool = False):
    """Causal attention of a flattened step's prefill query blocks over their pages, one layer.

    q [N,H,D] (scaled by 1/sqrt(D)); pools [L, pages, page_size, K, D]; block_tables [NB,P] (each
    block's sequence's pages; P divisible by the page block); block_start/len/pos [NB] (see
    paged_kv.StepLayout). Returns [NB*query_block, H, D]: row b*query_block + t is token
    block_start[b] + t when t < block_len[b] (other rows are garbage or zeros).
    """
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    L, NP, S, K, D = k_pool.shape
    N, H, _ = q.shape
    G = H // K
    Gp = 1 << (G - 1).bit_length()  # rows per token: the group, padded to a power of two
    NB, P = block_tables.shape
    ppcb = min(pages_per_compute_block, P)
    if P % ppcb:
        raise ValueError(f"pages per sequence {P} is not divisible by {ppcb} pages per block")
    # [K, (N + query_block) * Gp, D]: each kv head's query rows, token-major; the tail keeps a
    # block that starts near the end in bounds.
    qg = jnp.pad(q.reshape(N, K, G, D), ((0, query_block), (0, 0), (0, Gp - G), (0, 0)))
    qt = qg.transpose(1, 0, 2, 3).reshape(K, (N + query_block) * Gp, D)
    rows = query_block * Gp
    k_flat = k_pool.reshape(L * NP, S, K, D)
    v_flat = v_pool.reshape(L * NP, S, K, D)
    pool_spec = pl.BlockSpec((L * NP, S, None, D), lambda b, h: (0, 0, h, 0))
    scalar = pl.BlockSpec((1,), lambda b, h: (b,))
    out = pl.pallas_call(
        functools.partial(_prefill_kernel, num_pages=NP, group=Gp, pages_per_compute_block=ppcb, prefetch=prefetch),
        grid=(NB, K),
        in_specs=[pl.BlockSpec((None, (N + query_block) * Gp, D), lambda b, h: (h, 0, 0)),
                  pool_spec, pool_spec,
                  pl.BlockSpec((None, P), lambda b, h: (b, 0)),
                  scalar, scalar, scalar,
                  pl.BlockSpec((1,), lambda b, h: (0,))],
        out_specs=pl.BlockSpec((None, None, rows, D), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((NB, K, rows, D), q.dtype),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name=f"jaxserve_paged_prefill_qb{query_block}_ppcb{ppcb}",
    )(qt, k_flat, v_flat, block_tables.astype(jnp.int32), block_start.astype(jnp.int32),
      block_len.astype(jnp.int32), block_pos.astype(jnp.int32), jnp.reshape(layer, (1,)).astype(jnp.int32))
    out = out.reshape(NB, K, query_block, Gp, D)[:, :, :, :G]
    return out.transpose(0, 2, 1, 3, 4).reshape(NB * query_block, H, D)


def prefill_attention(q, k_pool, v_pool, layer, block_tables, block_start, block_len, block_pos, *,
                      query_block: int, mesh: Optional[Mesh] = None):
    """`pallas_prefill_attention` per model shard (see `decode_attention`)."""
    kernel = functools.partial(pallas_prefill_attention, query_block=query_block,
                               interpret=jax.default_backend() != "gpu")
    K = k_pool.shape[3]
    model = 1 if mesh is None else mesh.shape.get("model", 1)
    args = (q, k_pool, v_pool, layer, block_tables, block_start, block_len, block_pos)
    if model == 1 or K % model:
        return kernel(*args)
    heads = P(None, "model", None)
    pool = P(None, None, None, "model", None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(heads, pool, pool) + (P(),) * 5,
                         out_specs=heads, check_vma=False)(*args)


def decode_bytes(batch: int, context: int, num_layers: int, num_kv_heads: int, head_dim: int,
                 itemsize: int = 2) -> int:
    """KV bytes one decode step must read: every layer's K and V of every context token."""
    return 2 * batch * context * num_layers * num_kv_heads * head_dim * itemsize
