"""User-given priority (vLLM's convention: a lower value runs first), preemptive, ties by arrival."""
from __future__ import annotations

from jaxserve.scheduling.plan import RequestView
from jaxserve.scheduling.preemptive import PreemptivePolicy


class PriorityPolicy(PreemptivePolicy):
    name = "priority"

    def rank(self, r: RequestView) -> tuple:
        return (r.priority, r.arrival_time, r.request_id)
