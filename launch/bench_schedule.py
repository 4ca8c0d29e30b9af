"""Scheduling benchmark: FCFS vs MLFQ vs priority on a replayed trace, on the engine and in the simulator.

    # (a)+(b): the real engine on CPU (tiny model, lengths scaled down) and the simulator
    # calibrated from that engine's measured steps, at several loads (requests/s):
    python launch/bench_schedule.py --backend=both --loads=4,8,12
    # the simulator alone, in FastServe's artifact setting (OPT-13B fp16 on one A100-class GPU):
    python launch/bench_schedule.py --backend=sim --setting=fastserve --loads=0.5,1,2,3,4

The last line printed is one JSON object: per backend, policy and load, the average, p50, p95
and p99 JCT and TTFT (seconds), TPOT and goodput.
"""
import copy
import json
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from jaxserve.cli import run

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Model and engine config for --backend=engine.")
_TRACE = flags.DEFINE_string("trace", "../shared/data/azure_llm_2023_conv.csv", "CSV with TIMESTAMP, ContextTokens, GeneratedTokens.")
_BACKEND = flags.DEFINE_enum("backend", "both", ["sim", "engine", "both"], "Where to replay.")
_SETTING = flags.DEFINE_enum("setting", "engine", ["engine", "fastserve"], "Sim cost model: calibrated to this engine, or FastServe's artifact setting.")
_POLICIES = flags.DEFINE_list("policies", ["fcfs", "mlfq", "priority"], "Policies to compare.")
_LOADS = flags.DEFINE_list("loads", ["4", "8", "12"], "Arrival rates (requests/s) to rescale the trace to.")
_N = flags.DEFINE_integer("num_requests", 150, "Requests taken from the trace.")
_OFFSET = flags.DEFINE_integer("offset", 0, "First trace row used.")
_SCALE = flags.DEFINE_float("length_scale", 0.1, "Multiply prompt and output lengths by this.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt", 240, "Cap on prompt length after scaling.")
_MAX_OUTPUT = flags.DEFINE_integer("max_output", 64, "Cap on output length after scaling.")
_TTFT_SLO = flags.DEFINE_float("ttft_slo", 1.0, "TTFT SLO (s) for goodput.")
_TPOT_SLO = flags.DEFINE_float("tpot_slo", 0.1, "TPOT SLO (s) for goodput.")
_OUT = flags.DEFINE_string("out", "docs/bench_schedule.json", "Where to write the results.")
_PLOT = flags.DEFINE_string("plot", "docs/jct_vs_load.png", "JCT-vs-load plot ('' = none).")


def workload(load):
    from jaxserve.sim.workload import read_trace, rescale
    jobs = read_trace(_TRACE.value, limit=_N.value, offset=_OFFSET.value)
    return rescale(jobs, load, _SCALE.value, _MAX_PROMPT.value, _MAX_OUTPUT.value)


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
    from jaxserve.parallel.sharding import make_mesh
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
        for name in _POLICIES.value:
            jobs = workload(load) if key == "sim" else fastserve_jobs(load)
            sched = copy.deepcopy(config.scheduler)
            sched.policy = name
            sim = Simulator(policy_from_config(sched, cost), cost, sim_config)
            t = time.perf_counter()
            sim.run(jobs)
            results.setdefault(key, {}).setdefault(name, {})[str(load)] = summary(jobs, sim.stats)
            print(f"{key} {name:8s} load {load:5.2f}/s: {fmt(results[key][name][str(load)])} "
                  f"({time.perf_counter() - t:.1f}s wall)", flush=True)


def fastserve_jobs(rate):
    """Poisson arrivals at `rate`, lengths from the trace capped to OPT's 2048-token window."""
    from jaxserve.sim.workload import Job, read_trace
    trace = read_trace(_TRACE.value, limit=_N.value, offset=_OFFSET.value)
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
            f"TTFT avg {s['ttft_avg']:.3f} p99 {s['ttft_p99']:.3f} | goodput {s.get('goodput_rps', 0):.2f}/s")


def plot(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    backends = [b for b in ("engine", "sim", "fastserve") if b in results]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.8), squeeze=False)
    for ax, b in zip(axes[0], backends):
        for name, by_load in results[b].items():
            loads = sorted(by_load, key=float)
            metric = "latency_per_token_avg" if b == "fastserve" else "jct_avg"
            ax.plot([float(x) for x in loads], [by_load[x][metric] for x in loads], marker="o", label=name)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel("mean latency per output token (s)" if b == "fastserve" else "mean JCT (s)")
        ax.set_title({"engine": "engine (CPU, tiny model)", "sim": "simulator (calibrated)",
                      "fastserve": "sim: OPT-13B / A100 setting"}[b])
        ax.set_yscale("log")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv):
    del argv
    config = _CONFIG.value
    loads = [float(x) for x in _LOADS.value]
    results = {}
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
        plot(results, _PLOT.value)
    print(json.dumps(results))


if __name__ == "__main__":
    run(main)
