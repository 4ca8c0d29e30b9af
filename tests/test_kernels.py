"""The Pallas decode-attention path equals the pure-JAX reference; dispatch and transfer helpers.

CPU runs the GPU kernel interpreted (same kernel body, same grid and block specs); tests marked
`gpu` compile it with Triton and run only where jax.default_backend() == 'gpu'
(`JAX_PLATFORMS=cuda python -m pytest -q -m gpu tests/test_kernels.py`).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.cache import attention_kernels as ak
from jaxserve.cache import transfer
from jaxserve.cache.paged_kv import paged_attend, pool_sharding
from jaxserve.engine import model_runner
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import attention_scores_softmax
from jaxserve.model.params import init_random_on_device
from jaxserve.parallel.sharding import make_mesh, param_shardings

gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")


def reference_decode(q, k_pool, v_pool, layer, page_table, lengths):
    """Attention of q [B,H,D] over the first `lengths` tokens of each sequence's pages, in float32."""
    B, num_p = page_table.shape
    _, _, S, K, D = k_pool.shape
    k = k_pool[layer][page_table].reshape(B, num_p * S, K, D).astype(jnp.float32)
    v = v_pool[layer][page_table].reshape(B, num_p * S, K, D).astype(jnp.float32)
    mask = jnp.arange(num_p * S)[None, None, :] < lengths[:, None, None]
    out = attention_scores_softmax(q[:, None].astype(jnp.float32), k, v, mask)[:, 0]
    return jnp.where((lengths > 0)[:, None, None], out, 0.0)


def random_case(rng, *, L=3, num_pages=48, S=4, K=2, G=4, D=16, B=4, P=8, dtype=jnp.float32):
    k_pool = jnp.asarray(rng.standard_normal((L, num_pages, S, K, D)), dtype)
    v_pool = jnp.asarray(rng.standard_normal((L, num_pages, S, K, D)), dtype)
    q = jnp.asarray(rng.standard_normal((B, K * G, D)), dtype)
    table = jnp.asarray(rng.integers(0, num_pages, (B, P)), jnp.int32)
    # ragged: a full row, a one-token row, a batch-padding row (0) and random ones
    lengths = rng.integers(1, P * S + 1, B)
    lengths[:3] = [P * S, 1, 0][:B]
    return q, k_pool, v_pool, table, jnp.asarray(lengths, jnp.int32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


# -- dispatch -----------------------------------------------------------------------------------
def test_auto_picks_pallas_on_gpu_only_and_bad_names_name_the_field():
    assert ak.resolve_impl("auto", "gpu") == "pallas"
    assert ak.resolve_impl("auto", "cpu") == "reference"
    assert ak.resolve_impl("auto", "tpu") == "reference"
    assert ak.resolve_impl("reference", "gpu") == "reference"
    assert ak.resolve_impl("pallas", "cpu") == "pallas"
    with pytest.raises(ValueError, match="engine.attention_impl"):
        ak.resolve_impl("flash")
    from jaxserve.engine.engine import EngineConfig
    with pytest.raises(ValueError, match="engine.unroll_layers"):
        EngineConfig(unroll_layers="yes")


@pytest.mark.parametrize("batch", [1, 2, 8, 16, 64, 128, 256])
@pytest.mark.parametrize("pages", [1, 2, 4, 8, 64, 128, 512])
def test_kernel_parameters_always_divide_the_bucketed_page_table(batch, pages):
    ppcb, ks = ak.decode_params(batch, pages, 8)
    assert pages % ks == 0 and (pages // ks) % min(ppcb, pages // ks) == 0
    if batch == 1 and pages >= 128:
        assert ks >= 8  # a lone sequence is split so that the GPU's SMs all get work


# -- kernel vs reference (interpreted on CPU) ---------------------------------------------------
@pytest.mark.parametrize("ppcb, ks", [(8, 1), (2, 2), (1, 4), (1, 8)])
def test_interpreted_kernel_equals_reference(ppcb, ks):
    q, k_pool, v_pool, table, lengths = random_case(np.random.default_rng(ks))
    layer = jnp.int32(2)
    got = ak.pallas_decode_attention(q * 16 ** -0.5, k_pool, v_pool, layer, table, lengths,
                                     pages_per_compute_block=ppcb, k_splits=ks, interpret=True)
    want = reference_decode(q, k_pool, v_pool, layer, table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.asarray(got)[2].any()  # the padding row is zeros, not NaN


@pytest.mark.parametrize("G", [3, 4])
def test_interpreted_kernel_writes_gemm_padding_rows_as_zeros(G):
    # out_rows > B: the step's GEMM padding rows come out of the merge kernel as zeros; a group
    # of 3 query heads per kv head (SmolLM2's) is not a power of two, which Triton blocks must be
    q, k_pool, v_pool, table, lengths = random_case(np.random.default_rng(G), G=G, B=3)
    got = ak.pallas_decode_attention(q * 16 ** -0.5, k_pool, v_pool, jnp.int32(1), table, lengths,
                                     pages_per_compute_block=2, k_splits=4, out_rows=8, interpret=True)
    assert got.shape == (8, 2 * G, 16)
    want = reference_decode(q, k_pool, v_pool, jnp.int32(1), table, lengths)
    np.testing.assert_allclose(np.asarray(got)[:3], np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.asarray(got)[2:].any()  # the length-0 row and the 5 padding rows


def _decode_over_layers(impl, q, k, v, cache, positions, table, mesh=None):
    """A layer scan like llama.forward's: write this token's k, v, attend, per layer."""
    attend = functools.partial(paged_attend, page_table=table, impl=impl, mesh=mesh)

    def body(cache, layer):
        out, cache = attend(q, k, v, cache, layer, positions)
        return cache, out

    cache, outs = jax.lax.scan(body, cache, jnp.arange(cache["k"].shape[0]))
    return outs, cache


def test_paged_attend_pallas_decode_equals_reference_in_a_layer_scan():
    rng = np.random.default_rng(3)
    _, k_pool, v_pool, table, _ = random_case(rng, B=3)
    B, H, K, D = 3, 8, 2, 16
    positions = jnp.asarray([[31], [6], [-1]], jnp.int32)  # last one is batch padding
    q, k, v = (jnp.asarray(rng.standard_normal((B, 1, n, D)), jnp.float32) for n in (H, K, K))
    cache = {"k": k_pool, "v": v_pool}
    run = jax.jit(_decode_over_layers, static_argnums=0)
    out_r, cache_r = run("reference", q, k, v, cache, positions, table)
    out_p, cache_p = run("pallas", q, k, v, cache, positions, table)
    np.testing.assert_allclose(np.asarray(out_p)[:, :2], np.asarray(out_r)[:, :2], rtol=2e-5, atol=2e-5)
    for name in ("k", "v"):
        np.testing.assert_array_equal(np.asarray(cache_p[name]), np.asarray(cache_r[name]))


def test_kernel_on_a_model_sharded_mesh_equals_one_device():
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=16, mlp_dim=64)
    mesh = make_mesh(1, 2)
    rng = np.random.default_rng(4)
    q, k_pool, v_pool, table, lengths = random_case(rng, L=2, num_pages=16, K=2)
    sharding = pool_sharding(cfg, 16, 4, mesh)
    assert sharding.spec[3] == "model"  # kv heads really are split over two devices
    k_s, v_s = jax.device_put(k_pool, sharding), jax.device_put(v_pool, sharding)
    run = jax.jit(ak.decode_attention, static_argnames=("mesh",))
    got = run(q, k_s, v_s, jnp.int32(1), table, lengths, mesh=mesh)
    want = run(q, k_pool, v_pool, jnp.int32(1), table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


# -- model runner ---------------------------------------------------------------------------------
def test_runner_with_interpreted_kernel_gives_the_reference_tokens():
    cfg = ModelConfig(vocab_size=128, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=64, max_seq_len=64)
    mesh = make_mesh(1, 1)
    params = init_random_on_device(cfg, mesh, seed=1)
    runners = {impl: model_runner.ModelRunner(cfg, params, mesh, num_pages=32, page_size=4, max_batch=4,
                                              attention_impl=impl.split("+")[0],
                                              unroll_layers="on" if "gpu" in impl else "auto")
               for impl in ("reference", "pallas", "pallas+gpu")}
    assert runners["pallas"].attention_impl == "pallas"
    assert not runners["pallas"].unroll_layers and runners["pallas+gpu"].unroll_layers  # auto: off on CPU
    # the step as a GPU runs it (interpreted here): unrolled layers, rows padded for cuBLAS
    runners["pallas+gpu"].gemm_rows = model_runner.GEMM_ROWS_GPU
    prompts = [[5, 6, 7, 8, 9, 10, 11], [3, 4], [12, 13, 14, 15, 16]]
    pages = [[0, 1], [2], [5, 3]]
    outs = {}
    for impl, runner in runners.items():
        chunks = [model_runner.Chunk(p, 0, pg, 0.0, 0, 1.0, 0, 0) for p, pg in zip(prompts, pages)]
        first, _ = runner.run(chunks)
        toks, lps = [first], []
        for step in range(3):  # decode steps: the kernel path
            chunks = [model_runner.Chunk([int(t)], len(p) + step, pg + [20 + i], 0.0, 0, 1.0, 0, step + 1)
                      for i, (t, p, pg) in enumerate(zip(toks[-1], prompts, pages))]
            t, lp = runner.run(chunks)
            toks.append(t)
            lps.append(lp)
        outs[impl] = (np.stack(toks), np.stack(lps))
    for impl in ("pallas", "pallas+gpu"):
        np.testing.assert_array_equal(outs[impl][0], outs["reference"][0])
        np.testing.assert_allclose(outs[impl][1], outs["reference"][1], rtol=1e-4, atol=1e-5)


def test_decode_steps_padded_to_gemm_rows_give_the_same_tokens_and_leave_the_cache_alone():
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_seq_len=64)
    mesh = make_mesh(1, 1)
    params = init_random_on_device(cfg, mesh)
    assert model_runner.ModelRunner(cfg, params, mesh, 8, 4, 8).gemm_rows == (
        model_runner.GEMM_ROWS_GPU if jax.default_backend() == "gpu" else 1)
    outs = {}
    for gemm_rows in (1, model_runner.GEMM_ROWS_GPU):  # the GPU rule, checked on any backend
        runner = model_runner.ModelRunner(cfg, params, mesh, num_pages=16, page_size=4, max_batch=8)
        runner.gemm_rows = gemm_rows
        prompts = [[3, 5, 7, 9, 11], [2, 4, 6]]
        pages = [[0, 1], [2]]
        first, _ = runner.run([model_runner.Chunk(p, 0, pg, 0.0, 0, 1.0, 0, 0) for p, pg in zip(prompts, pages)])
        assert runner.pack([model_runner.Chunk([5], 3, [0], 0.0, 0, 1.0, 0, 0)])[0].shape == (1, 1)
        toks, lps = [first], []
        for step in range(3):  # 2 rows, then 1: padded to gemm_rows inside the step
            live = prompts[:2 - step // 2]
            chunks = [model_runner.Chunk([int(t)], len(p) + step, pg + [8 + i], 0.0, 0, 1.0, 0, step + 1)
                      for i, (t, p, pg) in enumerate(zip(toks[-1], live, pages))]
            t, lp = runner.run(chunks)
            assert t.shape == (len(live),)
            toks.append(t)
            lps.append(lp)
        outs[gemm_rows] = (np.concatenate(toks), np.concatenate(lps), np.asarray(runner.cache["k"]))
    one, padded = outs[1], outs[model_runner.GEMM_ROWS_GPU]
    np.testing.assert_array_equal(one[0], padded[0])
    np.testing.assert_allclose(one[1], padded[1], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(one[2], padded[2])  # padding rows wrote nothing


def test_random_weights_on_device_have_the_param_shapes_dtypes_and_shardings():
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, dtype="bfloat16")
    mesh = make_mesh(2, 2)
    params = init_random_on_device(cfg, mesh, seed=0)
    want = param_shardings(cfg, mesh)
    for (path, x), s in zip(jax.tree.flatten_with_path(params)[0], jax.tree.leaves(want)):
        assert x.dtype == jnp.bfloat16 and x.sharding.is_equivalent_to(s, x.ndim), path
    w = np.asarray(params["layers"]["w_down"], np.float32)
    assert abs(w.std() * np.sqrt(cfg.mlp_dim) - 1) < 0.1
    assert abs(np.asarray(params["final_norm"], np.float32).mean() - 1) < 0.1


# -- transfers ----------------------------------------------------------------------------------
def test_swap_round_trip_through_pinned_host_memory():
    rng = np.random.default_rng(6)
    pool = {n: jnp.asarray(rng.standard_normal((2, 10, 4, 2, 8)), jnp.float32) for n in ("k", "v")}
    pages = jnp.asarray([7, 2, 9], jnp.int32)
    host = transfer.swap_out(pool, pages)
    fused = transfer.gather_to_host(pool, pages)
    for name in ("k", "v"):
        assert host[name].sharding.memory_kind == "pinned_host"
        assert fused[name].sharding.memory_kind == "pinned_host"
        np.testing.assert_array_equal(np.asarray(fused[name]), np.asarray(pool[name])[:, [7, 2, 9]])
    want = {n: np.asarray(x).copy() for n, x in pool.items()}
    new = transfer.swap_in(pool, jnp.asarray([0, 1, 10], jnp.int32), host)  # id 10: out of range, dropped
    for name in ("k", "v"):
        want[name][:, [0, 1]] = want[name][:, [7, 2]]
        np.testing.assert_array_equal(np.asarray(new[name]), want[name])
        assert new[name].sharding.memory_kind == pool_kind(new[name])


def pool_kind(x):
    return next(iter(x.sharding.device_set)).default_memory().kind


# -- on the GPU: the Triton-compiled kernel ------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("ppcb, ks", [(8, 1), (4, 4), (8, 4), (4, 16)])
def test_gpu_kernel_matches_reference_in_bf16(ppcb, ks):
    rng = np.random.default_rng(ks)
    q, k_pool, v_pool, table, lengths = random_case(rng, L=2, num_pages=300, S=16, K=8, G=4, D=128,
                                                    B=5, P=64, dtype=jnp.bfloat16)
    layer = jnp.int32(1)
    scaled = (q.astype(jnp.float32) * 128 ** -0.5).astype(jnp.bfloat16)
    got = jax.jit(functools.partial(ak.pallas_decode_attention, pages_per_compute_block=ppcb, k_splits=ks))(
        scaled, k_pool, v_pool, layer, table, lengths)
    want = reference_decode(q, k_pool, v_pool, layer, table, lengths)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got, want) < 1e-2
    assert not np.asarray(got, np.float32)[2].any()


@pytest.mark.gpu
@gpu
def test_gpu_decode_step_kernel_matches_reference_step():
    cfg = ModelConfig(vocab_size=512, embed_dim=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=64, mlp_dim=512, max_seq_len=512, dtype="bfloat16")
    mesh = make_mesh(1, 1)
    params = init_random_on_device(cfg, mesh, seed=2)
    rng = np.random.default_rng(7)
    B, P, S = 4, 8, 16
    pool = {n: jnp.asarray(rng.standard_normal((2, 64, S, 2, 64)), jnp.bfloat16) for n in ("k", "v")}
    table = jnp.asarray(rng.permutation(64)[:B * P].reshape(B, P), jnp.int32)
    positions = jnp.asarray([[127], [60], [1], [-1]], jnp.int32)
    args = (jnp.asarray(rng.integers(0, 512, (B, 1)), jnp.int32), positions, table, jnp.zeros(B, jnp.int32),
            jnp.zeros(B, jnp.float32), jnp.zeros(B, jnp.int32), jnp.ones(B, jnp.float32),
            jnp.zeros(B, jnp.uint32), jnp.zeros(B, jnp.int32))
    out = {}
    for impl in ("reference", "pallas"):
        cache = jax.tree.map(jnp.copy, pool)
        tok, lp, _ = model_runner._paged_step(params, cache, *args, cfg=cfg, attention_impl=impl)
        out[impl] = np.asarray(tok)[:3], np.asarray(lp)[:3]
    np.testing.assert_allclose(out["pallas"][1], out["reference"][1], atol=5e-2)
