"""Sweep of the Mosaic GPU decode kernel's settings (jaxserve.cache.mgpu_decode) against the Triton kernel.

    python launch/sweep_mgpu_decode.py --cases=128x1024,64x640,128r100-2048 --configs=auto,k1s4p1,k4s2p2

Same data and measurement as launch/sweep_decode_kernel.py: a random bf16 pool [L, pages, 16, K, D],
a shuffled page table as wide as the engine's bucket, one kernel call per layer in one jitted scan
over 32 layers; KV bytes = 2 * sum(lengths) * L * K * D * 2. Each config is `auto` (what
`mgpu_decode.mgpu_params` picks) or k<splits>s<ring stages>p<CTAs an SM>; the Triton kernel runs
with `decode_params`' pick. Every result is checked against a float32 reference of the layer.
`--lower_only` lowers each config for cuda without a GPU (catches Mosaic GPU lowering errors).
The last line is one JSON object of every result (also written to $OUT/sweep_mgpu_decode.json).
"""
from __future__ import annotations

import functools
import json
import math
import os
import re
import sys
import time
import traceback

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.cli import run  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cases import (HEAD_DIM, HEADS, KV_HEADS, LAYERS, PAGE, over_layers, parse_case,  # noqa: E402
                          random_pool, shuffled_table, time_calls)

_CASES = flags.DEFINE_list("cases", ["128x1024", "64x640", "128r100-2048"], "Batch and context cases.")
_CONFIGS = flags.DEFINE_list("configs", ["auto", "k1s4p1", "k4s2p2"], "auto or k<splits>s<stages>p<ctas per SM>.")
_TRITON = flags.DEFINE_bool("triton", True, "Also time the Triton kernel.")
_LOWER_ONLY = flags.DEFINE_bool("lower_only", False, "Only lower for cuda (no device needed) and exit.")
_BUDGET = flags.DEFINE_float("budget_s", 400.0, "Stop after this many seconds.")


def parse_config(cfg: str, batch: int, pages: int, kv_heads: int) -> dict:
    """'auto' -> mgpu_params' pick; 'k4s2p2' -> k_splits=4, stages=2, ctas_per_sm=2."""
    from jaxserve.cache import mgpu_decode

    if cfg == "auto":
        ks, stages, ctas = mgpu_decode.mgpu_params(batch, pages, kv_heads)
    else:
        m = re.fullmatch(r"k(\d+)s(\d+)p(\d+)", cfg)
        if not m:
            raise ValueError(f"--configs: {cfg!r} is neither 'auto' nor k<splits>s<stages>p<ctas>")
        ks, stages, ctas = map(int, m.groups())
    return dict(k_splits=ks, stages=stages, ctas_per_sm=ctas)


def reference_decode(q, k_pool, v_pool, layer, page_table, lengths):
    """float32 pure-JAX attention of one layer (gathers the pages)."""
    import jax.numpy as jnp

    L, NP, S, K, D = k_pool.shape
    B, H, _ = q.shape
    k = k_pool[layer][page_table].reshape(B, -1, K, D).astype(jnp.float32)  # [B, T, K, D]
    v = v_pool[layer][page_table].reshape(B, -1, K, D).astype(jnp.float32)
    qg = q.reshape(B, K, H // K, D).astype(jnp.float32)
    logits = jnp.einsum("bkgd,btkd->bkgt", qg, k)
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = jnp.where(visible[:, None, None, :], logits, -jnp.inf)
    p = jnp.exp(logits - logits.max(-1, keepdims=True))
    return jnp.einsum("bkgt,btkd->bkgd", p / p.sum(-1, keepdims=True), v).reshape(B, H, D)


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from jaxserve.cache import attention_kernels as ak
    from jaxserve.scheduling.cost_model import bucket

    L, K, H, D, S = LAYERS.value, KV_HEADS.value, HEADS.value, HEAD_DIM.value, PAGE.value
    rng = np.random.default_rng(0)
    cases = [(c, *parse_case(c, rng)) for c in _CASES.value]

    def mgpu(cfg):
        return functools.partial(ak._mgpu_decode_attention, **cfg)

    if _LOWER_ONLY.value:
        for name, lens, width in cases:
            B, P = len(lens), bucket(-(-width // S))
            for cname in _CONFIGS.value:
                cfg = parse_config(cname, B, P, K)
                args = (jax.ShapeDtypeStruct((B, H, D), jnp.bfloat16),
                        *[jax.ShapeDtypeStruct((L, B * P + 1, S, K, D), jnp.bfloat16)] * 2,
                        jax.ShapeDtypeStruct((), jnp.int32),
                        jax.ShapeDtypeStruct((B, P), jnp.int32), jax.ShapeDtypeStruct((B,), jnp.int32))
                try:
                    f = jax.jit(functools.partial(mgpu(cfg), num_sms=132))
                    txt = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
                    print(f"{name} {cname} {cfg}: lowered ({len(txt)} chars)", flush=True)
                except Exception:  # noqa: BLE001
                    print(f"{name} {cname} {cfg}: lowering failed", flush=True)
                    traceback.print_exc()
        return

    pages_needed, pool = random_pool(cases)
    dev = jax.devices()[0]
    print(f"jax {jax.__version__}, {dev.device_kind}, {getattr(dev, 'core_count', '?')} SMs; pool {pages_needed} "
          f"pages, {2 * pool['k'].nbytes / 1e9:.1f} GB", flush=True)

    rows, start = [], time.perf_counter()
    for name, lens, width in cases:
        B, P = len(lens), bucket(-(-width // S))
        table = shuffled_table(rng, pages_needed, B, width)
        lengths = jnp.asarray(lens)
        q = (jax.random.normal(jax.random.key(1), (B, H, D), jnp.float32) / math.sqrt(D)).astype(jnp.bfloat16)
        kv_bytes = 2 * int(lens.sum()) * L * K * D * 2
        layer_chk = jnp.int32(L - 1)
        ref = jax.jit(reference_decode)(q, pool["k"], pool["v"], layer_chk, table, lengths)
        pick = ak.decode_params(B, P, K, S)
        kernels = [("triton", list(pick), functools.partial(
            ak.pallas_decode_attention, pages_per_compute_block=pick[0], k_splits=pick[1], num_warps=pick[2]))] \
            if _TRITON.value else []
        for cname in _CONFIGS.value:
            cfg = parse_config(cname, B, P, K)
            kernels.append((f"mgpu {cname}", cfg, mgpu(cfg)))
        for kname, params, attn in kernels:
            if time.perf_counter() - start > _BUDGET.value:
                print("out of time", flush=True)
                break
            try:
                out = jax.jit(attn)(q, pool["k"], pool["v"], layer_chk, table, lengths).astype(jnp.float32)
                err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
                # host: a kernel whose launch does host work (Mosaic GPU writes its TMA descriptors
                # on the host) costs an engine step host time even when the device is fast
                sec, host = time_calls(over_layers(attn), q, pool["k"], pool["v"], table, lengths)
            except Exception as e:  # noqa: BLE001
                print(f"{name} {kname} failed: {type(e).__name__}: {str(e)[:1500]}", flush=True)
                continue
            rows.append({"case": name, "kernel": kname, "params": params, "ms_all_layers": sec * 1e3,
                         "host_ms": host * 1e3, "tb_s": kv_bytes / sec / 1e12, "rel_err": err})
            print(f"{name} {kname} {params}: {sec * 1e3:.3f} ms ({host * 1e3:.3f} ms host), "
                  f"{kv_bytes / sec / 1e12:.2f} TB/s, rel err {err:.2e}", flush=True)
    print(json.dumps(rows))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "sweep_mgpu_decode.json"), "w") as fh:
            json.dump(rows, fh)


if __name__ == "__main__":
    run(main)
