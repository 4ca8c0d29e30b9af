"""Simulator settings of published systems: their model, GPU and memory as step costs.

FastServe's artifact setting: OPT-13B fp16 on one A100-80GB, analytical step costs (the
derivation is in docs/benchmarks.md, "Simulator in FastServe's artifact setting").
"""
from __future__ import annotations

import numpy as np

from jaxserve.scheduling.cost_model import CostModel
from jaxserve.sim.simulator import SimConfig


def fastserve_setting():
    """OPT-13B fp16 on one A100-80GB: analytical step costs (see docs/benchmarks.md for the derivation)."""
    weights_s = 26e9 / 2.0e12                     # stream 26 GB of weights at 2 TB/s
    kv_token = 2 * 40 * 5120 * 2                  # bytes of K and V per token
    flops_token = 2 * 13e9                        # forward flops per token
    coef = np.array([
        1e-3, flops_token / (312e12 * 0.6), 4 * 5120 * 40 / (312e12 * 0.6),   # prefill: call, token, qk pair
        weights_s, flops_token / (312e12 * 0.3), kv_token / 2.0e12,          # decode: call, token, context token
        1 / 25e9])                                                           # swap over PCIe 4
    cost = CostModel(coef=coef, page_size=16, max_batch=16, max_chunk=2048, max_pages=128, page_bytes=kv_token * 16)
    kv_pages = int((80e9 - 26e9 - 4e9) / (kv_token * 16))
    return cost, SimConfig(num_pages=kv_pages, page_size=16, host_pages=4 * kv_pages, max_batch=16,
                           token_budget=2048, max_chunk=2048, bytes_per_page=kv_token * 16,
                           overlap_swaps=True)
