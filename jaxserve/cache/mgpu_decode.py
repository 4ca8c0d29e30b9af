"""Paged decode attention on Hopper (Pallas Mosaic GPU): TMA page loads, wgmma, a persistent grid.

Work items are (sequence, kv head, split), as the Triton kernel's programs
(`attention_kernels._decode_kernel`). Each CTA has two warpgroups: a producer that issues one
TMA copy per page (one kv head's [page_size, head_dim] box, strided by the page's row) into a
`stages`-deep ring of 64-token K and V blocks in shared memory, and a consumer that runs
S = Q K^T and O += P V on wgmma (the group's query rows padded to wgmma's 64; only an 8-row
tile of them is loaded and stored) with an online softmax. The ring and its barriers' phases
carry over from item to item: a CTA loops over the items `cta, cta + C, ...`, so the producer
streams pages without a gap between items. The partials are merged (and normalised) by
`attention_kernels._combine`, which reads each head's rows from the shared 8-row tile.

Triton cannot express this kernel (its dot needs 16 rows, and it has no TMA gathers of pages
into a ring), and it streams the KV 15-33% faster than the Triton kernel on the H200
(docs/benchmarks.md). `supported` says where it runs; elsewhere the Triton kernel does.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

LOG2E = 1.4426950408889634
MASK = -0.7 * float(jnp.finfo(jnp.float32).max)
TILE_ROWS = 8  # q rows an item loads and stores: a TMA into a tiled buffer starts on an 8-row tile
BLOCK_TOKENS = 64  # tokens a ring slot holds: wgmma's N of Q K^T and K of P V
MIN_ITEMS = 64  # small batches are split until they have this many items (see mgpu_params)


def supported(num_heads: int, num_kv_heads: int, head_dim: int, page_size: int, dtype) -> bool:
    """Whether the kernel handles this shape on this process's first device: Hopper (sm_90),
    16-bit KV, a group that tiles 8 rows, head_dim a multiple of 64, pages that tile 64 tokens."""
    dev = jax.devices()[0]
    if dev.platform != "gpu" or getattr(dev, "compute_capability", None) != "9.0":
        return False
    group = num_heads // num_kv_heads
    return (jnp.dtype(dtype).itemsize == 2 and TILE_ROWS % group == 0 and num_heads % TILE_ROWS == 0
            and head_dim % 64 == 0 and BLOCK_TOKENS % page_size == 0)


def mgpu_params(batch: int, pages_per_seq: int, num_kv_heads: int, page_size: int = 16) -> tuple:
    """(k_splits, stages, ctas_per_sm) for a decode step of this bucketed shape.

    Rows are split in two: the grid hands out items round-robin, and with ragged lengths
    unsplit long rows leave a few CTAs working at the end (12% slower at batch 128, 100-1024
    tokens; 5% faster with rows all alike, but the shape does not say which it is). With 512
    items or more, two CTAs an SM with 2-deep rings keep more items in flight; with fewer, one
    CTA an SM with a 4-deep ring. Small batches are split further, to MIN_ITEMS items, while
    each split keeps a whole 64-token block. From the H200 sweep in docs/benchmarks.md.
    """
    block_pages = max(1, BLOCK_TOKENS // page_size)
    k_splits = 2 if pages_per_seq >= 2 * block_pages else 1
    while (batch * num_kv_heads * k_splits < MIN_ITEMS and pages_per_seq // (2 * k_splits) >= block_pages
           and k_splits < 32):
        k_splits *= 2
    return (k_splits, 2, 2) if batch * num_kv_heads * k_splits >= 512 else (k_splits, 4, 1)


def mgpu_decode_partials(q, k_pool, v_pool, layer, page_table, lengths, *, k_splits: int, stages: int = 4,
                         ctas_per_sm: int = 1, num_sms: Optional[int] = None, exclude_newest: bool = False,
                         interpret: bool = False):
    """Partial attention of one query token per sequence over one split of its pages, one layer.

    Shapes as `attention_kernels.pallas_decode_attention` (q already scaled), or q packed [B, K,
    T, D] (T a multiple of 8, `attention_kernels.pack_newest`): kv head h's query rows first in
    its own T rows. Returns (o [k_splits, B, K, 8, D] unnormalised in q.dtype, l and m
    [k_splits, B, K, 8] float32): kv head h's group is rows (h * G) % 8 .. + G of its tile, or
    rows 0 .. G of it when packed. exclude_newest: each row reads one key fewer than its length
    (the combine merges the newest).
    """
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    L, NP, S, K, D = k_pool.shape
    packed = q.ndim == 4
    B = q.shape[0]
    # the first of the 8 q rows an item loads, in units of a row: packed, kv head h's own rows
    first_row = ((lambda b, h: (b * K + h) * q.shape[2]) if packed
                 else (lambda b, h: lax.div((b * K + h) * (q.shape[1] // K), TILE_ROWS) * TILE_ROWS))
    P = page_table.shape[1]
    if P % k_splits:
        raise ValueError(f"{P} pages per sequence are not divisible by k_splits={k_splits}")
    per_split = P // k_splits
    BP = BLOCK_TOKENS // S  # pages a ring slot holds
    BT = BLOCK_TOKENS
    MQ = 64  # wgmma's M: the group's rows, padded
    n_items = B * K * k_splits
    num_sms = num_sms or getattr(jax.devices()[0], "core_count", None) or 132
    C = min(n_items, num_sms * ctas_per_sm)
    q2 = q.reshape(-1, D)
    k_flat = k_pool.reshape(L * NP * S, K, D)  # merges leading dims: no copy
    v_flat = v_pool.reshape(L * NP * S, K, D)
    tables = page_table.astype(jnp.int32).reshape(B, k_splits, per_split)
    layer_arr = jnp.reshape(layer, (1,)).astype(jnp.int32)
    dtype = q.dtype
    layout_cast = (lambda x, layout: x) if interpret else plgpu.layout_cast  # the interpreter has no layouts
    iota = ((lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)) if interpret
            else plgpu.broadcasted_iota)

    def body(q_ref, k_ref, v_ref, t_ref, len_ref, layer_ref, o_ref, l_ref, m_ref):
        def scoped(smem, bars):
            q_smem, k_smem, v_smem, l_smem, m_smem = smem
            q_bar, k_bar, v_bar, q_free, k_free, v_free = bars
            cta = lax.axis_index("c")
            wg = lax.axis_index("wg")
            n_mine = lax.div(n_items - cta + (C - 1), C)
            offset = layer_ref[0] * NP  # the layer's first page in the flattened pool

            def item(t):
                w = cta + t * C
                h = lax.rem(w, K)
                r = lax.div(w, K)
                s = lax.rem(r, k_splits)
                b = lax.div(r, k_splits)
                length = jnp.maximum(len_ref[b] - 1, 0) if exclude_newest else len_ref[b]
                first = s * per_split
                npages = jnp.minimum(jnp.maximum(lax.div(length + (S - 1), S) - first, 0), per_split)
                return b, h, s, length, first, npages, lax.div(npages + (BP - 1), BP)

            @pl.when(wg == 1)
            def _producer():
                def item_body(t, step):
                    b, h, s, _, _, npages, nblocks = item(t)
                    qs = lax.rem(t, 2)

                    @pl.when(t >= 2)
                    def _():
                        plgpu.barrier_wait(q_free.at[qs])

                    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(first_row(b, h), TILE_ROWS)],
                                            q_smem.at[qs, pl.ds(0, TILE_ROWS)], q_bar.at[qs])
                    last = jnp.maximum(npages - 1, 0)

                    def block_body(j, step):
                        slot = lax.rem(step, stages)
                        # pages past the row's end reload its last page (an L2 hit; masked out)
                        pages = [t_ref[b, s, jnp.minimum(j * BP + i, last)] + offset for i in range(BP)]
                        for ref, smem_ring, bar, free in ((k_ref, k_smem, k_bar, k_free), (v_ref, v_smem, v_bar, v_free)):
                            @pl.when(step >= stages)
                            def _():
                                plgpu.barrier_wait(free.at[slot])

                            for i, pg in enumerate(pages):
                                plgpu.copy_gmem_to_smem(ref.at[pl.ds(pg * S, S), h], smem_ring.at[slot, pl.ds(i * S, S)],
                                                        bar.at[slot])
                        return step + 1

                    return lax.fori_loop(0, nblocks, block_body, step)

                n_steps = lax.fori_loop(0, n_mine, item_body, jnp.int32(0))
                # Wait on the consumer's last releases too: every barrier phase is then waited on
                # once (the interpreter checks that).
                for i in range(stages):
                    @pl.when(n_steps - stages + i >= 0)
                    def _():
                        slot = lax.rem(n_steps - stages + i, stages)
                        plgpu.barrier_wait(k_free.at[slot])
                        plgpu.barrier_wait(v_free.at[slot])
                for i in range(2):
                    @pl.when(n_mine - 2 + i >= 0)
                    def _():
                        plgpu.barrier_wait(q_free.at[lax.rem(n_mine - 2 + i, 2)])

            @pl.when(wg == 0)
            def _consumer():
                def release_prev(t):
                    # item t-1's output stores have read its q/o buffer: the producer may refill it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                    @pl.when(t >= 1)
                    def _():
                        plgpu.barrier_arrive(q_free.at[lax.rem(t + 1, 2)])

                def item_body(t, step):
                    b, h, s, length, first, _, nblocks = item(t)
                    qs = lax.rem(t, 2)
                    plgpu.barrier_wait(q_bar.at[qs])
                    acc = layout_cast(jnp.full((MQ, D), 0, jnp.float32), plgpu.Layout.WGMMA)
                    m = layout_cast(jnp.full((MQ,), MASK, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    l = layout_cast(jnp.full((MQ,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    # tokens of the row from this split's first, within the split: a block past the
                    # split's last page holds copies of it
                    rest = jnp.minimum(length - first * S, per_split * S)

                    def block(j, carry):
                        acc, m, l, step = carry
                        slot = lax.rem(step, stages)
                        plgpu.barrier_wait(k_bar.at[slot])

                        def qk(acc_ref):
                            plgpu.wgmma(acc_ref, q_smem.at[qs], plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                            return acc_ref[...]

                        if interpret:  # the interpreter's wgmma takes no transposed refs: plain dots
                            sc = jnp.dot(q_smem[qs], k_smem[slot].T, preferred_element_type=jnp.float32)
                        else:
                            sc = pl.run_scoped(qk, plgpu.ACC((MQ, BT), jnp.float32))
                        plgpu.barrier_arrive(k_free.at[slot])
                        kv_ids = iota(jnp.int32, (MQ, BT), 1, layout=plgpu.Layout.WGMMA)
                        sc = jnp.where(kv_ids < rest - j * BT, sc * LOG2E, MASK)
                        m_new = jnp.maximum(m, sc.max(axis=1))
                        alpha = jnp.exp2(m - m_new)
                        p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
                        l = l * alpha + p.sum(axis=1)
                        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                        p16 = p.astype(dtype)
                        plgpu.barrier_wait(v_bar.at[slot])

                        def pv(acc_ref):
                            plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

                        if interpret:
                            acc = acc + jnp.dot(p16, v_smem[slot], preferred_element_type=jnp.float32)
                        else:
                            acc = pl.run_state(pv)(plgpu.ACC.init(acc))
                        plgpu.barrier_arrive(v_free.at[slot])
                        pl.when(j == 0)(lambda: release_prev(t))  # the last item's stores are long done
                        return acc, m_new, l, step + 1

                    acc, m, l, step = lax.fori_loop(0, nblocks, block, (acc, m, l, step))
                    pl.when(nblocks == 0)(lambda: release_prev(t))
                    o_smem = q_smem.at[qs]  # this item's q is no longer read: its buffer takes o
                    o_smem[...] = acc.astype(dtype)
                    l_smem[...] = l
                    m_smem[...] = m * (1.0 / LOG2E)  # natural-log units, as the combine expects
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, TILE_ROWS)], o_ref.at[s, b, h])
                    plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, TILE_ROWS)], l_ref.at[s, b, h])
                    plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, TILE_ROWS)], m_ref.at[s, b, h])
                    return step

                lax.fori_loop(0, n_mine, item_body, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)

                @pl.when(n_mine >= 1)
                def _():
                    plgpu.barrier_arrive(q_free.at[lax.rem(n_mine + 1, 2)])

        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (plgpu.SMEM((2, MQ, D), dtype, transforms=tiled),
                plgpu.SMEM((stages, BT, D), dtype, transforms=tiled),
                plgpu.SMEM((stages, BT, D), dtype, transforms=tiled),
                plgpu.SMEM((MQ,), jnp.float32),
                plgpu.SMEM((MQ,), jnp.float32))
        bars = (plgpu.Barrier(num_arrivals=1, num_barriers=2),
                plgpu.Barrier(num_arrivals=BP, num_barriers=stages),
                plgpu.Barrier(num_arrivals=BP, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=2),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                plgpu.Barrier(num_arrivals=1, num_barriers=stages))
        pl.run_scoped(scoped, smem, bars, collective_axes="wg")

    out_type = [jax.ShapeDtypeStruct((k_splits, B, K, TILE_ROWS, D), dtype),
                jax.ShapeDtypeStruct((k_splits, B, K, TILE_ROWS), jnp.float32),
                jax.ShapeDtypeStruct((k_splits, B, K, TILE_ROWS), jnp.float32)]
    kw = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw = {"interpret": InterpretGPUParams()}
    return plgpu.kernel(
        body, out_type=out_type, grid=(C,), grid_names=("c",), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
        **kw,
    )(q2, k_flat, v_flat, tables, lengths.astype(jnp.int32), layer_arr)
