"""Discrete-event simulation of the engine: the same policy objects, a cost model for time.

Each iteration mirrors `Engine.step`: views -> policy.schedule -> preempt / swap / allocate ->
run chunks -> commit tokens. Instead of running the model, the clock advances by the cost
model's step time (calibrated from measured engine steps), so long traces and large models can
be studied far faster than real time.
"""
from __future__ import annotations

import dataclasses
import heapq
from typing import List, Sequence

from jaxserve.cache.page_allocator import pages_for
from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.plan import CacheState, RequestView
from jaxserve.sim.workload import Job


@dataclasses.dataclass
class SimConfig:
    num_pages: int
    page_size: int = 16
    host_pages: int = 0
    max_batch: int = 32
    token_budget: int = 256
    max_chunk: int = 256
    bytes_per_page: int = 0   # KV bytes of one page, for swap costs
    # True: swaps ride a DMA link beside compute (GPU/TPU), and only the uploads of jobs that
    # run in the same step hold it up; a step lasts max(compute + those uploads, all transfers).
    # False: transfers add to the step (the CPU engine, whose cost model is fitted that way).
    overlap_swaps: bool = False


@dataclasses.dataclass
class _State:
    job: Job
    computed: int = 0
    generated: int = 0
    pages: int = 0
    location: str = "none"

    @property
    def tokens(self) -> int:
        return self.job.prompt_len + self.generated

    @property
    def cached(self) -> int:
        """The job's cached prompt prefix, while it has no cache of its own (as the engine's
        prefix cache gives it; it is assumed to stay cached across preemptions)."""
        if self.location != "none" or self.computed:
            return 0
        return min(self.job.cached_len, self.tokens - 1)


class Simulator:
    def __init__(self, policy, cost_model: CostModel, config: SimConfig):
        self.policy, self.cost, self.config = policy, cost_model, config
        self.stats = {"steps": 0, "preemptions": 0, "swap_outs": 0, "swap_ins": 0, "swap_bytes": 0}

    def run(self, jobs: Sequence[Job]) -> List[Job]:
        c = self.config
        pending = [(j.arrival, i, j) for i, j in enumerate(jobs)]
        heapq.heapify(pending)
        active = {}
        free, host_free, now = c.num_pages, c.host_pages, 0.0
        # what policies weigh swaps by: the link's time per page, where it runs beside compute
        link_s_per_page = self.cost.swap_s_per_page(c.bytes_per_page) if c.overlap_swaps else 0.0
        while pending or active:
            while pending and pending[0][0] <= now:
                j = heapq.heappop(pending)[2]
                active[j.request_id] = _State(j)
            if not active:
                now = pending[0][0]
                continue
            views = [RequestView(s.job.request_id, s.job.arrival, s.job.priority, s.tokens, s.computed,
                                 s.generated, s.job.output_len, s.pages, s.location, num_cached=s.cached)
                     for s in active.values()]
            cache = CacheState(c.page_size, free, c.num_pages, host_free, c.max_batch, c.token_budget, c.max_chunk,
                               link_s_per_page)
            plan = self.policy.schedule(views, cache, now)
            swap_pages, blocking_pages = 0, 0
            running = {rid for rid, _ in plan.run}
            for rid in plan.preempt:
                s = active[rid]
                if s.location == "host":
                    host_free += CacheState.host_pages_for(s.pages)
                else:
                    free += s.pages
                s.pages, s.computed, s.location = 0, 0, "none"
                self.stats["preemptions"] += 1
            for rid in plan.swap_out:
                s = active[rid]
                free, host_free, s.location = free + s.pages, host_free - CacheState.host_pages_for(s.pages), "host"
                swap_pages += s.pages
                self.stats["swap_outs"] += 1
            for rid in plan.swap_in:
                s = active[rid]
                free, host_free, s.location = free - s.pages, host_free + CacheState.host_pages_for(s.pages), "device"
                swap_pages += s.pages
                blocking_pages += s.pages if rid in running else 0
                self.stats["swap_ins"] += 1
            chunks = []
            for rid, n in plan.run:
                s = active[rid]
                s.computed += s.cached  # its prefill starts after its cached prefix
                new = pages_for(s.computed + n, c.page_size) - s.pages
                free, s.pages, s.location = free - new, s.pages + new, "device"
                chunks.append((s, n))
            if free < 0 or host_free < 0:
                raise RuntimeError(f"policy {self.policy.name} overcommitted memory (free={free}, host={host_free})")
            if not chunks and not swap_pages:
                if not pending:
                    raise RuntimeError(f"policy {self.policy.name} made no progress with {len(active)} jobs left")
                now = pending[0][0]  # idle until the next arrival
                continue
            swap_bytes = swap_pages * c.bytes_per_page
            self.stats["swap_bytes"] += swap_bytes
            chunks_cost = [(n, s.pages) for s, n in chunks]
            if c.overlap_swaps:
                link = self.cost.step_time([], swap_bytes)
                now += max(self.cost.step_time(chunks_cost, blocking_pages * c.bytes_per_page), link)
            else:
                now += self.cost.step_time(chunks_cost, swap_bytes)
            self.stats["steps"] += 1
            for s, n in chunks:
                s.computed += n
                if s.computed == s.tokens:  # a new token
                    s.generated += 1
                    if s.job.first_token is None:
                        s.job.first_token = now
                    if s.generated >= s.job.output_len:
                        s.job.finish = now
                        told = getattr(self.policy, "finished", None)  # optional, as in Engine._finish
                        if told is not None:
                            told(s.job.request_id, s.generated, "stop")
                        free += s.pages
                        del active[s.job.request_id]
        return list(jobs)
