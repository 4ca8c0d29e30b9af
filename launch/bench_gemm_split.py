"""Split-K against plain cuBLAS products for a model's layer matrices at decode row counts.

Each product runs over `num_layers` stacked weights under `lax.scan` (so every layer's weight
comes from HBM, as in a step), accumulating into a carry as the residual does; a split-K
variant contracts S slices of K as one batched product and sums the partials. Prints summed
kernel time per layer (jax.profiler, as tune_gemm_rows) and the bandwidth it implies.

  python launch/bench_gemm_split.py --config=configs/llama3_8b.py --rows=8,64
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/llama3_8b.py", "Model config file.")
_ROWS = flags.DEFINE_list("rows", "8,64", "Rows of the products (a decode step's tokens).")
_SPLITS = flags.DEFINE_list("splits", "2,4,7,8", "Split-K factors tried (those dividing K into 64-multiples).")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the figures to this JSON file.")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    from jaxserve.model.config import model_config_from_dict
    from jaxserve.model.gemm_rows import weight_matrices
    from kernel_time import kernel_seconds

    if jax.devices()[0].platform != "gpu":
        raise app.UsageError("bench_gemm_split times cuBLAS products: it needs a GPU")
    cfg = model_config_from_dict(dict(_CONFIG.value.model))
    L, dtype, results = cfg.num_layers, cfg.jnp_dtype, {}
    for name, (K, N) in weight_matrices(cfg).items():
        key = jax.random.PRNGKey(0)
        W = (jax.random.normal(key, (L, K, N), jnp.float32) * 0.02).astype(dtype)
        for M in map(int, _ROWS.value):
            x = jax.random.normal(key, (M, K), jnp.float32).astype(dtype)
            c0 = jnp.zeros((M, N), dtype)

            def variant(S):
                @jax.jit
                def run(W, x, c0):
                    def body(c, w):
                        if S == 1:
                            return c + x @ w, None
                        parts = jnp.einsum("msk,skn->smn", x.reshape(M, S, K // S), w.reshape(S, K // S, N),
                                           preferred_element_type=jnp.float32)
                        return (c.astype(jnp.float32) + parts.sum(0)).astype(c.dtype), None
                    return jax.lax.scan(body, c0, W)[0]
                return lambda: run(W, x, c0)

            row = {}
            for S in [1] + [int(s) for s in _SPLITS.value if K % (int(s) * 64) == 0]:
                us = kernel_seconds(variant(S), 5) / L * 1e6
                row["plain" if S == 1 else f"split{S}"] = us
            results[f"{name}@{M}"] = row
            print(f"{name:10s} {M:4d} rows  " + "  ".join(
                f"{k} {v:6.1f} us ({K * N * 2 / max(v, 1e-9) / 1e6:.2f} TB/s)" for k, v in row.items()), flush=True)
        del W
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
