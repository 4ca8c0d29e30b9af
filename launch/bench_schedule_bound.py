"""How much lower than FCFS any scheduler could make JCT on a trace's output lengths.

    python launch/bench_schedule_bound.py --loads=0.5,0.7,0.8,0.9,0.95,0.98

One server, jobs of `GeneratedTokens` units arriving at the trace's times rescaled to each
utilisation (`--arrivals=trace`) or as a Poisson process drawing sizes from the trace
(`--arrivals=poisson`). Compares FCFS with the Gittins policy (the best a size-blind scheduler
such as MLFQ can do for mean JCT) and SRPT (a perfect output-length predictor); see
`jaxserve/sim/queueing.py`. The last line printed is one JSON object.
"""
import json
import os

import numpy as np
from absl import flags

from jaxserve.bench.data import SAMPLE_TRACE
from jaxserve.cli import run
from jaxserve.sim.queueing import simulate
from jaxserve.sim.workload import read_trace

_TRACE = flags.DEFINE_string("trace", SAMPLE_TRACE, "CSV with TIMESTAMP, ContextTokens, GeneratedTokens (default: the "
                             "shipped 400-request sample; the published figures use the whole trace).")
_LOADS = flags.DEFINE_list("loads", ["0.5", "0.7", "0.8", "0.9", "0.95", "0.98"], "Server utilisations.")
_ARRIVALS = flags.DEFINE_enum("arrivals", "trace", ["trace", "poisson"], "Trace arrival times rescaled, or Poisson.")
_N = flags.DEFINE_integer("num_requests", 0, "Poisson: jobs drawn (0 = as many as the trace has).")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Poisson: independent runs averaged.")
_QUANTUM = flags.DEFINE_integer("quantum", 2, "Gittins switches jobs only every this many tokens.")
_OUT = flags.DEFINE_string("out", "results/bench_schedule_bound.json", "Where to write the results ('' = nowhere).")


def runs(sizes_all, arrivals_all, load, seed):
    """(arrivals, sizes) for one run at `load` utilisation."""
    rate = load / sizes_all.mean()
    if _ARRIVALS.value == "trace":
        span = arrivals_all.max() - arrivals_all.min()
        return (arrivals_all - arrivals_all.min()) * (len(sizes_all) - 1) / rate / span, sizes_all
    rng = np.random.default_rng(seed)
    n = _N.value or len(sizes_all)
    return np.cumsum(rng.exponential(1.0 / rate, n)), rng.choice(sizes_all, n)


def main(argv):
    del argv
    jobs = read_trace(_TRACE.value)
    sizes_all = np.array([j.output_len for j in jobs])
    arrivals_all = np.array([j.arrival for j in jobs])
    seeds = _SEEDS.value if _ARRIVALS.value == "poisson" else 1
    print(f"{len(jobs)} jobs, output tokens mean {sizes_all.mean():.1f}, CV {sizes_all.std() / sizes_all.mean():.2f}; "
          f"JCT in units of the mean job; ratios are FCFS / policy (above 1: policy better)")
    print(f"{'load':>5} {'policy':>8} {'JCT avg':>8} {'p99':>8} {'avg ratio':>9} {'p99 ratio':>9}")
    table = []
    for load in (float(x) for x in _LOADS.value):
        sums = {}
        for seed in range(seeds):
            arrivals, sizes = runs(sizes_all, arrivals_all, load, seed)
            for policy in ("fcfs", "gittins", "srpt"):
                jct = simulate(arrivals, sizes, policy, quantum=_QUANTUM.value) / sizes_all.mean()
                acc = sums.setdefault(policy, np.zeros(2))
                acc += (jct.mean() / seeds, np.percentile(jct, 99) / seeds)
        for policy, (avg, p99) in sums.items():
            row = {"load": load, "policy": policy, "jct_avg": float(avg), "jct_p99": float(p99),
                   "avg_ratio": float(sums["fcfs"][0] / avg), "p99_ratio": float(sums["fcfs"][1] / p99)}
            table.append(row)
            print(f"{load:5.2f} {policy:>8} {avg:8.2f} {p99:8.2f} {row['avg_ratio']:9.2f} {row['p99_ratio']:9.2f}")
    result = {"trace": _TRACE.value, "arrivals": _ARRIVALS.value, "quantum": _QUANTUM.value, "seeds": seeds, "rows": table}
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    run(main)
