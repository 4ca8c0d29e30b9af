"""Reading a Hugging Face model directory: config.json, *.safetensors and tokenizer.json."""
from __future__ import annotations

import glob
import json
import os

import numpy as np

from jaxserve.checkpoint.layout import params_from_hf_tensors
from jaxserve.model.config import ModelConfig, RopeScaling

_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}


def model_config(hf: dict, path: str, **overrides) -> ModelConfig:
    archs = hf.get("architectures") or []
    arch = next((_ARCHITECTURES[a] for a in archs if a in _ARCHITECTURES), None)
    if arch is None:
        raise ValueError(f"{path}: architecture {archs or hf.get('model_type')!r} is not supported "
                         f"(supported: {sorted(_ARCHITECTURES)})")
    try:
        heads = hf["num_attention_heads"]
        embed = hf["hidden_size"]
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = None
        if rope.get("rope_type", rope.get("type")) == "llama3":
            scaling = RopeScaling(rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                                  rope["original_max_position_embeddings"])
        eos = hf.get("eos_token_id")
        eos = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        fields = dict(
            arch=arch, vocab_size=hf["vocab_size"], embed_dim=embed, num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or embed // heads, mlp_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), rms_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta), rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=bool(hf.get("attention_bias", arch == "qwen2")),
            bos_token_id=hf.get("bos_token_id"), eos_token_ids=eos)
    except KeyError as e:
        raise ValueError(f"{path}: config.json lacks field {e.args[0]!r}") from e
    fields.update(overrides)
    return ModelConfig(**fields)


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Hugging Face config not found: {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e


def load_hf_dir(directory: str, **config_overrides):
    """Returns (ModelConfig, float32 numpy params) for a Hugging Face checkpoint directory."""
    from safetensors import safe_open
    cfg = model_config(read_config(directory), os.path.join(directory, "config.json"), **config_overrides)
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files")
    handles, where = [], {}
    for path in files:
        try:
            h = safe_open(path, framework="flax")  # flax: keeps bfloat16 readable
        except Exception as e:
            raise ValueError(f"{path}: not a readable safetensors file ({e})") from e
        handles.append(h)
        for name in h.keys():
            where[name] = h
    if cfg.tie_embeddings is False and "lm_head.weight" not in where:
        cfg = cfg.replace(tie_embeddings=True)

    def get(name):
        return np.asarray(where[name].get_tensor(name), dtype=np.float32)

    return cfg, params_from_hf_tensors(get, set(where), cfg, directory)
