"""Device work of one engine step: pack scheduled chunks into bucketed arrays, run, sample.

The only jitted function is `_paged_step`; its shapes are bucketed (batch, chunk length and
pages per sequence round up to powers of two) so that a long mixed run compiles a bounded
number of times. The cache pool is donated so that steps update it in place.
Decode steps attend through the Pallas kernel on GPU (`attention_impl`, see
jaxserve.cache.attention_kernels); prefill chunks always use the pure-JAX reference.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import numpy as np

from jaxserve import sampling
from jaxserve.cache import attention_kernels, paged_kv
from jaxserve.model import llama
from jaxserve.model.config import ModelConfig
from jaxserve.scheduling.cost_model import call_shape, step_shapes

TRACE_COUNT = {"paged_step": 0}  # incremented only when jax traces (i.e. compiles) a new shape

# XLA flags the decode step wants, applied unless the user's XLA_FLAGS already set them (or
# JAXSERVE_XLA_FLAGS=0). They only take effect if set before JAX starts its GPU backend, hence
# at import. Decode streams every weight once per step, so cuBLAS rather than XLA's Triton GEMMs
# for the skinny matrix products (Llama-3-8B, 2k context, H100, docs/benchmarks.md: batch 1
# 16.1 -> 8.2 ms/step, batch 64 25.7 -> 16.2). XLA's dot merger is left on: before the params
# stored wq|wk|wv fused it copied them into a fresh buffer every step (turning it off then saved
# 0.6 ms); now on and off differ by less than run-to-run noise (mean of 3 vs 2 H100 runs:
# batch 1 6.82 vs 6.89 ms, batch 64 14.79 vs 15.04 ms).
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
# On GPU, decode steps run at least this many rows: with a single row XLA rewrites the
# projections as vector products (a reduction fusion over a transposed copy of all layers'
# wk/wv, and an f32 copy of the LM head, every step); a padding row keeps them plain GEMMs with
# no more weight reads (batch 1, 2k context: 9.0 -> 7.6 ms/step). Prefill chunks are not padded,
# nor is anything on CPU, where the extra row is only extra arithmetic.
MIN_DECODE_ROWS_GPU = 2


def _apply_xla_flags() -> None:
    if os.environ.get("JAXSERVE_XLA_FLAGS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_apply_xla_flags()


@functools.partial(jax.jit, static_argnames=("cfg", "attention_impl", "mesh"), donate_argnames=("cache",))
def _paged_step(params, cache, tokens, positions, page_table, logit_index, temperature, top_k, top_p,
                seeds, steps, cfg: ModelConfig, attention_impl: str = "reference", mesh=None):
    """One bucketed step: tokens [B,T] at positions [B,T] (-1 = pad) -> (next token [B], logprob [B], cache).

    attention_impl: "reference" or "pallas" (resolved; decode shapes T == 1 use the kernel).
    """
    TRACE_COUNT["paged_step"] += 1
    attend = functools.partial(paged_kv.paged_attend, page_table=page_table, impl=attention_impl, mesh=mesh)
    logits, cache = llama.forward(params, tokens, positions, cache, cfg, attend, logit_index=logit_index)
    keys = sampling.request_keys(seeds, steps)
    next_tokens, logprobs = sampling.sample(logits, temperature, top_k, top_p, keys)
    return next_tokens, logprobs, cache


def padding_arrays(B: int, T: int, P: int) -> tuple:
    """The host arrays of one `_paged_step` call of shape (B, T, P), every row padding
    (position -1: writes nothing, attends to nothing). `ModelRunner.pack` fills rows in."""
    return (np.zeros((B, T), np.int32),    # tokens
            np.full((B, T), -1, np.int32),  # positions
            np.zeros((B, P), np.int32),     # page_table
            np.zeros(B, np.int32),          # logit_index
            np.zeros(B, np.float32),        # temperature
            np.zeros(B, np.int32),          # top_k
            np.ones(B, np.float32),         # top_p
            np.zeros(B, np.uint32),         # seeds
            np.zeros(B, np.int32))          # steps


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
    def __init__(self, cfg: ModelConfig, params, mesh, num_pages: int, page_size: int, max_batch: int,
                 attention_impl: str = "auto", cache: Optional[dict] = None):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.page_size, self.max_batch = page_size, max_batch
        self.max_pages_per_seq = -(-cfg.max_seq_len // page_size)
        self.attention_impl = attention_kernels.resolve_impl(attention_impl)
        self.min_decode_rows = MIN_DECODE_ROWS_GPU if mesh.devices.flat[0].platform == "gpu" else 1
        # a caller-made pool (benchmarks fill one with random keys and values) or zeros
        self.cache = paged_kv.init_pool(cfg, num_pages, page_size, mesh) if cache is None else cache
        # serving over several processes: process 0 sends each step's inputs to the others first
        self.mirror = None
        if jax.process_count() > 1 and jax.process_index() == 0:
            from jaxserve.parallel.multihost import StepMirror
            self.mirror = StepMirror()

    def _step(self, host: Sequence[np.ndarray]):
        """Runs `_paged_step` on packed host arrays (mirrored to the other processes, if any)."""
        if self.mirror is not None:
            host = self.mirror.lead(host)
        next_tokens, logprobs, self.cache = _paged_step(self.params, self.cache, *host, **self.step_kwargs())
        return next_tokens, logprobs

    def step_kwargs(self) -> dict:
        """The static arguments of `_paged_step` for this runner."""
        pallas = self.attention_impl == "pallas"
        return dict(cfg=self.cfg, attention_impl=self.attention_impl, mesh=self.mesh if pallas else None)

    def run(self, chunks: Sequence[Chunk]):
        """Runs chunks (all of similar length: decodes, or prefill chunks) in one call.

        Returns (next token [n], logprob [n]) as numpy, one per chunk.
        """
        next_tokens, logprobs = self._step(self.pack(chunks))
        n = len(chunks)
        return np.asarray(next_tokens)[:n], np.asarray(logprobs)[:n]

    def precompile(self, max_chunk: int, token_budget: int) -> int:
        """Compiles every step shape serving can reach, so that no request ever waits on XLA.

        Each shape runs once with padding rows only (position -1), which write nothing to the
        cache. Returns the number of shapes compiled now (0 when all were compiled already).
        """
        before = TRACE_COUNT["paged_step"]
        seen = set()
        for B, T, P in step_shapes(self.max_batch, max_chunk, token_budget, self.max_pages_per_seq):
            if T == 1:
                B = max(B, self.min_decode_rows)
            if (B, T, P) in seen:
                continue
            seen.add((B, T, P))
            self._step(padding_arrays(B, T, P))
        jax.block_until_ready(self.cache)
        return TRACE_COUNT["paged_step"] - before

    def pack(self, chunks: Sequence[Chunk]) -> tuple:
        """The bucketed host arrays of `_paged_step` for these chunks (padding rows: position -1)."""
        B, T, P = call_shape([len(c.tokens) for c in chunks], [len(c.pages) for c in chunks],
                             self.max_batch, self.max_pages_per_seq)
        if T == 1:
            B = max(B, self.min_decode_rows)
        arrays = padding_arrays(B, T, P)
        tokens, positions, page_table, logit_index, temperature, top_k, top_p, seeds, steps = arrays
        for i, c in enumerate(chunks):
            L = len(c.tokens)
            tokens[i, :L] = c.tokens
            positions[i, :L] = np.arange(c.start, c.start + L)
            page_table[i, :len(c.pages)] = c.pages
            logit_index[i] = L - 1
            temperature[i], top_k[i], top_p[i] = c.temperature, c.top_k, c.top_p
            seeds[i], steps[i] = c.seed, c.step
        return arrays
