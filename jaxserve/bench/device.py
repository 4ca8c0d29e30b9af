"""Decode, prefill and swap speed of jaxserve on one GPU, against the HBM roofline and `transformers`.

    jaxserve bench device llama3_8b --out_dir=results/device --variants=xla_default,dot_merger_off
    python launch/bench_device.py --config=configs/llama3_8b.py ...   # the same, from a checkout

Each part runs in its own process so that it has the whole GPU to itself:
  jax          random bf16 weights made on the device; decode ms/step at batch 1/16/64/128 with
               1k and 2k contexts through the engine's jitted step (`ModelRunner.launch`, Pallas kernel
               and reference attention), attention-kernel sweep and kernel-vs-reference checks,
               prefill of 2k-token prompts, swap transfers to/from pinned host memory
  variant:X    batch 1 and 64 decode under other XLA flags (`variant_flags`: XLA's defaults, or
               jaxserve's GPU_XLA_FLAGS changed), to measure what each flag is worth
  hf           `transformers` generate on the same shapes, and torch's pinned-memory copy speed
The roofline of a decode step is (weights read + KV read) / ROOFLINE_BW. The last line printed
is one JSON object holding every figure of the table.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time

# Before jaxserve is imported (its model_runner adds GPU_XLA_FLAGS to XLA_FLAGS at import): the
# xla_default part runs with the user's flags as they were.
_USER_XLA_FLAGS = os.environ.get("XLA_FLAGS")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxserve import configs  # noqa: E402
from jaxserve.bench import plots  # noqa: E402
from jaxserve.cli import run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec("llama3_8b"),
                                          "Model config (`jaxserve bench device MODEL` sets it).")
_PART = flags.DEFINE_enum("part", "all", ["all", "jax", "variant", "hf"], "Which part to run.")
_VARIANTS = flags.DEFINE_list("variants", ["xla_default", "dot_merger_off"],
                               "XLA flag variants to time decode under (XLA_VARIANTS).")
_DUMP_HLO = flags.DEFINE_string("dump_hlo", "", "Folder for the jax part's optimized HLO of the step.")
_JSON = flags.DEFINE_string("json", "", "Where a part writes its results (set by the parent).")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "Folder for the JSON results and the table (default: results/device).")
_PLOT = flags.DEFINE_bool("plot", True, "Plot decode tokens/s against the batch as throughput_vs_batch.png in "
                          "--out_dir (skipped without matplotlib).")
_BUDGET = flags.DEFINE_float("budget_s", 560.0, "Wall-clock budget of the whole run; late sections are skipped.")
_SKIP = flags.DEFINE_list("skip", [], "Sections to skip: sweep, reference, prefill, swap, stream, hf.")
_BATCHES = flags.DEFINE_list("batches", ["1", "16", "64", "128"], "Decode batch sizes.")
_CONTEXTS = flags.DEFINE_list("contexts", ["1024", "2048"], "Decode context lengths (tokens, multiples of 16).")

XLA_VARIANTS = ("as_shipped", "xla_default", "dot_merger_off", "cmdbuf_while", "no_cmdbuf", "full_unroll")


def variant_flags(name: str) -> list:
    """XLA flags (added to the user's) of a decode variant, each run in its own process."""
    from jaxserve.engine.model_runner import GPU_XLA_FLAGS
    lib = list(GPU_XLA_FLAGS)
    return {"as_shipped": lib,  # jaxserve's own flags, in a process like the other variants'
            "xla_default": [],  # XLA as it comes: none of jaxserve's flags
            "dot_merger_off": lib + ["--xla_gpu_dot_merger_threshold_mb=0"],
            "cmdbuf_while": lib + ["--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL"],
            "no_cmdbuf": lib + ["--xla_gpu_enable_command_buffer="],
            "full_unroll": lib + ["--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL"],
            }[name]


# B/s: replaced by the device-to-device copy bandwidth measured at the start of each run (every
# "% of roofline" divides by it); the datasheet figure is printed beside it
ROOFLINE_BW = float("nan")
DATASHEET_BW = {"H200": 4.8e12, "H100": 3.35e12}
LINK_BW = 52e9          # B/s: host<->device link, the swap target's reference
PAGE = 16
DATE = time.strftime("%Y-%m-%d")


# ------------------------------------------------------------------------------------------------
# shared helpers
class Results:
    """A dict written to disk after every section, so a part that dies still reports."""

    def __init__(self, path):
        self.path, self.data = path, {}
        self.t0 = time.time()

    def set(self, key, value):
        self.data[key] = value
        if self.path:
            with open(self.path, "w") as f:
                json.dump(self.data, f)

    def section(self, name, fn, *args, **kw):
        t = time.time()
        try:
            out = fn(*args, **kw)
            status = "ok"
        except Exception as e:  # keep going: later sections still give numbers
            import traceback
            traceback.print_exc()
            out, status = None, f"error: {type(e).__name__}: {str(e)[:300]}"
        times = self.data.get("section_s", {})
        times[name] = {"s": round(time.time() - t, 1), "status": status}
        self.set("section_s", times)
        print(f"[bench] section {name}: {status} in {time.time() - t:.1f}s", flush=True)
        return out


def log(*a):
    print("[bench]", *a, flush=True)


def model_cfg(config):
    from jaxserve.model.config import model_config_from_dict
    return model_config_from_dict(dict(config.model))


def weight_bytes_read(cfg) -> int:
    """Bytes of weights one decode step streams: all but the embedding table (only B rows are gathered)."""
    import numpy as np
    from jaxserve.model.params import is_spec, param_specs
    import jax
    leaves = jax.tree.leaves(param_specs(cfg), is_leaf=is_spec)
    total = sum(int(np.prod(s.shape)) for s in leaves) * 2
    return total - cfg.vocab_size * cfg.embed_dim * 2 * (0 if cfg.tie_embeddings else 1)


def timed(fn, n, warm=2):
    """Mean seconds per call over n back-to-back calls (device work pipelined), after warm-up calls."""
    import jax
    for _ in range(warm):
        jax.block_until_ready(fn())
    t = time.perf_counter()
    out = None
    for _ in range(n):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


# ------------------------------------------------------------------------------------------------
# part: jax
def part_jax(config, res: Results, deadline: float, variant: bool = False):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxserve.cache import attention_kernels as ak
    from jaxserve.cache import paged_kv, transfer
    from jaxserve.engine import model_runner
    from jaxserve.model.sharding import init_random_on_device
    from jaxserve.model.sharding import make_mesh

    cfg = model_cfg(config)
    dev = jax.devices()[0]
    res.set("device", dev.device_kind)
    res.set("jax", jax.__version__)
    res.set("xla_flags", os.environ.get("XLA_FLAGS", ""))
    log("device", dev.device_kind, "jax", jax.__version__, "XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
    mesh = make_mesh(1, 1)
    W = weight_bytes_read(cfg)
    res.set("weight_bytes", W)
    L, K, D = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    def left():
        return deadline - time.time()

    # -- copy bandwidth: the ceiling every figure below is read against -----------------------------
    def copy_bw():
        x = jnp.ones((1 << 28,), jnp.float32)  # 1 GiB
        f = jax.jit(lambda x: x + 1.0)
        t = timed(lambda: f(x), 20)
        return 2 * x.nbytes / t / 1e12
    global ROOFLINE_BW
    res.set("copy_tb_s", res.section("copy_bw", copy_bw))
    ROOFLINE_BW = (res.data.get("copy_tb_s") or float("nan")) * 1e12
    res.set("roofline_tb_s", ROOFLINE_BW / 1e12)
    name = str(jax.devices()[0].device_kind)
    res.set("datasheet_tb_s", next((bw / 1e12 for k, bw in DATASHEET_BW.items() if k in name), None))

    # -- weights and a pool of random keys and values --------------------------------------------------
    t = time.time()
    params = init_random_on_device(cfg, mesh, seed=0)
    jax.block_until_ready(params)
    res.set("init_weights_s", round(time.time() - t, 1))
    log(f"weights on device in {time.time() - t:.1f}s, {W / 1e9:.2f} GB read per step")

    BATCHES = [int(b) for b in _BATCHES.value]
    CONTEXTS = [int(c) for c in _CONTEXTS.value]
    CTX = max(CONTEXTS)  # the long context: reference rows, sweep, prefill
    B_MID = sorted(BATCHES)[len(BATCHES) // 2]  # 64 of 1/16/64/128: reference row and overlap test
    # -- the weight stream alone: each layer's matrices applied to B rows, under lax.scan -------------
    def weight_stream():
        @jax.jit
        def stream(params, x):
            def body(h, lp):
                qkv = jnp.einsum("be,ekgd->bkgd", h, lp["wqkv"])
                q = qkv[:, :, :-2].reshape(h.shape[0], cfg.num_heads, cfg.head_dim)
                o = jnp.einsum("bhd,hde->be", q, lp["wo"])
                # the MLP reads h + o, as in the model: were it h, XLA's dot merger would fuse
                # the two projections into one fresh concatenated weight every step (2x slower)
                gu = jnp.einsum("be,ecf->bcf", h + o, lp["w_gate_up"])
                d = (gu[:, 0] * gu[:, 1]) @ lp["w_down"]
                return (h + o + d + 1e-6 * qkv[:, :, -2:].sum().astype(h.dtype)).astype(h.dtype), None
            h, _ = jax.lax.scan(body, x, params["layers"])
            return h @ (params["lm_head"] if "lm_head" in params else params["embed"].T)
        rows = []
        for B in (1, B_MID):
            x = jax.random.normal(jax.random.key(3), (B, cfg.embed_dim), jnp.float32).astype(cfg.jnp_dtype)
            t = timed(lambda: stream(params, x), 20)
            rows.append({"batch": B, "ms": t * 1e3, "gb": W / 1e9, "roofline_ms": W / ROOFLINE_BW * 1e3,
                         "roofline_frac": W / ROOFLINE_BW / t, "tb_s": W / t / 1e12})
            log(f"weight stream B={B}: {t * 1e3:.2f} ms, {W / t / 1e12:.2f} TB/s")
        return rows
    if "stream" not in _SKIP.value:
        res.set("weight_stream", res.section("weight_stream", weight_stream))

    max_batch = B_MID if variant else max(BATCHES)
    num_pages = max_batch * CTX // PAGE + 1
    pool = paged_kv.init_pool(cfg, num_pages, PAGE, mesh)

    @functools.partial(jax.jit, donate_argnums=0)
    def fill(a, key, layer):
        return a.at[layer].set(jax.random.normal(key, a.shape[1:], jnp.float32).astype(a.dtype))
    key = jax.random.key(1)
    for name in ("k", "v"):
        for layer in range(L):
            key, sub = jax.random.split(key)
            pool[name] = fill(pool[name], sub, layer)
    jax.block_until_ready(pool)
    log(f"pool: {num_pages} pages, {2 * pool['k'].nbytes / 1e9:.1f} GB")
    rng = np.random.default_rng(0)
    perm = rng.permutation(num_pages - 1).astype(np.int32)

    def tables(B, ctx):
        P = ctx // PAGE
        return perm[:B * P].reshape(B, P)

    # -- attention alone: kernel vs reference, parameter sweep ---------------------------------------
    @functools.partial(jax.jit, static_argnames=("impl", "ppcb", "ks", "nw", "stages"))
    def attn_layers(q, kp, vp, table, lengths, impl, ppcb=8, ks=1, nw=4, stages=2):
        def body(acc, layer):
            if impl == "pallas":
                o = ak.pallas_decode_attention(q, kp, vp, layer, table, lengths, pages_per_compute_block=ppcb,
                                               k_splits=ks, num_warps=nw, num_stages=stages,
                                               interpret=jax.default_backend() != "gpu")
            else:
                B, P = table.shape
                k = kp[layer, table].reshape(B, P * PAGE, K, D)
                v = vp[layer, table].reshape(B, P * PAGE, K, D)
                mask = jnp.arange(P * PAGE)[None, None, :] < lengths[:, None, None]
                o = paged_kv.attention_scores_softmax(q[:, None], k, v, mask)[:, 0]
            return acc + o.astype(jnp.float32), None
        acc, _ = jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(L))
        return acc

    def check_kernel():
        """Kernel vs float32 reference on one layer, ragged lengths and a padding row, bf16 inputs."""
        out = {}
        for B in (1, B_MID):
            ctx = CTX
            table = jnp.asarray(tables(B, ctx))
            lengths = rng.integers(1, ctx + 1, B).astype(np.int32)
            lengths[0] = ctx
            if B > 1:
                lengths[1] = 0
            lengths = jnp.asarray(lengths)
            q = jax.random.normal(jax.random.key(B), (B, cfg.num_heads, D), jnp.float32).astype(cfg.jnp_dtype)
            li = min(5, L - 1)
            layer = jnp.int32(li)
            ppcb, ks, warps = ak.decode_params(B, ctx // PAGE, K)
            scaled = (q.astype(jnp.float32) * D ** -0.5).astype(cfg.jnp_dtype)
            got = jax.jit(functools.partial(ak.pallas_decode_attention, pages_per_compute_block=ppcb, k_splits=ks,
                                            num_warps=warps, interpret=jax.default_backend() != "gpu"))(
                scaled, pool["k"], pool["v"], layer, table, lengths)
            kk = pool["k"][li][table].reshape(B, ctx, K, D).astype(jnp.float32)
            vv = pool["v"][li][table].reshape(B, ctx, K, D).astype(jnp.float32)
            mask = jnp.arange(ctx)[None, None, :] < lengths[:, None, None]
            want = paged_kv.attention_scores_softmax(q[:, None].astype(jnp.float32), kk, vv, mask)[:, 0]
            want = jnp.where((lengths > 0)[:, None, None], want, 0.0)
            g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
            out[f"b{B}"] = {"rel_err": float(np.linalg.norm(g - w) / np.linalg.norm(w)),
                            "finite": bool(np.isfinite(g).all()), "ppcb": ppcb, "k_splits": ks}
        log("kernel vs reference (attention, bf16):", out)
        return out
    res.set("attention_check", res.section("attention_check", check_kernel) if not variant else None)

    # (pages per block, splits, warps): a block of ppcb pages fills `warps` warps' registers alike
    sweep_grid = {1: [(4, 8, 4), (4, 16, 4), (2, 32, 2)], 16: [(4, 4, 4), (1, 8, 1)],
                  64: [(1, 1, 1), (1, 2, 1), (2, 1, 2)], 128: [(1, 1, 1), (2, 1, 2), (4, 1, 4)]}
    sweep_grid = {B: [c for c in g if c[0] * c[1] <= CTX // PAGE] for B, g in sweep_grid.items() if B in BATCHES}

    def sweep():
        rows = []
        ctx = CTX
        for B, grid in sweep_grid.items():
            table = jnp.asarray(tables(B, ctx))
            lengths = jnp.full((B,), ctx, jnp.int32)
            q = jax.random.normal(jax.random.key(0), (B, cfg.num_heads, D), jnp.float32).astype(cfg.jnp_dtype)
            kv = ak.decode_bytes(B, ctx, L, K, D)
            best = ak.decode_params(B, ctx // PAGE, K)
            configs = [("pallas", p, s, w, 2) for p, s, w in grid]
            if best not in grid:
                configs.append(("pallas", *best, 2))
            configs += [("pallas", *best, 3)]
            if B in (1, B_MID) and "reference" not in _SKIP.value:
                configs.append(("reference", 0, 0, 0, 0))
            for impl, ppcb, ks, nw, stages in configs:
                if left() < 180:  # keep time for the decode table, prefill and swap
                    log("sweep: out of time")
                    return rows
                f = functools.partial(attn_layers, q, pool["k"], pool["v"], table, lengths, impl=impl,
                                      ppcb=ppcb, ks=ks, nw=nw, stages=stages)
                t = timed(f, 5, warm=1)
                rows.append({"batch": B, "ctx": ctx, "impl": impl, "ppcb": ppcb, "k_splits": ks, "num_warps": nw,
                             "num_stages": stages, "ms_all_layers": t * 1e3, "tb_s": kv / t / 1e12})
                log(f"attention B={B} {impl} ppcb={ppcb} ks={ks} nw={nw} st={stages}: {t * 1e3:.3f} ms / {L} layers, "
                    f"{kv / t / 1e12:.2f} TB/s")
            if B == B_MID:  # the shipped wrapper on its own head-major layout, for the layout's cost
                from jax.experimental.pallas.ops.gpu import paged_attention as shipped
                P = ctx // PAGE
                hm = jax.random.normal(jax.random.key(2), (K, B * P, PAGE, D), jnp.float32).astype(jnp.bfloat16)
                tab = jnp.arange(B * P, dtype=jnp.int32).reshape(B, P)

                @jax.jit
                def shipped_layers(q, kp, vp, tab, lengths):
                    def body(acc, _):
                        o = shipped.paged_attention(q, kp, vp, tab, lengths, pages_per_compute_block=8, k_splits=4)
                        return acc + o.astype(jnp.float32), None
                    return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(L))[0]
                t = timed(lambda: shipped_layers(q, hm, hm, tab, lengths), 5, warm=1)
                rows.append({"batch": B, "ctx": ctx, "impl": "shipped_head_major", "ppcb": 8, "k_splits": 4,
                             "num_warps": 8, "num_stages": 2, "ms_all_layers": t * 1e3, "tb_s": kv / t / 1e12})
                log(f"attention B={B} shipped wrapper, head-major pool: {t * 1e3:.3f} ms, {kv / t / 1e12:.2f} TB/s")
                del hm
        return rows
    if not variant and "sweep" not in _SKIP.value:
        res.set("attention_sweep", res.section("sweep", sweep))

    # -- decode steps through the engine's jitted step ---------------------------------------------
    decode_rows = []
    state = {"pool": pool}
    del pool

    def step_args(packed):
        """A packed step (ModelRunner.pack) as `ModelRunner.launch` arguments: its model inputs
        on the device; its sampling settings stay host arrays."""
        shape, step, sample, _ = packed
        return shape, jax.tree.map(jnp.asarray, step), sample, "greedy"

    def decode(B, ctx, impl, synced=True, check_against=None):
        """Decode steps of B sequences at context ctx, bucketed as the engine does."""
        runner = model_runner.ModelRunner(cfg, params, mesh, num_pages, PAGE, max_batch, attention_impl=impl,
                                          cache=state["pool"])
        table = tables(B, ctx)
        # the same tokens for every impl at this shape, so their outputs can be compared
        tokens = np.random.default_rng(B * 100003 + ctx).integers(0, cfg.vocab_size, (B, 1)).astype(np.int32)
        chunks = [model_runner.Chunk([int(tokens[i, 0])], ctx - 1, table[i].tolist(), 0.0, 0, 1.0, 0, 1)
                  for i in range(B)]
        args = step_args(runner.pack(chunks))
        rows = args[0].tokens  # the layers' rows
        traces = model_runner.TRACE_COUNT["forward"]
        t = time.time()
        first_cache = runner.cache
        tok, lp, _ = runner.launch(*args)
        jax.block_until_ready(tok)
        compile_s = time.time() - t
        donated = first_cache["k"].is_deleted()

        def step():
            return runner.launch(*args)[0]
        n = 20 if B <= 16 else 10
        t_pipe = timed(step, n)
        row = {"batch": B, "ctx": ctx, "impl": runner.attention_impl,
               "rows": rows, "ms": t_pipe * 1e3,
               "tok_s": B / t_pipe, "compile_s": round(compile_s, 1), "donated": bool(donated)}
        if synced:
            runner.run(chunks)
            t = time.perf_counter()
            for _ in range(5):
                runner.run(chunks)
            row["ms_engine"] = (time.perf_counter() - t) / 5 * 1e3
        row["retraced"] = model_runner.TRACE_COUNT["forward"] - traces
        kv = ak.decode_bytes(B, ctx, L, K, D)
        row["gb_read"] = (W + kv) / 1e9
        row["roofline_ms"] = (W + kv) / ROOFLINE_BW * 1e3
        row["roofline_frac"] = row["roofline_ms"] / row["ms"]
        row["achieved_tb_s"] = (W + kv) / t_pipe / 1e12
        # both impls from the same pool: each writes its own token at position ctx-1 first
        tok, lp, _ = runner.launch(*args)
        row["_tokens"], row["_logprobs"] = np.asarray(tok)[:B], np.asarray(lp)[:B]
        if check_against is not None:
            row["tokens_agree"] = float((row["_tokens"] == check_against["_tokens"]).mean())
            row["max_abs_dlogprob"] = float(np.abs(row["_logprobs"] - check_against["_logprobs"]).max())
        state["pool"] = runner.cache
        log(f"decode B={B} ({rows} rows) ctx={ctx} {row['impl']}: {row['ms']:.2f} ms/step (engine loop "
            f"{row.get('ms_engine', float('nan')):.2f}), {row['tok_s']:.0f} tok/s, "
            f"{100 * row['roofline_frac']:.1f}% of roofline {row['roofline_ms']:.2f} ms, compile {compile_s:.1f}s, "
            f"donated={donated}, retraced={row['retraced']}"
            + (f", tokens agree {row['tokens_agree']:.3f}, max |dlogprob| {row['max_abs_dlogprob']:.3g}"
               if check_against is not None else ""))
        return row

    def decode_all():
        shapes = [(1, CTX), (B_MID, CTX)] if variant else [(B, c) for c in CONTEXTS for B in BATCHES]
        for B, ctx in shapes:
            if left() < (25 if variant else 60):
                log("decode: out of time")
                break
            ref = None
            if not variant and ctx == CTX and B in (1, B_MID) and "reference" not in _SKIP.value:
                ref = decode(B, ctx, "reference", synced=False)
                decode_rows.append(ref)
            decode_rows.append(decode(B, ctx, "pallas", synced=not variant, check_against=ref))
            res.set("decode", [{k: v for k, v in r.items() if not k.startswith("_")} for r in decode_rows])
    res.section("decode", decode_all)

    if variant:
        return

    # -- prefill of 2k-token prompts ------------------------------------------------------------------
    def prefill():
        rows = []
        ctx = CTX
        table = tables(1, ctx)
        prompt = rng.integers(0, cfg.vocab_size, (1, ctx)).astype(np.int32)
        for chunk in (ctx, min(256, ctx)):
            if left() < 35:
                break
            runner = model_runner.ModelRunner(cfg, params, mesh, num_pages, PAGE, max_batch, cache=state["pool"])
            chunks = [model_runner.Chunk(prompt[0, s:s + chunk].tolist(), s, table[0].tolist(), 0.0, 0, 1.0, 0, 0)
                      for s in range(0, ctx, chunk)]
            t = time.time()
            for c in chunks:
                runner.run([c])
            compile_s = time.time() - t
            t = time.perf_counter()
            reps = 3
            for _ in range(reps):
                for c in chunks:
                    runner.run([c])
            dt = (time.perf_counter() - t) / reps
            flops = 2 * (W / 2) * ctx + 4 * L * cfg.num_heads * D * ctx * ctx / 2  # matmuls + causal attention
            rows.append({"prompt": ctx, "chunk": chunk, "ms": dt * 1e3, "tok_s": ctx / dt,
                         "tflop_s": flops / dt / 1e12, "compile_s": round(compile_s, 1)})
            state["pool"] = runner.cache
            log(f"prefill {ctx} tokens in chunks of {chunk}: {dt * 1e3:.1f} ms, {ctx / dt:.0f} tok/s, "
                f"{flops / dt / 1e12:.0f} TFLOP/s")
        return rows
    if "prefill" not in _SKIP.value:
        res.set("prefill", res.section("prefill", prefill))

    # -- swap: pages <-> pinned host memory -------------------------------------------------------
    @functools.partial(jax.jit, donate_argnums=(0,))
    def scatter_unique(pool, pages, blocks):
        return jax.tree.map(lambda a, b: a.at[:, pages].set(b, mode="drop", unique_indices=True), pool, blocks)

    def swap():
        out = {}
        pool = state["pool"]
        page_bytes = paged_kv.pool_bytes_per_page(cfg, PAGE)
        sizes = [n for n in (64, 512) if n <= num_pages // 4] or [num_pages // 4]
        for n in sizes:
            pages = jnp.asarray(perm[:n])
            nbytes = n * page_bytes
            blocks = transfer.gather(pool, pages)
            jax.block_until_ready(blocks)
            host = transfer.to_host(blocks)  # warm (allocator, first-use costs)
            jax.block_until_ready(host)
            back = transfer.to_device(host)
            jax.block_until_ready(back)
            reps = 5

            def rate(fn):
                jax.block_until_ready(fn())  # compiles, grows the pinned-host allocator: not the link
                t = time.perf_counter()
                for _ in range(reps):
                    jax.block_until_ready(fn())
                return nbytes / ((time.perf_counter() - t) / reps) / 1e9
            r = {"bytes": nbytes,
                 "d2h_gb_s": rate(lambda: transfer.to_host(blocks)),
                 "h2d_gb_s": rate(lambda: transfer.to_device(host)),
                 "swap_out_gb_s": rate(lambda: transfer.swap_out(pool, pages))}
            try:
                r["gather_to_host_gb_s"] = rate(lambda: transfer.gather_to_host(pool, pages))
            except Exception as e:  # host-memory outputs of jit: backend support varies
                r["gather_to_host_gb_s"] = f"error: {type(e).__name__}: {str(e)[:200]}"
            free = jnp.asarray(perm[-n - 1:-1])  # pages not used by any benchmark table

            def swap_in():
                state["pool"] = transfer.swap_in(state["pool"], free, host)
                return state["pool"]
            r["swap_in_gb_s"] = rate(swap_in)
            # where swap-in time goes: the scatter alone, with XLA told the page ids are unique
            dev_blocks = transfer.to_device(host)
            jax.block_until_ready(dev_blocks)

            def scatter(unique):
                fn = transfer.scatter if not unique else scatter_unique
                state["pool"] = fn(state["pool"], free, dev_blocks)
                return state["pool"]
            for unique in (False, True):
                before = state["pool"]["k"]
                jax.block_until_ready(scatter(unique))
                r[f"scatter{'_unique' if unique else ''}_ms"] = nbytes / rate(lambda: scatter(unique)) / 1e6
                r[f"scatter{'_unique' if unique else ''}_donated"] = bool(before.is_deleted())
            d2h_each = []
            for _ in range(4):
                t = time.perf_counter()
                jax.block_until_ready(transfer.to_host(blocks))
                d2h_each.append(nbytes / (time.perf_counter() - t) / 1e9)
            r["d2h_each_gb_s"] = d2h_each
            pool = state["pool"]
            ok = all(np.array_equal(np.asarray(pool[k][:, perm[-n - 1:-1]][:, :4]), np.asarray(blocks[k][:, :4]))
                     for k in ("k", "v"))
            r["round_trip_exact"] = bool(ok)
            out[f"pages_{n}"] = r
            log(f"swap {n} pages ({nbytes / 1e9:.2f} GB): " + ", ".join(
                f"{k} {v:.1f}" for k, v in r.items() if isinstance(v, float)))
            del blocks, back
        # the engine's own swap path (jaxserve.cache.swap: per-leaf gather + device_put)
        try:
            from jaxserve.cache import swap as engine_swap
            n = sizes[-1]
            hp = engine_swap.HostPagePool(2 * n, mesh)
            pages = perm[:n].tolist()
            hp.put("w", pool, pages)
            jax.block_until_ready(hp.entries["w"].data)
            staged, _ = hp.upload("w")
            jax.block_until_ready(staged)
            t = time.perf_counter()
            hp.put("a", pool, pages)
            jax.block_until_ready(hp.entries["a"].data)
            t_out = time.perf_counter() - t
            t = time.perf_counter()
            staged, _ = hp.upload("a")
            jax.block_until_ready(staged)
            t_in = time.perf_counter() - t
            nbytes = n * page_bytes
            out["engine_swap"] = {"pages": n, "out_gb_s": nbytes / t_out / 1e9, "in_gb_s": nbytes / t_in / 1e9}
            log(f"engine HostPagePool {n} pages:", out["engine_swap"])
        except Exception as e:
            out["engine_swap"] = f"error: {type(e).__name__}: {str(e)[:200]}"
        # overlap: swap traffic while decode steps run (batch 64, 1k context, Pallas)
        B, ctx = B_MID, min(CONTEXTS)
        runner = model_runner.ModelRunner(cfg, params, mesh, num_pages, PAGE, max_batch, cache=state["pool"])
        table = tables(B, ctx)
        tokens = rng.integers(0, cfg.vocab_size, B)
        args = step_args(runner.pack([model_runner.Chunk([int(tokens[i])], ctx - 1, table[i].tolist(), 0.0, 0, 1.0, 0, 1)
                                      for i in range(B)]))
        n_steps = 10
        n = sizes[-1]
        pages = jnp.asarray(perm[:n])
        host = transfer.swap_out(runner.cache, pages)
        jax.block_until_ready(host)

        def steps():
            out = None
            for _ in range(n_steps):
                out, _, _ = runner.launch(*args)
            return out

        def traffic():
            return transfer.swap_out(runner.cache, pages), transfer.to_device(host)
        jax.block_until_ready(steps())
        t = time.perf_counter(); jax.block_until_ready(steps()); t_dec = time.perf_counter() - t
        t = time.perf_counter(); jax.block_until_ready(traffic()); t_swap = time.perf_counter() - t
        t = time.perf_counter()
        moving = traffic()
        jax.block_until_ready((steps(), moving))
        t_both = time.perf_counter() - t
        state["pool"] = runner.cache
        hidden = (t_dec + t_swap - t_both) / min(t_dec, t_swap)
        out["overlap"] = {"decode_ms": t_dec * 1e3, "swap_ms": t_swap * 1e3, "both_ms": t_both * 1e3,
                          "hidden_frac": hidden, "swap_bytes_each_way": n * page_bytes}
        log("overlap:", out["overlap"])
        return out
    if "swap" not in _SKIP.value and left() > 20:
        res.set("swap", res.section("swap", swap))


# ------------------------------------------------------------------------------------------------
# part: hf (transformers on the same GPU and shapes)
def link(torch, res):
    """Device<->pinned-host copy speed of 1 GiB through torch: the link the swap figures are read against."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    h = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)
    for _ in range(2):
        h.copy_(a, non_blocking=True)
        a.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        h.copy_(a, non_blocking=True)
    torch.cuda.synchronize()
    d2h = 5 * a.numel() / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    for _ in range(5):
        a.copy_(h, non_blocking=True)
    torch.cuda.synchronize()
    h2d = 5 * a.numel() / (time.perf_counter() - t) / 1e9
    res.set("torch_pinned", {"d2h_gb_s": d2h, "h2d_gb_s": h2d})
    log(f"torch pinned copies, 1 GiB: d2h {d2h:.1f} GB/s, h2d {h2d:.1f} GB/s")


def part_hf(config, res: Results, deadline: float):
    import torch
    import transformers

    cfg = model_cfg(config)
    res.set("transformers", transformers.__version__)
    res.set("torch", torch.__version__)
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: smoke runs of this script only
    # the link, measured with torch's pinned buffers: what the swap numbers are read against
    if dev == "cuda":
        link(torch, res)

    conf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.embed_dim, intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.rms_eps, tie_word_embeddings=cfg.tie_embeddings, bos_token_id=0, eos_token_id=1,
        pad_token_id=0)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    t = time.time()
    with torch.device(dev):
        model = transformers.LlamaForCausalLM(conf)
    model.eval()
    log(f"transformers model on GPU in {time.time() - t:.1f}s")

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    def gen(B, prompt_len, new):
        ids = torch.randint(2, cfg.vocab_size, (B, prompt_len), device=dev)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)
        sync()
        return time.perf_counter() - t
    rows = []
    batches = [int(b) for b in _BATCHES.value]
    for B in (1, sorted(batches)[len(batches) // 2]):
        if deadline - time.time() < 30:
            break
        ctx, n = max(int(c) for c in _CONTEXTS.value), 16
        gen(B, ctx - 1, 3)  # first use of this shape's kernels (lazy CUDA module loading, cuBLAS heuristics)
        t1 = gen(B, ctx - 1, 1)
        tn = gen(B, ctx - 1, 1 + n)
        ms = (tn - t1) / n * 1e3
        rows.append({"batch": B, "ctx": ctx, "ms": ms, "tok_s": B / ms * 1e3, "prefill_s": t1})
        log(f"transformers generate B={B} ctx={ctx}: {ms:.1f} ms/step, {B / ms * 1e3:.0f} tok/s "
            f"(prefill+1 token {t1:.2f}s)")
        res.set("hf_decode", rows)


# ------------------------------------------------------------------------------------------------
# the parent: run the parts, print the table and the JSON line
def fmt_table(r: dict) -> str:
    lines = [f"device: {r.get('device')} | jax {r.get('jax')} | XLA_FLAGS {r.get('xla_flags')!r} | "
             f"copy {r.get('copy_tb_s') or float('nan'):.2f} TB/s measured (datasheet "
             f"{r.get('datasheet_tb_s') or float('nan'):.2f}), roofline uses the measured copy | weights read/step {r.get('weight_bytes', 0) / 1e9:.2f} GB",
             "", "decode (greedy, one token per sequence; ms/step pipelined; engine = ModelRunner.run, synced)",
             "| ctx | batch (rows) | attention | ms/step | tok/s | GB read | roofline ms | % roofline | engine ms/step | check |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d in r.get("decode") or []:
        check = (f"tokens {d['tokens_agree']:.2f}, d-logprob {d['max_abs_dlogprob']:.2g}"
                 if "tokens_agree" in d else "")
        lines.append(f"| {d['ctx']} | {d['batch']} ({d.get('rows', d['batch'])}) | {d['impl']} | {d['ms']:.2f} | "
                     f"{d['tok_s']:.0f} | "
                     f"{d['gb_read']:.1f} | {d['roofline_ms']:.2f} | {100 * d['roofline_frac']:.1f}% | "
                     f"{d.get('ms_engine', float('nan')):.2f} | {check} |")
    for v, part in (r.get("variants") or {}).items():
        for d in part.get("decode") or []:
            lines.append(f"| {d['ctx']} | {d['batch']} ({d.get('rows', d['batch'])}) | {d['impl']}, XLA flags: {v} | "
                         f"{d['ms']:.2f} | "
                         f"{d['tok_s']:.0f} | {d['gb_read']:.1f} | {d['roofline_ms']:.2f} | "
                         f"{100 * d['roofline_frac']:.1f}% | | |")
    for w in r.get("weight_stream") or []:
        lines.append(f"| - | {w['batch']} | weights only (matmul chain under scan) | {w['ms']:.2f} | | "
                     f"{w['gb']:.1f} | {w['roofline_ms']:.2f} | {100 * w['roofline_frac']:.1f}% | | |")
    for d in r.get("hf_decode") or []:
        lines.append(f"| {d['ctx']} | {d['batch']} | transformers generate | {d['ms']:.1f} | {d['tok_s']:.0f} | | | | | |")
    if r.get("prefill"):
        lines += ["", "prefill (one 2k-token prompt, batch 1)", "| chunk | ms | tok/s | TFLOP/s |", "|---|---|---|---|"]
        lines += [f"| {p['chunk']} | {p['ms']:.1f} | {p['tok_s']:.0f} | {p['tflop_s']:.0f} |" for p in r["prefill"]]
    if r.get("attention_sweep"):
        lines += ["", "attention alone, 32 layers, 2k context (KV bytes / time)",
                  "| batch | impl | pages/block | k_splits | warps | stages | ms | TB/s |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {a['batch']} | {a['impl']} | {a['ppcb']} | {a['k_splits']} | {a['num_warps']} | {a.get('num_stages')} | "
                  f"{a['ms_all_layers']:.3f} | {a['tb_s']:.2f} |" for a in r["attention_sweep"]]
    if r.get("attention_check"):
        lines += ["", "kernel vs reference (one layer, bf16, ragged lengths): " + json.dumps(r["attention_check"])]
    sw = r.get("swap")
    if sw:
        lines += ["", "swap (GB/s; target 0.8 x 52 = 41.6)",
                  "| pages | GB | d2h | h2d | swap_out (gather+d2h) | gather_to_host | swap_in (h2d+scatter) |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in sw.items():
            if k.startswith("pages_"):
                g = v.get("gather_to_host_gb_s")
                lines.append(f"| {k[6:]} | {v['bytes'] / 1e9:.2f} | {v['d2h_gb_s']:.1f} | {v['h2d_gb_s']:.1f} | "
                             f"{v['swap_out_gb_s']:.1f} | {g if isinstance(g, str) else f'{g:.1f}'} | "
                             f"{v['swap_in_gb_s']:.1f} |")
        lines.append(f"engine HostPagePool: {sw.get('engine_swap')}; overlap: {sw.get('overlap')}")
    if r.get("torch_pinned"):
        lines.append(f"torch pinned 1 GiB copies (link reference): {r['torch_pinned']}")
    lines += ["", "targets: " + json.dumps(r.get("targets"))]
    return "\n".join(lines)


def targets(r: dict) -> dict:
    out = {}
    dec = {(d["batch"], d["ctx"]): d for d in r.get("decode") or [] if d["impl"] == "pallas"}
    contexts = [int(c) for c in _CONTEXTS.value]
    for ctx in contexts:
        d = dec.get((1, ctx))
        if d:
            out[f"batch1_ctx{ctx}"] = {"frac": round(d["roofline_frac"], 3), "ms": round(d["ms"], 2),
                                       "met": d["roofline_frac"] >= 0.9 and d["ms"] <= 6.2}
    d = dec.get((64, max(contexts)))
    if d:
        out[f"batch64_ctx{max(contexts)}"] = {"frac": round(d["roofline_frac"], 3), "met": d["roofline_frac"] >= 0.8}
    sw = [v for k, v in sorted((r.get("swap") or {}).items()) if k.startswith("pages_")]
    sw = max(sw, key=lambda v: v["bytes"]) if sw else None
    if sw:
        out["swap_largest"] = {"out_gb_s": round(sw["swap_out_gb_s"], 1), "in_gb_s": round(sw["swap_in_gb_s"], 1),
                                 "met": min(sw["swap_out_gb_s"], sw["swap_in_gb_s"]) >= 0.8 * LINK_BW / 1e9}
    return out


def parent(argv):
    t_start = time.time()
    out_dir = _OUT_DIR.value or "results/device"
    os.makedirs(out_dir, exist_ok=True)
    del argv  # absl has consumed the flags; the children get them again from sys.argv
    passthrough = [a for a in sys.argv[1:]
                   if not a.startswith(("--part", "--json", "--out_dir", "--budget_s", "--variants", "--dump_hlo"))]
    variants = [v for v in _VARIANTS.value if v]
    unknown = [v for v in variants if v not in XLA_VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown {unknown}; known: {sorted(XLA_VARIANTS)}")
    hf = "hf" not in _SKIP.value
    # shares of the budget: the jax part most of it, variants and transformers the rest
    jax_share = 0.68 if variants or hf else 1.0
    rest = (1.0 - jax_share) / (len(variants) + (1.5 if hf else 0)) if variants or hf else 0
    parts, end = [("jax", "jax", jax_share)], jax_share
    for v in variants:
        end += rest
        parts.append((f"variant:{v}", v, end))
    if hf:
        parts.append(("hf", "hf", 1.0))
    results = {"date": DATE, "command": " ".join(["jaxserve bench device", *sys.argv[1:]])}
    for name, key, share in parts:
        deadline = t_start + _BUDGET.value * share
        if deadline - time.time() < 45:
            log(f"part {name}: skipped, out of time")
            continue
        path = os.path.join(out_dir, f"{key}.json")
        if os.path.exists(path):
            os.remove(path)
        env = dict(os.environ, JAXSERVE_BENCH_DEADLINE=str(deadline),
                   XLA_PYTHON_CLIENT_MEM_FRACTION=os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92"))
        argv_part = [f"--part={name.split(':')[0]}"]
        if name.startswith("variant:"):
            env["XLA_FLAGS"] = " ".join([*(_USER_XLA_FLAGS or "").split(), *variant_flags(key)])
            env["JAXSERVE_XLA_FLAGS"] = "0"  # exactly the flags above
            env["JAXSERVE_BENCH_VARIANT"] = key
        elif name == "jax" and _DUMP_HLO.value:
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_dump_to={_DUMP_HLO.value} --xla_dump_hlo_as_text"
                                " --xla_dump_hlo_module_re=.*forward_step.* --xla_dump_disable_metadata=true").strip()
        log(f"part {name}: starting ({deadline - time.time():.0f}s left for it)")
        try:
            subprocess.run([sys.executable, "-m", "jaxserve.bench.device", *argv_part, f"--json={path}", *passthrough], env=env,
                           timeout=max(10.0, deadline - time.time() + 20))
        except subprocess.TimeoutExpired:
            log(f"part {name}: killed at its deadline")
        part = json.load(open(path)) if os.path.exists(path) else {}
        if name.startswith("variant:"):
            results.setdefault("variants", {})[key] = part
        else:
            results.update(part)
    results["targets"] = targets(results)
    results["wall_s"] = round(time.time() - t_start, 1)
    table = fmt_table(results)
    with open(os.path.join(out_dir, "bench.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table + "\n")
    if _PLOT.value and results.get("decode"):
        plots.throughput_vs_batch(results, os.path.join(out_dir, "throughput_vs_batch.png"))
    print(table)
    print(json.dumps(results, separators=(",", ":")))


def main(argv):
    config = _CONFIG.value
    if _PART.value == "all":
        return parent(argv)
    res = Results(_JSON.value)
    deadline = float(os.environ.get("JAXSERVE_BENCH_DEADLINE", time.time() + _BUDGET.value))
    if _PART.value == "hf":
        return part_hf(config, res, deadline)
    if _PART.value == "variant":
        res.set("variant", os.environ.get("JAXSERVE_BENCH_VARIANT", ""))
    return part_jax(config, res, deadline, variant=_PART.value == "variant")


if __name__ == "__main__":  # each part runs as `python -m jaxserve.bench.device --part=...` (parent)
    run(main)
