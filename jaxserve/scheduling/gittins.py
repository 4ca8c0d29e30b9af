"""Gittins-index scheduling: the prefill a job still needs is known, its output length is learned.

A job's remaining service, in seconds of the engine, is its remaining prefill (known from its
prompt, through the cost model) plus its remaining decode: tokens, each costing a decode token's
share of a full decode step, their number drawn from the output lengths of the requests that
finished so far (an empirical distribution, over a prior of log-spaced lengths until data
arrives). The Gittins index of a job with `a` tokens generated and prefill `p` left is

    max over budgets d of  P(L <= a + d | L > a) / (p + t * E[min(L - a, d) | L > a])

(L: output length, t: a decode token's cost). Each step the jobs of highest index run, under
PreemptivePolicy's slots, pages and swap rules. With lengths whose hazard rises it behaves like
FCFS, with heavy tails like least-attained-service, and a long prompt waits behind short ones as
in SRPT. A request's `max_tokens` is not read: the simulator sets it to the true length.
"""
from __future__ import annotations

import collections
from typing import Dict, Sequence

import numpy as np

from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.plan import RequestView
from jaxserve.scheduling.preemptive import PreemptivePolicy


def decode_token_s(cost: CostModel) -> float:
    """What a decode token costs the engine: its share of a full decode step at 1k context."""
    pages = min(cost.max_pages, -(-1024 // cost.page_size))
    return cost.step_time([(1, pages)] * cost.max_batch) / cost.max_batch


class OutputLengths:
    """Output lengths seen so far, with a prior; the arrays the index reads are rebuilt only when
    the data has grown by `refresh` (a tenth) since, so that cached indices stay valid between."""

    def __init__(self, prior_max: int = 2048, prior_weight: float = 4.0, refresh: float = 0.1):
        if prior_max < 1 or prior_weight <= 0 or refresh < 0:
            raise ValueError("scheduler.gittins: prior_max >= 1, prior_weight > 0 and refresh >= 0 required")
        support = 2 ** np.arange(int(np.log2(prior_max)) + 1)
        self.weights = collections.Counter({int(v): prior_weight / len(support) for v in support})
        self.observed, self.refresh = 0, refresh
        self._built_at = -1
        self._cache: Dict[tuple, float] = {}
        self._rebuild()

    def observe(self, length: int) -> None:
        self.weights[max(1, int(length))] += 1.0
        self.observed += 1
        if self.observed - self._built_at >= max(1.0, self.refresh * self._built_at):
            self._rebuild()

    def _rebuild(self) -> None:
        values = np.array(sorted(self.weights), dtype=np.float64)
        self.values, self.counts = values, np.array([self.weights[int(v)] for v in values])
        self._built_at = self.observed
        self.forget_indices()

    def forget_indices(self) -> None:
        """Drops the cached indices (their costs changed: the cost model was refitted)."""
        self._cache.clear()

    def index(self, generated: int, prefill_s: float, token_s: float) -> float:
        key = (generated, prefill_s, token_s)
        if key not in self._cache:
            self._cache[key] = self._index(generated, prefill_s, token_s)
        return self._cache[key]

    def _index(self, generated: int, prefill_s: float, token_s: float) -> float:
        alive = self.values > generated
        left, w = self.values[alive] - generated, self.counts[alive]
        if not len(left):  # it outlived every length seen: as if it will run as long again
            return 1.0 / (prefill_s + token_s * max(1, generated))
        done = np.cumsum(w)
        # E[min(L - a, d)] at each budget d = left_j: the finished used L - a, the others d
        spent = (np.cumsum(w * left) + (done[-1] - done) * left) / done[-1]
        return float(np.max((done / done[-1]) / (prefill_s + token_s * spent)))


# finish reasons that cut a request short of its own length
CENSORED = frozenset({"abort", "error", "handed_over"})


class GittinsPolicy(PreemptivePolicy):
    name = "gittins"

    def __init__(self, prior_max: int = 2048, prior_weight: float = 4.0, **kwargs):
        super().__init__(**kwargs)
        self.lengths = OutputLengths(prior_max, prior_weight)
        self._index: Dict[str, float] = {}
        self._prefill: Dict[int, float] = {}  # these three follow the cost model's coefficients
        self._coef, self._token_s = None, 0.0

    def finished(self, request_id: str, num_generated: int, reason: str) -> None:
        """Learns r's output length from its end. A request that ended early (its client went
        away, a failure, handed to a peer) says only that its length was at least that much: it
        is left out rather than counted as a short job. One that leaves without an end told
        (moved to another engine) teaches nothing."""
        if reason not in CENSORED:
            self.lengths.observe(num_generated)

    def observe(self, requests: Sequence[RequestView], now: float) -> None:
        if self._coef is None or not np.array_equal(self._coef, self.cost_model.coef):  # refitted
            self._coef, self._prefill = np.array(self.cost_model.coef), {}
            self._token_s = decode_token_s(self.cost_model)
            self.lengths.forget_indices()
        self._index = {}
        for r in requests:
            prefill = self._prefill_s(r.num_remaining) if r.num_remaining > 1 else 0.0
            self._index[r.request_id] = self.lengths.index(r.num_generated, prefill, self._token_s)

    def rank(self, r: RequestView) -> tuple:
        return (-self._index[r.request_id], r.arrival_time, r.request_id)

    def _prefill_s(self, tokens: int) -> float:
        if tokens not in self._prefill:
            self._prefill[tokens] = self.cost_model.prefill_time(tokens)
        return self._prefill[tokens]
