"""Choosing a parallel configuration for the devices at hand (SpotServe's objective).

Among (data, model, pipe) shapes that fit the devices and their memory, pick the lowest
estimated latency whose throughput covers the demand; if none does, the highest throughput.
Memory is either what an engine really allocates (a `MemoryModel`: params at the replica's
degree and its preallocated KV pool on each device, its host page pool on the host), or, as
SpotServe's planner counts it, the params plus the in-flight KV. The engine serves without
pipeline stages (pipe = 1); the spot simulator also plans pipelined replicas, as SpotServe does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, List, Optional


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int
    model: int
    latency_s: float = 0.0       # the estimate `step_time` gave
    throughput: float = 0.0      # data * batch / latency_s
    pipe: int = 1

    @property
    def num_devices(self) -> int:
        return self.data * self.model * self.pipe

    @property
    def replica_devices(self) -> int:
        return self.model * self.pipe


@dataclasses.dataclass(frozen=True)
class MemoryModel:
    """What one replica allocates, the way the engine allocates it.

    replica_device_bytes(model): bytes on each device of a replica of tensor-parallel degree
    `model` (its params at that degree and its share of the preallocated KV pool);
    host_bytes_per_replica: its host page pool at full use. The replicas share the host.
    """
    replica_device_bytes: Callable[[int], float]
    device_bytes: float
    host_bytes_per_replica: float = 0.0
    host_bytes: float = math.inf

    def fits(self, data: int, model: int, pipe: int = 1) -> bool:
        return (self.replica_device_bytes(model) / pipe <= self.device_bytes
                and data * self.host_bytes_per_replica <= self.host_bytes)

    def why_not(self, model: int) -> str:
        return (f"a replica of model={model} needs {self.replica_device_bytes(model) / 2**30:.3f} GiB a device "
                f"(params and KV pool; {self.device_bytes / 2**30:.3f} GiB there) and "
                f"{self.host_bytes_per_replica / 2**30:.3f} GiB of host memory "
                f"({self.host_bytes / 2**30:.3f} GiB there)")


def candidate_shapes(num_devices: int, num_kv_heads: int, max_pipe: int = 1, max_model: Optional[int] = None,
                     min_replica_devices: int = 1) -> List[tuple]:
    """(data, model, pipe): model a power of two dividing the KV heads (or 1), at most max_model;
    pipe up to max_pipe; each replica at least min_replica_devices; data*model*pipe <= devices."""
    shapes = []
    model = 1
    while model <= num_devices and (max_model is None or model <= max_model):
        if num_kv_heads % model == 0 or model == 1:
            for pipe in range(1, max_pipe + 1):
                if model * pipe < min_replica_devices:
                    continue
                for data in range(1, num_devices // (model * pipe) + 1):
                    shapes.append((data, model, pipe))
        model *= 2
    return shapes


def choose(num_devices: int, num_kv_heads: int, param_bytes: float, kv_bytes: float, device_bytes: float,
           step_time: Callable[..., float], batch_per_replica: int, arrival_tokens_per_s: float = 0.0,
           fixed: Optional[tuple] = None, max_pipe: int = 1, max_model: Optional[int] = None,
           min_replica_devices: int = 1, memory: Optional[MemoryModel] = None) -> ParallelConfig:
    """step_time(model, batch, pipe): estimated seconds of one replica's unit of work (a decode
    step, or a whole batch); the demand `arrival_tokens_per_s` is in units of batch per that.

    fixed: a (data, model) or (data, model, pipe) shape to evaluate instead of searching.
    memory: what a replica allocates; given, it replaces the params-plus-in-flight-KV count
    (`param_bytes`, `kv_bytes` and `device_bytes` are then not used for fitting).
    """
    if num_devices < 1:
        raise ValueError("no devices left to serve on")
    if fixed is not None:
        shapes = [tuple(fixed) + (1,) * (3 - len(fixed))]
    else:
        shapes = candidate_shapes(num_devices, num_kv_heads, max_pipe, max_model, min_replica_devices)
    best_fit, best_any = None, None
    for data, model, pipe in shapes:
        if memory is not None:
            if not memory.fits(data, model, pipe):
                continue
        elif param_bytes / (model * pipe) + kv_bytes / (data * model * pipe) > device_bytes:
            continue
        t = step_time(model, batch_per_replica, pipe)
        cfg = ParallelConfig(data, model, t, data * batch_per_replica / t, pipe)
        if cfg.throughput >= arrival_tokens_per_s:
            if best_fit is None or (cfg.latency_s, -cfg.throughput) < (best_fit.latency_s, -best_fit.throughput):
                best_fit = cfg
        if best_any is None or cfg.throughput > best_any.throughput:
            best_any = cfg
    chosen = best_fit or best_any
    if chosen is None and memory is not None:
        widest = max(model for _, model, _ in shapes)
        raise ValueError(f"no configuration of {num_devices} devices fits: {memory.why_not(widest)}")
    if chosen is None:
        raise ValueError(f"params ({param_bytes / 2**30:.1f} GiB) plus in-flight KV do not fit "
                         f"{num_devices} devices of {device_bytes / 2**30:.1f} GiB")
    return chosen
