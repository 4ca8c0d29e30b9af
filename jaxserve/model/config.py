"""Architecture hyper-parameters of a Llama-family decoder, and their validation."""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ARCHITECTURES = ("llama", "qwen2")


def dtype_from_name(name: str, field: str = "model.dtype"):
    """Returns the jnp dtype called `name`; a clear error names the field otherwise."""
    if name not in DTYPES:
        raise ValueError(f"{field}={name!r} is not a dtype jaxserve knows; use one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    embed_dim: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    max_seq_len: int = 2048
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[RopeScaling] = None
    tie_embeddings: bool = False
    qkv_bias: bool = False
    arch: str = "llama"
    dtype: str = "float32"
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple = ()

    def __post_init__(self):
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"model.arch={self.arch!r} is not supported; supported: {ARCHITECTURES}")
        dtype_from_name(self.dtype)
        for name in ("vocab_size", "embed_dim", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "mlp_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"model.{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} is not a multiple of "
                             f"model.num_kv_heads={self.num_kv_heads}")

    @property
    def jnp_dtype(self):
        return dtype_from_name(self.dtype)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def model_config_from_dict(d: dict) -> ModelConfig:
    """Builds a ModelConfig from a plain dict (e.g. an ml_collections section); unknown keys are errors."""
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - fields)
    if unknown:
        raise ValueError(f"unknown model config field(s): {', '.join('model.' + k for k in unknown)}")
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**dict(d["rope_scaling"]))
    else:
        d["rope_scaling"] = None
    if "eos_token_ids" in d:
        d["eos_token_ids"] = tuple(d["eos_token_ids"])
    return ModelConfig(**d)
