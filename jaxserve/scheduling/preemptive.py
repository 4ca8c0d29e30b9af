"""Preemptive scheduling at token granularity, with proactive KV swapping.

Each step the policy ranks every job (subclasses say how: MLFQ level, user priority) and runs
the best-ranked jobs that fit the batch, the token budget and the KV pages. Jobs not picked are
preempted but keep their KV: it stays on the device, or is swapped to host memory when device
pages are short. Memory is managed ahead of need:
  * swap-out: keep `watermark_pages` free by offloading the jobs whose next run is furthest away
    (worst rank first);
  * prefetch: upload the host-resident jobs that rank next after the running set, so that their
    transfer overlaps this step and they never wait on their own upload;
  * only when the host pool is full too is a job's cache dropped (recomputed later; counted).
"""
from __future__ import annotations

from typing import Dict, List, Sequence

from jaxserve.scheduling.plan import CacheState, Plan, RequestView


class PreemptivePolicy:
    name = "preemptive"

    def __init__(self, watermark_pages: int = 0, prefetch: bool = True):
        self.watermark_pages = watermark_pages
        self.prefetch = prefetch

    # -- what subclasses define ---------------------------------------------------------------
    def observe(self, requests: Sequence[RequestView], now: float) -> None:
        """Updates per-job state (e.g. MLFQ levels) before ranking; default: nothing."""

    def rank(self, r: RequestView) -> tuple:
        raise NotImplementedError

    def ran(self, plan: Plan, now: float) -> None:
        """Told which jobs run in the step that starts at `now`; default: nothing."""

    # -- the shared mechanism ----------------------------------------------------------------
    def schedule(self, requests: Sequence[RequestView], cache: CacheState, now: float = 0.0) -> Plan:
        self.observe(requests, now)
        ordered = sorted(requests, key=self.rank)
        plan = Plan()
        free, host_free = cache.free_pages, cache.free_host_pages
        slots = cache.max_batch
        loc: Dict[str, str] = {r.request_id: r.location for r in ordered}
        chosen: List[RequestView] = []

        def evict(victim: RequestView) -> int:
            nonlocal host_free
            if victim.num_pages <= host_free:
                plan.swap_out.append(victim.request_id)
                host_free -= victim.num_pages
            else:
                plan.preempt.append(victim.request_id)
            loc[victim.request_id] = "gone"
            return victim.num_pages

        # Membership of the batch goes by rank (slots and pages); then the token budget goes to
        # decodes first (a decode token costs little beside the others) and prefill chunks after.
        for i, r in enumerate(ordered):
            if slots < 1:
                break
            if loc[r.request_id] == "gone":  # evicted earlier in this plan
                continue
            n = min(r.num_remaining, cache.max_chunk)
            need = cache.pages_needed(r, n) + (r.num_pages if r.location == "host" else 0)
            # free pages by evicting device-resident jobs that rank below r, worst first
            for victim in reversed(ordered[i + 1:]):
                if need <= free:
                    break
                if loc[victim.request_id] == "device" and victim.num_pages:
                    free += evict(victim)
            if need > free:
                continue
            chosen.append(r)
            if r.location == "host":
                plan.swap_in.append(r.request_id)
                host_free += r.num_pages
            free, slots = free - need, slots - 1
        budget = cache.token_budget
        for r in chosen:
            if r.num_remaining == 1 and budget >= 1:
                plan.run.append((r.request_id, 1))
                budget -= 1
        for r in chosen:
            if r.num_remaining > 1 and budget >= 1:
                n = min(r.num_remaining, cache.max_chunk, budget)
                plan.run.append((r.request_id, n))
                budget -= n
        chosen_ids = {r.request_id for r in chosen}
        idle = [r for r in ordered if r.request_id not in chosen_ids]
        # keep a watermark of free pages for the next steps' growth and arrivals
        for victim in reversed(idle):
            if free >= self.watermark_pages:
                break
            if loc[victim.request_id] == "device" and victim.num_pages and victim.num_pages <= host_free:
                free += evict(victim)
        # prefetch the host-resident jobs next in line, while the watermark still holds
        if self.prefetch and not plan.swap_out and not plan.preempt:
            for r in idle:
                if loc[r.request_id] != "host":
                    continue
                if free - r.num_pages < self.watermark_pages:
                    break
                plan.swap_in.append(r.request_id)
                free -= r.num_pages
        self.ran(plan, now)
        return plan
