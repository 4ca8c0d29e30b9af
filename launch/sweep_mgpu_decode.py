"""Prototype: paged-attention decode with Pallas Mosaic GPU (Hopper wgmma + TMA) vs our Pallas-Triton kernel.

    python launch/proto_mgpu_decode.py --cases=128x1024,64x640,128r100-2048 --configs=p1s4k1w1,p2s2w1

Same data layout and measurement as launch/sweep_decode_kernel.py: a random bf16 pool
[L, pages, 16, K, D], a shuffled page table as wide as the engine's bucket, one kernel call per
layer in one jitted scan over 32 layers; KV bytes = 2 * sum(lengths) * L * K * D * 2.

Kernel (`mgpu_decode_attention`): work items are (sequence, kv head, split), like the Triton
kernel's programs. Each CTA has two warpgroups: a producer that issues TMA copies of one kv
head's pages (a [16, D] box each, strided by the page's K*D row) into a `stages`-deep ring of
64-token K and V blocks in shared memory, and a consumer that runs S = Q K^T and O += P V on
wgmma (Q's group rows padded to wgmma's 64: only 8 rows are loaded and stored) with an online
softmax. The ring, and the phase of each barrier, carry over from one work item to the next:
with `ctas_per_sm` > 0 the grid is persistent (that many CTAs per SM loop over the items), so
the producer streams pages without a gap between items. Splits are merged by the Triton
kernel's own combine (`attention_kernels._combine`).

The last line is one JSON object of every result.

H200 (JAX 0.11.2), 32 layers, ms and TB/s of KV read (Triton: decode_params' pick, same data):
    128x1024      Triton 5.325 ms 3.23 TB/s | p1s4k1w1 4.595 ms 3.74 | p2s2w1 (ks=2) 4.810 ms 3.57
    64x640        Triton 2.364 ms 2.27 TB/s | p1s4k1w1 1.778 ms 3.02 | p2s2w1 (ks=2) 1.885 ms 2.85
    128r100-2048  Triton 6.697 ms 2.74 TB/s | p1s4k1w1 6.491 ms 2.83 | p2s2w1 (ks=4) 5.810 ms 3.16
relative error vs a float32 reference ~2.7e-3 (Triton's ~2.2e-3). Default semantics on 0.11.2 is
Warpgroup (w1); Lane measured the same within 1%. The q rows' TMA must start on an 8-row tile
(0.11's layout inference refuses the group's 4-row offset; 0.10's Lane lowering took it silently).
"""
from __future__ import annotations

import functools
import json
import math
import os
import sys
import time
import traceback

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.cli import run  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cases import HEAD_DIM, HEADS, KV_HEADS, LAYERS, PAGE, REPS, parse_case  # noqa: E402

_CASES = flags.DEFINE_list("cases", ["128x1024", "64x640", "128r100-2048"], "Batch and context cases.")
_CONFIGS = flags.DEFINE_list(
    "configs", ["p1s4k1w1", "p2s2w1"],
    "Mosaic GPU configs: p<ctas per SM, 0 = one CTA per item>s<ring stages>[k<splits>][r<consumer regs>]"
    "[o0: o through its own smem, not the q buffer][w1: Warpgroup lowering semantics, else Lane]"
    "[c0: skip the combine (timing only)].")
_TRITON = flags.DEFINE_bool("triton", True, "Also time the Triton kernel.")
_INTERPRET = flags.DEFINE_bool("interpret", False, "Run the Mosaic GPU kernel interpreted (CPU check).")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Only lower for cuda (no device needed) and exit.")
_NUM_SMS = flags.DEFINE_integer("num_sms", 0, "SMs the persistent grid assumes (0: the device's).")
_BUDGET = flags.DEFINE_float("budget_s", 400.0, "Stop after this many seconds.")

LOG2E = 1.4426950408889634
MASK = -0.7 * float(np.finfo(np.float32).max)
QROWS = 8  # q rows a work item loads and stores: its group (4), padded to a tile of 8 rows


def parse_config(cfg: str) -> dict:
    """'p2s2k2r200o0' -> dict(ctas_per_sm=2, stages=2, k_splits=2, regs=200, share_o=0); k, r, o optional."""
    out, key, num = {}, None, ""
    names = {"p": "ctas_per_sm", "s": "stages", "k": "k_splits", "r": "regs", "o": "share_o", "w": "wg_semantics",
             "c": "combine_splits"}
    for ch in cfg + "$":
        if ch.isdigit():
            num += ch
            continue
        if key is not None:
            out[names[key]] = int(num)
        key, num = ch, ""
    return out


def mgpu_decode_attention(q, k_pool, v_pool, layer, page_table, lengths, *, k_splits: int, stages: int = 2,
                          ctas_per_sm: int = 2, regs: int = 0, share_o: bool = True, wg_semantics: bool = False,
                          combine_splits: bool = True, num_sms: int = 132, block_pages: int = 4,
                          interpret: bool = False):
    """Decode attention of one layer, Mosaic GPU. Shapes as `pallas_decode_attention`; returns [B, H, D]."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu
    L, NP, S, K, D = k_pool.shape
    B, H, _ = q.shape
    G = H // K
    assert QROWS % G == 0 and H % QROWS == 0 and D % 64 == 0
    P = page_table.shape[1]
    if P % k_splits:
        raise ValueError(f"{P} pages per row not divisible by {k_splits} splits")
    per_split = P // k_splits
    BP = block_pages
    BT = BP * S  # tokens a ring slot holds (wgmma's N of Q K^T and K of P V)
    if BT % 64:
        raise ValueError(f"block of {BT} tokens: must be a multiple of 64")
    MQ = 64  # wgmma's M: the group's rows, padded
    n_items = B * K * k_splits
    C = n_items if ctas_per_sm <= 0 else min(n_items, num_sms * ctas_per_sm)
    q2 = q.reshape(B * H, D)
    k_flat = k_pool.reshape(L * NP * S, K, D)  # free reshapes
    v_flat = v_pool.reshape(L * NP * S, K, D)
    tables = page_table.astype(jnp.int32).reshape(B, k_splits, per_split)
    layer_arr = jnp.reshape(layer, (1,)).astype(jnp.int32)
    dtype = q.dtype
    # the interpreter has no layouts
    layout_cast = (lambda x, layout: x) if interpret else plgpu.layout_cast
    iota = ((lambda dt, shape, dim, layout: lax.broadcasted_iota(dt, shape, dim)) if interpret
            else plgpu.broadcasted_iota)

    def body(q_ref, k_ref, v_ref, t_ref, len_ref, layer_ref, o_ref, l_ref, m_ref):
        def scoped(smem, bars):
            q_smem, k_smem, v_smem, o_buf, l_smem, m_smem = smem
            q_bar, k_bar, v_bar, q_free, k_free, v_free = bars
            cta = lax.axis_index("c")
            wg = lax.axis_index("wg")
            n_mine = lax.div(n_items - cta + (C - 1), C)
            offset = layer_ref[0] * NP

            def item(t):
                w = cta + t * C
                h = lax.rem(w, K)
                r = lax.div(w, K)
                s = lax.rem(r, k_splits)
                b = lax.div(r, k_splits)
                length = len_ref[b]
                first = s * per_split
                npages = jnp.minimum(jnp.maximum(lax.div(length + (S - 1), S) - first, 0), per_split)
                nblocks = lax.div(npages + (BP - 1), BP)
                return b, h, s, length, first, npages, nblocks

            @pl.when(wg == 1)
            def _producer():
                if regs:
                    plgpu.set_max_registers(40, action="decrease")

                def item_body(t, step):
                    b, h, s, _, _, npages, nblocks = item(t)
                    qs = lax.rem(t, 2)

                    @pl.when(t >= 2)
                    def _():
                        plgpu.barrier_wait(q_free.at[qs])

                    # the 8-row tile holding the group's rows (TMA into a tiled buffer starts on a tile)
                    plgpu.copy_gmem_to_smem(q_ref.at[pl.ds(lax.div((b * K + h) * G, QROWS) * QROWS, QROWS)],
                                            q_smem.at[qs, pl.ds(0, QROWS)], q_bar.at[qs])
                    last = jnp.maximum(npages - 1, 0)

                    def block_body(j, step):
                        slot = lax.rem(step, stages)
                        # pages past the row's end reload its last page (an L2 hit; masked out)
                        pages = [t_ref[b, s, jnp.minimum(j * BP + i, last)] + offset for i in range(BP)]

                        @pl.when(step >= stages)
                        def _():
                            plgpu.barrier_wait(k_free.at[slot])

                        for i, pg in enumerate(pages):
                            plgpu.copy_gmem_to_smem(k_ref.at[pl.ds(pg * S, S), h], k_smem.at[slot, pl.ds(i * S, S)],
                                                    k_bar.at[slot])

                        @pl.when(step >= stages)
                        def _():
                            plgpu.barrier_wait(v_free.at[slot])

                        for i, pg in enumerate(pages):
                            plgpu.copy_gmem_to_smem(v_ref.at[pl.ds(pg * S, S), h], v_smem.at[slot, pl.ds(i * S, S)],
                                                    v_bar.at[slot])
                        return step + 1

                    return lax.fori_loop(0, nblocks, block_body, step)

                n_steps = lax.fori_loop(0, n_mine, item_body, jnp.int32(0))
                # Observe the consumer's last releases: nothing needs them, but every barrier phase
                # is then waited on once (the interpreter checks that).
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
                if regs:
                    plgpu.set_max_registers(regs, action="increase")

                def item_body(t, step):
                    b, h, s, length, first, _, nblocks = item(t)
                    qs = lax.rem(t, 2)
                    plgpu.barrier_wait(q_bar.at[qs])
                    acc = layout_cast(jnp.full((MQ, D), 0, jnp.float32), plgpu.Layout.WGMMA)
                    m = layout_cast(jnp.full((MQ,), MASK, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    l = layout_cast(jnp.full((MQ,), 0, jnp.float32), plgpu.Layout.WGMMA.reduce(1))
                    rest = length - first * S  # tokens of the row from this split's first

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
                        if share_o:  # by now the last item's output stores have long read its buffer
                            pl.when(j == 0)(lambda: release_prev(t))
                        return acc, m_new, l, step + 1

                    acc, m, l, step = lax.fori_loop(0, nblocks, block, (acc, m, l, step))
                    if share_o:
                        pl.when(nblocks == 0)(lambda: release_prev(t))
                        o_smem = q_smem.at[qs]  # this item's q is no longer read: its buffer takes o
                    else:
                        plgpu.barrier_arrive(q_free.at[qs])
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # last item's stores have read smem
                        o_smem = o_buf
                    o_smem[...] = acc.astype(dtype)
                    l_smem[...] = l
                    m_smem[...] = m * (1.0 / LOG2E)  # natural-log units, as the combine expects
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(0, QROWS)], o_ref.at[s, b, h])
                    plgpu.copy_smem_to_gmem(l_smem.at[pl.ds(0, QROWS)], l_ref.at[s, b, h])
                    plgpu.copy_smem_to_gmem(m_smem.at[pl.ds(0, QROWS)], m_ref.at[s, b, h])
                    return step

                def release_prev(t):
                    # item t-1's output stores have read its q/o buffer: the producer may refill it
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

                    @pl.when(t >= 1)
                    def _():
                        plgpu.barrier_arrive(q_free.at[lax.rem(t + 1, 2)])

                lax.fori_loop(0, n_mine, item_body, jnp.int32(0))
                plgpu.wait_smem_to_gmem(0)
                if share_o:
                    @pl.when(n_mine >= 1)
                    def _():
                        plgpu.barrier_arrive(q_free.at[lax.rem(n_mine + 1, 2)])

        tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
        smem = (
            plgpu.SMEM((2, MQ, D), dtype, transforms=tiled),
            plgpu.SMEM((stages, BT, D), dtype, transforms=tiled),
            plgpu.SMEM((stages, BT, D), dtype, transforms=tiled),
            None if share_o else plgpu.SMEM((MQ, D), dtype),
            plgpu.SMEM((MQ,), jnp.float32),
            plgpu.SMEM((MQ,), jnp.float32),
        )
        bars = (
            plgpu.Barrier(num_arrivals=1, num_barriers=2),
            plgpu.Barrier(num_arrivals=BP, num_barriers=stages),
            plgpu.Barrier(num_arrivals=BP, num_barriers=stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=2),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),
            plgpu.Barrier(num_arrivals=1, num_barriers=stages),
        )
        pl.run_scoped(scoped, smem, bars, collective_axes="wg")

    out_type = [jax.ShapeDtypeStruct((k_splits, B, K, QROWS, D), dtype),
                jax.ShapeDtypeStruct((k_splits, B, K, QROWS), jnp.float32),
                jax.ShapeDtypeStruct((k_splits, B, K, QROWS), jnp.float32)]
    kw = {}
    if interpret:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
        kw = {"interpret": InterpretGPUParams()}
    o, l, m = plgpu.kernel(
        body, out_type=out_type, grid=(C,), grid_names=("c",), num_threads=2, thread_name="wg",
        compiler_params=plgpu.CompilerParams(
            approx_math=True,
            lowering_semantics=plgpu.LoweringSemantics.Warpgroup if wg_semantics else plgpu.LoweringSemantics.Lane),
        **kw,
    )(q2, k_flat, v_flat, tables, lengths.astype(jnp.int32), layer_arr)
    if not combine_splits:  # timing only: the kernel's cost without the combine (the output is wrong)
        return jnp.zeros_like(q) + o[0, 0, 0, 0, 0] + l[0, 0, 0, 0] + m[0, 0, 0, 0]
    return combine(o, l, m, B, G, dtype, interpret)


def combine(o, l, m, out_rows: int, num_heads: int, dtype, interpret: bool):
    """`attention_kernels._combine`, but reading each kv head's rows from its item's 8-row tile of q
    rows (at (h * G) % 8) and with its backend pinned to Triton: a pallas_call without compiler
    params goes to Mosaic GPU when jax_pallas_use_mosaic_gpu is on (0.10's default), which refuses
    these small blocks."""
    import jax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as pltriton
    from jaxserve.cache import attention_kernels as ak

    ks, B, K, block_h, D = o.shape
    g = 1 << (num_heads - 1).bit_length()
    last = B - 1
    per_tile = block_h // g  # groups a tile of q rows holds
    part = lambda b, h: (0, jax.numpy.minimum(b, last), h, h % per_tile)
    out = pl.pallas_call(
        functools.partial(ak._combine_kernel, batch=B),
        grid=(out_rows, K),
        in_specs=[pl.BlockSpec((ks, None, None, g, D), lambda b, h: part(b, h) + (0,)),
                  pl.BlockSpec((ks, None, None, g), part),
                  pl.BlockSpec((ks, None, None, g), part)],
        out_specs=pl.BlockSpec((None, None, g, D), lambda b, h: (b, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct((out_rows, K, g, D), dtype),
        compiler_params=pltriton.CompilerParams(num_warps=4),
        interpret=interpret,
        name="proto_mgpu_decode_combine",
    )(o, l, m)
    if g != num_heads:
        out = out[:, :, :num_heads]
    return out.reshape(out_rows, K * num_heads, D)


def reference_decode(q, k_pool, v_pool, layer, page_table, lengths):
    """float32 pure-JAX attention of one layer (gathers the pages)."""
    import jax.numpy as jnp

    L, NP, S, K, D = k_pool.shape
    B, H, _ = q.shape
    G = H // K
    k = k_pool[layer][page_table].reshape(B, -1, K, D).astype(jnp.float32)  # [B, T, K, D]
    v = v_pool[layer][page_table].reshape(B, -1, K, D).astype(jnp.float32)
    qg = q.reshape(B, K, G, D).astype(jnp.float32)
    logits = jnp.einsum("bkgd,btkd->bkgt", qg, k)
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
    p = jnp.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    return jnp.einsum("bkgt,btkd->bkgd", p, v).reshape(B, H, D)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from jaxserve.cache import attention_kernels as ak
    from jaxserve.scheduling.cost_model import bucket

    L, K, H, D, S = LAYERS.value, KV_HEADS.value, HEADS.value, HEAD_DIM.value, PAGE.value
    rng = np.random.default_rng(0)
    cases = [(c, *parse_case(c, rng)) for c in _CASES.value]
    configs = [(c, parse_config(c)) for c in _CONFIGS.value]
    dev = jax.devices()[0]
    num_sms = _NUM_SMS.value or getattr(dev, "core_count", None) or 132

    if _LOWER_ONLY.value:  # abstract shapes, lowered for cuda: catches Mosaic GPU lowering errors off the GPU
        for name, lens, width in cases:
            B, P = len(lens), bucket(-(-width // S))
            for cname, cfg in configs:
                cfg = dict(cfg)
                ks = cfg.pop("k_splits", 0) or ak.decode_params(B, P, K, S)[1]
                f = jax.jit(functools.partial(mgpu_decode_attention, k_splits=ks, num_sms=132, **cfg))
                args = (jax.ShapeDtypeStruct((B, H, D), jnp.bfloat16),
                        jax.ShapeDtypeStruct((L, B * P + 1, S, K, D), jnp.bfloat16),
                        jax.ShapeDtypeStruct((L, B * P + 1, S, K, D), jnp.bfloat16),
                        jax.ShapeDtypeStruct((), jnp.int32),
                        jax.ShapeDtypeStruct((B, P), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))
                try:
                    txt = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
                    print(f"{name} {cname} ks={ks}: lowered ({len(txt)} chars)", flush=True)
                except Exception:  # noqa: BLE001
                    print(f"{name} {cname} ks={ks}: lowering failed", flush=True)
                    traceback.print_exc()
        return

    pages_needed = max(len(lens) * bucket(-(-width // S)) for _, lens, width in cases) + 1
    key = jax.random.key(0)
    pool = {n: jax.random.normal(jax.random.fold_in(key, i), (L, pages_needed, S, K, D), jnp.bfloat16)
            for i, n in enumerate("kv")}
    print(f"jax {jax.__version__}, jax_pallas_use_mosaic_gpu={getattr(jax.config, 'jax_pallas_use_mosaic_gpu', 'n/a')}", flush=True)
    print(f"pool: {pages_needed} pages, {2 * pool['k'].nbytes / 1e9:.1f} GB, {dev.device_kind}, {num_sms} SMs",
          flush=True)

    def layers_fn(attn):
        @jax.jit
        def f(q, kp, vp, table, lengths):
            def body(acc, layer):
                return acc + attn(q, kp, vp, layer, table, lengths).astype(jnp.float32), None
            return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(L))[0]
        return f

    def timeit(f, *args):
        jax.block_until_ready(f(*args))
        t = time.perf_counter()
        for _ in range(REPS.value):
            out = f(*args)
        jax.block_until_ready(out)
        return (time.perf_counter() - t) / REPS.value

    rows, start = [], time.perf_counter()
    for name, lens, width in cases:
        B, P = len(lens), bucket(-(-width // S))
        table = jnp.asarray(rng.permutation(pages_needed - 1)[:B * P].astype(np.int32).reshape(B, P))
        lengths = jnp.asarray(lens)
        q = (jax.random.normal(jax.random.key(1), (B, H, D), jnp.float32) / math.sqrt(D)).astype(jnp.bfloat16)
        kv_bytes = 2 * int(lens.sum()) * L * K * D * 2
        pick = ak.decode_params(B, P, K, S)
        layer_chk = L - 1
        ref = jax.jit(reference_decode)(q, pool["k"], pool["v"], jnp.int32(layer_chk), table, lengths)

        def rel_err(out):
            out = out.astype(jnp.float32)
            return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)), float(jnp.max(jnp.abs(out - ref)))

        if _TRITON.value:
            tri = functools.partial(ak.pallas_decode_attention, pages_per_compute_block=pick[0], k_splits=pick[1],
                                    num_warps=pick[2])
            try:
                err = rel_err(jax.jit(tri)(q, pool["k"], pool["v"], jnp.int32(layer_chk), table, lengths))
                sec = timeit(layers_fn(tri), q, pool["k"], pool["v"], table, lengths)
                rows.append({"case": name, "kernel": "triton", "params": list(pick), "ms_all_layers": sec * 1e3,
                             "tb_s": kv_bytes / sec / 1e12, "rel_err": err[0], "max_abs_err": err[1]})
                print(f"{name} triton {pick}: {sec * 1e3:.3f} ms, {kv_bytes / sec / 1e12:.2f} TB/s, "
                      f"rel err {err[0]:.2e} (max abs {err[1]:.2e})", flush=True)
            except Exception as e:  # noqa: BLE001
                print(f"{name} triton failed: {type(e).__name__}: {str(e)[:300]}", flush=True)

        for cname, cfg in configs:
            if time.perf_counter() - start > _BUDGET.value:
                print("out of time", flush=True)
                break
            cfg = dict(cfg)
            ks = cfg.pop("k_splits", 0) or pick[1]
            attn = functools.partial(mgpu_decode_attention, k_splits=ks, num_sms=num_sms,
                                     interpret=_INTERPRET.value, **cfg)
            try:
                t0 = time.perf_counter()
                err = rel_err(jax.jit(attn)(q, pool["k"], pool["v"], jnp.int32(layer_chk), table, lengths))
                if not cfg.get("combine_splits", 1):
                    err = (float("nan"), float("nan"))  # no combine: the output is not attention
                t_compile = time.perf_counter() - t0
                sec = timeit(layers_fn(attn), q, pool["k"], pool["v"], table, lengths)
            except Exception as e:  # noqa: BLE001
                print(f"{name} mgpu {cname} ks={ks} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                print(traceback.format_exc()[-2500:], flush=True)
                continue
            rows.append({"case": name, "kernel": "mgpu", "config": cname, "k_splits": ks, "ms_all_layers": sec * 1e3,
                         "tb_s": kv_bytes / sec / 1e12, "rel_err": err[0], "max_abs_err": err[1]})
            print(f"{name} mgpu {cname} ks={ks}: {sec * 1e3:.3f} ms, {kv_bytes / sec / 1e12:.2f} TB/s, "
                  f"rel err {err[0]:.2e} (max abs {err[1]:.2e}), first call {t_compile:.1f} s", flush=True)
    print(json.dumps(rows))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "proto_mgpu_decode.json"), "w") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    run(main)
