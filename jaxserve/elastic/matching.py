"""Mapping a new mesh onto the devices that remain, reusing what is already resident.

SpotServe's device mapper: Kuhn-Munkres matching (`scipy.optimize.linear_sum_assignment`)
that maximises the bytes each device already holds for the position it is given. Matching
is two-level, as in SpotServe: new replicas are first matched to old replicas (so that a
replica's KV cache stays together), then each replica's model-axis positions to devices.

A position is a model-axis index, or (stage, index) when replicas are pipelined (the spot
simulator's SpotServe setting): a stage holds a slice of the layers, an index a slice of each.
"""
from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment


def shard_range(index: int, parts: int, size: int) -> tuple:
    """The [start, stop) slice of a dimension of `size` that shard `index` of `parts` holds."""
    step = size // parts
    return index * step, (index + 1) * step


def overlap_fraction(old_index: int, old_parts: int, new_index: int, new_parts: int) -> float:
    """Fraction of new shard `new_index`/`new_parts` already inside old shard `old_index`/`old_parts`."""
    a0, a1 = old_index / old_parts, (old_index + 1) / old_parts
    b0, b1 = new_index / new_parts, (new_index + 1) / new_parts
    return max(0.0, min(a1, b1) - max(a0, b0)) * new_parts


def position_overlap(old_index, old_size, new_index, new_size) -> float:
    """overlap_fraction for positions that are ints (model index) or (stage, index) pairs."""
    if not isinstance(old_index, tuple):
        old_index, old_size = (0, old_index), (1, old_size)
    if not isinstance(new_index, tuple):
        new_index, new_size = (0, new_index), (1, new_size)
    frac = 1.0
    for oi, os_, ni, ns in zip(old_index, old_size, new_index, new_size):
        frac *= overlap_fraction(oi, os_, ni, ns)
    return frac


class Mapping(NamedTuple):
    """A new mesh on the surviving devices."""
    groups: List[List[object]]   # per new replica, its devices in (stage-major) position order
    heirs: List[Optional[int]]   # per new replica, the old replica it inherits (KV, requests), if any


def match(old_placement: Dict[object, tuple], survivors: Sequence[object], data: int, model: int,
          param_bytes: float, kv_bytes: Dict[int, float], pipe: int = 1) -> Mapping:
    """Chooses which surviving device takes each position of a new (data, model[, pipe]) mesh.

    old_placement: device -> (old replica, old position, old layout) for devices that held a
    replica: position a model index and layout the model size, or (stage, index) and
    (pipe, model). kv_bytes: old replica -> bytes of KV its requests hold (split over its devices).
    Returns the new replicas' devices and the old replica each inherits (matching's level 1).
    """
    per_replica = model * pipe
    if data * per_replica > len(survivors):
        raise ValueError(f"mesh {data}x{model}x{pipe} needs {data * per_replica} devices, {len(survivors)} remain")
    old_replicas = sorted({p[0] for p in old_placement.values()})
    layout = model if pipe == 1 else (pipe, model)
    slots = list(range(model)) if pipe == 1 else [(s, m) for s in range(pipe) for m in range(model)]

    def resident(device, position, old_replica=None):
        """Bytes `device` already holds for `position` (params always; KV if its replica)."""
        if device not in old_placement:
            return 0.0
        rep, idx, size = old_placement[device]
        frac = position_overlap(idx, size, position, layout)
        kv = kv_bytes.get(rep, 0.0) / per_replica if old_replica is not None and rep == old_replica else 0.0
        return frac * (param_bytes / per_replica + kv)

    # Level 1: new replicas <- old replicas, by the bytes the old replica's survivors could keep.
    assign_old = [None] * data
    if old_replicas:
        w = np.zeros((data, len(old_replicas)))
        for j, rep in enumerate(old_replicas):
            members = [d for d in survivors if old_placement.get(d, (None,))[0] == rep]
            w[:, j] = sum(max(resident(d, m, rep) for m in slots) for d in members)
        rows, cols = linear_sum_assignment(w, maximize=True)
        for r, c in zip(rows, cols):
            assign_old[r] = old_replicas[c]
    # Level 2: all positions x devices, KV counted only for the old replica each new one inherits.
    positions = [(r, m) for r in range(data) for m in slots]
    w = np.array([[resident(d, m, assign_old[r]) for d in survivors] for r, m in positions])
    # a small preference for keeping an inherited replica's devices together breaks ties
    for i, (r, m) in enumerate(positions):
        for j, d in enumerate(survivors):
            if d in old_placement and old_placement[d][0] == assign_old[r]:
                w[i, j] += 1e-6
    rows, cols = linear_sum_assignment(w, maximize=True)
    groups = [[None] * per_replica for _ in range(data)]
    for i, j in zip(rows, cols):
        r, m = positions[i]
        groups[r][slots.index(m)] = survivors[j]
    return Mapping(groups, assign_old)


def resident_bytes(groups, old_placement, param_bytes, model: int, pipe: int = 1) -> float:
    """Parameter bytes a mapping keeps in place (for reports, tests and the spot simulator)."""
    layout = model if pipe == 1 else (pipe, model)
    slots = list(range(model)) if pipe == 1 else [(s, m) for s in range(pipe) for m in range(model)]
    total = 0.0
    for group in groups:
        for position, d in zip(slots, group):
            if d in old_placement:
                _, idx, size = old_placement[d]
                total += position_overlap(idx, size, position, layout) * param_bytes / (model * pipe)
    return total


def in_rank_order(num_old_replicas: int, devices: Sequence, data: int, replica_devices: int) -> tuple:
    """(groups, heirs) with no mapper: devices taken in order, new replica i inheriting old
    replica i (SpotServe's ablation without the device mapper)."""
    groups = [list(devices[i * replica_devices:(i + 1) * replica_devices]) for i in range(data)]
    return groups, [i if i < num_old_replicas else None for i in range(data)]
