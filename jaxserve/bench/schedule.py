"""Scheduling benchmark: FCFS, MLFQ, priority and Gittins on a workload, on the engine and in the simulator.

    # (a)+(b): the real engine on CPU (tiny model, lengths scaled down) and the simulator
    # calibrated from that engine's measured steps, at several loads (requests/s):
    jaxserve bench schedule --backend=both --loads=4,8,12
    # the simulator alone, in FastServe's artifact setting (OPT-13B fp16 on one A100-class GPU):
    jaxserve bench schedule --backend=sim --setting=fastserve --loads=0.5,1,2,3,4
    # the prefill-heavy, heavy-tailed synthetic workload (Poisson arrivals, lognormal lengths):
    jaxserve bench schedule --backend=sim --setting=fastserve --workload=synthetic --num_requests=1000 \
        --loads=0.5,2,2.5,3

Workloads: `--workload=trace` replays any CSV with the Azure columns (`--trace`); `synthetic`
draws lengths from `--prompt_mean/--prompt_cv/--output_mean/--output_cv` (capped by
`--synthetic_max_prompt/--synthetic_max_output`). On the engine and its calibrated simulator
every workload's lengths are then scaled by `--length_scale` and capped by `--max_prompt` and
`--max_output`, so that the tiny model on CPU can serve them.

The last line printed is one JSON object: per backend, policy and load, the average, p50, p95
and p99 JCT and TTFT (seconds), TPOT, goodput, requests served per second and, in the
simulator, the one-server FCFS, Gittins and SRPT figures (`queueing.py`) on the same job sizes.
"""
import copy
import json
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxserve import configs
from jaxserve.bench import plots
from jaxserve.bench.data import SAMPLE_TRACE
from jaxserve.cli import run

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec("tiny"),
                                          "Model and engine config for --backend=engine (`jaxserve bench schedule MODEL`).")
_TRACE = flags.DEFINE_string("trace", SAMPLE_TRACE, "CSV with TIMESTAMP, ContextTokens, GeneratedTokens (default: the "
                             "shipped 400-request sample, jaxserve/bench/data/README.md).")
_BACKEND = flags.DEFINE_enum("backend", "both", ["sim", "engine", "both"], "Where to replay.")
_SETTING = flags.DEFINE_enum("setting", "engine", ["engine", "fastserve"], "Sim cost model: calibrated to this engine, or FastServe's artifact setting.")
_POLICIES = flags.DEFINE_list("policies", ["fcfs", "mlfq", "priority", "gittins"], "Policies to compare.")
_WORKLOAD = flags.DEFINE_enum("workload", "trace", ["trace", "synthetic"], "Replay --trace, or draw a synthetic workload.")
_PROMPT_MEAN = flags.DEFINE_float("prompt_mean", 2000, "Synthetic: mean prompt length (tokens).")
_PROMPT_CV = flags.DEFINE_float("prompt_cv", 1.0, "Synthetic: coefficient of variation of prompt lengths.")
_OUTPUT_MEAN = flags.DEFINE_float("output_mean", 30, "Synthetic: mean output length (tokens).")
_OUTPUT_CV = flags.DEFINE_float("output_cv", 4.0, "Synthetic: coefficient of variation of output lengths.")
_SYN_MAX_PROMPT = flags.DEFINE_integer("synthetic_max_prompt", 8192, "Synthetic: cap on prompt lengths.")
_SYN_MAX_OUTPUT = flags.DEFINE_integer("synthetic_max_output", 2048, "Synthetic: cap on output lengths.")
_SEED = flags.DEFINE_integer("seed", 0, "Synthetic: seed of the lengths and arrivals.")
_LOADS = flags.DEFINE_list("loads", ["4", "8", "12"], "Arrival rates (requests/s) to rescale the trace to.")
_N = flags.DEFINE_integer("num_requests", 150, "Requests taken from the trace.")
_OFFSET = flags.DEFINE_integer("offset", 0, "First trace row used.")
_SCALE = flags.DEFINE_float("length_scale", 0.1, "Multiply prompt and output lengths by this.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt", 240, "Cap on prompt length after scaling.")
_MAX_OUTPUT = flags.DEFINE_integer("max_output", 64, "Cap on output length after scaling.")
_TTFT_SLO = flags.DEFINE_float("ttft_slo", 1.0, "TTFT SLO (s) for goodput.")
_TPOT_SLO = flags.DEFINE_float("tpot_slo", 0.1, "TPOT SLO (s) for goodput.")
_OUT = flags.DEFINE_string("out", "results/bench_schedule.json", "Where to write the results ('' = nowhere).")
_PLOT = flags.DEFINE_string("plot", "results/jct_vs_load.png", "JCT-vs-load plot ('' = none; skipped without matplotlib).")


def source_jobs(load):
    """The workload at `load` requests/s, lengths as drawn or recorded."""
    from jaxserve.sim.workload import read_trace, synthetic
    if _WORKLOAD.value == "synthetic":
        return synthetic(_N.value, load, _PROMPT_MEAN.value, _PROMPT_CV.value, _OUTPUT_MEAN.value, _OUTPUT_CV.value,
                         _SYN_MAX_PROMPT.value, _SYN_MAX_OUTPUT.value, seed=_SEED.value)
    return read_trace(_TRACE.value, limit=_N.value, offset=_OFFSET.value)


def workload(load):
    """The workload scaled to the engine's setting (tiny model on CPU)."""
    from jaxserve.sim.workload import rescale
    return rescale(source_jobs(load), load, _SCALE.value, _MAX_PROMPT.value, _MAX_OUTPUT.value)


def make_engine(config, policy_name, cfg, params, mesh, tokenizer, cost_model):
    from jaxserve.engine.engine import Engine, EngineConfig
    from jaxserve.llm import policy_from_config
    config = copy.deepcopy(config)
    config.scheduler.policy = policy_name
    engine_config = EngineConfig(policy=policy_name, **config.engine)
    policy = policy_from_config(config.scheduler, cost_model)
    return Engine(cfg, params, mesh, tokenizer, engine_config, policy=policy, cost_model=cost_model)


def engine_runs(config, loads, results):
    """Replays every (policy, load) on the engine; returns the cost model fitted to all steps."""
    from jaxserve.checkpoint.load import load as load_model
    from jaxserve.model.sharding import make_mesh
    from jaxserve.engine.engine import EngineConfig, engine_cost_model
    from jaxserve.sim.engine_replay import replay
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    cfg, params, tokenizer = load_model(config.checkpoint, config.model, mesh)
    cost = engine_cost_model(cfg, EngineConfig(**config.engine))
    log = []
    # Warm-up: compile every step shape (a compilation mid-replay would stall the clock by
    # seconds), then profile steps with arrivals compressed.
    t = time.perf_counter()
    compiled = make_engine(config, "fcfs", cfg, params, mesh, tokenizer, cost).precompile()
    print(f"compiled {compiled} step shapes in {time.perf_counter() - t:.0f} s", flush=True)
    warm = workload(max(loads) * 4)
    for name in _POLICIES.value:
        engine = make_engine(config, name, cfg, params, mesh, tokenizer, cost)
        replay(engine, warm)
        log += engine.step_log
        cost.coef = cost.fit([f for f, _ in log], [t for _, t in log]).coef
    print("cost model after warm-up:", np.array2string(cost.coef, precision=8))
    for load in loads:
        for name in _POLICIES.value:
            jobs = workload(load)
            engine = make_engine(config, name, cfg, params, mesh, tokenizer, cost)
            t = time.perf_counter()
            replay(engine, jobs)
            log += engine.step_log
            results.setdefault("engine", {}).setdefault(name, {})[str(load)] = summary(jobs, engine.stats)
            print(f"engine {name:8s} load {load:5.1f}/s: {fmt(results['engine'][name][str(load)])} "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
    cost.coef = cost.fit([f for f, _ in log], [t for _, t in log]).coef
    return cost, cost.page_bytes


def sim_runs(config, loads, cost, sim_config, results, key):
    from jaxserve.llm import policy_from_config
    from jaxserve.sim.simulator import Simulator
    for load in loads:
        fresh = lambda: workload(load) if key == "sim" else fastserve_jobs(load)  # a replay fills its jobs in
        results.setdefault(key, {}).setdefault("one_server_bound", {})[str(load)] = one_server_bound(fresh(), cost)
        for name in _POLICIES.value:
            jobs = fresh()
            sched = copy.deepcopy(config.scheduler)
            sched.policy = name
            sim = Simulator(policy_from_config(sched, cost), cost, sim_config)
            t = time.perf_counter()
            sim.run(jobs)
            results.setdefault(key, {}).setdefault(name, {})[str(load)] = summary(jobs, sim.stats)
            print(f"{key} {name:8s} load {load:5.2f}/s: {fmt(results[key][name][str(load)])} "
                  f"({time.perf_counter() - t:.1f}s wall)", flush=True)


def one_server_bound(jobs, cost):
    """Mean JCT (s) of the same jobs in one server (queueing.py) under FCFS, the Gittins index of
    their sizes and SRPT (sizes known: no one-server policy does better): each job's prefill at
    batch 1 plus its output tokens at a decode token's cost."""
    from jaxserve.scheduling.gittins import decode_token_s
    from jaxserve.sim.queueing import simulate
    token_s = decode_token_s(cost)
    sizes = np.array([max(1, round(1e3 * (cost.prefill_time(j.prompt_len) + j.output_len * token_s))) for j in jobs])
    arrivals = np.array([j.arrival for j in jobs]) * 1e3
    return {p: float(simulate(arrivals, sizes, p).mean() / 1e3) for p in ("fcfs", "gittins", "srpt")}


def fastserve_jobs(rate):
    """Poisson arrivals at `rate`; the trace's lengths capped to OPT's 2048-token window, or the
    synthetic workload as drawn."""
    from jaxserve.sim.workload import Job
    if _WORKLOAD.value == "synthetic":
        return source_jobs(rate)
    trace = source_jobs(rate)
    gaps = np.random.default_rng(0).exponential(1.0 / rate, size=len(trace))
    t = np.cumsum(gaps) - gaps[0]
    return [Job(j.request_id, float(a), min(j.prompt_len, 1536), min(j.output_len, 512)) for j, a in zip(trace, t)]


def summary(jobs, stats):
    from jaxserve.sim.workload import summarize
    s = summarize(jobs, _TTFT_SLO.value, _TPOT_SLO.value)
    per_token = [j.jct / j.output_len for j in jobs if j.finish is not None]
    s["latency_per_token_avg"] = float(np.mean(per_token))
    s["latency_per_token_p95"] = float(np.percentile(per_token, 95))
    s.update({k: v for k, v in stats.items() if k in ("preemptions", "swap_outs", "swap_ins", "steps")})
    return s


def fmt(s):
    return (f"JCT avg {s['jct_avg']:.3f} p50 {s['jct_p50']:.3f} p95 {s['jct_p95']:.3f} p99 {s['jct_p99']:.3f} | "
            f"TTFT avg {s['ttft_avg']:.3f} p99 {s['ttft_p99']:.3f} | served {s['served_rps']:.3f}/s "
            f"goodput {s.get('goodput_rps', 0):.2f}/s")


def main(argv):
    del argv
    config = _CONFIG.value
    loads = [float(x) for x in _LOADS.value]
    results = {}
    print(f"workload: {_WORKLOAD.value}" + (f", trace {_TRACE.value}" if _WORKLOAD.value == "trace" else ""))
    if _SETTING.value == "fastserve":
        from jaxserve.sim.settings import fastserve_setting
        cost, sim_config = fastserve_setting()
        sim_runs(config, loads, cost, sim_config, results, "fastserve")
    else:
        from jaxserve.scheduling.cost_model import CostModel
        from jaxserve.sim.simulator import SimConfig
        e = config.engine
        if _BACKEND.value in ("engine", "both"):
            cost, bytes_per_page = engine_runs(config, loads, results)
        else:
            cost, bytes_per_page = CostModel(page_size=e.page_size, max_batch=e.max_batch, max_chunk=e.max_chunk), 0
        print("cost model:", np.array2string(cost.coef, precision=8))
        if _BACKEND.value in ("sim", "both"):
            sim_config = SimConfig(num_pages=e.num_pages, page_size=e.page_size, host_pages=e.host_pages,
                                   max_batch=e.max_batch, token_budget=e.token_budget, max_chunk=e.max_chunk,
                                   bytes_per_page=bytes_per_page)
            sim_runs(config, loads, cost, sim_config, results, "sim")
        if "engine" in results and "sim" in results:
            results["sim_vs_engine_avg_jct"] = {
                name: {load: results["sim"][name][load]["jct_avg"] / results["engine"][name][load]["jct_avg"]
                       for load in results["engine"][name]} for name in results["engine"]}
        results["cost_model"] = dict(zip(__import__("jaxserve.scheduling.cost_model", fromlist=["FEATURES"]).FEATURES,
                                         map(float, cost.coef)))
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)
    if _PLOT.value:
        plots.jct_vs_load(results, _PLOT.value)
    print(json.dumps(results))

