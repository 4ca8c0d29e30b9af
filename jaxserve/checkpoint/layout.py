"""Converting Hugging Face-layout weight matrices into jaxserve's parameter tree.

Both the safetensors and the GGUF readers produce tensors named and shaped as in Hugging Face
(`q_proj.weight` is [heads*head_dim, embed], out x in); this module alone knows how they map
onto jaxserve's layout ([embed, heads, head_dim], in x out).
"""
from __future__ import annotations

import os
from typing import Callable

import numpy as np
import tqdm

from jaxserve.model.config import ModelConfig
from jaxserve.model.params import check_params, fuse_projections

# per-layer HF suffix -> (jaxserve name, converter from the HF matrix)
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm",
    "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "wq",
    "self_attn.k_proj.weight": "wk",
    "self_attn.v_proj.weight": "wv",
    "self_attn.o_proj.weight": "wo",
    "self_attn.q_proj.bias": "bq",
    "self_attn.k_proj.bias": "bk",
    "self_attn.v_proj.bias": "bv",
    "mlp.gate_proj.weight": "w_gate",
    "mlp.up_proj.weight": "w_up",
    "mlp.down_proj.weight": "w_down",
}


def _convert_layer_tensor(name: str, w: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    E, H, K, D = cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if name == "wq":
        return w.T.reshape(E, H, D)
    if name in ("wk", "wv"):
        return w.T.reshape(E, K, D)
    if name == "wo":
        return w.T.reshape(H, D, E)
    if name in ("w_gate", "w_up", "w_down"):
        return w.T
    if name == "bq":
        return w.reshape(H, D)
    if name in ("bk", "bv"):
        return w.reshape(K, D)
    return w  # norms


def params_from_hf_tensors(get: Callable[[str], np.ndarray], names: set, cfg: ModelConfig,
                           source: str) -> dict:
    """Builds the parameter tree from HF-named tensors; `get(name)` returns one as float32 numpy.
    A progress bar on stderr counts the tensors read (dequantizing a GGUF file takes a while)."""
    suffixes = [(s, ours) for s, ours in _LAYER_TENSORS.items() if cfg.qkv_bias or not ours.startswith("b")]
    total = len(suffixes) * cfg.num_layers + 2 + (not cfg.tie_embeddings)
    bar = tqdm.tqdm(total=total, desc=f"Loading {os.path.basename(source.rstrip('/'))}", unit="tensor",
                    dynamic_ncols=True)

    def need(name):
        if name not in names:
            raise ValueError(f"{source}: tensor {name!r} is missing")
        tensor = np.asarray(get(name), dtype=np.float32)
        bar.update(1)
        return tensor

    with bar:
        per_layer = {ours: np.stack([_convert_layer_tensor(ours, need(f"model.layers.{i}.{suffix}"), cfg)
                                     for i in range(cfg.num_layers)])
                     for suffix, ours in suffixes}
        params = {
            "embed": need("model.embed_tokens.weight"),
            "layers": fuse_projections(per_layer, cfg),
            "final_norm": need("model.norm.weight"),
        }
        if not cfg.tie_embeddings:
            params["lm_head"] = need("lm_head.weight").T
    check_params(params, cfg, source)
    return params
