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

FEATURES = ("calls", "tokens", "attention", "swap_bytes")


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum): the shape buckets of jitted steps."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def call_shape(chunk_lens: Sequence[int], chunk_pages: Sequence[int], max_batch: int, max_pages: int) -> tuple:
    """(B, T, P): the padded batch, chunk length and pages per sequence of one runner call."""
    n = len(chunk_lens)
    B = bucket(n) if n > max_batch else min(bucket(n), bucket(max_batch))
    T = bucket(max(chunk_lens))
    T = 1 if T == 1 else max(T, 16)
    P = min(bucket(max(chunk_pages)), bucket(max_pages))
    return B, T, P


def call_features(B: int, T: int, P: int, page_size: int) -> np.ndarray:
    return np.array([1.0, B * T, B * T * P * page_size, 0.0])


@dataclasses.dataclass
class CostModel:
    # seconds per: runner call, padded token, query x key pair, swapped byte
    coef: np.ndarray = dataclasses.field(default_factory=lambda: np.array([5e-3, 5e-5, 1e-9, 1e-10]))
    page_size: int = 16
    max_batch: int = 32
    max_pages: int = 128
    max_chunk: int = 256

    def step_time(self, chunks: Sequence[tuple], swap_bytes: int = 0) -> float:
        """chunks: (num_tokens, pages_after) per scheduled request. Mirrors the engine's calls."""
        return float(self.features(chunks, swap_bytes) @ self.coef)

    def features(self, chunks: Sequence[tuple], swap_bytes: int = 0) -> np.ndarray:
        f = np.array([0.0, 0.0, 0.0, float(swap_bytes)])
        for group in ([c for c in chunks if c[0] > 1], [c for c in chunks if c[0] == 1]):
            if group:
                B, T, P = call_shape([c[0] for c in group], [c[1] for c in group], self.max_batch, self.max_pages)
                f += call_features(B, T, P, self.page_size)
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
        """Non-negative least squares over recorded steps (a few columns: projected gradient)."""
        X, y = np.asarray(features, float), np.asarray(seconds, float)
        used = X.any(axis=0)
        scale = np.where(used, np.abs(X).max(axis=0), 1.0)
        Xs = X / scale
        w = np.linalg.lstsq(Xs[:, used], y, rcond=None)[0]
        coef = np.zeros(X.shape[1])
        coef[used] = w
        for _ in range(50):  # clip negatives and refit the rest
            neg = coef < 0
            if not neg.any():
                break
            keep = used & ~neg
            used = keep
            coef = np.zeros(X.shape[1])
            if keep.any():
                coef[keep] = np.linalg.lstsq(Xs[:, keep], y, rcond=None)[0]
        fitted = coef / scale
        fitted[~(X.any(axis=0))] = self.coef[~(X.any(axis=0))]  # unseen features keep their prior
        return dataclasses.replace(self, coef=fitted)
