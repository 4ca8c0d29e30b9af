"""Device work of one engine step: pack the scheduled chunks into one flat bucketed batch, run, sample.

A step is two jitted functions: `forward_step`, the model over every scheduled token at once,
decodes and prefill chunks together (so the weights are read once per step whatever the mix),
to the logits of each sequence's last token; and `sample_step`, in the sampling mode the host
picks from the requests' settings. Shapes are bucketed (`cost_model.StepShape`), so a long
mixed run compiles a bounded number of times, all of them in `precompile`. The KV pool is
donated and updated in place.

Sampled tokens stay on the device: the next step takes its decode inputs from them
(`Chunk.prev_row`), so the engine can pack and dispatch step N+1 while step N runs and read
step N's tokens afterwards, without a round trip through the host in between.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os
from typing import Callable, List, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import sampling
from jaxserve.cache import attention_kernels, paged_kv
from jaxserve.cache.paged_kv import StepLayout
from jaxserve.model import gemm_rows, llama
from jaxserve.model.config import ModelConfig
from jaxserve.scheduling.cost_model import QUERY_BLOCK, StepShape, bucket, step_shape, step_shapes

TRACE_COUNT = {"forward": 0, "sample": 0}  # incremented only when jax traces (compiles) a new shape

# XLA flags the step wants, applied unless the user's XLA_FLAGS already set them (or
# JAXSERVE_XLA_FLAGS=0). They only take effect if set before JAX starts its GPU backend, hence
# at import. Decode streams every weight once per step, so cuBLAS rather than XLA's Triton GEMMs
# for the skinny matrix products (docs/benchmarks.md).
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false",)
# Whether decode-only steps on GPU run the layers as an unrolled Python loop rather than a
# `lax.scan`. With the Mosaic GPU decode kernel the unrolled step is no faster at batch 1 and
# 4-10% slower at batch 64 on the H200 (docs/benchmarks.md), so steps keep the scan unless
# EngineConfig.unroll_layers="on".
UNROLL_LAYERS_GPU = False
UNROLL_CHOICES = ("auto", "on", "off")  # EngineConfig.unroll_layers: auto = UNROLL_LAYERS_GPU on GPU
# On one GPU, decode steps pad the layer products' rows where the table measured for this GPU
# kind says cuBLAS runs the padded shape faster (jaxserve.model.gemm_rows). Meshes of several
# devices run other (sharded) products and keep them unpadded.
USE_GEMM_ROW_TABLES = True


def _apply_xla_flags() -> None:
    if os.environ.get("JAXSERVE_XLA_FLAGS", "1") == "0":
        return
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f for f in GPU_XLA_FLAGS if f.split("=")[0] not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


_apply_xla_flags()


class StepInputs(NamedTuple):
    """The arrays of one `forward_step`: N flattened tokens, S sequences (see paged_kv.StepLayout)."""
    tokens: np.ndarray       # [N] token ids (padding: 0)
    prev_rows: np.ndarray    # [N] -1, or the row of the previous step's sampled tokens to take instead
    positions: np.ndarray    # [N] (-1 = padding)
    logit_index: np.ndarray  # [S] flat index of each sequence's last token
    layout: StepLayout


# Token ids a step can keep one row from sampling (end-of-sequence and stop tokens, before a
# request's min_tokens): a fixed width, so the sampling step has one shape per row count.
BANNED_TOKENS = 8


class PenaltyInputs(NamedTuple):
    """Per-sequence penalty settings [S] of a step in a '+penalties' sampling mode."""
    rows: np.ndarray         # the row of the runner's token counts it reads and adds to (-1 = none)
    repetition: np.ndarray   # 1 = off
    presence: np.ndarray     # 0 = off
    frequency: np.ndarray    # 0 = off


class SampleInputs(NamedTuple):
    """Per-sequence sampling settings [S] of one `sample_step`."""
    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seeds: np.ndarray
    steps: np.ndarray        # index of the token being drawn (the request's generated count)
    banned: np.ndarray       # [S, BANNED_TOKENS] token ids a row may not draw (-1 = none)
    penalties: Optional[PenaltyInputs] = None  # in the '+penalties' modes only (nothing sent else)


@functools.partial(jax.jit, static_argnames=("cfg", "attention_impl", "mesh", "unroll_layers", "gemm_rows"),
                   donate_argnames=("cache",))
def forward_step(params, cache, prev_tokens, inputs: StepInputs, cfg: ModelConfig,
                 attention_impl: str = "reference", mesh=None, unroll_layers: bool = False, gemm_rows=()):
    """The model over one flattened step -> (logits [S,V] float32, cache).

    prev_tokens [R]: the previous step's sampled tokens, still on the device; a token whose
    prev_rows entry is r >= 0 is prev_tokens[r]. attention_impl: resolved ("reference" or
    "pallas"). unroll_layers: a Python loop over the layers instead of a scan. gemm_rows: see
    llama.forward.
    """
    TRACE_COUNT["forward"] += 1
    rows = inputs.prev_rows
    tokens = jnp.where(rows >= 0, prev_tokens[jnp.maximum(rows, 0)], inputs.tokens)
    attend = functools.partial(paged_kv.paged_attend, layout=inputs.layout, impl=attention_impl, mesh=mesh)
    logits, cache = llama.forward(params, tokens[None], inputs.positions[None], cache, cfg, attend,
                                  logit_index=inputs.logit_index[None], unroll_layers=unroll_layers,
                                  gemm_rows=gemm_rows)
    return logits[0], cache


@functools.partial(jax.jit, static_argnames=("mode", "rows"), donate_argnames=("counts",))
def sample_step(logits, s: SampleInputs, mode: str, rows: int, counts=None):
    """-> (tokens [rows] int32, the S sampled ones first; logprobs [S]; counts).

    counts (the '+penalties' modes): {"counts" [C,V] int32, "in_prompt" [C,V] bool}, the token
    counts of the requests holding each row (`PenaltyRows`); each penalized sequence's drawn
    token is added to its row, so the next step's penalties include it without the host."""
    TRACE_COUNT["sample"] += 1
    keys = sampling.request_keys(s.seeds, s.steps)
    penalties = None
    if sampling.split_mode(mode)[1]:
        rows_of = jnp.maximum(s.penalties.rows, 0)  # rows of -1 read row 0 with neutral penalties
        penalties = sampling.Penalties(counts["counts"][rows_of], counts["in_prompt"][rows_of],
                                       s.penalties.repetition, s.penalties.presence, s.penalties.frequency)
    tokens, logprobs = sampling.sample(logits, s.temperature, s.top_k, s.top_p, keys, mode=mode, banned=s.banned,
                                       penalties=penalties)
    if penalties is not None:
        counts = dict(counts, counts=counts["counts"].at[rows_of, tokens].add((s.penalties.rows >= 0).astype(jnp.int32)))
    return jnp.pad(tokens, (0, rows - tokens.shape[0])), logprobs, counts


@functools.partial(jax.jit, static_argnames=("k",))
def top_step(logits, tokens, k: int):
    """(ids [S,k], logprobs [S,k], chosen rank [S]) of a step's logits [S,V] and its drawn tokens
    (sample_step's [rows]): run after it in the steps where a request asks for them, k one of
    sampling.TOP_K_BUCKETS."""
    return sampling.top_logprobs(logits, tokens[:logits.shape[0]], k)


@functools.partial(jax.jit, donate_argnames=("counts",))
def set_counts_row(counts, row, output_counts, in_prompt):
    """counts with row `row` set to a request's: output_counts [V] and in_prompt [V]."""
    return {"counts": counts["counts"].at[row].set(output_counts), "in_prompt": counts["in_prompt"].at[row].set(in_prompt)}


def _counts_layout(vocab_size: int, num_rows: int) -> dict:
    """{name: (shape, dtype)} of the token counts of `num_rows` penalized requests (sample_step)."""
    return {"counts": ((num_rows, vocab_size), np.int32), "in_prompt": ((num_rows, vocab_size), np.bool_)}


def counts_bytes(vocab_size: int, num_rows: int) -> int:
    """What the token counts take on each device (they are replicated)."""
    return sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in _counts_layout(vocab_size, num_rows).values())


def init_counts(vocab_size: int, num_rows: int, mesh) -> dict:
    """The token counts of `num_rows` penalized requests, zero, replicated on the mesh."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.device_put({k: np.zeros(s, d) for k, (s, d) in _counts_layout(vocab_size, num_rows).items()}, replicated)


def penalty_padding(S: int) -> PenaltyInputs:
    """PenaltyInputs of S rows that read and count nothing."""
    return PenaltyInputs(rows=np.full(S, -1, np.int32), repetition=np.ones(S, np.float32),
                         presence=np.zeros(S, np.float32), frequency=np.zeros(S, np.float32))


def sample_padding(shape: StepShape, scratch_page: int, mode: str) -> tuple:
    """`padding_inputs` for a step in this sampling mode (a row of it samples, or filters, so
    that the step runs the mode's work; penalty inputs where the mode has them)."""
    step, sample = padding_inputs(shape, scratch_page)
    base, penalized = sampling.split_mode(mode)
    sample.temperature[0] = 0.0 if base == "greedy" else 1.0
    sample.top_k[0] = 2 if base == "filter" else 0
    if penalized:
        sample = sample._replace(penalties=penalty_padding(shape.seqs))
    return step, sample


def padding_inputs(shape: StepShape, scratch_page: int) -> tuple:
    """(StepInputs, SampleInputs) host arrays of one step of `shape`, every row padding: it
    writes only the scratch page and attends to nothing. `ModelRunner.pack` fills rows in."""
    N, S, P, NB = shape.tokens, shape.seqs, shape.pages, shape.blocks
    i32 = lambda n, fill=0: np.full(n, fill, np.int32)
    layout = StepLayout(kv_page=i32(N, scratch_page), kv_offset=i32(N), page_table=np.zeros((S, P), np.int32),
                        decode_lens=i32(S), block_seq=i32(NB), block_start=i32(NB), block_len=i32(NB),
                        block_pos=i32(NB))
    step = StepInputs(tokens=i32(N), prev_rows=i32(N, -1), positions=i32(N, -1), logit_index=i32(S), layout=layout)
    sample = SampleInputs(temperature=np.zeros(S, np.float32), top_k=i32(S), top_p=np.ones(S, np.float32),
                          seeds=np.zeros(S, np.uint32), steps=i32(S),
                          banned=np.full((S, BANNED_TOKENS), -1, np.int32))
    return step, sample


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
    prev_row: int = -1  # >= 0: the last token is the previous step's sampled token of this row
    banned: Sequence[int] = ()  # token ids the step may not sample for it (at most BANNED_TOKENS)
    penalty_row: int = -1       # >= 0: its row of the runner's token counts (penalties on)
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    top_logprobs: int = 0       # how many top log-probabilities the step returns for it


class Dispatched(NamedTuple):
    """A step sent to the device: its outputs are device arrays, read when needed."""
    tokens: jax.Array    # [R] sampled tokens
    logprobs: jax.Array  # [S]
    rows: List[int]      # each chunk's row in them
    top: Optional[tuple] = None  # top_step's (ids [S,k], logprobs [S,k], chosen rank [S]), if run

    def read(self):
        """(tokens [n], logprobs [n]) as numpy, one per chunk (waits for the device)."""
        tokens, logprobs = np.asarray(self.tokens), np.asarray(self.logprobs)
        return tokens[self.rows], logprobs[self.rows]

    def read_top(self) -> Optional[tuple]:
        """(ids [n,k], logprobs [n,k], chosen rank [n]) as numpy, one per chunk, or None."""
        return None if self.top is None else tuple(np.asarray(a)[self.rows] for a in self.top)


def step_settings(cfg: ModelConfig, mesh, attention_impl: str = "auto", unroll_layers: str = "auto") -> dict:
    """How steps run on this mesh: the resolved attention impl, layer unrolling and GEMM row padding."""
    on_gpu = mesh.devices.flat[0].platform == "gpu"
    impl = attention_kernels.resolve_impl(attention_impl)
    if impl == "tpu" and mesh.size > 1:  # a Mosaic kernel is not partitioned by XLA: one device only
        if attention_impl == "tpu":
            raise ValueError(f"engine.attention_impl='tpu' runs on a one-device mesh only (this one has "
                             f"{mesh.size}); use 'auto' (the reference attention there)")
        impl = "reference"
    return dict(attention_impl=impl,
                unroll_layers={"on": True, "off": False, "auto": UNROLL_LAYERS_GPU and on_gpu}[unroll_layers],
                row_table=gemm_row_table(cfg, mesh))


def gemm_row_table(cfg: ModelConfig, mesh) -> gemm_rows.RowTable:
    """The decode steps' GEMM row padding on this mesh (USE_GEMM_ROW_TABLES)."""
    device = mesh.devices.flat[0]
    if not (USE_GEMM_ROW_TABLES and device.platform == "gpu" and mesh.size == 1):
        return {}
    return gemm_rows.load(cfg, device.device_kind)


def forward_kwargs(cfg: ModelConfig, mesh, shape: StepShape, attention_impl: str, unroll_layers: bool,
                   row_table: gemm_rows.RowTable) -> dict:
    """The static arguments of `forward_step` for a step of `shape` (settings from `step_settings`)."""
    return dict(cfg=cfg, attention_impl=attention_impl, mesh=mesh if attention_impl in attention_kernels.PALLAS_IMPLS else None,
                unroll_layers=unroll_layers and not shape.prefill,
                gemm_rows=() if shape.prefill else row_table.get(shape.tokens, ()))


def compile_ahead(cfg: ModelConfig, mesh, num_pages: int, page_size: int, max_batch: int,
                  shapes: Sequence[StepShape], attention_impl: str = "auto", unroll_layers: str = "auto",
                  modes: Sequence[str] = ("greedy",)) -> int:
    """Compiles the steps of `shapes` on `mesh` before any params or pool live there.

    Inputs are abstract (shapes and the shardings a runner on this mesh will use), and JAX keeps
    the executables, so a runner made on the mesh later runs these shapes without compiling:
    the cluster calls this during a preemption's grace period, while the old replicas serve.
    Returns how many step shapes were compiled.
    """
    from jaxserve.model.params import abstract_params
    from jaxserve.model.sharding import param_shardings

    settings = step_settings(cfg, mesh, attention_impl, unroll_layers)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg), param_shardings(cfg, mesh))
    pool = jax.ShapeDtypeStruct(paged_kv.pool_shape(cfg, num_pages, page_size), cfg.jnp_dtype,
                                sharding=paged_kv.pool_sharding(cfg, num_pages, page_size, mesh))
    rows = bucket(max_batch)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    prev = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated)

    def lower(shape):
        step = jax.tree.map(_abstract, padding_inputs(shape, num_pages)[0])
        return forward_step.lower(params, {"k": pool, "v": pool}, prev, step, **forward_kwargs(cfg, mesh, shape, **settings))
    modes_of = [[m for m in of if m in modes] for of in _sampling_modes(shapes)]
    compile_in_parallel(cfg, shapes, modes_of, lower, num_pages, rows, mesh)
    return len(shapes)


# XLA compiles outside the GIL, so step shapes compile side by side: a cold start of the 8B
# model's 132 shapes took about 290 s one at a time on an H200 host (docs/benchmarks.md).
COMPILE_THREADS = min(8, os.cpu_count() or 1)


def _abstract(a) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(a.shape, a.dtype)


def _sampling_modes(shapes: Sequence[StepShape]) -> List[tuple]:
    """The sampling modes to compile after each shape: every mode at a row count's first shape
    (the sampler depends only on the rows), greedy after that."""
    seen, out = set(), []
    for shape in shapes:
        out.append(sampling.MODES if shape.seqs not in seen else ("greedy",))
        seen.add(shape.seqs)
    return out


def compile_in_parallel(cfg: ModelConfig, shapes: Sequence[StepShape], modes_of: Sequence[Sequence[str]],
                        lower: Callable, num_pages: int, rows: int, mesh, bar=None) -> None:
    """Compiles `forward_step` at every shape (`lower(shape)` traces it, here, one at a time:
    tracing holds the GIL) and `sample_step` in each shape's modes, the XLA compiles on
    `COMPILE_THREADS` threads; `top_step` at each row count, and `set_counts_row`. JAX keeps
    the executables for the steps' calls."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    counts = {k: jax.ShapeDtypeStruct(s, d, sharding=replicated) for k, (s, d) in _counts_layout(cfg.vocab_size, rows).items()}

    def compile_shape(shape, lowered, modes):
        forward = lowered.compile()
        logits = jax.ShapeDtypeStruct((shape.seqs, cfg.vocab_size), jnp.float32, sharding=forward.output_shardings[0])
        lowered = []
        for mode in modes:
            sample = jax.tree.map(_abstract, sample_padding(shape, num_pages, mode)[1])
            lowered.append(sample_step.lower(logits, sample, mode=mode, rows=rows,
                                             counts=counts if sampling.split_mode(mode)[1] else None))
        if len(modes) > 1:  # a row count's first shape (_sampling_modes)
            lowered += [top_step.lower(logits, jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=replicated), k=k)
                        for k in sampling.TOP_K_BUCKETS]
        return lowered

    with concurrent.futures.ThreadPoolExecutor(max(1, COMPILE_THREADS)) as pool:
        pending = []
        for shape, modes in zip(shapes, modes_of):
            pending.append(pool.submit(compile_shape, shape, lower(shape), modes))
            if bar is not None:
                pending[-1].add_done_callback(lambda _: bar.update())
        samplers = [pool.submit(lowered.compile) for f in pending for lowered in f.result()]
        vocab_row = lambda dtype: jax.ShapeDtypeStruct((cfg.vocab_size,), dtype)
        scalar = jax.ShapeDtypeStruct((), jnp.int32)
        samplers.append(pool.submit(set_counts_row.lower(counts, scalar, vocab_row(jnp.int32), vocab_row(bool)).compile))
        for f in samplers:
            f.result()


class ModelRunner:
    def __init__(self, cfg: ModelConfig, params, mesh, num_pages: int, page_size: int, max_batch: int,
                 attention_impl: str = "auto", cache: Optional[dict] = None, unroll_layers: str = "auto"):
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.num_pages, self.page_size, self.max_batch = num_pages, page_size, max_batch
        self.max_pages_per_seq = -(-cfg.max_seq_len // page_size)
        self.rows = bucket(max_batch)
        self.decode_floor: Optional[tuple] = None  # see pack
        self.settings = step_settings(cfg, mesh, attention_impl, unroll_layers)
        self.attention_impl, self.unroll_layers = self.settings["attention_impl"], self.settings["unroll_layers"]
        # a caller-made pool (benchmarks fill one with random keys and values) or zeros
        self.cache = paged_kv.init_pool(cfg, num_pages, page_size, mesh) if cache is None else cache
        self._reset_prev_tokens()
        # the token counts of penalized requests, one row each (lent by the engine's PenaltyRows)
        self.counts = init_counts(cfg.vocab_size, self.rows, mesh)
        # serving over several processes: process 0 sends each step's inputs to the others first
        self.mirror = None
        if jax.process_count() > 1 and jax.process_index() == 0:
            from jaxserve.parallel.multihost import StepMirror
            self.mirror = StepMirror()

    def recover(self) -> bool:
        """After a failed step: makes the runner usable again. A step that failed on the device
        took the donated pool with it (its outputs hold the error); then a zero pool replaces it
        and True is returned (every page's contents are gone). The previous step's sampled
        tokens and every row of token counts are dropped either way."""
        lost = False
        try:
            jax.block_until_ready(self.cache)
        except Exception:  # noqa: BLE001 - whatever the device raised
            lost = True
        if lost or any(x.is_deleted() for x in self.cache.values()):
            self.cache = None  # the failed arrays first: their memory may be reclaimed
            self.cache = paged_kv.init_pool(self.cfg, self.num_pages, self.page_size, self.mesh)
            lost = True
        self._reset_prev_tokens()
        self.counts = None
        self.counts = init_counts(self.cfg.vocab_size, self.rows, self.mesh)
        return lost

    def _reset_prev_tokens(self) -> None:
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        self.prev_tokens = jax.device_put(np.zeros(self.rows, np.int32), replicated)

    def step_kwargs(self, shape: StepShape) -> dict:
        """The static arguments of `forward_step` for a step of this shape on this runner."""
        return forward_kwargs(self.cfg, self.mesh, shape, **self.settings)

    def launch(self, shape: StepShape, step: StepInputs, sample: SampleInputs, mode: str, top: int = 0):
        """Sends one packed step to the device (mirrored to the other processes, if any).
        Returns (tokens, logprobs, top) device arrays (top: None, or top_step's of width `top`)."""
        if self.mirror is not None:
            step, sample = self.mirror.lead(shape, sampling.MODES.index(mode), (step, sample))
        logits, self.cache = forward_step(self.params, self.cache, self.prev_tokens, step, **self.step_kwargs(shape))
        penalized = sample.penalties is not None
        self.prev_tokens, logprobs, counts = sample_step(logits, sample, mode=mode, rows=self.rows,
                                                         counts=self.counts if penalized else None)
        if penalized:
            self.counts = counts
        return self.prev_tokens, logprobs, top_step(logits, self.prev_tokens, k=top) if top else None

    def dispatch(self, chunks: Sequence[Chunk]) -> Dispatched:
        """Runs chunks (any mix of prefill chunks and decodes) as one step, without waiting."""
        shape, step, sample, rows = self.pack(chunks)
        mode = sampling.mode_for(*sample[:3], penalties=sample.penalties is not None)
        wanted = max(c.top_logprobs for c in chunks)
        top = sampling.top_k_bucket(wanted) if wanted else 0
        tokens, logprobs, top = self.launch(shape, step, sample, mode, top=top)
        return Dispatched(tokens, logprobs, rows, top)

    def set_counts(self, row: int, prompt: Sequence[int], output: Sequence[int]) -> None:
        """Sets a row of the token counts to a request's prompt and output tokens. Ordered after
        the steps already dispatched, which may still add to the row (for its last holder)."""
        V = self.cfg.vocab_size
        in_prompt = np.zeros(V, bool)
        in_prompt[np.asarray(prompt, np.int64)] = True
        output_counts = np.bincount(np.asarray(output, np.int64), minlength=V).astype(np.int32)
        self.counts = set_counts_row(self.counts, np.int32(row), output_counts, in_prompt)

    def run(self, chunks: Sequence[Chunk]):
        """`dispatch`, then wait: (next token [n], logprob [n]) as numpy, one per chunk."""
        return self.dispatch(chunks).read()

    def precompile(self, token_budget: int, progress: bool = False) -> int:
        """Compiles every step shape serving can reach, so that no request ever waits on XLA.

        Each shape is lowered and compiled (side by side; with several processes, by running it,
        so that the followers compile it too): JAX keeps the executables for the steps' calls,
        and with a warm persistent cache (`enable_compile_cache`) a restart only loads them.
        Then each runs once in each of its sampling modes, with padding rows only (which write
        nothing but the scratch page): an executable's first run does one-time work (on a GPU,
        loading its kernels and making cuBLAS's plans) that would otherwise land on a request.
        Returns the number of forward shapes compiled now (0 when all were compiled already).
        """
        before = TRACE_COUNT["forward"]
        shapes = step_shapes(self.max_batch, token_budget, self.max_pages_per_seq)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(shapes), desc="compiling step shapes", unit="shape")
        modes_of = _sampling_modes(shapes)
        if self.mirror is None:
            def lower(shape):
                step, _ = padding_inputs(shape, self.num_pages)
                return forward_step.lower(self.params, self.cache, self.prev_tokens, step, **self.step_kwargs(shape))
            compile_in_parallel(self.cfg, shapes, modes_of, lower, self.num_pages, self.rows, self.mesh, bar)
        for shape, modes in zip(shapes, modes_of):
            for mode in modes:  # inputs of their own: a launched step may still read them
                self.launch(shape, *sample_padding(shape, self.num_pages, mode), mode)
            for k in sampling.TOP_K_BUCKETS if len(modes) > 1 else ():  # a row count's first shape
                self.launch(shape, *sample_padding(shape, self.num_pages, "greedy"), "greedy", top=k)
            if bar is not None and self.mirror is not None:
                bar.update()
        bar is not None and bar.close()
        jax.block_until_ready(self.cache)
        return TRACE_COUNT["forward"] - before

    def padding_step(self) -> None:
        """Runs one step of padding rows only (it writes nothing but the scratch page)."""
        shape = step_shapes(self.max_batch, 1, self.max_pages_per_seq)[0]
        self.launch(shape, *padding_inputs(shape, self.num_pages), "greedy")
        jax.block_until_ready(self.cache)

    def follow(self, max_steps: Optional[int] = None) -> int:
        """A non-leading process: runs every step process 0 announces, until it says stop.

        Returns the number of steps run."""
        from jaxserve.parallel import multihost
        n = 0
        while max_steps is None or n < max_steps:
            announced = multihost.receive_header()
            if announced is None:
                break
            shape, mode_index = announced
            step, sample = multihost.receive(padding_inputs(shape, self.num_pages))
            self.launch(shape, step, sample, sampling.MODES[mode_index])
            n += 1
        return n

    def pack(self, chunks: Sequence[Chunk]) -> tuple:
        """`pack` for this runner. Decode-only steps run at least `decode_floor` (rows, pages)
        when set: shapes compiled ahead for this mesh (ServingCluster's deferred switch) that
        the requests grow into."""
        shape = None
        if self.decode_floor and all(len(c.tokens) == 1 for c in chunks):
            floor_rows, floor_pages = self.decode_floor
            if max(len(c.pages) for c in chunks) >= floor_pages:
                self.decode_floor = None  # the requests have grown into it
            else:
                shape = step_shape([1] * max(len(chunks), floor_rows), [floor_pages], self.max_batch,
                                   self.max_pages_per_seq)
        return pack(chunks, self.page_size, self.max_batch, self.max_pages_per_seq, self.num_pages, shape)


def pack(chunks: Sequence[Chunk], page_size: int, max_batch: int, max_pages: int, scratch_page: int,
         shape: Optional[StepShape] = None) -> tuple:
    """(StepShape, StepInputs, SampleInputs, each chunk's row) of one step over these chunks.

    Decodes take the first rows (token i is sequence i's), prefill chunks follow, each cut into
    query blocks. shape: the step's shape, when not `step_shape` of the chunks (a larger one)."""
    lens = [len(c.tokens) for c in chunks]
    shape = shape or step_shape(lens, [len(c.pages) for c in chunks], max_batch, max_pages)
    step, sample = padding_inputs(shape, scratch_page)
    lay = step.layout
    order = sorted(range(len(chunks)), key=lambda i: lens[i] > 1)  # decodes first, stable
    ordered = [chunks[i] for i in order]
    rows = [0] * len(chunks)
    for row, i in enumerate(order):
        rows[i] = row
        lay.page_table[row, :len(chunks[i].pages)] = chunks[i].pages
    # Decode rows (token i is sequence i's) are filled in bulk: per-row numpy calls cost more
    # host time at batch 128 than the rest of the step's scheduling.
    D = lens.count(1)
    decodes = ordered[:D]
    if D:
        starts = np.fromiter((c.start for c in decodes), np.int32, D)
        step.tokens[:D] = [c.tokens[0] for c in decodes]
        step.positions[:D] = starts
        step.prev_rows[:D] = [c.prev_row for c in decodes]
        lay.kv_page[:D] = [c.pages[c.start // page_size] for c in decodes]
        lay.kv_offset[:D] = starts % page_size
        lay.decode_lens[:D] = starts + 1
        step.logit_index[:D] = np.arange(D)
    t, b = D, 0
    for row in range(D, len(ordered)):
        c = ordered[row]
        L = len(c.tokens)
        pos = np.arange(c.start, c.start + L, dtype=np.int32)
        step.tokens[t:t + L] = c.tokens
        step.positions[t:t + L] = pos
        if c.prev_row >= 0:
            step.prev_rows[t + L - 1] = c.prev_row
        lay.kv_page[t:t + L] = np.asarray(c.pages, np.int32)[pos // page_size]
        lay.kv_offset[t:t + L] = pos % page_size
        step.logit_index[row] = t + L - 1
        for k in range(0, L, QUERY_BLOCK):
            lay.block_seq[b], lay.block_start[b] = row, t + k
            lay.block_len[b], lay.block_pos[b] = min(QUERY_BLOCK, L - k), c.start + k
            b += 1
        t += L
    n = len(ordered)
    sample.temperature[:n] = [c.temperature for c in ordered]
    sample.top_k[:n] = [c.top_k for c in ordered]
    sample.top_p[:n] = [c.top_p for c in ordered]
    sample.seeds[:n] = [c.seed for c in ordered]
    sample.steps[:n] = [c.step for c in ordered]
    for row, c in enumerate(ordered):
        if c.banned:
            sample.banned[row, :len(c.banned)] = c.banned
    if any(c.penalty_row >= 0 for c in ordered):
        pen = penalty_padding(shape.seqs)
        pen.rows[:n] = [c.penalty_row for c in ordered]
        pen.repetition[:n] = [c.repetition_penalty for c in ordered]
        pen.presence[:n] = [c.presence_penalty for c in ordered]
        pen.frequency[:n] = [c.frequency_penalty for c in ordered]
        sample = sample._replace(penalties=pen)
    return shape, step, sample, rows


def enable_compile_cache(path: str) -> None:
    """Keeps every compiled step in JAX's persistent compilation cache at `path` (a restarted
    engine loads them instead of compiling). Every entry is kept, however quick to compile."""
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
