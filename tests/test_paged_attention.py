"""Paged attention (pure-JAX reference) equals dense attention on the same keys and values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.cache.paged_kv import paged_attend
from jaxserve.model.llama import dense_attend


@pytest.mark.parametrize("lengths", [[13, 7, 10], [11]])  # one sequence: decode writes take another path
def test_paged_equals_dense_over_prefill_chunks_and_decodes(lengths):
    rng = np.random.default_rng(0)
    L, B, H, K, D, page_size, num_pages = 2, len(lengths), 4, 2, 8, 4, 32
    # each sequence gets scattered, non-contiguous pages
    perm = rng.permutation(num_pages)
    tables = np.zeros((B, 4), np.int32)
    for b in range(B):
        tables[b] = perm[b * 4:(b + 1) * 4]
    dense = {"k": jnp.zeros((L, B, 16, K, D)), "v": jnp.zeros((L, B, 16, K, D))}
    # num_pages for requests and the scratch page that padding tokens write to (paged_kv.pool_shape)
    paged = {"k": jnp.zeros((L, num_pages + 1, page_size, K, D)), "v": jnp.zeros((L, num_pages + 1, page_size, K, D))}
    # run positions in three ragged chunks: [0,5), [5,len-1), then one decode token
    bounds = [(0, 5)] + [(5, None)] + [(None, None)]
    starts = np.zeros(B, int)
    for step, (lo, hi) in enumerate(bounds):
        ends = [5 if step == 0 else (n - 1 if step == 1 else n) for n in lengths]
        T = max(e - s for s, e in zip(starts, ends))
        positions = np.full((B, T), -1, np.int32)
        for b in range(B):
            positions[b, :ends[b] - starts[b]] = np.arange(starts[b], ends[b])
        q = jnp.asarray(rng.standard_normal((B, T, H, D)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32)
        v = jnp.asarray(rng.standard_normal((B, T, K, D)), jnp.float32)
        for layer in range(L):
            out_d, dense = dense_attend(q, k, v, dense, layer, positions)
            out_p, paged = jax.jit(lambda *a: paged_attend(*a, page_table=tables))(q, k, v, paged, layer, positions)
            valid = positions >= 0
            np.testing.assert_allclose(np.asarray(out_p)[valid], np.asarray(out_d)[valid], rtol=1e-5, atol=1e-5)
        starts = np.array(ends)
    # pages not in any table were never written; padding tokens wrote only to the scratch page
    unused = np.setdiff1d(np.arange(num_pages), tables.ravel())
    assert not np.asarray(paged["k"])[:, unused].any()
    assert np.asarray(paged["k"])[:, num_pages].any() == (B > 1)  # one sequence has no padding
