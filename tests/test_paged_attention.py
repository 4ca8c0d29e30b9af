"""Paged attention over a flattened step (pure-JAX reference) equals dense attention on the same
keys and values, for ragged prefill chunks and decodes in one call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.cache.paged_kv import paged_attend
from jaxserve.engine.model_runner import Chunk, pack
from jaxserve.model.llama import dense_attend


def flat_step(chunks, page_size, num_pages):
    """The runner's packing of chunks, and each chunk's flat token indices in it."""
    shape, step, _, rows = pack(chunks, page_size, max_batch=8, max_pages=4, scratch_page=num_pages)
    order = sorted(range(len(chunks)), key=lambda i: len(chunks[i].tokens) > 1)
    where, t = {}, 0
    for i in order:
        where[i] = np.arange(t, t + len(chunks[i].tokens))
        t += len(chunks[i].tokens)
    return step, [where[i] for i in range(len(chunks))]


@pytest.mark.parametrize("lengths", [[13, 7, 10], [11], [20, 7]])  # query blocks of 16: a chunk spans two
def test_paged_equals_dense_over_prefill_chunks_and_decodes(lengths):
    with jax.default_matmul_precision("highest"):  # f32 dots in full precision on GPU too (not TF32)
        check_paged_equals_dense(lengths)


def check_paged_equals_dense(lengths):
    rng = np.random.default_rng(0)
    L, B, H, K, D, page_size, num_pages = 2, len(lengths), 4, 2, 8, 8, 32
    perm = rng.permutation(num_pages)  # each sequence gets scattered, non-contiguous pages
    tables = [perm[b * 4:(b + 1) * 4].tolist() for b in range(B)]
    dense = {"k": jnp.zeros((L, B, 32, K, D)), "v": jnp.zeros((L, B, 32, K, D))}
    paged = {n: jnp.zeros((L, num_pages + 1, page_size, K, D)) for n in ("k", "v")}
    attend = jax.jit(paged_attend)
    starts = [0] * B
    for step_i in range(3):  # [0,5), [5,len-1), then one decode token: mixed in one call
        ends = [5 if step_i == 0 else (n - 1 if step_i == 1 else n) for n in lengths]
        chunks = [Chunk([0] * (e - s), s, tables[b], 0.0, 0, 1.0, 0, 0)
                  for b, (s, e) in enumerate(zip(starts, ends))]
        step, where = flat_step(chunks, page_size, num_pages)
        N = step.tokens.shape[0]
        T = max(e - s for s, e in zip(starts, ends))
        positions = np.full((B, T), -1, np.int32)
        for b in range(B):
            positions[b, :ends[b] - starts[b]] = np.arange(starts[b], ends[b])
        q, k, v = (jnp.asarray(rng.standard_normal((B, T, n, D)), jnp.float32) for n in (H, K, K))
        flat = lambda x: jnp.zeros((1, N, *x.shape[2:])).at[0, np.concatenate(where)].set(
            jnp.concatenate([x[b, :len(where[b])] for b in range(B)]))
        for layer in range(L):
            out_d, dense = dense_attend(q, k, v, dense, layer, positions)
            out_p, paged = attend(flat(q), flat(k), flat(v), paged, layer, step.positions[None], layout=step.layout)
            for b in range(B):
                np.testing.assert_allclose(np.asarray(out_p)[0, where[b]], np.asarray(out_d)[b, :len(where[b])],
                                           rtol=1e-5, atol=1e-5)
        starts = ends
    # pages not in any table were never written; padding tokens wrote only to the scratch page
    unused = np.setdiff1d(np.arange(num_pages), np.ravel(tables))
    assert not np.asarray(paged["k"])[:, unused].any()
