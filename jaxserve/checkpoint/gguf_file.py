"""Reading a GGUF file (llama.cpp's format): architecture, dequantized weights and tokenizer.

The `gguf` package parses and dequantizes; this module maps llama.cpp names onto Hugging Face
names (undoing llama.cpp's rotary permutation of q/k) and hands them to checkpoint.layout.
"""
from __future__ import annotations

import os

import numpy as np

from jaxserve.checkpoint.layout import params_from_hf_tensors
from jaxserve.model.config import ModelConfig

_GGUF_TO_HF = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def open_gguf(path: str):
    import gguf
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF checkpoint not found: {path}")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises assorted errors on a damaged file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def metadata(reader) -> dict:
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key not in (
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
            continue  # large arrays, read on demand
        try:
            out[key] = field.contents()
        except Exception:
            continue
    return out


def model_config(meta: dict, path: str, **overrides) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: architecture {arch!r} is not supported (llama, qwen2 are)")

    def get(key, default=None):
        full = f"{arch}.{key}"
        if full not in meta and default is None:
            raise ValueError(f"{path}: metadata field {full!r} is missing")
        return meta.get(full, default)

    embed, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", embed // heads))
    rope_scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "llama3":  # rarely stored; Llama-3.1 GGUFs bake it into rope_freqs
        raise ValueError(f"{path}: GGUF Llama-3 rope scaling is not supported yet; convert from HF instead")
    vocab = int(get("vocab_size", 0)) or len(meta.get("tokenizer.ggml.tokens", [])) or None
    eos = meta.get("tokenizer.ggml.eos_token_id")
    fields = dict(
        arch=arch, vocab_size=vocab, embed_dim=embed, num_layers=int(get("block_count")),
        num_heads=heads, num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
        mlp_dim=int(get("feed_forward_length")), max_seq_len=int(get("context_length")),
        rms_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)), rope_scaling=rope_scaling,
        qkv_bias=(arch == "qwen2"), bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else ())
    fields.update(overrides)
    return ModelConfig(**fields)


def _unpermute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp stores q/k rows pairwise-interleaved per head; HF uses rotate-half order."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def load_gguf(path: str, **config_overrides):
    """Returns (ModelConfig, float32 numpy params, reader) for a GGUF file."""
    import gguf
    reader = open_gguf(path)
    meta = metadata(reader)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    cfg = model_config(meta, path, tie_embeddings=not has_output, **config_overrides)
    tensors = {}
    for t in reader.tensors:
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, kind, kind2 = name.split(".")
            if kind not in _GGUF_TO_HF:
                continue
            hf = f"model.layers.{idx}.{_GGUF_TO_HF[kind]}.{kind2}"
        else:
            continue
        tensors[hf] = t

    def get(hf_name):
        t = tensors[hf_name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if cfg.arch == "llama" and (".q_proj." in hf_name or ".k_proj." in hf_name):
            w = _unpermute_rotary(w, cfg.num_heads if ".q_proj." in hf_name else cfg.num_kv_heads)
        return w

    params = params_from_hf_tensors(get, set(tensors), cfg, path)
    return cfg, params, reader
