"""Workloads: a trace's arrivals and lengths, rescaled to a target load, and their outcomes.

A trace is any CSV with the Azure LLM inference trace's columns: TIMESTAMP (arrival),
ContextTokens (prompt length) and GeneratedTokens (output length).
"""
from __future__ import annotations

import csv
import dataclasses
import datetime
from typing import List, Optional, Sequence

import numpy as np


@dataclasses.dataclass
class Job:
    """One request of a workload and, once replayed, what happened to it."""
    request_id: str
    arrival: float              # seconds from the start of the replay
    prompt_len: int
    output_len: int
    priority: int = 0
    cached_len: int = 0         # prompt tokens a prefix cache holds for it (its prefill skips them)
    first_token: Optional[float] = None   # absolute times on the replay's clock
    finish: Optional[float] = None

    @property
    def jct(self) -> float:
        return self.finish - self.arrival

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        return (self.finish - self.first_token) / max(1, self.output_len - 1)


def _seconds(stamp: str) -> float:
    try:
        return float(stamp)
    except ValueError:
        # Python's fromisoformat takes at most 6 fractional digits; the Azure trace has 7.
        head, _, frac = stamp.partition(".")
        return datetime.datetime.fromisoformat(f"{head}.{frac[:6]}" if frac else head).timestamp()


def read_trace(path: str, limit: Optional[int] = None, offset: int = 0) -> List[Job]:
    """Jobs of a trace CSV, arrivals relative to its first row."""
    jobs = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: trace lacks column(s) {sorted(missing)}")
        for i, row in enumerate(reader):
            if i < offset:
                continue
            if limit is not None and len(jobs) >= limit:
                break
            jobs.append(Job(f"job{i}", _seconds(row["TIMESTAMP"]), int(row["ContextTokens"]),
                            max(1, int(row["GeneratedTokens"]))))
    if not jobs:
        raise ValueError(f"{path}: no rows")
    t0 = min(j.arrival for j in jobs)
    for j in jobs:
        j.arrival -= t0
    return jobs


def rescale(jobs: Sequence[Job], rate: float, length_scale: float = 1.0, max_prompt: Optional[int] = None,
            max_output: Optional[int] = None, priority_levels: int = 4) -> List[Job]:
    """A copy with arrivals stretched to `rate` requests/s on average and lengths scaled and capped.

    Priorities (for the priority policy) are a stand-in for user-given ones: prompt-length
    quantiles, shorter prompts first.
    """
    arrivals = np.array([j.arrival for j in jobs])
    span = arrivals.max() - arrivals.min()
    factor = (len(jobs) - 1) / rate / span if span > 0 else 0.0
    prompts = np.array([max(1, int(round(j.prompt_len * length_scale))) for j in jobs])
    if max_prompt:
        prompts = np.minimum(prompts, max_prompt)
    cuts = np.quantile(prompts, np.linspace(0, 1, priority_levels + 1)[1:-1]) if len(jobs) > 1 else []
    out = []
    for j, a, p in zip(jobs, arrivals, prompts):
        o = max(1, int(round(j.output_len * length_scale)))
        out.append(Job(j.request_id, float((a - arrivals.min()) * factor), int(p),
                       min(o, max_output) if max_output else o, int(np.searchsorted(cuts, p, side="right"))))
    return out


def poisson(n: int, rate: float, prompt_len: int, output_len: int, seed: int = 0) -> List[Job]:
    """n jobs with Poisson arrivals at `rate`/s and fixed lengths (SpotServe/FastServe-style)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [Job(f"job{i}", float(t), prompt_len, output_len) for i, t in enumerate(np.cumsum(gaps) - gaps[0])]


def lognormal_lengths(rng: np.random.Generator, n: int, mean: float, cv: float, cap: int) -> np.ndarray:
    """n integer lengths in [1, cap] from a lognormal of this mean and coefficient of variation."""
    if mean < 1 or cv < 0 or cap < 1:
        raise ValueError(f"lengths: mean >= 1, cv >= 0 and cap >= 1 required (got {mean}, {cv}, {cap})")
    s2 = np.log1p(cv * cv)
    return np.clip(np.round(rng.lognormal(np.log(mean) - s2 / 2, np.sqrt(s2), n)), 1, cap).astype(int)


def synthetic(n: int, rate: float, prompt_mean: float = 2000, prompt_cv: float = 1.0, output_mean: float = 30,
              output_cv: float = 4.0, max_prompt: int = 8192, max_output: int = 2048, seed: int = 0) -> List[Job]:
    """n jobs, Poisson arrivals at `rate`/s, lognormal prompt and output lengths (capped).

    The defaults are the prefill-heavy, heavy-tailed workload of issue 16: long prompts, short
    outputs whose tail reaches past 1,000 tokens. The lengths depend on `seed` only, not on the
    rate, so that runs at several loads serve the same jobs.
    """
    if n < 1 or rate <= 0:
        raise ValueError(f"synthetic: n >= 1 and rate > 0 required (got n={n}, rate={rate})")
    rng = np.random.default_rng(seed)
    prompts = lognormal_lengths(rng, n, prompt_mean, prompt_cv, max_prompt)
    outputs = lognormal_lengths(rng, n, output_mean, output_cv, max_output)
    gaps = rng.exponential(1.0 / rate, n)
    times = np.cumsum(gaps) - gaps[0]
    return [Job(f"job{i}", float(t), int(p), int(o)) for i, (t, p, o) in enumerate(zip(times, prompts, outputs))]


def summarize(jobs: Sequence[Job], ttft_slo: float = None, tpot_slo: float = None) -> dict:
    """Average and p50/p95/p99 JCT and TTFT (seconds), TPOT, and goodput under the SLOs."""
    done = [j for j in jobs if j.finish is not None]
    if not done:
        return {"completed": 0}
    jct, ttft, tpot = (np.array([getattr(j, k) for j in done]) for k in ("jct", "ttft", "tpot"))
    span = max(j.finish for j in done) - min(j.arrival for j in done)
    out = {"completed": len(done), "of": len(jobs), "served_rps": len(done) / span if span > 0 else 0.0}
    for name, v in (("jct", jct), ("ttft", ttft), ("tpot", tpot)):
        out[f"{name}_avg"] = float(v.mean())
        for q in (50, 95, 99):
            out[f"{name}_p{q}"] = float(np.percentile(v, q))
    if ttft_slo is not None and tpot_slo is not None:
        good = int(((ttft <= ttft_slo) & (tpot <= tpot_slo)).sum())
        out["goodput_rps"] = good / span if span > 0 else 0.0
        out["slo_attainment"] = good / len(jobs)
    return out
