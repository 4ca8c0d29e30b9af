"""Row padding for the layer GEMMs: tables measured per GPU kind, shipped with the package.

cuBLAS picks a GEMM's kernel from its shape by heuristic, and XLA gives it no alternatives to
time for these bf16 products. At a few row counts the pick is slow: on an H200 the 8B shape's
gate|up product took 97 us with 128 rows and 63 us with 144 (docs/benchmarks.md, issue 14).
`launch/tune_gemm_rows.py` times whole decode steps with each product padded in turn and writes
a table for the GPU kind; `llama` then pads a step's activations with zero rows (sliced off
after the product) where the table says so. Like vLLM's per-GPU kernel configs, a table is
data, keyed by the product's shape, so every model with those matrices uses it.
"""
from __future__ import annotations

import json
import os
import re
from typing import Callable, Dict, Optional, Sequence, Tuple

from jaxserve.model.config import ModelConfig

PAD_CANDIDATES = (8, 16)  # extra rows tried at each row count
MIN_SAVING_S = 4e-6  # per layer: about two kernels (the pad, and a residual add cuBLAS fused before)
TABLE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gemm_tables")
# A step's rows -> ((weight name, rows run), ...): hashable, a static argument of the step.
RowTable = Dict[int, Tuple[Tuple[str, int], ...]]


def weight_matrices(cfg: ModelConfig) -> Dict[str, Tuple[int, int]]:
    """(in, out) of each layer weight's product, as `llama._layer` runs it."""
    G = cfg.num_heads // cfg.num_kv_heads
    return {"wqkv": (cfg.embed_dim, cfg.num_kv_heads * (G + 2) * cfg.head_dim),
            "wo": (cfg.num_heads * cfg.head_dim, cfg.embed_dim),
            "w_gate_up": (cfg.embed_dim, 2 * cfg.mlp_dim),
            "w_down": (cfg.mlp_dim, cfg.embed_dim)}


def choose(seconds: Dict[int, float], rows: int, min_saving: float) -> int:
    """The row count to run a `rows`-row step's product at, from the step's time with each."""
    best = min(seconds, key=seconds.get)
    return best if seconds[rows] - seconds[best] > min_saving else rows


def tune(cfg: ModelConfig, row_counts: Sequence[int], step_seconds: Callable) -> RowTable:
    """step_seconds(rows, pads) -> device seconds of a decode step of `rows` rows whose products
    run padded as `pads` ((name, rows run), ...). Each product is padded on its own against the
    unpadded step; the table keeps the paddings that save more than MIN_SAVING_S a layer."""
    table: RowTable = {}
    for rows in row_counts:
        base = step_seconds(rows, ())
        pads = []
        for name in weight_matrices(cfg):
            seconds = {rows: base, **{rows + p: step_seconds(rows, ((name, rows + p),)) for p in PAD_CANDIDATES}}
            run = choose(seconds, rows, MIN_SAVING_S * cfg.num_layers)
            if run != rows:
                pads.append((name, run))
        if pads:
            table[rows] = tuple(pads)
    return table


def table_path(device_kind: str) -> str:
    return os.path.join(TABLE_DIR, re.sub(r"[^A-Za-z0-9]+", "_", device_kind).strip("_") + ".json")


def to_entries(cfg: ModelConfig, table: RowTable) -> list:
    """A table as shape-keyed entries (the file's form)."""
    mats = weight_matrices(cfg)
    return [dict(k=mats[name][0], n=mats[name][1], rows=rows, run_rows=run)
            for rows, pads in sorted(table.items()) for name, run in pads]


def from_entries(cfg: ModelConfig, entries: Sequence[dict]) -> RowTable:
    """The entries that match this model's products, as its RowTable."""
    by_shape = {(e["k"], e["n"], e["rows"]): e["run_rows"] for e in entries}
    table: Dict[int, list] = {}
    for name, (k, n) in weight_matrices(cfg).items():
        for (ek, en, rows), run in sorted(by_shape.items()):
            if (ek, en) == (k, n):
                table.setdefault(rows, []).append((name, run))
    return {rows: tuple(pads) for rows, pads in table.items()}


def load(cfg: ModelConfig, device_kind: str, path: Optional[str] = None) -> RowTable:
    """The shipped table for this GPU kind (empty when there is none)."""
    path = path or table_path(device_kind)
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return from_entries(cfg, json.load(f)["entries"])
