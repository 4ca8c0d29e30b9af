"""Step-time cost model: how long an engine step takes, from the shapes it runs.

The engine records (features, seconds) for every step; `fit` solves a non-negative least
squares. Policies use it to estimate a job's first-token (prefill) time for skip-join, and the
simulator uses it to advance its clock. Features follow the runner's bucketing, since padded
shapes are what the device really computes.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

# Prefill chunks and decodes run as separate calls with different costs (prefill is compute
# bound, decode streams weights and KV), so each has its own call, token and attention terms.
FEATURES = ("prefill_calls", "prefill_tokens", "prefill_attention",
            "decode_calls", "decode_tokens", "decode_attention", "swap_bytes")


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum): the shape buckets of every jitted step."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def call_shape(chunk_lens: Sequence[int], chunk_pages: Sequence[int], max_batch: int, max_pages: int) -> tuple:
    """(B, T, P): the padded batch, chunk length and pages per sequence of one runner call.

    The one definition of the runner's buckets: ModelRunner.pack uses it, so the cost model
    sees exactly the shapes the device runs.
    """
    n = len(chunk_lens)
    B = bucket(n) if n > max_batch else min(bucket(n), bucket(max_batch))
    T = bucket(max(chunk_lens))
    T = 1 if T == 1 else max(T, 16)
    P = min(bucket(max(chunk_pages)), bucket(max_pages))
    return B, T, P


def step_shapes(max_batch: int, max_chunk: int, token_budget: int, max_pages: int) -> list:
    """Every (B, T, P) that `call_shape` can produce under these engine limits.

    A call holds either decodes (T == 1) or prefill chunks of 2..max_chunk tokens whose sum is
    at most token_budget; shapes no such call can reach (e.g. 8 rows of 128 under a budget of
    128) are left out.
    """
    pages = sorted({min(bucket(p), bucket(max_pages)) for p in range(1, max_pages + 1)})
    rows = sorted({call_shape([1] * n, [1], max_batch, max_pages)[0] for n in range(1, max_batch + 1)})
    shapes = [(B, 1, P) for B in rows for P in pages]
    for B in rows:
        n_min = B // 2 + 1 if B > 1 else 1        # fewest chunks that bucket to B rows
        if n_min > max_batch:
            n_min = max_batch
        for T in sorted({call_shape([L], [1], max_batch, max_pages)[1] for L in range(2, max_chunk + 1)}):
            L_min = T // 2 + 1 if T > 16 else 2   # shortest longest-chunk that buckets to T
            if L_min + 2 * (n_min - 1) <= token_budget:
                shapes += [(B, T, P) for P in pages]
    return shapes


def call_features(B: int, T: int, P: int, page_size: int) -> np.ndarray:
    """[calls, padded tokens, query x key pairs] of one runner call."""
    return np.array([1.0, B * T, B * T * P * page_size])


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
        """chunks: (num_tokens, pages_after) per scheduled request. Mirrors the engine's calls."""
        return float(self.features(chunks, swap_bytes) @ self.coef)

    def features(self, chunks: Sequence[tuple], swap_bytes: int = 0) -> np.ndarray:
        f = np.zeros(len(FEATURES))
        f[-1] = swap_bytes
        for offset, group in ((0, [c for c in chunks if c[0] > 1]), (3, [c for c in chunks if c[0] == 1])):
            if group:
                B, T, P = call_shape([c[0] for c in group], [c[1] for c in group], self.max_batch, self.max_pages)
                f[offset:offset + 3] += call_features(B, T, P, self.page_size)
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
        from scipy.optimize import nnls
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
