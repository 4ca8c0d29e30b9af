"""FastServe's skip-join multi-level feedback queue.

Queues Q0..Q{k-1} with quanta growing geometrically from a base quantum: `base_quantum_s`, or
by default `base_quantum_steps` one-row decode steps by the cost model, so that the queues
scale with the machine (a fixed 10 ms is a step of a small model on a CPU and a fraction of
one on a GPU serving a 13B model, where every job then reached the last queue at once and
the mean JCT came out 1.11x FCFS's on the Azure trace at 2 requests/s: docs/benchmarks.md,
issue 16). A new job skips the
queues whose quantum is shorter than its estimated first-token time (from the cost model) and
joins the first whose quantum covers it. A job that has run for its level's quantum (service
time, accumulated over the steps it ran in) is demoted one level. A job that has not run for
`starvation_s` is promoted back to Q0, first in line there, but it takes only free slots and
pages until it has run again: it does not evict others. FastServe's artifact lets promoted jobs
preempt; under overload every waiting job is "starved", and promotion then turns the batch into
a round robin over all of them, each turn swapping KV out and back: in the simulator of
FastServe's own setting the mean JCT went from 36 s to over 1,000 s at 2 req/s.
Within a level, jobs run in arrival order.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Sequence

from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.plan import Plan, RequestView
from jaxserve.scheduling.preemptive import PreemptivePolicy


@dataclasses.dataclass
class JobState:
    level: int
    attained: float = 0.0      # service time at this level
    last_run: float = 0.0      # when it last ran (or arrived)
    promoted: bool = False     # promoted for starvation and not run since


class MLFQPolicy(PreemptivePolicy):
    name = "mlfq"

    def __init__(self, num_levels: int = 6, base_quantum_s: float = 0.0, quantum_growth: float = 2.0,
                 starvation_s: float = 3.0, base_quantum_steps: float = 3.0, cost_model: Optional[CostModel] = None,
                 **kwargs):
        super().__init__(cost_model=cost_model, **kwargs)
        if num_levels < 1 or base_quantum_s < 0 or base_quantum_steps <= 0 or quantum_growth < 1:
            raise ValueError("scheduler.mlfq: num_levels >= 1, base_quantum_s >= 0 (0: base_quantum_steps), "
                             "base_quantum_steps > 0, quantum_growth >= 1 required")
        self.num_levels, self.quantum_growth = num_levels, quantum_growth
        self.base_quantum_s, self.base_quantum_steps = base_quantum_s, base_quantum_steps
        self.starvation_s = starvation_s
        self.jobs: Dict[str, JobState] = {}
        self._running: Sequence[str] = ()
        self._step_start: Optional[float] = None

    @property
    def quanta(self) -> list:
        """Each queue's quantum, from the cost model as it is now (the engine refits it)."""
        base = self.base_quantum_s or self.base_quantum_steps * self.cost_model.step_time([(1, 1)])
        return [base * self.quantum_growth ** i for i in range(self.num_levels)]

    def join_level(self, r: RequestView, quanta: Sequence[float]) -> int:
        """Skip-join: the highest-priority queue whose quantum covers the job's first-token time."""
        t = self.cost_model.prefill_time(r.num_remaining)
        for level, q in enumerate(quanta):
            if q >= t:
                return level
        return len(quanta) - 1

    def observe(self, requests: Sequence[RequestView], now: float) -> None:
        quanta = self.quanta
        live = {r.request_id for r in requests}
        for rid in list(self.jobs):
            if rid not in live:
                del self.jobs[rid]
        if self._step_start is not None:  # charge the last step's duration to the jobs that ran
            spent = max(0.0, now - self._step_start)
            for rid in self._running:
                job = self.jobs.get(rid)
                if job is None:
                    continue
                job.attained += spent
                job.last_run, job.promoted = now, False
                if job.attained >= quanta[job.level] - 1e-9 and job.level < len(quanta) - 1:
                    job.level, job.attained = job.level + 1, 0.0
        for r in requests:
            job = self.jobs.get(r.request_id)
            if job is None:
                self.jobs[r.request_id] = JobState(self.join_level(r, quanta), 0.0, now)
            elif now - job.last_run > self.starvation_s and job.level > 0:
                job.level, job.attained, job.last_run, job.promoted = 0, 0.0, now, True

    def may_evict_for(self, r: RequestView) -> bool:
        return not self.jobs[r.request_id].promoted

    def rank(self, r: RequestView) -> tuple:
        return (self.jobs[r.request_id].level, r.arrival_time, r.request_id)

    def ran(self, plan: Plan, now: float) -> None:
        self._running = [rid for rid, _ in plan.run]
        self._step_start = now

    def queue_lengths(self) -> list:
        counts = [0] * self.num_levels
        for job in self.jobs.values():
            counts[job.level] += 1
        return counts
