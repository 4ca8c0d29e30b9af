"""What any scheduler could gain: a one-server queue under FCFS, the best size-blind policy, and SRPT.

A bound for the scheduling benchmark, not a model of the engine. Jobs arrive at a trace's
(rescaled) times and need `size` units of service (here: output tokens, the part of a job
that no scheduler knows in advance). Three preemptive-priority policies, each a rank over what
the scheduler may see:

- ``fcfs``: arrival order, never preempts.
- ``gittins``: the Gittins index of the job's attained service under the size distribution.
  Among policies that do not know sizes (MLFQ, least-attained-service, round robin, FCFS), it
  minimises mean completion time in the M/G/1 queue (Gittins 1989; Scully et al., SOAP, 2018),
  so its gain over FCFS bounds what MLFQ can gain on the same sizes.
- ``srpt``: shortest remaining size first, which knows sizes: the bound for a perfect
  output-length predictor.
"""
from __future__ import annotations

import heapq
from typing import Sequence

import numpy as np


def gittins_ranks(sizes: Sequence[int]) -> np.ndarray:
    """rank[a] for integer attained service a = 0..max-1 (lower runs first): 1 / Gittins index.

    The index of age a is the best ratio, over service budgets d, of the chance of finishing
    within d to the expected service spent trying: P(S <= a+d | S > a) / E[min(S-a, d) | S > a].
    For a discrete distribution the best d ends at a support point.
    """
    values, counts = np.unique(np.asarray(sizes, dtype=np.int64), return_counts=True)
    if values[0] < 1:
        raise ValueError("sizes: every size must be at least 1")
    ranks = np.empty(int(values[-1]), dtype=np.float64)
    for a in range(int(values[-1])):
        alive = values > a
        v, c = values[alive], counts[alive].astype(np.float64)
        finished = np.cumsum(c)                       # jobs done by budget v_j - a
        # E[min(S-a, d)] * n at d = v_j - a: those finished used S-a, the rest used d.
        spent = np.cumsum(c * (v - a)) + (c.sum() - finished) * (v - a)
        ranks[a] = 1.0 / np.max(finished / spent)
    return ranks


def simulate(arrivals: Sequence[float], sizes: Sequence[int], policy: str, quantum: int = 1) -> np.ndarray:
    """Completion times minus arrivals, one server at speed 1 size unit per time unit.

    Gittins switches between jobs only at multiples of `quantum` units of attained service
    (besides arrivals): with quantum 1, jobs of nearly equal index trade places every unit.
    """
    arrivals = np.asarray(arrivals, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    order = np.argsort(arrivals, kind="stable")
    if policy == "gittins":
        table = gittins_ranks(sizes)
        rank = lambda i, age: table[int(age)]
    elif policy == "srpt":
        rank = lambda i, age: sizes[i] - age
    elif policy == "fcfs":
        rank = lambda i, age: arrivals[i]
    else:
        raise ValueError(f"policy: unknown {policy!r} (fcfs, gittins or srpt)")

    age = np.zeros(len(sizes), dtype=np.float64)
    done = np.full(len(sizes), np.nan)
    waiting = []                                     # (rank, arrival, job)
    running, now, nxt = None, 0.0, 0

    def admit():  # every job that has arrived by `now` joins the queue
        nonlocal nxt
        while nxt < len(order) and arrivals[order[nxt]] <= now:
            j = order[nxt]
            heapq.heappush(waiting, (rank(j, 0.0), arrivals[j], j))
            nxt += 1

    while nxt < len(order) or waiting or running is not None:
        if running is None:
            if not waiting:
                now = max(now, arrivals[order[nxt]])
            admit()
            running = heapq.heappop(waiting)[2]
        i = running
        until = now + sizes[i] - age[i]              # its completion, unless something comes first
        if nxt < len(order):
            until = min(until, arrivals[order[nxt]])
        if policy == "gittins" and waiting:
            # Run until its index falls below the best waiting job's, in whole quanta.
            a0, best = int(age[i]), waiting[0][0]
            worse = np.nonzero(table[a0 + 1:sizes[i]] > best)[0]
            if len(worse):
                switch = -(-(a0 + 1 + worse[0]) // quantum) * quantum
                until = min(until, now + switch - age[i])
        # Snap to whole units: float drift would leave the age a hair short of a switch point.
        age[i] += until - now
        if abs(age[i] - round(age[i])) < 1e-6:
            age[i] = round(age[i])
        now = until
        admit()
        if age[i] >= sizes[i] - 1e-9:
            done[i] = now
            running = None
        elif policy != "fcfs" and waiting and waiting[0][0] < rank(i, age[i]):
            # preemption: a waiting job now ranks before the running one
            heapq.heappush(waiting, (rank(i, age[i]), arrivals[i], i))
            running = None
    return done - arrivals
