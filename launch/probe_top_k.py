"""Times top-k log-probabilities of [S, V] logits on this GPU: lax.top_k at several k, two-stage, approx_max_k.

    python launch/probe_top_k.py   # docs/benchmarks.md, "Sampling extras on the H200"
"""
import time, functools
import jax, jax.numpy as jnp, numpy as np

def plain(logits, k):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jax.lax.top_k(logp, k)

def two_stage(logits, k, block):
    logp = jax.nn.log_softmax(logits, axis=-1)
    S, V = logp.shape
    nb = -(-V // block)
    padded = jnp.pad(logp, ((0, 0), (0, nb * block - V)), constant_values=-jnp.inf).reshape(S, nb, block)
    v1, i1 = jax.lax.top_k(padded, k)                       # [S, nb, k]
    i1 = i1 + (jnp.arange(nb) * block)[None, :, None]
    v2, j = jax.lax.top_k(v1.reshape(S, nb * k), k)
    return v2, jnp.take_along_axis(i1.reshape(S, nb * k), j, axis=-1)

def approx(logits, k):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jax.lax.approx_max_k(logp, k, recall_target=1.0)

def bench(f, x, n=50):
    out = f(x); jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(n):
        out = f(x)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e6

V = 128256
for S in (1, 64, 128):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(S, V)).astype(np.float32))
    ref = None
    for k in (5, 8, 16, 20):
        r = {"plain": bench(jax.jit(functools.partial(plain, k=k)), x)}
        for block in (256, 1024, 4096):
            r[f"two{block}"] = bench(jax.jit(functools.partial(two_stage, k=k, block=block)), x)
            a, b = jax.jit(functools.partial(two_stage, k=k, block=block))(x), jax.jit(functools.partial(plain, k=k))(x)
            assert np.array_equal(np.asarray(a[1]), np.asarray(b[1])), (S, k, block)
        try:
            r["approx"] = bench(jax.jit(functools.partial(approx, k=k)), x)
        except Exception as e:
            r["approx"] = str(e)[:40]
        print(S, k, {n: (round(v, 1) if isinstance(v, float) else v) for n, v in r.items()}, flush=True)
