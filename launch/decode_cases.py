"""Decode-attention benchmark cases shared by the kernel sweeps: 'BxCTX' (every row CTX long) or
'BrLO-HI' (lengths uniform in [LO, HI])."""
from __future__ import annotations

import numpy as np


def parse_case(case: str, rng):
    """'128x1024' or '128r100-2000' -> (lengths [B], longest length); the page table's width is
    bucketed to a power of two of pages, as the engine's step shapes are."""
    if "r" in case:
        b, span = case.split("r")
        lo, hi = map(int, span.split("-"))
        return rng.integers(lo, hi + 1, int(b)).astype(np.int32), hi
    b, ctx = map(int, case.split("x"))
    return np.full(int(b), ctx, np.int32), ctx
