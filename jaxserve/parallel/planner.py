"""Choosing a parallel configuration for the devices at hand (SpotServe's objective).

Among (data, model) shapes that fit the devices and whose per-device memory holds the params
plus the in-flight KV, pick the lowest estimated latency whose throughput covers the arrival
rate; if none does, the highest throughput.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    data: int
    model: int
    latency_s: float = 0.0       # estimated time of one decode step
    throughput: float = 0.0      # estimated output tokens per second

    @property
    def num_devices(self) -> int:
        return self.data * self.model


def candidate_shapes(num_devices: int, num_kv_heads: int) -> List[tuple]:
    """(data, model) with model a power of two dividing the KV heads (or 1), data*model <= devices."""
    shapes = []
    model = 1
    while model <= num_devices:
        if num_kv_heads % model == 0 or model == 1:
            for data in range(1, num_devices // model + 1):
                shapes.append((data, model))
        model *= 2
    return shapes


def choose(num_devices: int, num_kv_heads: int, param_bytes: float, kv_bytes: float, device_bytes: float,
           step_time: Callable[[int, int], float], batch_per_replica: int, arrival_tokens_per_s: float = 0.0,
           fixed: Optional[tuple] = None) -> ParallelConfig:
    """step_time(model, batch): estimated decode step seconds of one replica with `model`-way TP."""
    if num_devices < 1:
        raise ValueError("no devices left to serve on")
    best_fit, best_any = None, None
    for data, model in ([fixed] if fixed else candidate_shapes(num_devices, num_kv_heads)):
        per_device = param_bytes / model + kv_bytes / (data * model)
        if per_device > device_bytes:
            continue
        t = step_time(model, batch_per_replica)
        cfg = ParallelConfig(data, model, t, data * batch_per_replica / t)
        if cfg.throughput >= arrival_tokens_per_s:
            if best_fit is None or (cfg.latency_s, -cfg.throughput) < (best_fit.latency_s, -best_fit.throughput):
                best_fit = cfg
        if best_any is None or cfg.throughput > best_any.throughput:
            best_any = cfg
    chosen = best_fit or best_any
    if chosen is None:
        raise ValueError(f"params ({param_bytes / 2**30:.1f} GiB) plus in-flight KV do not fit "
                         f"{num_devices} devices of {device_bytes / 2**30:.1f} GiB")
    return chosen
