"""First-come-first-served, run to completion (Orca / vLLM's default).

Every step: running requests, oldest first, get their next decode token or prefill chunk under
the token budget; when pages run out the youngest running request is preempted (its cache is
dropped and recomputed later). Then waiting requests are admitted in arrival order while their
whole prompt fits in free pages; the first that does not fit blocks the ones behind it.
"""
from __future__ import annotations

from typing import Sequence

from jaxserve.cache.page_allocator import pages_for
from jaxserve.scheduling.plan import CacheState, Plan, RequestView


class FCFSPolicy:
    name = "fcfs"

    def order(self, requests: Sequence[RequestView]) -> list:
        return sorted(requests, key=lambda r: (r.arrival_time, r.request_id))

    def schedule(self, requests: Sequence[RequestView], cache: CacheState, now: float = 0.0) -> Plan:
        plan = Plan()
        ordered = self.order(requests)
        running = [r for r in ordered if r.location == "device"]
        waiting = [r for r in ordered if r.location != "device"]
        free, budget, slots = cache.free_pages, cache.token_budget, cache.max_batch
        while running:
            r = running.pop(0)
            if budget < 1 or slots < 1:
                break
            n = min(r.num_remaining, budget, cache.max_chunk)
            need = cache.pages_needed(r, n)
            while need > free and running:  # make room by preempting the youngest
                victim = running.pop()
                plan.preempt.append(victim.request_id)
                free += victim.own_pages
            if need > free:
                plan.preempt.append(r.request_id)
                free += r.own_pages
                break
            plan.run.append((r.request_id, n))
            free, budget, slots = free - need, budget - n, slots - 1
        if plan.preempt:
            return plan  # under memory pressure: admit nothing new this step
        for r in waiting:
            if budget < 1 or slots < 1:
                break
            n = min(r.num_remaining, budget, cache.max_chunk)
            # Admit only if the whole known sequence fits now, so that prefill cannot stall midway.
            if pages_for(r.num_tokens, cache.page_size) > free:
                break
            if r.location == "host":  # its KV waits in host memory (e.g. after a migration)
                plan.swap_in.append(r.request_id)
            plan.run.append((r.request_id, n))
            free -= pages_for(r.num_tokens, cache.page_size)  # reserve the rest too
            budget, slots = budget - n, slots - 1
        return plan
