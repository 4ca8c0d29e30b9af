"""Offline throughput of the engine on a trace, against the device's physical floor (like `vllm bench throughput`).

    jaxserve bench throughput tiny --num_requests=20 --max_prompt=256 --config.engine.max_batch=8
    jaxserve bench throughput llama3_8b --num_requests=200 --output=results/throughput.json
    python launch/bench_throughput.py --config=configs/llama3_8b.py ...   # the same, from a checkout

Prompts are random token ids of the trace's lengths (Azure LLM trace columns TIMESTAMP,
ContextTokens, GeneratedTokens; the timestamps are ignored), every output is exactly the
recorded length (ignore_eos, greedy), and every request is submitted at once: the figure is
the engine's throughput with its queue full, not a latency. Lengths are capped by
--max_prompt / --max_output and by the model's context (prompt + output <= the engine's
context window).

Beside the achieved tok/s it prints the physical floor of the same work on the same device:
the memory bandwidth (a device-to-device copy) and the matrix rate (a large matmul) are
measured in this process, prefill is priced as compute at the matrix rate and decode as
weight + KV bytes at the bandwidth (see `prefill_floor_s` and `decode_floor_s`). Floor / wall
is the fraction of the hardware the engine achieved. Compile time is measured from jax's own
monitoring events, for start-up (+ precompile) and for the timed run separately. The last line
printed is one JSON object with every figure (also written to --output).
"""
from __future__ import annotations

import collections
import csv
import gc
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxserve import configs
from jaxserve.bench.data import SAMPLE_TRACE
from jaxserve.cli import run
from jaxserve.sampling_params import PENALTIES_OFF

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec("tiny"),
                                          "Model/serving config (`jaxserve bench throughput MODEL` sets it).")
_TRACE = flags.DEFINE_string("trace", SAMPLE_TRACE, "CSV with TIMESTAMP, ContextTokens, GeneratedTokens "
                             "(default: the first 400 rows of the Azure 2023 conversation trace).")
_NUM = flags.DEFINE_integer("num_requests", 200, "Timed requests: the trace's first rows.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup_requests", 0, "Other requests (the rows after the timed ones) run "
                               "first, untimed.", lower_bound=0)
_MAX_PROMPT = flags.DEFINE_integer("max_prompt", 2048, "Cap on prompt tokens.", lower_bound=1)
_MAX_OUTPUT = flags.DEFINE_integer("max_output", None, "Cap on output tokens (default: none).", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random prompt token ids.")
_OUTPUT = flags.DEFINE_string("output", "results/bench_throughput.json", "Also write every figure to this JSON "
                              "file ('' = nowhere).")
_INPUT_LEN = flags.DEFINE_integer("input_len", None, "Every prompt this long instead of the trace's "
                                  "(with --output_len: a fixed-shape decode benchmark).", lower_bound=1)
_OUTPUT_LEN = flags.DEFINE_integer("output_len", None, "Every output this long instead of the trace's.",
                                   lower_bound=1)
_PRECOMPILE = flags.DEFINE_bool("precompile", True, "Call engine.precompile() before timing.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Every request's sampling temperature (0: greedy).")
_PENALTIES = {name: flags.DEFINE_float(name, off, f"Every request's {name} ({off:g}: off).")
              for name, off in PENALTIES_OFF.items()}
_LOGPROBS = flags.DEFINE_integer("logprobs", None, "Every request's SamplingParams.logprobs (default: none).",
                                 lower_bound=0)
_HOST_PROFILE = flags.DEFINE_integer("host_profile", 0, "Run the timed requests once more under cProfile and "
                                     "print this many of the host's functions by own time (0: no).", lower_bound=0)
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Run the timed requests once more under jax's profiler, "
                                   "writing the trace here, and report the device's busy time per step from it.")

# Datasheet figures: (bytes/s of HBM, dense bf16 FLOP/s).
DATASHEET = {"H200": (4.8e12, 989e12), "H100 SXM": (3.35e12, 989e12)}


def log(*a):
    print("[bench]", *a, flush=True)


# ------------------------------------------------------------------------------------------------
# compile time, from jax's monitoring events
class CompileTimer:
    """Sums the durations of jax's compile events, per phase of the run.

    jax (0.10) records, for each new jit shape, '/jax/core/compile/jaxpr_trace_duration' (tracing,
    top-level only), '/jax/core/compile/jaxpr_to_mlir_module_duration' (lowering) and
    '/jax/core/compile/backend_compile_duration' (XLA): three consecutive, non-nested phases, so
    their sum is the time spent compiling. '/jax/compilation_cache/compile_time_saved_sec' (a
    persistent-cache hit: time *not* spent) is left out."""

    def __init__(self):
        self.phase = "startup"
        self.by_phase: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
        self.count: Dict[str, int] = collections.defaultdict(int)

    def __call__(self, event: str, duration: float, **kwargs) -> None:
        if "compile" in event and "time_saved" not in event:
            self.by_phase[self.phase][event] += duration
            if "backend_compile" in event:
                self.count[self.phase] += 1

    def total(self, phase: str) -> float:
        return sum(self.by_phase[phase].values())

    def summary(self) -> dict:
        return {p: {"compile_s": round(self.total(p), 3),
                    "backend_compile_s": round(sum(v for k, v in ev.items() if "backend_compile" in k), 3),
                    "backend_compiles": self.count[p],
                    "events": {k: round(v, 3) for k, v in ev.items()}}
                for p, ev in self.by_phase.items()}


class GcTimer:
    """Counts and times the cyclic garbage collector's collections, by generation, while entered:
    a full collection walks every tracked object, and a step's host time includes it."""

    def __enter__(self):
        self.collections, self.seconds, self._start = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        gc.callbacks.append(self._callback)
        return self

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.collections[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict:
        return {"collections": self.collections, "s": [round(x, 4) for x in self.seconds],
                "tracked_objects_after": len(gc.get_objects())}


# ------------------------------------------------------------------------------------------------
# trace
def read_trace(path: str, num: int, warmup: int) -> List[tuple]:
    """(ContextTokens, GeneratedTokens) of the trace's first num + warmup rows; read before the
    engine is built, so a short or malformed trace fails at once."""
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: trace lacks column(s) {sorted(missing)}")
        for row in reader:
            if len(rows) >= num + warmup:
                break
            rows.append((int(row["ContextTokens"]), int(row["GeneratedTokens"])))
    if len(rows) < num + warmup:
        raise ValueError(f"{path}: {len(rows)} rows, but --num_requests + --warmup_requests = {num + warmup}")
    return rows


def cap_lengths(rows: Sequence[tuple], max_prompt: int, max_output: Optional[int], max_context: int):
    """(prompt_lens, output_lens), capped by max_prompt / max_output and so that prompt + output
    fits max_context (the engine ends a request when it reaches its context window)."""
    prompts, outputs = [], []
    for p, o in rows:
        p = max(1, min(p, max_prompt, max_context - 1))
        o = max(1, min(o, max_output or o, max_context - p))
        prompts.append(p)
        outputs.append(o)
    return prompts, outputs


# ------------------------------------------------------------------------------------------------
# the physical floor
def model_figures(cfg) -> dict:
    """Sizes of the model that its floor needs, from the parameter specs of `cfg`.

    layer_matmul_params: weights multiplied by every token (q|k|v, o, gate|up, down) over all
    layers; lm_head_params: the vocabulary projection (the embedding table when tied), applied
    once per emitted token (prefill takes logits of each prompt's last token only);
    decode_weight_bytes: bytes a decode step must stream, all weights but the embedding table's
    gather (read whole only when it is the tied lm_head); kv_bytes_per_token: 2 (K and V) *
    layers * kv_heads * head_dim * dtype bytes."""
    import jax
    from jaxserve.model.params import is_spec, param_specs
    specs = param_specs(cfg)
    itemsize = int(np.dtype(cfg.jnp_dtype).itemsize)
    layer_leaves = jax.tree.leaves(specs["layers"], is_leaf=is_spec)
    # a matrix multiplied into the residual stream carries the "embed" axis; norms and biases do not
    matmul = sum(int(np.prod(s.shape)) for s in layer_leaves if "embed" in s.axes)
    total = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(specs, is_leaf=is_spec))
    embed = cfg.vocab_size * cfg.embed_dim
    return {"layer_matmul_params": matmul, "lm_head_params": embed, "total_params": total,
            "dtype_bytes": itemsize,
            "decode_weight_bytes": (total - (0 if cfg.tie_embeddings else embed)) * itemsize,
            "kv_bytes_per_token": 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize,
            "attn_flops_per_pair": 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim}


def prefill_flops(prompts: Sequence[int], fig: dict) -> float:
    """FLOPs every prompt must cost: 2 * layer matmul params per prompt token, the lm_head once
    per prompt (its first output token), and causal attention, 4 * layers * heads * head_dim per
    (query, key) pair, L^2/2 pairs for a prompt of L tokens."""
    P = np.asarray(prompts, np.float64)
    return float(2 * fig["layer_matmul_params"] * P.sum() + 2 * fig["lm_head_params"] * len(P)
                 + fig["attn_flops_per_pair"] * (P ** 2 / 2).sum())


def decode_steps_lower_bound(decode_tokens: Sequence[int], max_batch: int) -> int:
    """Fewest decode steps that can emit these per-request decode tokens with max_batch slots.

    A step emits at most one token per request and at most max_batch tokens, so it takes at
    least ceil(sum / max_batch) steps (perfect packing) and at least max(tokens) steps (the
    longest request, one token a step); the max of the two bounds. Greedy packing (longest
    first) reaches this bound closely when requests are many and short next to the total; it
    ignores that the KV pool may hold fewer than max_batch sequences (a floor errs low)."""
    d = [int(x) for x in decode_tokens if x > 0]
    if not d:
        return 0
    return max(math.ceil(sum(d) / max_batch), max(d))


def decode_kv_tokens_read(prompts: Sequence[int], outputs: Sequence[int]) -> float:
    """Cached tokens the decode steps must read, summed over all steps: a request's first output
    token comes out of its prefill; its j-th decode step (j = 1..out-1) reads the P + j - 1
    tokens already cached (the new token's own K/V is written, not streamed back)."""
    total = 0.0
    for p, o in zip(prompts, outputs):
        d = max(0, o - 1)
        total += d * p + d * (d - 1) / 2
    return total


def prefill_floor_s(prompts: Sequence[int], fig: dict, flops_per_s: float, bytes_per_s: float) -> dict:
    """Prefill at the matrix rate (compute-bound), but never faster than reading the weights once."""
    flops = prefill_flops(prompts, fig)
    compute = flops / flops_per_s
    memory = fig["decode_weight_bytes"] / bytes_per_s
    return {"flops": flops, "compute_s": compute, "weights_once_s": memory, "s": max(compute, memory)}


def decode_floor_s(prompts: Sequence[int], outputs: Sequence[int], fig: dict, max_batch: int,
                   flops_per_s: float, bytes_per_s: float) -> dict:
    """Decode at the bandwidth: every step streams the weights once plus the KV of its batch.

    memory_s = (steps * decode weight bytes + KV bytes read by all steps) / bandwidth, with
    steps = decode_steps_lower_bound; the KV total does not depend on the schedule. The compute
    of the same tokens at the matrix rate is a second lower bound (it binds only at large
    batches); the floor is the larger of the two."""
    decode_tokens = [max(0, o - 1) for o in outputs]
    steps = decode_steps_lower_bound(decode_tokens, max_batch)
    kv_tokens = decode_kv_tokens_read(prompts, outputs)
    kv_bytes = kv_tokens * fig["kv_bytes_per_token"]
    weight_bytes = steps * fig["decode_weight_bytes"]
    memory = (weight_bytes + kv_bytes) / bytes_per_s
    D = sum(decode_tokens)
    flops = 2 * (fig["layer_matmul_params"] + fig["lm_head_params"]) * D + fig["attn_flops_per_pair"] * (kv_tokens + D)
    compute = flops / flops_per_s
    return {"steps": steps, "decode_tokens": D, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "memory_s": memory, "flops": flops, "compute_s": compute, "s": max(memory, compute)}


def work_floor(prompts, outputs, fig, max_batch, flops_per_s, bytes_per_s) -> dict:
    """Floor of the whole run = prefill floor + decode floor (this engine runs a step's prefill
    chunks and its decodes as separate calls, so the two do not overlap)."""
    pre = prefill_floor_s(prompts, fig, flops_per_s, bytes_per_s)
    dec = decode_floor_s(prompts, outputs, fig, max_batch, flops_per_s, bytes_per_s)
    return {"prefill": pre, "decode": dec, "s": pre["s"] + dec["s"]}


# ------------------------------------------------------------------------------------------------
# device measurements
def _median_time(fn, runs: int, calls: int) -> float:
    """Median seconds per call over `runs` runs of `calls` back-to-back calls each (one
    block_until_ready per run, so the sync's latency is spread over the calls), after a warm-up."""
    import jax
    jax.block_until_ready(fn())
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn()
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / calls)
    return float(np.median(times))


def measure_bandwidth(on_cpu: bool) -> dict:
    """Device memory bandwidth: a device-to-device copy (y = x + 1) of 1 GiB (64 MiB on CPU),
    bytes read + bytes written per second. The two buffers swap roles every call and the
    destination is donated, so no call allocates: on CPU a fresh output buffer's first-touch page
    faults would otherwise dominate (3.8 GB/s instead of ~25 GB/s measured on a 2-core EPYC)."""
    import jax
    import jax.numpy as jnp
    n = (64 << 20 if on_cpu else 1 << 30) // 4
    copy = jax.jit(lambda src, dst: src + 1.0, donate_argnums=1, keep_unused=True)  # kept: donated
    bufs = [jnp.ones((n,), jnp.float32), jnp.zeros((n,), jnp.float32)]

    def step():
        bufs[0], bufs[1] = copy(bufs[0], bufs[1]), bufs[0]
        return bufs[0]
    t = _median_time(step, runs=7, calls=3 if on_cpu else 10)
    moved = 2 * n * 4
    del bufs[:]
    return {"bytes_moved": moved, "s": t, "bytes_per_s": moved / t}


def measure_matmul(on_cpu: bool) -> dict:
    """Matrix rate: an n^3 matmul, 8192 bf16 on an accelerator, 2048 float32 on CPU; 2 n^3 FLOPs."""
    import jax
    import jax.numpy as jnp
    n, dtype = (2048, jnp.float32) if on_cpu else (8192, jnp.bfloat16)
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    t = _median_time(lambda: f(a, b), runs=5, calls=1 if on_cpu else 10)
    del a, b
    return {"n": n, "dtype": jnp.dtype(dtype).name, "s": t, "flops_per_s": 2 * n ** 3 / t}


def datasheet(device_kind: str):
    """(name, bytes/s, dense bf16 FLOP/s) of the device's datasheet, for H200 and H100 SXM."""
    kind = device_kind.upper()
    if "H200" in kind and "NVL" not in kind:
        return ("H200",) + DATASHEET["H200"]
    if "H100" in kind and ("SXM" in kind or "HBM3" in kind) and "NVL" not in kind and "PCIE" not in kind:
        return ("H100 SXM",) + DATASHEET["H100 SXM"]
    return None


# ------------------------------------------------------------------------------------------------
def device_busy(trace_dir: str) -> Optional[dict]:
    """Busy seconds of the accelerator in a jax.profiler trace (union of its kernels and copies),
    and the number of kernels; None when the trace holds no accelerator (CPU runs)."""
    import glob
    import jax
    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return None
    spans, by_kernel, calls = [], collections.Counter(), collections.Counter()
    for plane in jax.profiler.ProfileData.from_file(files[-1]).planes:
        if plane.name.startswith("/device:") and "CPU" not in plane.name:
            for line in plane.lines:
                if "Stream" in line.name:
                    for ev in line.events:
                        spans.append((ev.start_ns, ev.end_ns, ev.name))
                        by_kernel[ev.name] += ev.duration_ns
                        calls[ev.name] += 1
    if not spans:
        return None
    top = {name: ns / 1e9 for name, ns in by_kernel.most_common(40)}
    span = max(s[1] for s in spans) - min(s[0] for s in spans)
    busy, gaps = union_and_gaps(spans)
    return {"busy_s": busy / 1e9, "span_s": span / 1e9, "kernels": len(spans), "idle_gaps": gap_histogram(gaps),
            "idle_gap_sites": gap_sites(spans), "top_kernels_s": top,
            "top_kernel_calls": {name: calls[name] for name in top}}


def gap_sites(events: Sequence[tuple], min_ns: int = 10_000, top: int = 12) -> List[tuple]:
    """Where the device idles: gaps of at least min_ns between (start, end, name) events, by
    the names of the last event before and the first after, as (before, after, count, seconds),
    the largest total first. A host that falls behind shows as gaps before a step's first
    kernels or copies."""
    sites: dict = collections.defaultdict(lambda: [0, 0])
    for gap, before, after in _sweep(events)[1]:
        if gap >= min_ns:
            site = sites[(before[0].split("(")[0][:60], after[0].split("(")[0][:60])]
            site[0] += 1
            site[1] += gap
    ranked = sorted(sites.items(), key=lambda kv: -kv[1][1])[:top]
    return [(before, after, n, round(ns / 1e9, 6)) for (before, after), (n, ns) in ranked]


def union_and_gaps(spans: Sequence[tuple]) -> tuple:
    """Total length covered by (start, end, ...) intervals (a device's streams overlap each
    other), and the lengths of the idle gaps between them."""
    busy, gaps = _sweep(spans)
    return busy, [gap for gap, _, _ in gaps]


def _sweep(events: Sequence[tuple]) -> tuple:
    """(busy length, [(gap, the rest of the event that ended last before it, of the next)]) of
    (start, end, ...) intervals, swept in start order."""
    busy, end, last, gaps = 0, None, None, []
    for a, b, *rest in sorted(events):
        if end is not None and a > end:
            gaps.append((a - end, last, rest))
        if end is None or b > end:
            busy += b - (a if end is None else max(a, end))
            end, last = b, rest
    return busy, gaps


GAP_EDGES_US = (2, 5, 20, 100, 1000)


def gap_histogram(gaps_ns: Sequence[int]) -> dict:
    """Idle time between kernels by gap length ("0-2us", ..., ">=1000us"): (count, seconds). Gaps
    of a few microseconds are launch latency between kernels; long ones, a device waiting on the host."""
    edges = (0,) + GAP_EDGES_US
    names = [f"{lo}-{hi}us" for lo, hi in zip(edges, edges[1:])] + [f">={edges[-1]}us"]
    hist = {n: [0, 0.0] for n in names}
    for g in gaps_ns:
        i = sum(g >= e * 1000 for e in GAP_EDGES_US)
        hist[names[i]][0] += 1
        hist[names[i]][1] += g / 1e9
    return {n: (c, round(t, 4)) for n, (c, t) in hist.items()}


def run_requests(engine, prefix: str, prompts: List[List[int]], outputs: Sequence[int]) -> dict:
    """Adds every request at once, then steps until none is left; token counts and steps."""
    from jaxserve import SamplingParams
    ids = [f"{prefix}-{i}" for i in range(len(prompts))]
    t0 = time.perf_counter()
    for rid, prompt, o in zip(ids, prompts, outputs):
        engine.add_request(rid, prompt, SamplingParams(max_tokens=int(o), ignore_eos=True, temperature=_TEMPERATURE.value,
                                                       logprobs=_LOGPROBS.value,
                                                       **{k: f.value for k, f in _PENALTIES.items()}))
    steps, final = 0, {}
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        for out in outs:
            if out.finished:
                final[out.request_id] = out
    wall = time.perf_counter() - t0
    got = [len(final[rid].token_ids) if rid in final else 0 for rid in ids]
    return {"wall_s": wall, "steps": steps, "output_tokens": int(sum(got)),
            "short": [(rid, g, int(o)) for rid, g, o in zip(ids, got, outputs) if g != o]}


def main(argv):
    del argv
    import jax

    timer = CompileTimer()
    jax.monitoring.register_event_duration_secs_listener(timer)
    try:
        bench(_CONFIG.value, timer)  # app.run exits with main's return value: return nothing
    finally:
        jax.monitoring.unregister_event_duration_listener(timer)


def bench(config, timer: CompileTimer) -> dict:
    """The whole benchmark under the flags' settings; returns every figure (the JSON object)."""
    import jax
    import jaxserve

    rows = read_trace(_TRACE.value, _NUM.value, _WARMUP.value)  # timed rows first, then warm-up rows
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    log("device", dev.device_kind, "jax", jax.__version__)

    # -- the physical ceilings, on this device, before the engine takes its memory ----------------
    timer.phase = "device_probe"
    bw = measure_bandwidth(on_cpu)
    mm = measure_matmul(on_cpu)
    sheet = datasheet(dev.device_kind)
    log(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s, {mm['dtype']} matmul {mm['n']}^3 "
        f"{mm['flops_per_s'] / 1e12:.2f} TFLOP/s" + (f"; datasheet ({sheet[0]}) {sheet[1] / 1e12:.2f} TB/s, "
                                                     f"{sheet[2] / 1e12:.0f} TFLOP/s" if sheet else ""))

    # -- the engine ---------------------------------------------------------------------------------
    timer.phase = "startup"
    t = time.perf_counter()
    llm = jaxserve.LLM(config)
    engine = llm.engine
    load_s = time.perf_counter() - t
    row_table = getattr(getattr(engine, "runner", None), "settings", {}).get("row_table")
    if row_table:
        log("GEMM row padding (step rows: (weight, rows run)):", row_table)
    cfg = getattr(engine, "cfg", None)
    if cfg is None:
        from jaxserve.model.config import model_config_from_dict
        cfg = model_config_from_dict(dict(config.model))
    max_batch = int(config.engine.max_batch)
    max_context = int(getattr(engine, "max_context", min(cfg.max_seq_len,
                                                          config.engine.num_pages * config.engine.page_size)))
    precompile_s, shapes = 0.0, None
    if _PRECOMPILE.value:
        timer.phase = "precompile"
        t = time.perf_counter()
        shapes = engine.precompile(progress=True)
        precompile_s = time.perf_counter() - t
        log(f"precompiled {shapes} step shapes in {precompile_s:.1f}s")

    num = _NUM.value
    if _INPUT_LEN.value or _OUTPUT_LEN.value:
        rows = [(_INPUT_LEN.value or p, _OUTPUT_LEN.value or o) for p, o in rows]
    all_p, all_o = cap_lengths(rows, _MAX_PROMPT.value, _MAX_OUTPUT.value, max_context)
    (prompt_lens, output_lens), (warm_p, warm_o) = (all_p[:num], all_o[:num]), (all_p[num:], all_o[num:])
    rng = np.random.default_rng(_SEED.value)

    def prompts_of(lens):
        return [rng.integers(0, cfg.vocab_size, n).tolist() for n in lens]
    prompts, warm_prompts = prompts_of(prompt_lens), prompts_of(warm_p)

    if warm_prompts:
        timer.phase = "warmup"
        w = run_requests(engine, "warmup", warm_prompts, warm_o)
        log(f"warm-up: {len(warm_prompts)} requests in {w['wall_s']:.1f}s")

    # -- the timed run ------------------------------------------------------------------------------
    stats0 = dict(getattr(engine, "stats", {}) or {})
    num_steps0 = getattr(engine, "num_steps", None)
    timer.phase = "timed"
    with GcTimer() as gc_timer:
        r = run_requests(engine, "bench", prompts, output_lens)
    timer.phase = "after"
    stats1 = dict(getattr(engine, "stats", {}) or {})
    engine_steps = (engine.num_steps - num_steps0) if num_steps0 is not None else None
    profiled = None
    # Reruns get new prompts of the same lengths: the timed prompts' pages are in the prefix cache.
    if _PROFILE_DIR.value:  # the same work again, traced (the profiler slows the host)
        import jax
        steps0 = engine.num_steps
        with jax.profiler.trace(_PROFILE_DIR.value):
            p = run_requests(engine, "profiled", prompts_of(prompt_lens), output_lens)
        profiled = device_busy(_PROFILE_DIR.value)
        if profiled is not None:
            profiled.update(wall_s=p["wall_s"], model_steps=engine.num_steps - steps0)

    if _HOST_PROFILE.value:  # where the host's share of a step goes (cProfile slows it: shares, not times)
        import cProfile
        import pstats
        prof = cProfile.Profile()
        prof.enable()
        h = run_requests(engine, "host-profiled", prompts_of(prompt_lens), output_lens)
        prof.disable()
        log(f"host-profiled rerun: {h['wall_s']:.2f} s wall")
        pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(_HOST_PROFILE.value)

    def delta(key):
        if key not in stats1:
            return None
        return stats1[key] - stats0.get(key, 0)
    model_steps = engine_steps if engine_steps else r["steps"]
    if r["short"]:
        log(f"warning: {len(r['short'])} requests ended with other than their max_tokens, e.g. "
            f"(id, got, wanted) {r['short'][:3]}")

    prompt_tokens, output_tokens, wall = int(sum(prompt_lens)), r["output_tokens"], r["wall_s"]
    fig = model_figures(cfg)
    floor = work_floor(prompt_lens, output_lens, fig, max_batch, mm["flops_per_s"], bw["bytes_per_s"])
    floor_sheet = (work_floor(prompt_lens, output_lens, fig, max_batch, sheet[2], sheet[1]) if sheet else None)

    compile_summary = timer.summary()
    res = {
        "device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
        "config": {"model": config.model.to_dict(), "engine": config.engine.to_dict(),
                   "scheduler_policy": config.scheduler.policy},
        "trace": _TRACE.value, "seed": _SEED.value,
        "sampling": {"temperature": _TEMPERATURE.value, "logprobs": _LOGPROBS.value,
                     **{k: f.value for k, f in _PENALTIES.items()}},
        "requests": len(prompts), "warmup_requests": len(warm_prompts),
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "expected_output_tokens": int(sum(output_lens)),
        "max_prompt_len": max(prompt_lens), "max_output_len": max(output_lens), "max_context": max_context,
        "wall_s": wall, "requests_per_s": len(prompts) / wall,
        "output_tok_s": output_tokens / wall, "total_tok_s": (prompt_tokens + output_tokens) / wall,
        "steps": r["steps"], "engine_num_steps": engine_steps,
        # per model step: engine.num_steps counts the steps that ran the model (a pipelined engine's
        # last step() call may only collect results); the step() calls where it has no counter
        "mean_tokens_per_step": (prompt_tokens + output_tokens) / max(1, model_steps),
        "mean_output_tokens_per_step": output_tokens / max(1, model_steps),
        "load_s": load_s, "precompile_s": precompile_s, "precompiled_shapes": shapes,
        "gemm_row_padding": {str(k): v for k, v in (row_table or {}).items()},
        "compile_s": {"startup": timer.total("startup"), "precompile": timer.total("precompile"),
                      "warmup": timer.total("warmup"), "timed": timer.total("timed")},
        "compile_detail": compile_summary,
        "host_s": delta("host_s"), "device_wait_s": delta("device_wait_s"),
        "idle_dispatches": delta("idle_dispatches"), "gc": gc_timer.summary(),
        "preemptions": delta("preemptions"), "recomputed_tokens": delta("recomputed_tokens"),
        "measured": {"bandwidth_bytes_per_s": bw["bytes_per_s"], "copy": bw,
                     "matmul_flops_per_s": mm["flops_per_s"], "matmul": mm},
        "datasheet": ({"name": sheet[0], "bandwidth_bytes_per_s": sheet[1], "bf16_flops_per_s": sheet[2]}
                      if sheet else None),
        "model_figures": fig,
        "floor": floor, "floor_s": floor["s"], "floor_fraction": floor["s"] / wall,
        "floor_datasheet": floor_sheet,
        "floor_datasheet_fraction": floor_sheet["s"] / wall if floor_sheet else None,
        "profiled": profiled,
    }

    # -- report -------------------------------------------------------------------------------------
    def row(name, value):
        print(f"  {name:<34} {value}")
    print("=" * 72)
    row("device", f"{dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    row("requests", f"{len(prompts)} (+{len(warm_prompts)} warm-up), max_batch {max_batch}, "
        f"context {max_context}")
    row("prompt tokens", f"{prompt_tokens} (max {max(prompt_lens)})")
    row("output tokens", f"{output_tokens} (expected {sum(output_lens)}, max {max(output_lens)})")
    row("wall", f"{wall:.3f} s")
    row("requests/s", f"{len(prompts) / wall:.2f}")
    row("output tok/s", f"{output_tokens / wall:.1f}")
    row("total tok/s", f"{(prompt_tokens + output_tokens) / wall:.1f}")
    row("steps", f"{r['steps']} step() calls" + (f", {engine_steps} model steps (engine.num_steps)"
                                                  if engine_steps is not None else ""))
    row("mean tokens / model step", f"{res['mean_tokens_per_step']:.1f} (output {res['mean_output_tokens_per_step']:.2f})")
    row("compile, start-up (load)", f"{timer.total('startup'):.2f} s (load {load_s:.1f} s)")
    row("compile, precompile", f"{timer.total('precompile'):.2f} s (precompile {precompile_s:.1f} s, "
        f"{shapes} shapes)" if _PRECOMPILE.value else "off")
    if warm_prompts:
        row("compile, warm-up run", f"{timer.total('warmup'):.2f} s")
    row("compile, timed run", f"{timer.total('timed'):.2f} s ({timer.count['timed']} XLA compiles)")
    hs, dw = res["host_s"], res["device_wait_s"]
    row("host / device wait", f"{hs:.3f} s / {dw:.3f} s" if hs is not None and dw is not None
        else f"{hs} / {dw} (engine.stats has no host_s / device_wait_s)")
    row("steps sent to an idle device", f"{res['idle_dispatches']} of {model_steps}")
    g = res["gc"]
    row("garbage collections (gen 0/1/2)", "/".join(map(str, g["collections"])) + " in " + "/".join(
        f"{x:.3f}" for x in g["s"]) + f" s; {g['tracked_objects_after']} objects tracked after")
    row("preemptions", f"{res['preemptions']} ({res['recomputed_tokens']} tokens recomputed)")
    row("measured bandwidth", f"{bw['bytes_per_s'] / 1e9:.1f} GB/s" + (
        f"  (datasheet {sheet[0]}: {sheet[1] / 1e9:.0f} GB/s)" if sheet else ""))
    row("measured matrix rate", f"{mm['flops_per_s'] / 1e12:.3f} TFLOP/s {mm['dtype']}" + (
        f"  (datasheet: {sheet[2] / 1e12:.0f} TFLOP/s bf16 dense)" if sheet else ""))
    pre, dec = floor["prefill"], floor["decode"]
    row("floor: prefill", f"{pre['s']:.4f} s ({pre['flops'] / 1e12:.3f} TFLOP)")
    row("floor: decode", f"{dec['s']:.4f} s (>= {dec['steps']} steps, "
        f"{(dec['weight_bytes'] + dec['kv_bytes']) / 1e9:.2f} GB, of it KV {dec['kv_bytes'] / 1e9:.2f} GB)")
    row("floor", f"{floor['s']:.4f} s -> {floor['s'] / wall * 100:.1f}% of it achieved"
        + (f"; at datasheet rates {floor_sheet['s']:.4f} s, {floor_sheet['s'] / wall * 100:.1f}%"
           if floor_sheet else ""))
    if profiled is not None:
        n = max(1, profiled["model_steps"])
        row("profiled rerun: device busy", f"{profiled['busy_s']:.3f} s of {profiled['wall_s']:.3f} s wall "
            f"({100 * profiled['busy_s'] / profiled['wall_s']:.1f}%); per model step {profiled['busy_s'] / n * 1e3:.2f} "
            f"ms busy, {profiled['wall_s'] / n * 1e3:.2f} ms wall; {profiled['kernels'] / n:.0f} kernels")
        row("profiled rerun: idle gaps", ", ".join(f"{k} {c} ({t:.3f} s)" for k, (c, t) in profiled["idle_gaps"].items()))
        for before, after, n, t in profiled["idle_gap_sites"][:5]:
            row("  idle >= 10 us", f"{n} gaps, {t:.3f} s: {before} -> {after}")
        for name, sec in profiled["top_kernels_s"].items():
            row(f"  {sec / n * 1e3:7.3f} ms/step", f"{profiled['top_kernel_calls'][name] / n:5.1f}/step {name[:60]}")
    print("=" * 72, flush=True)
    if _OUTPUT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
        with open(_OUTPUT.value, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(json.dumps(res, default=str), flush=True)
    return res

