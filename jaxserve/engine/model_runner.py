"""Device work of one engine step: pack scheduled chunks into bucketed arrays, run, sample.

The only jitted function is `_paged_step`; its shapes are bucketed (batch, chunk length and
pages per sequence round up to powers of two) so that a long mixed run compiles a bounded
number of times. The cache pool is donated so that steps update it in place.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import sampling
from jaxserve.cache import paged_kv
from jaxserve.model import llama
from jaxserve.model.config import ModelConfig

TRACE_COUNT = {"paged_step": 0}  # incremented only when jax traces (i.e. compiles) a new shape


def bucket(n: int, minimum: int = 1) -> int:
    """Next power of two >= n (and >= minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _paged_step(params, cache, tokens, positions, page_table, logit_index, temperature, top_k, top_p,
                seeds, steps, cfg: ModelConfig):
    TRACE_COUNT["paged_step"] += 1
    attend = functools.partial(paged_kv.paged_attend, page_table=page_table)
    logits, cache = llama.forward(params, tokens, positions, cache, cfg, attend, logit_index=logit_index)
    keys = sampling.request_keys(seeds, steps)
    next_tokens, logprobs = sampling.sample(logits, temperature, top_k, top_p, keys)
    return next_tokens, logprobs, cache


@dataclasses.dataclass
class Chunk:
    """One request's slice of work in a step: run `tokens` starting at `start` with `pages`."""
    tokens: Sequence[int]
    start: int
    pages: Sequence[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    step: int  # index of the token to sample (the request's number of generated tokens)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, mesh, num_pages: int, page_size: int, max_batch: int):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.page_size, self.max_batch = page_size, max_batch
        self.max_pages_per_seq = -(-cfg.max_seq_len // page_size)
        self.cache = paged_kv.init_pool(cfg, num_pages, page_size, mesh)

    def run(self, chunks: Sequence[Chunk]):
        """Runs chunks (all of similar length: decodes, or prefill chunks) in one call.

        Returns (next token [n], logprob [n]) as numpy, one per chunk.
        """
        n = len(chunks)
        B = min(bucket(n), bucket(self.max_batch)) if n <= self.max_batch else bucket(n)
        T = bucket(max(len(c.tokens) for c in chunks))
        T = 1 if T == 1 else max(T, 16)
        P = min(bucket(max(len(c.pages) for c in chunks)), bucket(self.max_pages_per_seq))
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        page_table = np.zeros((B, P), np.int32)
        logit_index = np.zeros(B, np.int32)
        temperature = np.zeros(B, np.float32)
        top_k = np.zeros(B, np.int32)
        top_p = np.ones(B, np.float32)
        seeds = np.zeros(B, np.uint32)
        steps = np.zeros(B, np.int32)
        for i, c in enumerate(chunks):
            L = len(c.tokens)
            tokens[i, :L] = c.tokens
            positions[i, :L] = np.arange(c.start, c.start + L)
            page_table[i, :len(c.pages)] = c.pages
            logit_index[i] = L - 1
            temperature[i], top_k[i], top_p[i] = c.temperature, c.top_k, c.top_p
            seeds[i], steps[i] = c.seed, c.step
        next_tokens, logprobs, self.cache = _paged_step(
            self.params, self.cache, tokens, positions, page_table, logit_index, temperature, top_k,
            top_p, seeds, steps, cfg=self.cfg)
        return np.asarray(next_tokens)[:n], np.asarray(logprobs)[:n]
