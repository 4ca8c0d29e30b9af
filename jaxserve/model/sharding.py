"""Meshes and the one rules table mapping logical axis names onto mesh axes.

A single device is a 1x1 mesh; nothing in the model knows how many devices there are. Trees
are placed onto meshes here too: host arrays (`shard_params`) or random weights drawn on the
devices (`init_random_on_device`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.model.config import ModelConfig
from jaxserve.model.params import is_spec, param_specs

MESH_AXES = ("data", "model")

# Logical axis -> mesh axis. Tensor parallelism shards heads, the MLP and the vocabulary over
# `model`; requests (batch) are spread over `data`. Everything else is replicated.
RULES = (
    ("batch", "data"),
    ("vocab", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("mlp", "model"),
    ("embed", None),
    ("head_dim", None),
    ("qkv", None),
    ("gate_up", None),
    ("norm", None),
    ("layers", None),
    ("seq", None),
    ("pages", None),
    ("page_slot", None),
)


def make_mesh(data: int = 1, model: int = 1, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: the first data*model local devices)."""
    if data < 1 or model < 1:
        raise ValueError(f"mesh.data={data} and mesh.model={model} must both be >= 1")
    if devices is None:
        available = jax.devices()
        if data * model > len(available):
            hint = (f" (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={data * model} before the "
                    "process starts gives that many CPU devices)" if available[0].platform == "cpu" else "")
            raise ValueError(f"mesh.data*mesh.model={data * model} exceeds the {len(available)} "
                             f"devices available{hint}")
        devices = available[: data * model]
    return Mesh(np.asarray(devices).reshape(data, model), MESH_AXES)


def _mesh_axes(axes: Sequence[str], shape: Sequence[int], sizes, rules) -> list:
    """The mesh axis of each dim (None: replicated); a dim the mesh axis does not divide is replicated."""
    spec = nn.logical_to_mesh_axes(tuple(axes), rules)
    return [a if a is not None and dim % sizes[a] == 0 else None for dim, a in zip(shape, spec)]


def logical_to_spec(axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules=RULES) -> P:
    """PartitionSpec for an array with logical `axes`; a dim the mesh axis does not divide is replicated."""
    return P(*_mesh_axes(axes, shape, mesh.shape, rules))


def bytes_per_device(axes: Sequence[str], shape: Sequence[int], itemsize: int, data: int = 1, model: int = 1,
                     rules=RULES) -> int:
    """What each device of a (data, model) mesh holds of an array with logical `axes` (no mesh needed)."""
    sizes = {"data": data, "model": model}
    n = itemsize
    for dim, a in zip(shape, _mesh_axes(axes, shape, sizes, rules)):
        n *= dim // sizes[a] if a is not None else dim
    return n


def param_bytes_per_device(cfg, model: int = 1, rules=RULES) -> int:
    """What each device of a replica with tensor-parallel degree `model` holds of the params."""
    itemsize = np.dtype(cfg.jnp_dtype).itemsize
    return sum(bytes_per_device(s.axes, s.shape, itemsize, 1, model, rules)
               for s in jax.tree.leaves(param_specs(cfg), is_leaf=is_spec))


def logical_sharding(axes: Sequence[str], shape: Sequence[int], mesh: Mesh, rules=RULES) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))


def param_shardings(cfg, mesh: Mesh, rules=RULES) -> dict:
    """NamedSharding for every parameter of `cfg` on `mesh`."""
    return jax.tree.map(lambda s: logical_sharding(s.axes, s.shape, mesh, rules),
                        param_specs(cfg), is_leaf=is_spec)


def shard_params(params: dict, cfg, mesh: Mesh, rules=RULES) -> dict:
    """Places a (host or device) parameter tree onto `mesh`, cast to the model dtype."""
    shardings = param_shardings(cfg, mesh, rules)
    dtype = cfg.jnp_dtype
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x).astype(dtype) if isinstance(x, np.ndarray) else x.astype(dtype), s),
                        params, shardings)


def init_random_on_device(cfg: ModelConfig, mesh, seed: int = 0) -> dict:
    """Random weights drawn on the devices, in cfg's dtype and already in their shardings.

    The scale of a trained model, for tests and benchmarks; each leaf is one jitted draw, so a
    multi-GB model is made in seconds (drawn on the host and copied, it took minutes).
    """
    E, F, HD = cfg.embed_dim, cfg.mlp_dim, cfg.num_heads * cfg.head_dim
    fan_in = {"wqkv": E, "wo": HD, "w_gate_up": E, "w_down": F, "lm_head": E}
    dtype = cfg.jnp_dtype
    specs, treedef = jax.tree.flatten_with_path(param_specs(cfg), is_leaf=is_spec)
    shardings = jax.tree.leaves(param_shardings(cfg, mesh))
    root = jax.random.key(seed)
    leaves = []
    for i, ((path, s), sharding) in enumerate(zip(specs, shardings)):
        name = path[-1].key
        if s.axes[-1] == "norm":
            loc, std = 1.0, 0.1
        else:
            loc, std = 0.0, (1.0 / np.sqrt(fan_in[name]) if name in fan_in else 0.02)
        draw = jax.jit(lambda k, loc=loc, std=std, shape=s.shape:
                       (loc + std * jax.random.normal(k, shape, jnp.float32)).astype(dtype),
                       out_shardings=sharding)
        leaves.append(draw(jax.random.fold_in(root, i)))
    return jax.tree.unflatten(treedef, leaves)
