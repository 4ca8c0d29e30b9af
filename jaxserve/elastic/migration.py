"""Moving arrays onto a new mesh so that only missing shards travel.

`reshard` assembles each device's new shard from the old shards: a device that already holds
exactly its new slice keeps the buffer (no copy); otherwise the pieces are sliced on devices
that hold them and copied over. It counts the bytes that crossed devices. Arrays are sharded
on at most one dimension (true of every rule in model.sharding).
"""
from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _bounds(index, shape) -> Tuple[Tuple[int, int], ...]:
    return tuple((s.start or 0, shape[i] if s.stop is None else s.stop) for i, s in enumerate(index))


def reshard(x: jax.Array, sharding, lost=frozenset()) -> Tuple[jax.Array, int]:
    """(x placed with `sharding`, bytes copied between devices). Shards on `lost` devices are not read.

    Raises LookupError when some slice is held only by lost devices.
    """
    shape = x.shape
    sources = [(s.device, _bounds(s.index, shape), s.data) for s in x.addressable_shards if s.device not in lost]
    itemsize = np.dtype(x.dtype).itemsize
    pieces, moved = [], 0
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        want = _bounds(index, shape)
        same = [d for dev, b, d in sources if dev == device and b == want]
        if same:  # already resident: reuse the buffer
            pieces.append(same[0])
            continue
        split = {i for _, b, _ in sources for i in range(len(shape)) if b[i] != (0, shape[i])}
        dims = sorted(split | {i for i in range(len(shape)) if want[i] != (0, shape[i])}) or [0]
        if len(dims) > 1:
            raise NotImplementedError("arrays sharded on more than one dimension")
        dim = dims[0]
        lo, hi = want[dim]
        parts, pos = [], lo
        while pos < hi:  # walk the slice, taking each piece from the closest holder
            holders = [(dev != device, dev, b, d) for dev, b, d in sources
                       if b[dim][0] <= pos < b[dim][1] and all(b[i] == (0, shape[i]) for i in range(len(shape)) if i != dim)]
            if not holders:
                raise LookupError(f"slice {pos} of dim {dim} is held only by lost devices")
            remote, dev, b, data = min(holders, key=lambda h: h[0])
            end = min(hi, b[dim][1])
            piece = jax.lax.slice_in_dim(data, pos - b[dim][0], end - b[dim][0], axis=dim)
            if remote:
                piece = jax.device_put(piece, device)
                moved += piece.size * itemsize
            parts.append(piece)
            pos = end
        pieces.append(parts[0] if len(parts) == 1 else jax.device_put(jnp.concatenate(parts, axis=dim), device))
    return jax.make_array_from_single_device_arrays(shape, sharding, pieces), moved


def reshard_tree(tree, shardings, lost=frozenset()) -> Tuple[object, int]:
    leaves, treedef = jax.tree.flatten(tree)
    out, total = [], 0
    for x, s in zip(leaves, jax.tree.leaves(shardings)):
        y, moved = reshard(x, s, lost)
        out.append(y)
        total += moved
    return jax.tree.unflatten(treedef, out), total


def device_bytes(tree) -> Dict[object, int]:
    """Bytes each device holds of a tree of arrays."""
    held: Dict[object, int] = {}
    for x in jax.tree.leaves(tree):
        for s in x.addressable_shards:
            held[s.device] = held.get(s.device, 0) + s.data.nbytes
    return held


def live_device_bytes() -> Dict[object, int]:
    """Bytes each device holds in live arrays, each buffer counted once (an array and the
    per-device arrays it is made of share theirs)."""
    buffers: Dict[tuple, int] = {}
    for x in jax.live_arrays():
        for s in x.addressable_shards:
            buffers[(s.device, s.data.unsafe_buffer_pointer())] = s.data.nbytes
    held: Dict[object, int] = {}
    for (device, _), n in buffers.items():
        held[device] = held.get(device, 0) + n
    return held
