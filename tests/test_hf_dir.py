"""Loading a Hugging Face directory: tiny random models that transformers saves in the test."""
import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from jaxserve.checkpoint.hf_dir import load_hf_dir
from jaxserve.model import llama
from jaxserve.model.sharding import make_mesh, shard_params

VARIANTS = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=False),
    "llama3_rope_tied": lambda: transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=64)),
    "qwen2_bias": lambda: transformers.Qwen2Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False),
}


def save_random_model(hf_config, directory, dtype=torch.float32):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(hf_config).to(dtype).eval()
    with torch.no_grad():  # make biases and norms non-trivial so that a mix-up shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_hf_directory_logits_match_transformers(tmp_path, variant):
    hf_config = VARIANTS[variant]()
    model = save_random_model(hf_config, tmp_path)
    cfg, params = load_hf_dir(str(tmp_path))
    assert cfg.tie_embeddings == hf_config.tie_word_embeddings
    assert (cfg.rope_scaling is not None) == (variant == "llama3_rope_tied")
    tokens = np.random.default_rng(0).integers(0, 256, size=(2, 100)).astype(np.int32)
    with torch.no_grad():
        ref = model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    positions = np.tile(np.arange(100, dtype=np.int32), (2, 1))
    p = shard_params(params, cfg, make_mesh(1, 1))
    ours, _ = jax.jit(lambda p, t, q, c: llama.forward(p, t, q, c, cfg))(
        p, tokens, positions, llama.init_dense_cache(cfg, 2, 128))
    ours = np.asarray(ours)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-4


def test_bfloat16_safetensors_load(tmp_path):
    save_random_model(VARIANTS["llama"](), tmp_path, dtype=torch.bfloat16)
    cfg, params = load_hf_dir(str(tmp_path), dtype="bfloat16")
    assert cfg.dtype == "bfloat16"
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    want = ref.model.layers[1].mlp.down_proj.weight.detach().numpy().T
    np.testing.assert_array_equal(params["layers"]["w_down"][1], want)


def test_unknown_architecture_is_named(tmp_path):
    save_random_model(VARIANTS["llama"](), tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*not supported"):
        load_hf_dir(str(tmp_path))


def test_missing_and_corrupt_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(str(tmp_path))
    save_random_model(VARIANTS["llama"](), tmp_path)
    weights = next(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))
    (tmp_path / weights).write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match=weights):
        load_hf_dir(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_hf_dir(str(tmp_path))
