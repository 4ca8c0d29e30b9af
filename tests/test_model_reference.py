"""The JAX model against Hugging Face transformers on the same SmolLM2 weights (float32, CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.dense_generate import generate
from jaxserve.model import llama
from jaxserve.model.sharding import make_mesh, shard_params

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "In 1969, Neil Armstrong became the first person to",
    "Translate to French: I like apples. ->",
]


def jax_logits(cfg, params, ids, unroll_layers=False, gemm_rows=()):
    tokens = np.asarray([ids], np.int32)
    positions = np.arange(len(ids), dtype=np.int32)[None]
    cache = llama.init_dense_cache(cfg, 1, 64)
    fwd = jax.jit(lambda p, t, q, c: llama.forward(p, t, q, c, cfg, unroll_layers=unroll_layers,
                                                   gemm_rows=gemm_rows))
    logits, _ = fwd(params, tokens, positions, cache)
    return np.asarray(logits)[0]


@pytest.fixture(scope="module")
def device_params(smollm2):
    cfg, params, _ = smollm2
    return shard_params(params, cfg, make_mesh(1, 1))


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers(smollm2, hf_smollm2, device_params, prompt):
    cfg, _, tok = smollm2
    ids = tok.encode(prompt)
    with torch.no_grad():
        ref = hf_smollm2(torch.tensor([ids])).logits[0].numpy()
    ours = jax_logits(cfg, device_params, ids)
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    assert rel < 1e-4, rel
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_continuations_match_transformers(smollm2, hf_smollm2, device_params):
    cfg, _, tok = smollm2
    mesh = make_mesh(1, 1)
    prompts = [tok.encode(p) for p in PROMPTS[:3]]
    ours = generate(device_params, cfg, mesh, prompts, 32)  # one batch of mixed lengths
    for ids, got in zip(prompts, ours):
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                      pad_token_id=0)[0, len(ids):].tolist()
        # transformers stops at EOS; up to there (or all 32 tokens) the sequences must agree
        assert len(ref) == 32 or ref[-1] in cfg.eos_token_ids
        assert got[:len(ref)] == ref


def test_mesh_2x4_logits_equal_single_device(smollm2, device_params):
    cfg, params, tok = smollm2
    mesh = make_mesh(2, 4)
    sharded = shard_params(params, cfg, mesh)
    assert sharded["layers"]["w_gate_up"].sharding.spec[3] == "model"  # the MLP is really split
    assert len(sharded["embed"].addressable_shards) == 8
    prompts = [tok.encode(PROMPTS[0]), tok.encode(PROMPTS[2])]
    n = max(map(len, prompts))
    tokens = np.zeros((2, n), np.int32)
    positions = np.full((2, n), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], positions[i, :len(p)] = p, np.arange(len(p))

    def run(p, mesh):
        cache = llama.init_dense_cache(cfg, 2, 32)
        sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "data"))
        fwd = jax.jit(lambda p, t, q, c: llama.forward(p, t, q, c, cfg))
        return np.asarray(fwd(p, jax.device_put(tokens, sh), jax.device_put(positions, sh), cache)[0])

    single = run(device_params, make_mesh(1, 1))
    multi = run(sharded, mesh)
    for i, p in enumerate(prompts):
        np.testing.assert_allclose(multi[i, :len(p)], single[i, :len(p)], rtol=0, atol=2e-4)
        assert (multi[i, :len(p)].argmax(-1) == single[i, :len(p)].argmax(-1)).all()


def test_unrolled_layers_give_the_scanned_logits(smollm2, device_params):
    # engine.unroll_layers=on runs the layers as a Python loop instead of a scan
    cfg, _, tok = smollm2
    ids = tok.encode(PROMPTS[2])
    scanned = jax_logits(cfg, device_params, ids)
    unrolled = jax_logits(cfg, device_params, ids, unroll_layers=True)
    np.testing.assert_allclose(unrolled, scanned, rtol=0, atol=1e-4)
    assert (unrolled.argmax(-1) == scanned.argmax(-1)).all()


def test_padded_gemm_rows_give_the_same_logits(smollm2, device_params):
    # the GPU pads some layer products' rows where cuBLAS runs the padded shape faster (gemm_rows)
    cfg, _, tok = smollm2
    ids = tok.encode(PROMPTS[0])
    plain = jax_logits(cfg, device_params, ids)
    pads = tuple((name, len(ids) + extra) for name, extra in
                 (("wqkv", 8), ("wo", 16), ("w_gate_up", 8), ("w_down", 24)))
    padded = jax_logits(cfg, device_params, ids, gemm_rows=pads)
    np.testing.assert_allclose(padded, plain, rtol=0, atol=1e-4)
    assert (padded.argmax(-1) == plain.argmax(-1)).all()


def test_bfloat16_runs_close_to_float32(smollm2, device_params):
    cfg, params, tok = smollm2
    bf = cfg.replace(dtype="bfloat16")
    ids = tok.encode(PROMPTS[0])
    f32 = jax_logits(cfg, device_params, ids)
    b16 = jax_logits(bf, shard_params(params, bf, make_mesh(1, 1)), ids)
    assert jnp.asarray(b16).dtype == jnp.float32  # logits are always float32
    assert np.abs(b16 - f32).max() / np.abs(f32).max() < 0.1
    assert b16[-1].argmax() == f32[-1].argmax()
