"""Spot-preemption benchmark: SpotServe recovery vs restart vs reroute, simulated and on the engine.

    jaxserve bench spot --backend=sim                      # SpotServe's setting, trace A_S (seconds)
    jaxserve bench spot tiny --backend=engine              # the real engine on 8 CPU devices (minutes)
    jaxserve bench spot --backend=sim --availability=jaxserve/bench/data/spotserve_trace_BS.jsonl \
        --trace=PATH/azure_llm_2023_conv.csv               # segment B_S, the whole request trace

--backend=sim: the spot simulator (jaxserve.sim.spot_simulator) in SpotServe's own setting
(--sim_config, default GPT-20B on 4 x T4 nodes with the artifact's measured step profile), one
trace node = one node of devices, for the paper's workload (512/128 tokens, 0.35 req/s) and the
Azure conversation trace. --backend=engine: the real engine at small scale, one trace node = one
CPU device (of 8 fake ones), the trace replayed --time_scale times faster than real time. Every
removal is noticed --grace_s (trace seconds) before it happens. The availability traces (A_S, B_S
and the whole g4dn trace) and a 400-request sample of the Azure trace ship with the package
(jaxserve/bench/data/README.md); the simulator's Azure workload takes up to 1,024 requests, so
pass the whole trace with --trace for the published figures.

The last line printed is one JSON object with each method's P50/P90/P99 latency (s), requests
lost, device-hours (in trace time), the re-parallelization events (with their trace time `t`),
every request's (arrival, latency or null if lost), and the nodes alive after each trace event;
--plot draws them as a timeline. The simulator also replays SpotServe's ablation levels
(`sim_ablations`) and, for the cost per request (`sim_cost`), on-demand fleets of each size the
trace visits; by default it counts the requests that arrive before the trace's DONE notice, as
the artifact does (--horizon=all: the whole workload).
"""
import dataclasses
import json
import os
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from jaxserve import configs  # noqa: E402
from jaxserve.bench import plots  # noqa: E402
from jaxserve.bench.data import SAMPLE_TRACE, SPOT_TRACES  # noqa: E402
from jaxserve.cli import run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", configs.config_spec("tiny"),
                                          "Model and engine config for --backend=engine (`jaxserve bench spot MODEL`).")
_AVAIL = flags.DEFINE_string("availability", SPOT_TRACES["trace_AS.jsonl"],
                             "Availability trace (default: SpotServe's segment A_S, shipped with the package).")
_TRACE = flags.DEFINE_string("trace", SAMPLE_TRACE, "Request trace, Azure columns (default: the shipped 400-request sample).")
_METHODS = flags.DEFINE_list("methods", ["spotserve", "restart", "reroute"], "Recovery methods to compare.")
_TIME_SCALE = flags.DEFINE_float("time_scale", 60.0, "Trace seconds replayed per real second.")
_GRACE = flags.DEFINE_float("grace_s", 30.0, "Notice before each event, in trace seconds (0 = none).")
_RATE = flags.DEFINE_float("rate", 3.0, "Request arrivals per real second.")
_N = flags.DEFINE_integer("num_requests", 60, "Requests taken from the request trace.")
_SCALE = flags.DEFINE_float("length_scale", 0.1, "Multiply prompt and output lengths by this.")
_OUT = flags.DEFINE_string("out", "results/bench_spot.json", "Where to write the results ('' = nowhere).")
_PLOT = flags.DEFINE_string("plot", "results/spot_timeline.png", "Timeline plot ('' = none; skipped without matplotlib).")
_BACKEND = flags.DEFINE_enum("backend", "both", ["sim", "engine", "both"], "Where to replay.")
_SIM_CONFIG = config_flags.DEFINE_config_file("sim_config", configs.config_spec("spotserve_gpt20b"), "Spot simulator setting.")
_WORKLOADS = flags.DEFINE_list("workloads", ["paper", "azure"], "Simulator workloads: the paper's, the Azure trace.")
_ABLATIONS = flags.DEFINE_bool("ablations", True, "Simulator: also SpotServe without, in turn, each component "
                               "(the artifact's ablation levels, jaxserve.elastic.recovery.ABLATIONS).")
_HORIZON = flags.DEFINE_enum("horizon", "trace", ["trace", "all"], "Simulator: requests arriving up to the trace's "
                             "DONE notice (as the artifact counts them), or the whole workload.")
_SPOT_PRICE = flags.DEFINE_float("spot_price", 1.9046, "Spot price per node-hour (the artifact's g4dn.12xlarge).")
_ONDEMAND_PRICE = flags.DEFINE_float("ondemand_price", 3.912, "On-demand price per node-hour (g4dn.12xlarge).")
_SIM_REQUESTS = flags.DEFINE_integer("sim_requests", 0, "Simulated requests (0 = the sim config's).")
_WARMUP = flags.DEFINE_bool("warmup", True, "Replay every method once untimed before timing any, so that the measured "
                            "run does not include XLA compilation for the meshes the trace visits.")


def run_method(method, config, cfg, params, tokenizer, ckpt, events, jobs):
    import jax
    from jaxserve.engine.engine import EngineConfig
    from jaxserve.elastic.cluster import ServingCluster
    from jaxserve.sampling_params import SamplingParams
    from jaxserve.sim.engine_replay import prompt_ids
    devices = jax.devices()
    node_device, alive = {}, set()

    def device_of(node):
        if node not in node_device and len(node_device) < len(devices):
            node_device[node] = devices[len(node_device)]
        return node_device.get(node)

    first = [e for e in events if e.time_s == events[0].time_s]
    for e in first:
        alive |= {device_of(n) for n in e.nodes} - {None}
    rest = [e for e in events if e not in first]
    init = sorted(alive, key=lambda d: d.id)
    model = 1 if method == "reroute" else min(2, len(init))
    cluster = ServingCluster(cfg, params, init[: (len(init) // model) * model], len(init) // model, model,
                             EngineConfig(**config.engine), tokenizer, checkpoint_path=ckpt, method=method)
    # notices happen grace_s before each event; a "remove" is acted on at its notice
    timeline = sorted([((e.time_s - (_GRACE.value if e.kind == "remove" else 0)) / _TIME_SCALE.value, e)
                       for e in rest], key=lambda x: x[0])
    start = time.monotonic()
    pending = sorted(jobs, key=lambda j: j.arrival)
    i, k, device_seconds, last, records = 0, 0, 0.0, 0.0, []
    finish = {}
    horizon = max(pending[-1].arrival, timeline[-1][0] if timeline else 0)
    while i < len(pending) or cluster.has_unfinished() or (k < len(timeline) and timeline[k][0] <= horizon):
        now = time.monotonic() - start
        device_seconds += (now - last) * len(cluster.devices)
        last = now
        while k < len(timeline) and timeline[k][0] <= now:
            notice, e = timeline[k]
            k += 1
            devs = [device_of(n) for n in e.nodes]
            devs = [d for d in devs if d is not None]
            try:
                if e.kind == "remove":
                    ev = cluster.notify_preemption([d for d in devs if d in cluster.devices],
                                                   _GRACE.value / _TIME_SCALE.value)
                else:
                    ev = cluster.notify_acquisition(devs)
                records.append(dict(dataclasses.asdict(ev), t=notice * _TIME_SCALE.value))
            except (RuntimeError, ValueError) as err:  # too few devices for this method: it waits
                records.append({"kind": e.kind, "t": notice * _TIME_SCALE.value, "error": str(err)})
        while i < len(pending) and pending[i].arrival <= now:
            j = pending[i]
            cluster.add_request(j.request_id, prompt_ids(j, cfg.vocab_size),
                                SamplingParams(max_tokens=j.output_len, temperature=0.0, ignore_eos=True),
                                arrival_time=start + j.arrival)
            i += 1
        if cluster.has_unfinished():
            for o in cluster.step():
                if o.finished:
                    finish[o.request_id] = o.finish_time - o.arrival_time
        else:
            time.sleep(0.01)
    for j in jobs:
        j.finish = j.arrival + finish[j.request_id] if j.request_id in finish else None
    r = latency_summary(jobs, time_scale=_TIME_SCALE.value)
    r.update(device_hours=device_seconds * _TIME_SCALE.value / 3600, events=records)
    return r


def latency_summary(jobs, time_scale: float = 1.0) -> dict:
    """Latency percentiles, and each request's (arrival in trace seconds, latency or None if lost)."""
    done = [j.finish - j.arrival for j in jobs if j.finish is not None]
    lat = np.array(done) if done else np.zeros(1)
    return {"p50_s": float(np.percentile(lat, 50)), "p90_s": float(np.percentile(lat, 90)),
            "p99_s": float(np.percentile(lat, 99)), "avg_s": float(lat.mean()), "requests_lost": len(jobs) - len(done),
            "requests": [[j.arrival * time_scale, None if j.finish is None else j.finish - j.arrival] for j in jobs]}


def sim_jobs(workload, sim_cfg, events):
    """The simulator's requests: the paper's (Gamma arrivals, fixed lengths) or the Azure trace's,
    starting once the trace has devices enough for one replica."""
    from jaxserve.elastic.availability import node_counts
    from jaxserve.sim.spot_simulator import gamma_arrivals
    from jaxserve.sim.workload import read_trace, rescale
    w = sim_cfg.workload
    n = _SIM_REQUESTS.value or w.num_requests
    if workload == "paper":
        jobs = gamma_arrivals(n, w.rate, w.cv, w.prompt_len, w.output_len, w.seed)
    else:  # Azure conversation lengths (capped to the model's 2k window), arrivals rescaled to the rate
        jobs = rescale(read_trace(_TRACE.value, limit=n), w.azure_rate, 1.0, 1536, 512)
    need = sim_cfg.min_replica_devices / sim_cfg.devices_per_node
    start = next((t for t, count in node_counts(events) if count >= need), 0.0)
    for j in jobs:
        j.arrival += start
    return jobs


def sim_runs(events, end) -> dict:
    """{"sim": each method's results by workload; "sim_ablations": SpotServe's ablation levels';
    "sim_cost": cost per request on spot against on-demand fleets of every size the trace
    visits, serving the same requests, at the trace's prices}."""
    from jaxserve.elastic.availability import AvailabilityEvent, node_counts, node_seconds
    from jaxserve.elastic.recovery import ABLATIONS
    from jaxserve.sim.spot_simulator import SpotSimulator, setting_from_config
    sim_cfg = _SIM_CONFIG.value
    setting = setting_from_config(sim_cfg)
    duration = end if end is not None else events[-1].time_s
    spot_node_h = node_seconds(events, duration) / 3600
    out = {"sim": {}, "sim_ablations": {}, "sim_cost": {}}
    for workload in _WORKLOADS.value:
        def replay(method, availability, label):
            jobs = sim_jobs(workload, sim_cfg, events)
            if _HORIZON.value == "trace":
                jobs = [j for j in jobs if j.arrival < duration - _GRACE.value]
            sim = SpotSimulator(setting, method, grace_s=_GRACE.value)
            t = time.perf_counter()
            sim.run(jobs, availability)
            r = latency_summary(jobs)
            r.update(requests_restarted=sim.restarted, device_hours=sim.device_seconds / 3600, events=sim.events,
                     cost_per_request=spot_node_h * _SPOT_PRICE.value / max(1, len(jobs) - r["requests_lost"]))
            print(f"sim {workload:6s} {label:22s} avg {r['avg_s']:.1f}s P50 {r['p50_s']:.1f}s P90 {r['p90_s']:.1f}s "
                  f"P99 {r['p99_s']:.1f}s lost {r['requests_lost']} restarted {sim.restarted} "
                  f"({time.perf_counter() - t:.1f}s wall)", flush=True)
            return r, len(jobs)
        runs = {m: replay(m, events, m)[0] for m in dict.fromkeys(_METHODS.value + ["spotserve"])}
        out["sim"][workload] = {m: runs[m] for m in _METHODS.value}
        if not _ABLATIONS.value:
            continue
        out["sim_ablations"][workload] = {m: runs[m] if m in runs else replay(m, events, m)[0] for m in ABLATIONS}
        fleets = {}
        for nodes in sorted({count for _, count in node_counts(events) if count > 0}):
            always = [AvailabilityEvent(0.0, "add", tuple(f"node-{i}" for i in range(nodes)))]
            r, n = replay("spotserve", always, f"on-demand x{nodes}")
            fleets[nodes] = dict(p99_s=r["p99_s"], avg_s=r["avg_s"],
                                 cost_per_request=nodes * duration / 3600 * _ONDEMAND_PRICE.value / max(1, n))
        spot = runs["spotserve"]
        as_fast = [v for v in fleets.values() if v["p99_s"] <= spot["p99_s"]]
        cheapest = min(as_fast, key=lambda v: v["cost_per_request"]) if as_fast else None
        saving = None if cheapest is None else 1 - spot["cost_per_request"] / cheapest["cost_per_request"]
        out["sim_cost"][workload] = dict(spot_cost_per_request=spot["cost_per_request"], spot_node_hours=spot_node_h,
                                         duration_s=duration, on_demand=fleets, saving=saving)
        print(f"sim {workload:6s} cost per request: spotserve on spot ${spot['cost_per_request']:.4f}; the cheapest "
              "on-demand fleet as fast (P99): " + ("none" if cheapest is None else
                                                   f"${cheapest['cost_per_request']:.4f}, saving {100 * saving:.0f}%"),
              flush=True)
    return out


def main(argv):
    del argv
    from jaxserve.elastic.availability import node_counts, read_availability, read_end
    events = read_availability(_AVAIL.value)
    results = {"availability": node_counts(events), "grace_s": _GRACE.value}
    print(f"availability: {_AVAIL.value} ({len(events)} events); request trace: {_TRACE.value}", flush=True)
    if _BACKEND.value in ("sim", "both"):
        results.update(sim_runs(events, read_end(_AVAIL.value)))
    if _BACKEND.value in ("engine", "both"):
        results["engine"] = engine_runs(events)
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=1)
    if _PLOT.value:
        plots.spot_timeline(results, _PLOT.value)
    print(json.dumps(results))


def engine_runs(events) -> dict:
    import tempfile
    from jaxserve.checkpoint import store
    from jaxserve.checkpoint.load import load_host
    from jaxserve.sim.workload import read_trace, rescale
    config = _CONFIG.value
    cfg, params, tokenizer = load_host(config.checkpoint, config.model)
    ckpt = tempfile.mkdtemp(prefix="jaxserve_spot_")
    store.save(ckpt, cfg, params)
    results = {}
    jobs_of = lambda: rescale(read_trace(_TRACE.value, limit=_N.value), _RATE.value, _SCALE.value, 200, 64)
    if _WARMUP.value:
        # Every method replays the same requests once, untimed, before any is timed: which step
        # shapes a replica compiles depends on how loaded it gets, and a warm-up of the timed
        # method alone still left some to whichever method was timed first (restart timed three
        # times in a row: P50 6.37, 0.04, 0.03 s).
        for method in _METHODS.value:
            run_method(method, config, cfg, params, tokenizer, ckpt, events, jobs_of())
    for method in _METHODS.value:
        jobs = jobs_of()
        t = time.perf_counter()
        results[method] = run_method(method, config, cfg, params, tokenizer, ckpt, events, jobs)
        r = results[method]
        print(f"engine {method:9s} P50 {r['p50_s']:.2f}s P90 {r['p90_s']:.2f}s P99 {r['p99_s']:.2f}s lost "
              f"{r['requests_lost']} device-hours {r['device_hours']:.2f} events {len(r['events'])} "
              f"({time.perf_counter() - t:.0f}s)", flush=True)
    return results


if __name__ == "__main__":
    run(main)
