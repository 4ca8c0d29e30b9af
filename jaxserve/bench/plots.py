"""The benchmarks' plots, each drawn from the JSON its benchmark writes (matplotlib, the `bench` extra).

    python -m jaxserve.bench.plots schedule results/bench_schedule.json results/jct_vs_load.png
    python -m jaxserve.bench.plots device results/device/bench.json results/throughput_vs_batch.png
    python -m jaxserve.bench.plots spot results/bench_spot.json results/spot_timeline.png

Each benchmark also draws its own with `--plot=PATH`; this redraws one from saved results.
"""
from __future__ import annotations

import json
import os
import sys


def pyplot():
    """matplotlib.pyplot on a file-only backend, or None (with a note) where it is not installed.
    Each plot below returns its saved Figure (None without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed (pip install 'jaxserve[bench]'): no plot")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")
    return fig


def jct_vs_load(results: dict, path: str) -> None:
    """Mean JCT (or latency per token, in FastServe's setting) against the arrival rate, per policy."""
    plt = pyplot()
    if plt is None:
        return
    backends = [b for b in ("engine", "sim", "fastserve") if b in results]
    fig, axes = plt.subplots(1, len(backends), figsize=(5 * len(backends), 3.8), squeeze=False)
    for ax, b in zip(axes[0], backends):
        for name, by_load in results[b].items():
            if name == "one_server_bound":
                continue
            loads = sorted(by_load, key=float)
            metric = "latency_per_token_avg" if b == "fastserve" else "jct_avg"
            ax.plot([float(x) for x in loads], [by_load[x][metric] for x in loads], marker="o", label=name)
        ax.set_xlabel("arrival rate (requests/s)")
        ax.set_ylabel("mean latency per output token (s)" if b == "fastserve" else "mean JCT (s)")
        ax.set_title({"engine": "engine (CPU, tiny model)", "sim": "simulator (calibrated)",
                      "fastserve": "sim: OPT-13B / A100 setting"}[b])
        ax.set_yscale("log")
        ax.legend()
    return _save(fig, path)


def throughput_vs_batch(results: dict, path: str) -> None:
    """Decode tokens/s against the batch, per context length: the engine's kernels, the roofline
    (weights + KV at the measured copy bandwidth) and transformers where it was run."""
    plt = pyplot()
    if plt is None:
        return
    rows = [d for d in results.get("decode") or [] if d["impl"] == "pallas"]
    if not rows:
        raise ValueError("no pallas decode rows in the results: nothing to plot")
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, ctx in enumerate(sorted({d["ctx"] for d in rows})):
        pts = sorted((d["batch"], d["tok_s"], d["batch"] / d["roofline_ms"] * 1e3) for d in rows if d["ctx"] == ctx)
        batch, tok_s, roof = zip(*pts)
        color = f"C{i}"
        ax.plot(batch, tok_s, marker="o", color=color, label=f"jaxserve, context {ctx}")
        ax.plot(batch, roof, linestyle="--", color=color, label=f"roofline, context {ctx}")
    hf = sorted((d["batch"], d["tok_s"], d["ctx"]) for d in results.get("hf_decode") or [])
    if hf:
        ax.plot([b for b, _, _ in hf], [t for _, t, _ in hf], marker="s", color="gray",
                label=f"transformers generate, context {hf[0][2]}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    batches = sorted({d["batch"] for d in rows})
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch (sequences decoding)")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"decode on {results.get('device', '?')} ({results.get('date', '')})", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def spot_timeline(results: dict, path: str) -> None:
    """Per backend and workload: the nodes alive over the trace (each method's re-parallelizations
    marked), and every request's latency at its arrival time, lost requests on the top edge."""
    plt = pyplot()
    if plt is None:
        return
    panels = [(f"sim, {w} workload", runs) for w, runs in (results.get("sim") or {}).items()]
    if results.get("engine"):
        panels.append(("engine (CPU, tiny model)", results["engine"]))
    if not panels:
        raise ValueError("no sim or engine results: nothing to plot")
    avail = results.get("availability") or []
    fig, axes = plt.subplots(2, len(panels), figsize=(5.5 * len(panels), 5.5), squeeze=False,
                             sharex="col", gridspec_kw={"height_ratios": [1, 2]})
    for col, (title, runs) in enumerate(panels):
        top, bottom = axes[0][col], axes[1][col]
        if avail:
            t, n = zip(*avail)
            end = max([t[-1]] + [a for r in runs.values() for a, _ in r.get("requests") or []])
            top.step(list(t) + [end], list(n) + [n[-1]], where="post", color="black")
        for i, (method, r) in enumerate(runs.items()):
            color = f"C{i}"
            for e in r.get("events") or []:
                if "t" in e and "error" not in e:
                    top.axvline(e["t"], color=color, alpha=0.5, linewidth=1)
            reqs = r.get("requests") or []
            done = [(a, lat) for a, lat in reqs if lat is not None]
            if done:
                bottom.plot(*zip(*done), ".", color=color, markersize=3,
                            label=f"{method} (P99 {r['p99_s']:.2f} s, lost {r['requests_lost']})")
            lost = [a for a, lat in reqs if lat is None]
            if lost:
                bottom.plot(lost, [max([lat for _, lat in done] or [1.0])] * len(lost), "x", color=color)
        top.set_ylabel("nodes alive")
        top.set_title(title + ": re-parallelizations", fontsize=10)
        bottom.set_xlabel("arrival (trace seconds)")
        bottom.set_ylabel("latency (s)")
        bottom.set_yscale("log")
        bottom.legend(fontsize=8)
    return _save(fig, path)


PLOTS = {"schedule": jct_vs_load, "device": throughput_vs_batch, "spot": spot_timeline}


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] not in PLOTS:
        sys.stderr.write(f"usage: python -m jaxserve.bench.plots {{{'|'.join(PLOTS)}}} RESULTS.json OUT.png\n")
        sys.exit(2)
    kind, src, out = argv
    with open(src) as f:
        PLOTS[kind](json.load(f), out)


if __name__ == "__main__":
    main()
