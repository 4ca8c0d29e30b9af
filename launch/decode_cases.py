"""What the decode-attention kernel sweeps share: the KV shape's flags, and cases 'BxCTX' (every
row CTX long) or 'BrLO-HI' (lengths uniform in [LO, HI])."""
from __future__ import annotations

import numpy as np
from absl import flags

LAYERS = flags.DEFINE_integer("layers", 32, "Layers (one kernel call each).")
KV_HEADS = flags.DEFINE_integer("kv_heads", 8, "KV heads.")
HEADS = flags.DEFINE_integer("heads", 32, "Query heads.")
HEAD_DIM = flags.DEFINE_integer("head_dim", 128, "Head dim.")
PAGE = flags.DEFINE_integer("page_size", 16, "Tokens a page.")
REPS = flags.DEFINE_integer("reps", 10, "Timed calls per configuration.")


def parse_case(case: str, rng):
    """'128x1024' or '128r100-2000' -> (lengths [B], longest length); the page table's width is
    bucketed to a power of two of pages, as the engine's step shapes are."""
    if "r" in case:
        b, span = case.split("r")
        lo, hi = map(int, span.split("-"))
        return rng.integers(lo, hi + 1, int(b)).astype(np.int32), hi
    b, ctx = map(int, case.split("x"))
    return np.full(int(b), ctx, np.int32), ctx
