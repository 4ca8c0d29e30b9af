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
from jaxserve.cache import mgpu_decode
from jaxserve.cache import paged_kv, transfer
from jaxserve.cache.paged_kv import paged_attend, pool_sharding
from jaxserve.engine import model_runner
from jaxserve.model.config import ModelConfig
from jaxserve.model.llama import attention_scores_softmax
from jaxserve.model.sharding import init_random_on_device
from jaxserve.model.sharding import make_mesh, param_shardings

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
def test_auto_picks_each_platforms_kernel_and_bad_names_name_the_field():
    assert ak.resolve_impl("auto", "gpu") == "mgpu"
    assert ak.resolve_impl("auto", "cpu") == "reference"
    assert ak.resolve_impl("auto", "tpu") == "tpu"
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
    ppcb, ks, warps = ak.decode_params(batch, pages, 8)
    assert pages % ks == 0 and (pages // ks) % min(ppcb, pages // ks) == 0
    assert ppcb <= warps  # at most a page a warp: a bigger block and the prefetched one spill registers
    # ragged rows: no program reads more than SPLIT_PAGES pages, unless splits ran out
    assert pages // ks <= ak.SPLIT_PAGES or ks == 32 or pages // (2 * ks) < ppcb
    if batch == 1 and pages >= 128:
        assert ks >= 8  # a lone sequence is split so that the GPU's SMs all get work


# -- kernel vs reference (interpreted on CPU) ---------------------------------------------------
@pytest.mark.parametrize("ppcb, ks, prefetch", [(8, 1, 1), (2, 2, 1), (1, 4, 2), (1, 8, 1), (1, 1, 3)])
def test_interpreted_kernel_equals_reference(ppcb, ks, prefetch):
    q, k_pool, v_pool, table, lengths = random_case(np.random.default_rng(ks))
    layer = jnp.int32(2)
    got = ak.pallas_decode_attention(q * 16 ** -0.5, k_pool, v_pool, layer, table, lengths,
                                     pages_per_compute_block=ppcb, k_splits=ks, prefetch=prefetch, interpret=True)
    want = reference_decode(q, k_pool, v_pool, layer, table, lengths)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.asarray(got)[2].any()  # the padding row is zeros, not NaN


@pytest.mark.parametrize("G", [3, 4])
def test_interpreted_kernel_writes_gemm_padding_rows_as_zeros(G):
    # out_rows > B: the step's GEMM padding rows come out of the merge kernel as zeros; a group
    # of 3 query heads per kv head (SmolLM2's) is not a power of two, which Triton blocks must be
    q, k_pool, v_pool, table, lengths = random_case(np.random.default_rng(G), G=G, B=3)
    with jax.default_matmul_precision("float32"):  # a GPU's default runs float32 dots in bf16 passes
        got = ak.pallas_decode_attention(q * 16 ** -0.5, k_pool, v_pool, jnp.int32(1), table, lengths,
                                         pages_per_compute_block=2, k_splits=4, out_rows=8, interpret=True)
        want = reference_decode(q, k_pool, v_pool, jnp.int32(1), table, lengths)
    assert got.shape == (8, 2 * G, 16)
    np.testing.assert_allclose(np.asarray(got)[:3], np.asarray(want), rtol=2e-5, atol=2e-5)
    assert not np.asarray(got)[2:].any()  # the length-0 row and the 5 padding rows


@pytest.mark.parametrize("ks, stages, ctas", [(1, 4, 1), (2, 2, 2), (4, 2, 1)])
def test_interpreted_mosaic_gpu_kernel_equals_reference(ks, stages, ctas):
    # 4 splits of 8 pages: 2 pages a split, less than a 64-token block (the rest of the block
    # repeats the split's last page and must be masked even where the row goes on)
    # 2 SMs: each CTA of the persistent grid runs several items, its ring carried over between them
    q, k_pool, v_pool, table, lengths = random_case(np.random.default_rng(ks), L=2, num_pages=40, S=16, K=2, G=4,
                                                    D=64, B=3, P=8, dtype=jnp.bfloat16)
    layer = jnp.int32(1)
    scaled = (q.astype(jnp.float32) * 64 ** -0.5).astype(q.dtype)
    got = ak._mgpu_decode_attention(scaled, k_pool, v_pool, layer, table, lengths, out_rows=5, k_splits=ks,
                                    stages=stages, ctas_per_sm=ctas, num_sms=2, interpret=True)
    want = reference_decode(q, k_pool, v_pool, layer, table, lengths)
    assert got.shape == (5, 8, 64)
    assert rel_err(got[:3], want) < 5e-3  # bf16 probabilities and partials
    assert not np.asarray(got, np.float32)[2:].any()  # the length-0 row and the 2 GEMM padding rows


@pytest.mark.parametrize("kernel, G", [("triton", 4), ("triton", 3), ("mgpu", 4), ("mgpu", 8)])
def test_decode_kernels_write_the_newest_keys_in_place_and_attend_to_them(kernel, G):
    # a decode step's fused KV write: each row's newest key and value go into the pool from the
    # merge kernel, and attention sees them without reading them back; rows of length 0 write nothing.
    # q, k and v reach the kernels packed in rows of 8 (G = 3, 4) or 16 (G = 8: the Mosaic GPU
    # kernel's q tile is then all query rows, the key and value in the next tile)
    rng = np.random.default_rng(7)
    B, S, D, P = 4, 16, 64, 4
    dtype = jnp.bfloat16 if kernel == "mgpu" else jnp.float32  # the Mosaic GPU kernel is bf16 only
    q, k_pool, v_pool, table, lengths = random_case(rng, L=2, num_pages=40, S=S, K=2, G=G, D=D, B=B, P=P, dtype=dtype)
    table = jnp.asarray(np.stack([rng.permutation(39)[:P] for _ in range(B)]), jnp.int32)  # page 39: scratch
    N, layer = 8, jnp.int32(1)  # 4 GEMM padding rows
    k_new, v_new = (jnp.asarray(rng.standard_normal((N, 2, D)), dtype) for _ in range(2))
    pos = np.maximum(np.asarray(lengths) - 1, 0)
    live = np.asarray(lengths) > 0
    kv_page = np.full(N, 39, np.int32)
    kv_offset = np.zeros(N, np.int32)
    kv_page[:B] = np.where(live, np.asarray(table)[np.arange(B), pos // S], 39)
    kv_offset[:B] = np.where(live, pos % S, 0)
    scaled = (q.astype(jnp.float32) * D ** -0.5).astype(dtype)
    new_kv = (jnp.stack([k_new, v_new], axis=2), jnp.asarray(kv_page), jnp.asarray(kv_offset))
    if kernel == "mgpu":
        run = functools.partial(ak._mgpu_decode_attention, k_splits=2, stages=2, num_sms=2, out_rows=N,
                                interpret=True)
    else:
        run = functools.partial(ak.pallas_decode_attention, pages_per_compute_block=2, k_splits=2, out_rows=N,
                                interpret=True)
    got, k_got, v_got = jax.jit(run)(scaled, k_pool, v_pool, layer, table, lengths, new_kv)
    write = lambda pool, new: pool.at[layer, kv_page[:B][live], kv_offset[:B][live]].set(new[:B][live])
    k_want, v_want = write(k_pool, k_new), write(v_pool, v_new)
    np.testing.assert_array_equal(np.asarray(k_got, np.float32), np.asarray(k_want, np.float32))
    np.testing.assert_array_equal(np.asarray(v_got, np.float32), np.asarray(v_want, np.float32))
    want = reference_decode(q, k_want, v_want, layer, table, lengths)
    assert got.shape == (N, 2 * G, D)
    for b in (0, 1, 3):  # each row by itself: the newest token's share of a row is large in the short ones
        assert rel_err(got[b], want[b]) < (5e-3 if kernel == "mgpu" else 1e-5), b  # mgpu: bf16 probabilities
    assert not np.asarray(got, np.float32)[2:3].any() and not np.asarray(got, np.float32)[B:].any()


@pytest.mark.parametrize("batch", [1, 2, 8, 16, 64, 128, 256])
@pytest.mark.parametrize("pages", [1, 2, 4, 8, 64, 128, 512])
def test_mosaic_gpu_parameters_always_divide_the_bucketed_page_table(batch, pages):
    ks, stages, ctas = mgpu_decode.mgpu_params(batch, pages, 8)
    assert pages % ks == 0 and stages * ctas <= 4  # shared memory holds 4 stages of K and V an SM
    assert pages // ks >= min(pages, 4)  # a split holds a whole 64-token block where the row does
    assert ks >= 2 or pages < 8  # ragged rows are split: round-robin items would end on the long ones


def test_decode_kernel_names_are_checked_and_the_mosaic_kernel_needs_hopper():
    q, k_pool, v_pool, table, lengths = random_case(np.random.default_rng(0))
    with pytest.raises(ValueError, match="decode kernel 'flash'"):
        ak.decode_attention(q, k_pool, v_pool, jnp.int32(0), table, lengths, kernel_impl="flash")
    assert ak.resolve_impl("mgpu", "gpu") == "mgpu"
    if jax.default_backend() != "gpu":
        assert not mgpu_decode.supported(32, 8, 128, 16, jnp.bfloat16)
        # off Hopper 'mgpu' is the Triton kernel (here interpreted): the same numbers
        args = (q * 16 ** -0.5, k_pool, v_pool, jnp.int32(1), table, lengths)
        np.testing.assert_array_equal(np.asarray(ak.decode_attention(*args, kernel_impl="mgpu")),
                                      np.asarray(ak.decode_attention(*args)))


def _decode_over_layers(impl, q, k, v, cache, positions, layout, mesh=None):
    """A layer scan like llama.forward's: write this token's k, v, attend, per layer."""
    attend = functools.partial(paged_attend, layout=layout, impl=impl, mesh=mesh)

    def body(cache, layer):
        out, cache = attend(q, k, v, cache, layer, positions)
        return cache, out

    cache, outs = jax.lax.scan(body, cache, jnp.arange(cache["k"].shape[0]))
    return outs, cache


def test_paged_attend_pallas_equals_reference_in_a_layer_scan():
    rng = np.random.default_rng(3)
    _, k_pool, v_pool, _, _ = random_case(rng, B=3)
    H, K, D, NP, S = 8, 2, 16, k_pool.shape[1] - 1, k_pool.shape[2]
    perm = rng.permutation(NP).tolist()
    # two decodes and a 20-token prefill chunk (two query blocks) in one flattened step
    chunks = [model_runner.Chunk([0], 31, perm[:8], 0.0, 0, 1.0, 0, 0),
              model_runner.Chunk([0], 6, perm[8:10], 0.0, 0, 1.0, 0, 0),
              model_runner.Chunk([0] * 20, 9, perm[10:18], 0.0, 0, 1.0, 0, 0)]
    _, step, _, _ = model_runner.pack(chunks, S, 8, 8, NP)
    N = step.tokens.shape[0]
    q, k, v = (jnp.asarray(rng.standard_normal((1, N, n, D)), jnp.float32) for n in (H, K, K))
    cache = {"k": k_pool, "v": v_pool}
    run = jax.jit(_decode_over_layers, static_argnums=0)
    out_r, cache_r = run("reference", q, k, v, cache, step.positions[None], step.layout)
    out_p, cache_p = run("pallas", q, k, v, cache, step.positions[None], step.layout)
    tol = 2e-3 if jax.default_backend() == "gpu" else 2e-5  # Triton's float32 dots run in tf32
    np.testing.assert_allclose(np.asarray(out_p)[:, :, :22], np.asarray(out_r)[:, :, :22], rtol=tol, atol=tol)
    for name in ("k", "v"):  # but the scratch page, where padding tokens' writes race
        np.testing.assert_array_equal(np.asarray(cache_p[name])[:, :-1], np.asarray(cache_r[name])[:, :-1])


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
    # with the newest keys written by the kernels: each device writes its own heads' slots
    kv = jnp.asarray(rng.standard_normal((4, 2, 2, 16)), jnp.float32)
    new_kv = (kv, jnp.asarray([3, 5, 7, 15], jnp.int32), jnp.asarray([0, 1, 2, 3], jnp.int32))
    got = run(q, k_s, v_s, jnp.int32(1), table, lengths, new_kv, mesh=mesh)
    want = run(q, k_pool, v_pool, jnp.int32(1), table, lengths, new_kv)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-6)
    assert np.asarray(got[1])[1, 5, 1].tolist() == np.asarray(kv)[1, :, 0].tolist()


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
    # the step as a GPU runs it (interpreted here): both kernels, decode steps unrolled
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


def test_a_mixed_step_gives_what_separate_steps_give_and_padding_writes_only_the_scratch_page():
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_seq_len=64)
    mesh = make_mesh(1, 1)
    params = init_random_on_device(cfg, mesh)
    prompts = [[3, 5, 7, 9, 11], [2, 4, 6]]
    late = list(range(10, 31))  # 21 tokens: two query blocks, one partial
    outs = {}
    for mixed in (False, True):
        runner = model_runner.ModelRunner(cfg, params, mesh, num_pages=16, page_size=4, max_batch=8)
        first, _ = runner.run([model_runner.Chunk(p, 0, pg, 0.0, 0, 1.0, 0, 0)
                               for p, pg in zip(prompts, [[0, 1], [2]])])
        decodes = [model_runner.Chunk([int(t)], len(p), pg, 0.0, 0, 1.0, 0, 1)
                   for t, p, pg in zip(first, prompts, [[0, 1], [2, 3]])]
        prefill = model_runner.Chunk(late, 0, [4, 5, 6, 7, 8, 9], 0.0, 0, 1.0, 0, 0)
        if mixed:  # decodes and a prefill chunk in one call
            before = model_runner.TRACE_COUNT["forward"]
            shape = runner.pack(decodes + [prefill])[0]
            assert shape.prefill and shape.tokens == 32 and shape.blocks > 0
            toks, lps = runner.run([prefill] + decodes)  # any order: results come back in it
            toks, lps = np.roll(toks, -1), np.roll(lps, -1)
        else:
            t1, l1 = runner.run(decodes)
            t2, l2 = runner.run([prefill])
            toks, lps = np.concatenate([t1, t2]), np.concatenate([l1, l2])
        outs[mixed] = toks, lps, np.asarray(runner.cache["k"])
    np.testing.assert_array_equal(outs[False][0], outs[True][0])
    np.testing.assert_allclose(outs[False][1], outs[True][1], rtol=1e-5, atol=1e-6)
    # every page but the scratch one (the last) holds the same keys: padding wrote nowhere else
    np.testing.assert_allclose(outs[False][2][:, :-1], outs[True][2][:, :-1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("prefetch", [0, 1])
def test_prefill_kernel_interpreted_matches_the_reference(prefetch):
    rng = np.random.default_rng(4)
    L, NP, S, K, G, D, N = 2, 20, 4, 2, 3, 16, 40
    pools = [jnp.asarray(rng.standard_normal((L, NP, S, K, D)), jnp.float32) for _ in range(2)]
    q = jnp.asarray(rng.standard_normal((N, K * G, D)), jnp.float32)
    tables = np.stack([rng.permutation(NP)[:8] for _ in range(2)]).astype(np.int32)
    # seq 0: tokens 2..30 at positions 3..31 (its 8 pages); seq 1: tokens 32..36 at positions 0..4; an unused block
    start, length, pos, seq = (np.array(a, np.int32) for a in ([2, 18, 32, 0], [16, 13, 5, 0], [3, 19, 0, 0],
                                                                 [0, 0, 1, 0]))
    args = (q, *pools, jnp.int32(1), jnp.asarray(tables[seq]), start, length, pos)
    got = np.asarray(ak.pallas_prefill_attention(*args, query_block=16, pages_per_compute_block=2, prefetch=prefetch,
                                                 interpret=True)).reshape(4, 16, K * G, D)
    want = np.asarray(paged_kv._reference_prefill(*args, 16)).reshape(4, 16, K * G, D)
    for b in range(3):
        np.testing.assert_allclose(got[b, :length[b]], want[b, :length[b]], rtol=1e-5, atol=1e-5)
    assert not got[3].any()  # an unused block writes zeros


def test_the_step_updates_the_pool_in_place():
    """The compiled step aliases the donated pool: none of its temporaries could hold a copy of it.

    The pool is large next to everything else the step holds: on GPU that includes cuBLAS's
    fixed 32 MiB workspace, so each of k and v is 64 MiB here."""
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, mlp_dim=64, max_seq_len=256)
    mesh = make_mesh(1, 1)
    params = init_random_on_device(cfg, mesh)
    runner = model_runner.ModelRunner(cfg, params, mesh, num_pages=131072, page_size=4, max_batch=8)
    one_array = runner.cache["k"].nbytes
    for shape in (model_runner.StepShape(8, 8, 64, False), model_runner.StepShape(64, 8, 64, True)):
        step, _ = model_runner.padding_inputs(shape, runner.num_pages)
        compiled = model_runner.forward_step.lower(params, runner.cache, runner.prev_tokens, step,
                                                   **runner.step_kwargs(shape)).compile()
        mem = compiled.memory_analysis()
        assert mem.alias_size_in_bytes >= 2 * one_array, shape
        assert mem.temp_size_in_bytes < one_array, (shape, mem.temp_size_in_bytes)


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


# -- on the GPU: the compiled kernels ------------------------------------------------------------
MGPU = functools.partial(ak._mgpu_decode_attention, out_rows=8)
DECODE_KERNELS_ON_GPU = {
    **{f"triton ppcb{p} ks{k} w{w}": functools.partial(ak.pallas_decode_attention, pages_per_compute_block=p,
                                                        k_splits=k, num_warps=w, out_rows=8)
       for p, k, w in [(8, 1, 4), (4, 4, 4), (1, 4, 1), (1, 1, 1), (4, 16, 4)]},
    **{f"mgpu ks{k} s{s} p{c}": functools.partial(MGPU, k_splits=k, stages=s, ctas_per_sm=c)
       for k, s, c in [(1, 4, 1), (2, 2, 2), (4, 2, 2), (16, 2, 2), (32, 4, 1)]},
    # what the engine runs on Hopper by default (attention_impl auto -> mgpu), mgpu_params' pick
    "mgpu picked": functools.partial(ak.decode_attention, out_rows=8, kernel_impl="mgpu"),
}


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("name", list(DECODE_KERNELS_ON_GPU))
def test_gpu_decode_kernels_match_reference_in_bf16(name):
    rng = np.random.default_rng(len(name))
    q, k_pool, v_pool, table, lengths = random_case(rng, L=2, num_pages=300, S=16, K=8, G=4, D=128,
                                                    B=5, P=64, dtype=jnp.bfloat16)
    layer = jnp.int32(1)
    scaled = (q.astype(jnp.float32) * 128 ** -0.5).astype(jnp.bfloat16)
    assert mgpu_decode.supported(32, 8, 128, 16, jnp.bfloat16) == (jax.devices()[0].compute_capability == "9.0")
    got = jax.jit(DECODE_KERNELS_ON_GPU[name])(scaled, k_pool, v_pool, layer, table, lengths)
    want = reference_decode(q, k_pool, v_pool, layer, table, lengths)
    assert got.shape == (8, 32, 128) and np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got[:5], want) < 1e-2
    assert not np.asarray(got, np.float32)[[2, 5, 6, 7]].any()  # the length-0 row and the GEMM padding


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("kernel", ["triton", "mgpu"])
def test_gpu_fused_kv_write_reaches_pages_past_2_to_the_31_elements(kernel):
    # a decode step's KV write from the merge kernel, into the last pages of an 8.6 GB pool
    # (the offline benchmark's is 21 GB): its offsets overflow int32
    L, NP, S, K, D, B, P = 2, 131073, 16, 8, 128, 2, 4
    rng = np.random.default_rng(11)
    table = jnp.asarray([[NP - 9, NP - 8, NP - 7, NP - 6], [NP - 5, NP - 4, NP - 3, NP - 2]], jnp.int32)
    layer, lengths = jnp.int32(1), jnp.asarray([50, 64], jnp.int32)
    fill = lambda: jnp.zeros((L, NP, S, K, D), jnp.bfloat16).at[layer, table].set(
        jnp.asarray(rng.standard_normal((B, P, S, K, D)), jnp.bfloat16))
    k_pool, v_pool = fill(), fill()
    q = jnp.asarray(rng.standard_normal((B, 32, D)) * 128 ** -0.5, jnp.bfloat16)
    k_new, v_new = (jnp.asarray(rng.standard_normal((8, K, D)), jnp.bfloat16) for _ in range(2))
    pos = np.asarray(lengths) - 1
    kv_page = jnp.asarray(np.r_[np.asarray(table)[np.arange(B), pos // S], [NP - 1] * 6], jnp.int32)
    kv_offset = jnp.asarray(np.r_[pos % S, [0] * 6], jnp.int32)
    run = jax.jit(functools.partial(ak.decode_attention, out_rows=8, kernel_impl=kernel))
    got, k_got, v_got = run(q, k_pool, v_pool, layer, table, lengths, (jnp.stack([k_new, v_new], 2), kv_page, kv_offset))
    for b in range(B):
        np.testing.assert_array_equal(np.asarray(k_got[1, kv_page[b], kv_offset[b]], np.float32),
                                      np.asarray(k_new[b], np.float32))
        np.testing.assert_array_equal(np.asarray(v_got[1, kv_page[b], kv_offset[b]], np.float32),
                                      np.asarray(v_new[b], np.float32))
    k_want = k_pool.at[1, kv_page[:B], kv_offset[:B]].set(k_new[:B])
    v_want = v_pool.at[1, kv_page[:B], kv_offset[:B]].set(v_new[:B])
    want = reference_decode(q * 128 ** 0.5, k_want, v_want, layer, table, lengths)
    assert rel_err(got[:B], want) < 1e-2
    assert not np.asarray(got, np.float32)[B:].any()
    assert not np.asarray(k_got[1, NP - 1], np.float32).any()  # the padding rows wrote nothing


@pytest.mark.gpu
@gpu
def test_gpu_mixed_step_kernels_match_reference_step():
    cfg = ModelConfig(vocab_size=512, embed_dim=256, num_layers=2, num_heads=8, num_kv_heads=2,
                      head_dim=64, mlp_dim=512, max_seq_len=512, dtype="bfloat16")
    mesh = make_mesh(1, 1)
    params = init_random_on_device(cfg, mesh, seed=2)
    rng = np.random.default_rng(7)
    pool = {n: jnp.asarray(rng.standard_normal((2, 65, 16, 2, 64)), jnp.bfloat16) for n in ("k", "v")}
    perm = rng.permutation(64).tolist()
    chunks = [model_runner.Chunk([int(rng.integers(512))], 127, perm[:8], 0.0, 0, 1.0, 0, 1),
              model_runner.Chunk([int(rng.integers(512))], 60, perm[8:12], 0.0, 0, 1.0, 0, 1),
              model_runner.Chunk(rng.integers(0, 512, 100).tolist(), 30, perm[12:21], 0.0, 0, 1.0, 0, 0),
              model_runner.Chunk(rng.integers(0, 512, 7).tolist(), 0, perm[21:22], 0.0, 0, 1.0, 0, 0)]
    out = {}
    for impl in ("reference", "pallas", "mgpu"):
        runner = model_runner.ModelRunner(cfg, params, mesh, 64, 16, 8, attention_impl=impl,
                                          cache=jax.tree.map(jnp.copy, pool))
        mixed = runner.run(chunks)
        # then a decode-only step, where the kernels write the new keys themselves
        decodes = [model_runner.Chunk([int(t)], c.start + len(c.tokens), list(c.pages) + [perm[22 + i]], 0.0, 0, 1.0,
                                      0, 1) for i, (t, c) in enumerate(zip(mixed[0], chunks))]
        out[impl] = mixed, runner.run(decodes), jax.tree.map(np.asarray, runner.cache)
    for impl in ("pallas", "mgpu"):
        for step in (0, 1):
            np.testing.assert_allclose(out[impl][step][1], out["reference"][step][1], atol=5e-2)
        for name in ("k", "v"):  # all but the scratch page
            np.testing.assert_allclose(np.asarray(out[impl][2][name][:, :-1], np.float32),
                                       np.asarray(out["reference"][2][name][:, :-1], np.float32), atol=5e-2)


@pytest.mark.gpu
@gpu
def test_gpu_prefill_kernel_matches_reference_in_bf16():
    rng = np.random.default_rng(5)
    L, NP, S, K, G, D, N = 2, 300, 16, 8, 4, 128, 512
    pools = [jnp.asarray(rng.standard_normal((L, NP, S, K, D)), jnp.bfloat16) for _ in range(2)]
    q = jnp.asarray(rng.standard_normal((N, K * G, D)) * 128 ** -0.5, jnp.bfloat16)
    tables = jnp.asarray(np.stack([rng.permutation(NP)[:64] for _ in range(32)]), jnp.int32)
    start = jnp.asarray(np.arange(32) * 16, jnp.int32)
    length = jnp.full(32, 16, jnp.int32)
    pos = jnp.asarray(rng.integers(0, 1000, 32), jnp.int32)
    args = (q, *pools, jnp.int32(1), tables, start, length, pos)
    got = jax.jit(functools.partial(ak.pallas_prefill_attention, query_block=16))(*args)
    want = paged_kv._reference_prefill(*args, 16)
    assert np.isfinite(np.asarray(got, np.float32)).all()
    assert rel_err(got, want) < 1e-2


# -- TPU: JAX's ragged paged attention kernel ----------------------------------------------------
def test_a_step_maps_onto_the_tpu_kernels_contract():
    """Decodes at ragged lengths (one at a page boundary, one padding row) and prefill chunks
    crossing pages (two query blocks, one partial), grouped-query heads (G = 2), packed by the
    runner: through tpu_attention's mapping, JAX's reference of the TPU kernel's contract gives
    the step's reference attention. The kernel itself runs only on a TPU (see tpu_attention)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ref_ragged_paged_attention
    from jaxserve.cache import tpu_attention
    rng = np.random.default_rng(7)
    L_, NP, PS, K, G, D = 2, 24, 4, 2, 2, 16
    pools = {n: jnp.asarray(rng.standard_normal((L_, NP, PS, K, D)), jnp.float32) for n in ("k", "v")}
    chunks = [model_runner.Chunk([5], 7, [0, 1], 0.0, 0, 1.0, 0, 1),        # 8 keys: 2 full pages
              model_runner.Chunk([6], 2, [2], 0.0, 0, 1.0, 0, 1),           # 3 keys
              model_runner.Chunk(list(range(10, 31)), 3, [3, 4, 5, 6, 7, 8], 0.0, 0, 1.0, 0, 0),  # 21 at 3..23
              model_runner.Chunk([7, 8, 9], 0, [9], 0.0, 0, 1.0, 0, 0)]
    shape, step, _, _ = model_runner.pack(chunks, PS, max_batch=8, max_pages=8, scratch_page=NP - 1)
    layout = jax.tree.map(jnp.asarray, step.layout)
    N = shape.tokens
    q = jnp.asarray(rng.standard_normal((N, K * G, D)), jnp.float32) * 0.3
    k_new = jnp.asarray(rng.standard_normal((1, N, K, D)), jnp.float32)
    want, cache = paged_attend(q[None], k_new, k_new * 0.5, dict(pools), 1, jnp.asarray(step.positions)[None],
                               layout=layout, impl="reference")
    got = tpu_attention.attend(q * D ** -0.5, cache["k"], cache["v"], 1, layout, kernel=ref_ragged_paged_attention)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want[0]), rtol=1e-5, atol=1e-5)
    cu, kv_lens, num_seqs = tpu_attention.sequence_ranges(layout)
    assert int(num_seqs[0]) == 4 and list(np.asarray(kv_lens)[:4]) == [8, 3, 24, 3]
    with pytest.raises(ValueError, match="engine.attention_impl='tpu' needs a TPU"):
        ak.resolve_impl("tpu", "cpu")


def test_the_tpu_kernel_is_used_on_one_device_meshes_only(monkeypatch):
    # XLA does not partition a Mosaic kernel: sharded TPU meshes fall back to the reference
    monkeypatch.setattr(ak, "resolve_impl", lambda impl, backend=None: "tpu")
    cfg = ModelConfig(vocab_size=64, embed_dim=32, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8,
                      mlp_dim=64, max_seq_len=64)
    assert model_runner.step_settings(cfg, make_mesh(1, 1), "auto")["attention_impl"] == "tpu"
    assert model_runner.step_settings(cfg, make_mesh(1, 2), "auto")["attention_impl"] == "reference"
    with pytest.raises(ValueError, match="one-device mesh only"):
        model_runner.step_settings(cfg, make_mesh(1, 2), "tpu")
