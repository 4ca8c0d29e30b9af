"""Device work of one engine step: pack scheduled chunks into bucketed arrays, run, sample.

A step is two jitted functions: `_paged_forward` (the model over the packed chunks, to logits)
and `_sample` (in the sampling mode the host picks from the requests' settings). Their shapes
are bucketed (batch, chunk length and pages per sequence round up to powers of two) so that a
long mixed run compiles a bounded number of times. The cache pool is donated so that steps
update it in place.
Decode steps attend through the Pallas kernel on GPU (`attention_impl`, see
jaxserve.cache.attention_kernels); prefill chunks always use the pure-JAX reference.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import sampling
from jaxserve.cache import attention_kernels, paged_kv
from jaxserve.model import llama
from jaxserve.model.config import ModelConfig
from jaxserve.scheduling.cost_model import call_shape, step_shapes

TRACE_COUNT = {"paged_step": 0, "sample": 0}  # incremented only when jax traces (compiles) a new shape

# XLA flags the decode step wants, applied unless the user's XLA_FLAGS already set them (or
# JAXSERVE_XLA_FLAGS=0). They only take effect if set before JAX starts its GPU backend, hence
# at import. Decode streams every weight once per step, so cuBLAS rather than XLA's Triton GEMMs
# for the skinny matrix products (Llama-3-8B, 2k context, H100, docs/benchmarks.md: batch 1
# 16.1 -> 8.2 ms/step, batch 64 25.7 -> 16.2). XLA's dot merger is left on: before the params
# stored wq|wk|wv fused it copied them into a fresh buffer every step (turning it off then saved
# 0.6 ms); now on and off differ by less than run-to-run noise (mean of 3 vs 2 H100 runs:
# batch 1 6.82 vs 6.89 ms, batch 64 14.79 vs 15.04 ms).
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
# On GPU, decode steps run their layers on a multiple of this many rows (padding rows inside the
# step; attention and sampling see only the real ones). cuBLAS wants bf16 GEMM dimensions in
# multiples of 8: with 2 rows XLA padded every projection's input to 8 and sliced its output (7
# small kernels a layer, 0.3 ms a step at batch 1 on an H100); with 1 row it rewrote the
# projections as vector products over transposed copies of the weights (batch 1, 2k context:
# 9.0 -> 7.6 ms/step with a second row). Prefill chunks are not padded, nor anything on CPU.
GEMM_ROWS_GPU = 8
# On GPU the step runs the layers as an unrolled Python loop rather than a `lax.scan`. The scan's
# while loop cost about 7 us a layer on an H100: a gap between iterations, the counter update,
# and copying each layer's two norm weights and its index out of the stacked arrays (4 small
# kernels); unrolled, every index is static. Llama-3-8B shape, 2k context: batch 1 6.32 -> 6.08
# ms/step, batch 64 14.27 -> 13.98; but a decode step shape compiles in about 7 s instead of under
# 1 s, which startup precompiles and the first step on a new mesh after a re-parallelization wait
# for (EngineConfig.unroll_layers="off" trades the other way). Decode steps only: a 2k-token
# prefill, bound by compute, measured 76 -> 81 ms unrolled. Not on CPU, where compile time is what
# tests and small models wait on.
UNROLL_LAYERS_GPU = True
UNROLL_CHOICES = ("auto", "on", "off")  # EngineConfig.unroll_layers: auto = UNROLL_LAYERS_GPU on GPU


def _apply_xla_flags() -> None:
    if os.environ.get("JAXSERVE_XLA_FLAGS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_apply_xla_flags()


@functools.partial(jax.jit, static_argnames=("cfg", "attention_impl", "mesh", "gemm_rows", "unroll_layers"),
                   donate_argnames=("cache",))
def _paged_forward(params, cache, tokens, positions, page_table, logit_index, cfg: ModelConfig,
                   attention_impl: str = "reference", mesh=None, gemm_rows: int = 1,
                   unroll_layers: bool = False):
    """The model over tokens [B,T] at positions [B,T] (-1 = pad) -> (logits [B,V] float32, cache).

    attention_impl: "reference" or "pallas" (resolved; decode shapes T == 1 use the kernel).
    gemm_rows: decode steps run the layers on a multiple of this many rows (GEMM_ROWS_GPU).
    unroll_layers: decode steps run the layers as a Python loop, not a scan (UNROLL_LAYERS_GPU).
    """
    TRACE_COUNT["paged_step"] += 1
    rows = tokens.shape[0]
    slots = paged_kv.token_slots(positions, page_table, cache)  # once, not in every layer
    decode = tokens.shape[1] == 1  # prefill chunks are neither padded nor unrolled
    extra = -rows % gemm_rows if decode else 0
    if extra:  # padding rows: position -1 (write nothing); paged_attend skips them (page_table has B rows)
        tokens = jnp.pad(tokens, ((0, extra), (0, 0)))
        positions = jnp.pad(positions, ((0, extra), (0, 0)), constant_values=-1)
        logit_index = jnp.pad(logit_index, (0, extra))
    attend = functools.partial(paged_kv.paged_attend, page_table=page_table, impl=attention_impl, mesh=mesh,
                               slots=slots)
    logits, cache = llama.forward(params, tokens, positions, cache, cfg, attend, logit_index=logit_index,
                                  unroll_layers=unroll_layers and decode)
    return logits[:rows], cache


@functools.partial(jax.jit, static_argnames=("mode",))
def _sample(logits, temperature, top_k, top_p, seeds, steps, mode: str):
    TRACE_COUNT["sample"] += 1
    return sampling.sample(logits, temperature, top_k, top_p, sampling.request_keys(seeds, steps), mode=mode)


def _paged_step(params, cache, tokens, positions, page_table, logit_index, temperature, top_k, top_p,
                seeds, steps, **forward_kwargs):
    """One bucketed step on packed arrays (`padding_arrays`) -> (next token [B], logprob [B], cache)."""
    logits, cache = _paged_forward(params, cache, tokens, positions, page_table, logit_index, **forward_kwargs)
    mode = sampling.mode_for(temperature, top_k, top_p)
    next_tokens, logprobs = _sample(logits, temperature, top_k, top_p, seeds, steps, mode=mode)
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


def step_settings(mesh, attention_impl: str = "auto", unroll_layers: str = "auto") -> dict:
    """How steps run on this mesh: the resolved attention impl, GEMM row padding, unrolling."""
    on_gpu = mesh.devices.flat[0].platform == "gpu"
    return dict(attention_impl=attention_kernels.resolve_impl(attention_impl),
                gemm_rows=GEMM_ROWS_GPU if on_gpu else 1,
                unroll_layers={"on": True, "off": False, "auto": UNROLL_LAYERS_GPU and on_gpu}[unroll_layers])


def forward_kwargs(cfg: ModelConfig, mesh, attention_impl: str, gemm_rows: int, unroll_layers: bool) -> dict:
    """The static arguments of `_paged_forward` (resolved settings, as `step_settings` gives)."""
    return dict(cfg=cfg, attention_impl=attention_impl, mesh=mesh if attention_impl == "pallas" else None,
                gemm_rows=gemm_rows, unroll_layers=unroll_layers)


def compile_ahead(cfg: ModelConfig, mesh, num_pages: int, page_size: int, shapes: Sequence[tuple],
                  attention_impl: str = "auto", unroll_layers: str = "auto",
                  modes: Sequence[str] = ("greedy",)) -> int:
    """Compiles the steps of shapes [(B, T, P)] on `mesh` before any params or pool live there.

    Inputs are abstract (shapes and the shardings a runner on this mesh will use), and JAX keeps
    the executables, so a runner made on the mesh later runs these shapes without compiling:
    the cluster calls this during a preemption's grace period, while the old replicas serve.
    Returns how many step shapes were compiled.
    """
    from jaxserve.model.params import abstract_params
    from jaxserve.parallel.sharding import param_shardings

    kw = forward_kwargs(cfg, mesh, **step_settings(mesh, attention_impl, unroll_layers))
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg), param_shardings(cfg, mesh))
    pool = jax.ShapeDtypeStruct(paged_kv.pool_shape(cfg, num_pages, page_size), cfg.jnp_dtype,
                                sharding=paged_kv.pool_sharding(cfg, num_pages, page_size, mesh))
    cache = {"k": pool, "v": pool}
    abstract = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype)
    for B, T, P in shapes:
        host = padding_arrays(B, T, P)
        forward = _paged_forward.lower(params, cache, *map(abstract, host[:4]), **kw).compile()
        logits = jax.ShapeDtypeStruct((B, cfg.vocab_size), jnp.float32, sharding=forward.output_shardings[0])
        for mode in modes:
            _sample.lower(logits, *map(abstract, host[4:]), mode=mode).compile()
    return len(shapes)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, mesh, num_pages: int, page_size: int, max_batch: int,
                 attention_impl: str = "auto", cache: Optional[dict] = None, unroll_layers: str = "auto"):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.page_size, self.max_batch = page_size, max_batch
        self.max_pages_per_seq = -(-cfg.max_seq_len // page_size)
        self.decode_floor: Optional[tuple] = None  # see pack
        settings = step_settings(mesh, attention_impl, unroll_layers)
        self.attention_impl, self.gemm_rows, self.unroll_layers = (
            settings["attention_impl"], settings["gemm_rows"], settings["unroll_layers"])
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
        """The static arguments of `_paged_forward` for this runner."""
        return forward_kwargs(self.cfg, self.mesh, self.attention_impl, self.gemm_rows, self.unroll_layers)

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
        rows = set()
        for B, T, P in step_shapes(self.max_batch, max_chunk, token_budget, self.max_pages_per_seq):
            # Padding rows sample greedily; at each row count, one sampled (and one filtered)
            # padding row compiles the other sampling modes, through `_step` like any step.
            for mode in sampling.MODES if B not in rows else ("greedy",):
                host = padding_arrays(B, T, P)
                host[4][0] = 1.0 if mode != "greedy" else 0.0   # temperature
                host[5][0] = 2 if mode == "filter" else 0        # top_k
                self._step(host)
            rows.add(B)
        jax.block_until_ready(self.cache)
        return TRACE_COUNT["paged_step"] - before

    def pack(self, chunks: Sequence[Chunk]) -> tuple:
        """The bucketed host arrays of `_paged_step` for these chunks (padding rows: position -1).

        Decode steps run at least `decode_floor` (rows, pages) when set: shapes compiled ahead
        for this mesh (ServingCluster's deferred switch) that the requests grow into."""
        lens, pages = [len(c.tokens) for c in chunks], [len(c.pages) for c in chunks]
        if self.decode_floor and max(lens) == 1:
            rows, floor_pages = self.decode_floor
            if max(pages) >= floor_pages:
                self.decode_floor = None  # the requests have grown into it
            else:
                lens, pages = lens + [1] * (rows - len(lens)), pages + [floor_pages]
        B, T, P = call_shape(lens, pages, self.max_batch, self.max_pages_per_seq)
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
