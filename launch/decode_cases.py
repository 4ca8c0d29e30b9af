"""What the decode-attention kernel sweeps share: the KV shape's flags, cases 'BxCTX' (every
row CTX long) or 'BrLO-HI' (lengths uniform in [LO, HI]), a random pool, shuffled page tables,
and timing of a kernel called once a layer."""
from __future__ import annotations

import time

import numpy as np
from absl import flags

LAYERS = flags.DEFINE_integer("layers", 32, "Layers (one kernel call each).")
KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
HEADS = flags.DEFINE_integer("heads", 32, "Query heads.")
HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
PAGE = flags.DEFINE_integer("page_size", 16, "Tokens a page.")
REPS = flags.DEFINE_integer("reps", 10, "Timed calls per configuration.")


def parse_case(case: str, rng):
    """'128x1024' or '128r100-2000' -> (lengths [B], longest length); the page table's width is
    bucketed to a power of two of pages, as the engine's step shapes are."""
    if "r" in case:
        b, span = case.split("r")
        lo, hi = map(int, span.split("-"))
        return rng.integers(lo, hi + 1, int(b)).astype(np.int32), hi
    b, ctx = map(int, case.split("x"))
    return np.full(int(b), ctx, np.int32), ctx


def random_pool(cases):
    """(pages, {"k", "v"}): random bf16 pools [LAYERS, pages, PAGE, KV_HEADS, HEAD_DIM] with the
    pages the largest case's table needs, plus one no table holds."""
    import jax
    import jax.numpy as jnp
    from jaxserve.scheduling.cost_model import bucket
    S = PAGE.value
    pages = max(len(lens) * bucket(-(-width // S)) for _, lens, width in cases) + 1
    key = jax.random.key(0)
    shape = (LAYERS.value, pages, S, KV_HEADS.value, HEAD_DIM.value)
    return pages, {n: jax.random.normal(jax.random.fold_in(key, i), shape, jnp.bfloat16) for i, n in enumerate("kv")}


def shuffled_table(rng, pages: int, batch: int, width: int):
    """A [batch, bucketed pages of `width` tokens] table of distinct pages in random order, as a
    long-running pool's are."""
    import jax.numpy as jnp
    from jaxserve.scheduling.cost_model import bucket
    P = bucket(-(-width // PAGE.value))
    return jnp.asarray(rng.permutation(pages - 1)[:batch * P].astype(np.int32).reshape(batch, P))


def over_layers(attn):
    """A jitted f(q, k_pool, v_pool, table, lengths): `attn` of every layer, one call a layer in
    one scan (as the engine's step runs them), summed."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def f(q, kp, vp, table, lengths):
        def body(acc, layer):
            return acc + attn(q, kp, vp, layer, table, lengths).astype(jnp.float32), None
        return jax.lax.scan(body, jnp.zeros(q.shape, jnp.float32), jnp.arange(LAYERS.value))[0]
    return f


def time_calls(f, *args) -> tuple:
    """(seconds a call, seconds a call's dispatch takes the host) over REPS calls after a first."""
    import jax
    jax.block_until_ready(f(*args))
    t = time.perf_counter()
    for _ in range(REPS.value):
        out = f(*args)
    host = time.perf_counter() - t
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / REPS.value, host / REPS.value
