"""The parameter tree of the decoder: shapes and logical axis names.

Every leaf has a `ParamSpec` giving its shape and the logical name of each axis; the
sharding rules table (jaxserve.model.sharding) turns those names into mesh axes.
Layers are stacked on a leading `layers` axis so that the forward pass can `lax.scan` them.

The projections that read the same input are stored concatenated, so that a decode step runs
one GEMM where it would run several under-filled ones (H100, Llama-3-8B shape, all layers:
5.97 -> 5.33 ms at 2 rows; see docs/benchmarks.md): q, k and v as `wqkv` [E, K, G + 2, D],
grouped by kv head (its G query heads, then its key, then its value), and gate and up as
`w_gate_up` [E, 2, F]. Grouping by kv head keeps the tensor-parallel split a plain split of
the `kv_heads` axis for every mesh size, so resharding never re-lays out the weights.
"""
from __future__ import annotations

import dataclasses

import jax
import numpy as np

from jaxserve.model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    axes: tuple  # one logical axis name per dimension

    def __post_init__(self):
        assert len(self.shape) == len(self.axes), (self.shape, self.axes)


def param_specs(cfg: ModelConfig) -> dict:
    """The parameter tree of `cfg`, with a ParamSpec at every leaf."""
    L, E, H, K, D, F, V = (cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads,
                           cfg.head_dim, cfg.mlp_dim, cfg.vocab_size)
    G = H // K
    layers = {
        "attn_norm": ParamSpec((L, E), ("layers", "norm")),
        "wqkv": ParamSpec((L, E, K, G + 2, D), ("layers", "embed", "kv_heads", "qkv", "head_dim")),
        "wo": ParamSpec((L, H, D, E), ("layers", "heads", "head_dim", "embed")),
        "mlp_norm": ParamSpec((L, E), ("layers", "norm")),
        "w_gate_up": ParamSpec((L, E, 2, F), ("layers", "embed", "gate_up", "mlp")),
        "w_down": ParamSpec((L, F, E), ("layers", "mlp", "embed")),
    }
    if cfg.qkv_bias:
        layers["bqkv"] = ParamSpec((L, K, G + 2, D), ("layers", "kv_heads", "qkv", "head_dim"))
    specs = {
        "embed": ParamSpec((V, E), ("vocab", "embed")),
        "layers": layers,
        "final_norm": ParamSpec((E,), ("norm",)),
    }
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((E, V), ("embed", "vocab"))
    return specs


def fuse_projections(layers: dict, cfg: ModelConfig) -> dict:
    """Stacked per-layer host arrays with separate wq, wk, wv (bq, bk, bv), w_gate and w_up, as
    the checkpoint formats store them -> the fused layout of `param_specs`."""
    L, E, H, K, D = cfg.num_layers, cfg.embed_dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    G = H // K
    out = dict(layers)
    q, k, v = (out.pop(n) for n in ("wq", "wk", "wv"))
    out["wqkv"] = np.concatenate([q.reshape(L, E, K, G, D), k[:, :, :, None], v[:, :, :, None]], axis=3)
    if "bq" in out:
        bq, bk, bv = (out.pop(n) for n in ("bq", "bk", "bv"))
        out["bqkv"] = np.concatenate([bq.reshape(L, K, G, D), bk[:, :, None], bv[:, :, None]], axis=2)
    out["w_gate_up"] = np.stack([out.pop("w_gate"), out.pop("w_up")], axis=2)
    return out


def is_spec(x) -> bool:
    return isinstance(x, ParamSpec)


def abstract_params(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs for every parameter (no memory is allocated)."""
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.jnp_dtype),
                        param_specs(cfg), is_leaf=is_spec)


def check_params(params: dict, cfg: ModelConfig, source: str) -> None:
    """Raises a clear error when a loaded tree does not match the architecture's shapes."""
    want = jax.tree.flatten_with_path(param_specs(cfg), is_leaf=is_spec)[0]
    have = dict(jax.tree.flatten_with_path(params)[0])
    for path, spec in want:
        name = jax.tree_util.keystr(path)
        if path not in have:
            raise ValueError(f"{source}: parameter {name} is missing")
        if tuple(have[path].shape) != spec.shape:
            raise ValueError(f"{source}: parameter {name} has shape {tuple(have[path].shape)}, "
                             f"expected {spec.shape}")
    extra = set(have) - {p for p, _ in want}
    if extra:
        raise ValueError(f"{source}: unexpected parameters {sorted(jax.tree_util.keystr(p) for p in extra)}")
