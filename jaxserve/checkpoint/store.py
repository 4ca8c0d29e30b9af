"""jaxserve's own checkpoint: orbax / tensorstore params plus model and tokenizer metadata.

Layout of a checkpoint directory:
    model.json        ModelConfig fields
    tokenizer.json, tokenizer_config.json
    params/           orbax PyTree checkpoint (tensorstore zarr arrays)
Restoring reads each array straight into the target sharding: a device reads only its shards.
`path` is anything jaxserve.paths takes: a local directory, file:// or gs://.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import orbax.checkpoint as ocp

from jaxserve import paths
from jaxserve.model.config import ModelConfig, model_config_from_dict
from jaxserve.model.params import abstract_params, check_params
from jaxserve.model.sharding import param_shardings

MODEL_FILE = "model.json"
PARAMS_DIR = "params"


def is_checkpoint(path: str) -> bool:
    return (paths.as_path(path) / MODEL_FILE).exists()


def save(path: str, cfg: ModelConfig, params: dict, tokenizer=None) -> None:
    """Writes params (any placement) in cfg.dtype, with the model config and tokenizer beside them."""
    root = paths.as_path(path)
    root.mkdir(parents=True, exist_ok=True)
    (root / MODEL_FILE).write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
    if tokenizer is not None:
        tokenizer.save(str(root))
    arrays = jax.tree.map(lambda x: jax.numpy.asarray(x, cfg.jnp_dtype), params)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(root / PARAMS_DIR, arrays, force=True)


def load_config(path: str, **overrides) -> ModelConfig:
    model_path = paths.as_path(path) / MODEL_FILE
    if not model_path.exists():
        raise FileNotFoundError(f"jaxserve checkpoint not found: {model_path} is missing")
    try:
        fields = json.loads(model_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{model_path}: invalid JSON ({e})") from e
    fields.update(overrides)
    return model_config_from_dict(fields)


def restore(path: str, cfg: ModelConfig, mesh, rules=None) -> dict:
    """Reads params directly into the shardings `mesh` gives them (any mesh, any dtype)."""
    params_path = paths.as_path(path) / PARAMS_DIR
    if not params_path.is_dir():
        raise FileNotFoundError(f"jaxserve checkpoint has no params: {params_path} is missing")
    kwargs = {} if rules is None else {"rules": rules}
    shardings = param_shardings(cfg, mesh, **kwargs)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg), shardings)
    try:
        with ocp.StandardCheckpointer() as ckpt:
            params = ckpt.restore(params_path, target)
    except Exception as e:
        raise ValueError(f"{params_path}: cannot restore params ({type(e).__name__}: {e})") from e
    check_params(params, cfg, params_path)
    return params
