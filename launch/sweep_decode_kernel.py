"""The decode attention kernel's parameters swept on one GPU: ms for all layers and TB/s of KV read.

    python launch/sweep_decode_kernel.py --cases=128x1024,64x640,128r100-2000 --warps=1,2,4 --prefetch=1,2,3

A case is BATCHxCONTEXT (every row that long) or BATCHrLO-HI (lengths uniform in [LO, HI]); the
page table is as wide as the engine's bucket for the longest row. Each (pages per block, splits,
warps, prefetch) runs the kernel once per layer of the 8B KV shape in one jitted scan over a
random bf16 pool and a shuffled page table; `decode_params`' own pick is always included and marked. Configurations that fail to
compile (register spills past Triton's limits, block shapes it refuses) are reported and skipped.
The last line is one JSON object of every row.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import sys
import time

import numpy as np
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.cli import run  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decode_cases import (HEAD_DIM, HEADS, KV_HEADS, LAYERS, PAGE, over_layers, parse_case,  # noqa: E402
                          random_pool, shuffled_table, time_calls)

_CASES = flags.DEFINE_list("cases", ["128x1024", "64x640", "128r100-2000"], "Batch and context cases.")
_PPCB = flags.DEFINE_list("ppcb", ["1", "2"], "Pages per compute block.")
_SPLITS = flags.DEFINE_list("splits", ["0"], "k_splits (0: decode_params' pick, and twice it).")
_WARPS = flags.DEFINE_list("warps", ["1", "2", "4"], "Warps per program.")
_PREFETCH = flags.DEFINE_list("prefetch", ["1", "2", "3"], "Blocks loaded ahead of the math.")
_BUDGET = flags.DEFINE_float("budget_s", 400.0, "Stop sweeping after this many seconds.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    from jaxserve.cache import attention_kernels as ak
    from jaxserve.scheduling.cost_model import bucket

    L, K, H, D, S = LAYERS.value, KV_HEADS.value, HEADS.value, HEAD_DIM.value, PAGE.value
    rng = np.random.default_rng(0)
    cases = [(c, *parse_case(c, rng)) for c in _CASES.value]
    pages_needed, pool = random_pool(cases)
    print(f"pool: {pages_needed} pages, {2 * pool['k'].nbytes / 1e9:.1f} GB, {jax.devices()[0].device_kind}", flush=True)

    rows, start = [], time.perf_counter()
    for name, lens, width in cases:
        B, P = len(lens), bucket(-(-width // S))
        table = shuffled_table(rng, pages_needed, B, width)
        lengths = jnp.asarray(lens)
        q = jax.random.normal(jax.random.key(1), (B, H, D), jnp.bfloat16)
        kv_bytes = 2 * int(lens.sum()) * L * K * D * 2
        pick = ak.decode_params(B, P, K, S)
        splits = sorted({s for v in _SPLITS.value for s in ((pick[1], 2 * pick[1]) if v == "0" else (int(v),))})
        grid = [(int(p), s, int(w), int(f)) for p, s, w, f in
                itertools.product(_PPCB.value, splits, _WARPS.value, _PREFETCH.value)]
        grid = [g for g in grid if P % g[1] == 0 and (P // g[1]) % g[0] == 0 and g[0] * S >= 16]
        if (pick[0], pick[1], pick[2], 1) not in grid:
            grid.insert(0, (pick[0], pick[1], pick[2], 1))
        for ppcb, ks, nw, pf in grid:
            if time.perf_counter() - start > _BUDGET.value:
                print("out of time", flush=True)
                break
            attn = functools.partial(ak.pallas_decode_attention, pages_per_compute_block=ppcb, k_splits=ks,
                                     num_warps=nw, prefetch=pf, interpret=jax.default_backend() != "gpu")
            try:
                sec, _ = time_calls(over_layers(attn), q, pool["k"], pool["v"], table, lengths)
            except Exception as e:  # noqa: BLE001 - a configuration Triton refuses is a result, not a crash
                print(f"{name} ppcb={ppcb} ks={ks} nw={nw} pf={pf}: failed ({type(e).__name__}: {str(e)[:120]})")
                continue
            mark = " <- decode_params" if (ppcb, ks, nw, pf) == (*pick, 1) else ""
            rows.append({"case": name, "ppcb": ppcb, "k_splits": ks, "num_warps": nw, "prefetch": pf,
                         "ms_all_layers": sec * 1e3, "tb_s": kv_bytes / sec / 1e12, "decode_params": bool(mark)})
            print(f"{name} ppcb={ppcb} ks={ks} nw={nw} pf={pf}: {sec * 1e3:.3f} ms, {kv_bytes / sec / 1e12:.2f} TB/s{mark}",
                  flush=True)
    print(json.dumps(rows))


if __name__ == "__main__":
    run(main)
