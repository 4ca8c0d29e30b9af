"""Step-time cost model: how long an engine step takes, from the shapes it runs.

The engine records (features, seconds) for every step; `fit` solves a non-negative least
squares. Policies use it to estimate a job's first-token (prefill) time for skip-join, and the
simulator uses it to advance its clock. Features follow the runner's bucketing, since padded
shapes are what the device really computes.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence

import numpy as np
# At import, not in `fit`: the engine refits while serving, and the first import of scipy.optimize
# (about a second) would stall the device for that long.
from scipy.optimize import nnls

# A step is one call over every scheduled token. A step that holds a prefill chunk is compute
# bound (every token through every layer); a decode-only step streams the weights and the KV, so
# each kind has its own call, token and attention terms.
FEATURES = ("prefill_calls", "prefill_tokens", "prefill_attention",
            "decode_calls", "decode_tokens", "decode_attention", "swap_bytes")

MIN_TOKENS = 8   # fewest flattened token rows a step runs (cuBLAS wants bf16 GEMM rows in 8s)
MIN_PAGES = 8    # narrowest page table: fewer shapes, and the attention kernels' page blocks
QUERY_BLOCK = 16  # prefill attention works on blocks of this many tokens of one sequence


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum): the shape buckets of every jitted step."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


FINE_TOKENS = 512  # above this, a prefill step's rows round up to a quarter octave, not an octave


def token_bucket(n: int, minimum: int = 1) -> int:
    """Flattened token rows of a step that holds a prefill chunk: the next power of two up to
    FINE_TOKENS, then the next quarter of an octave (640, 768, 896, 1024, 1280, ...). Such steps
    are compute bound, so every padded row costs a token's full time through the layers."""
    p = bucket(n, minimum)
    if p <= FINE_TOKENS:
        return p
    quarter = p // 8  # a quarter of the octave (p / 2, p]
    return -(-n // quarter) * quarter


class StepShape(NamedTuple):
    """The bucketed shape of one step: flattened tokens, sequences (sampled rows), pages per
    sequence, and whether any chunk is a prefill chunk (decode-only steps skip that attention)."""
    tokens: int
    seqs: int
    pages: int
    prefill: bool

    @property
    def blocks(self) -> int:
        """Query blocks of prefill attention: each chunk splits into QUERY_BLOCK-token blocks,
        plus at most one partial block per chunk (a sequence has one chunk in a step)."""
        return self.tokens // QUERY_BLOCK + self.seqs if self.prefill else 0


def step_shape(chunk_lens: Sequence[int], chunk_pages: Sequence[int], max_batch: int, max_pages: int) -> StepShape:
    """The one definition of the runner's buckets: ModelRunner.pack uses it, so the cost model
    sees exactly the shapes the device runs. chunk_pages: each sequence's pages after the step."""
    n, total = len(chunk_lens), sum(chunk_lens)
    P = min(bucket(max(chunk_pages), MIN_PAGES), bucket(max_pages))
    rows = bucket(max_batch)
    if max(chunk_lens) == 1:  # decode only: a row per sequence
        S = min(bucket(n), rows)
        return StepShape(max(S, MIN_TOKENS), S, P, False)
    N = token_bucket(total, max(MIN_TOKENS, QUERY_BLOCK))
    return StepShape(N, min(N, rows), P, True)


def step_shapes(max_batch: int, token_budget: int, max_pages: int) -> list:
    """Every StepShape that `step_shape` can produce under these engine limits."""
    pages = sorted({min(bucket(p, MIN_PAGES), bucket(max_pages)) for p in range(1, max_pages + 1)})
    rows = sorted({step_shape([1] * n, [1], max_batch, max_pages) for n in range(1, max_batch + 1)})
    decode = sorted({s.seqs for s in rows})
    mixed = sorted({step_shape([t], [1], max_batch, max_pages).tokens for t in range(2, max(token_budget, 2) + 1)})
    return ([step_shape([1] * S, [P], max_batch, max_pages) for S in decode for P in pages]
            + [step_shape([N], [P], max_batch, max_pages) for N in mixed for P in pages])


def shape_features(shape: StepShape, page_size: int) -> np.ndarray:
    """FEATURES (but swap_bytes) of one step of this shape."""
    f = np.zeros(len(FEATURES) - 1)
    context = shape.pages * page_size
    if shape.prefill:
        f[0:3] = 1.0, shape.tokens, shape.tokens * context
    else:
        f[3:5] = 1.0, shape.tokens
    f[5] = shape.seqs * context
    return f


@dataclasses.dataclass
class CostModel:
    # seconds per unit of each FEATURES entry; the defaults are rough CPU figures until fitted
    coef: np.ndarray = dataclasses.field(
        default_factory=lambda: np.array([5e-3, 5e-5, 1e-9, 5e-3, 1e-5, 1e-9, 1e-10]))
    page_size: int = 16
    max_batch: int = 32
    max_pages: int = 128
    max_chunk: int = 256
    page_bytes: int = 0      # KV bytes of one page (device and host pools alike), for swap costs

    def step_time(self, chunks: Sequence[tuple], swap_bytes: int = 0) -> float:
        """chunks: (num_tokens, pages_after) per scheduled request. Mirrors the engine's step."""
        return float(self.features(chunks, swap_bytes) @ self.coef)

    def swap_s_per_page(self, page_bytes: Optional[int] = None) -> float:
        """Link time to move one page (of `page_bytes`, default this model's) to or from the host."""
        return float(self.coef[FEATURES.index("swap_bytes")]) * (self.page_bytes if page_bytes is None else page_bytes)

    def features(self, chunks: Sequence[tuple], swap_bytes: int = 0) -> np.ndarray:
        f = np.zeros(len(FEATURES))
        f[-1] = swap_bytes
        if chunks:
            shape = step_shape([c[0] for c in chunks], [c[1] for c in chunks], self.max_batch, self.max_pages)
            f[:-1] = shape_features(shape, self.page_size)
        return f

    def prefill_time(self, prompt_tokens: int) -> float:
        """Batch-1 time to the first token of a prompt, in max-chunk steps (for skip-join)."""
        total, done = 0.0, 0
        while done < prompt_tokens:
            n = min(self.max_chunk, prompt_tokens - done)
            done += n
            total += self.step_time([(n, -(-done // self.page_size))])
        return total

    def fit(self, features: np.ndarray, seconds: np.ndarray) -> "CostModel":
        """Non-negative least squares over recorded steps, refitted once without outliers.

        Outliers are steps far slower than the model predicts (a compilation, a GC pause).
        Features never seen keep their prior coefficient.
        """
        X, y = np.asarray(features, float), np.asarray(seconds, float)
        seen = X.any(axis=0)
        scale = np.where(seen, np.abs(X).max(axis=0), 1.0)
        keep = np.ones(len(y), bool)
        for _ in range(2):
            w, _ = nnls(X[keep][:, seen] / scale[seen], y[keep])
            resid = y - (X[:, seen] / scale[seen]) @ w
            mad = np.median(np.abs(resid[keep])) + 1e-9
            keep = resid < 10 * mad
        coef = self.coef.copy()
        coef[seen] = w / scale[seen]
        return dataclasses.replace(self, coef=coef)
