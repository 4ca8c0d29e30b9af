"""Preemptive scheduling at token granularity, with proactive KV swapping.

Each step the policy ranks every job (subclasses say how: MLFQ level, user priority, Gittins
index) and runs the best-ranked jobs that fit the batch, the token budget and the KV pages.
Jobs not picked are preempted but keep their KV: it stays on the device, or is swapped to host
memory when device pages are short. Memory is managed ahead of need:
  * swap-out: keep `watermark_pages` free by offloading the jobs whose next run is furthest away
    (worst rank first);
  * prefetch: upload the host-resident jobs that rank next after the running set, so that their
    transfer overlaps this step and they never wait on their own upload;
  * only when the host pool is full too, and nothing could run otherwise, is a job's cache
    dropped (recomputed later; counted).
A prefill chunk ranked below one of the step's decodes fills the step only to `short_step`
tokens, so that better-ranked decodes are not held up by a full budget of worse-ranked prefill:
the step may cost up to `max_prefill_slowdown` of the prefill throughput, or up to
`idle_prefill_slowdown` while all the prefill waiting fits in one token budget (then throughput
is not what holds the queue back).
Swaps the policy chooses stay within what the host link moves while the step computes (its
compute from the cost model, the link's speed from `CacheState.swap_s_per_page`), and a job
brought back from host memory runs from the step after its upload: otherwise swap traffic, not
compute, sets the step's length, and under overload a preemptive policy serves fewer requests
than FCFS (docs/benchmarks.md, issue 16).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from jaxserve.cache.page_allocator import pages_for
from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.plan import CacheState, Plan, RequestView


class PreemptivePolicy:
    name = "preemptive"

    def __init__(self, watermark_pages: int = 0, prefetch: bool = True, cost_model: Optional[CostModel] = None,
                 max_prefill_slowdown: float = 0.10, idle_prefill_slowdown: float = 0.5):
        for name, value in (("max_prefill_slowdown", max_prefill_slowdown),
                            ("idle_prefill_slowdown", idle_prefill_slowdown)):
            if not 0 <= value < 1:
                raise ValueError(f"scheduler.{name} must be in [0, 1), got {value}")
        self.watermark_pages = watermark_pages
        self.prefetch = prefetch
        self.max_prefill_slowdown = max_prefill_slowdown
        self.idle_prefill_slowdown = idle_prefill_slowdown
        self.cost_model = cost_model or CostModel()
        self._uploaded: set = set()  # swapped in by the last plan: they run in this step

    # -- what subclasses define ---------------------------------------------------------------
    def observe(self, requests: Sequence[RequestView], now: float) -> None:
        """Updates per-job state (e.g. MLFQ levels) before ranking; default: nothing."""

    def rank(self, r: RequestView) -> tuple:
        raise NotImplementedError

    def ran(self, plan: Plan, now: float) -> None:
        """Told which jobs run in the step that starts at `now`; default: nothing."""

    def finished(self, request_id: str, num_generated: int, reason: str) -> None:
        """Told when a request ends (reason: its finish reason); default: nothing."""

    def may_evict_for(self, r: RequestView) -> bool:
        """Whether r may evict lower-ranked jobs' caches to get pages; default: yes."""
        return True

    # -- the shared mechanism ----------------------------------------------------------------
    def schedule(self, requests: Sequence[RequestView], cache: CacheState, now: float = 0.0) -> Plan:
        self.observe(requests, now)
        ordered = sorted(requests, key=self.rank)
        plan = self._plan(ordered, cache, None)
        if cache.swap_s_per_page > 0:
            plan = self._within_link(plan, ordered, cache)
        self._uploaded = set(plan.swap_in)
        self.ran(plan, now)
        return plan

    def _within_link(self, plan: Plan, ordered: Sequence[RequestView], cache: CacheState) -> Plan:
        """Swaps beyond what the link moves during the step's compute would lengthen the step:
        plans again within that (a plan with fewer swaps may compute less: a few rounds)."""
        by_id = {r.request_id: r for r in ordered}
        link = None
        for _ in range(3):
            chunks = [(n, pages_for(by_id[rid].num_computed + n, cache.page_size)) for rid, n in plan.run]
            fits = int(self.cost_model.step_time(chunks) / cache.swap_s_per_page) if chunks else 0
            if sum(by_id[rid].own_pages for rid in plan.swap_out + plan.swap_in) <= fits or fits == link:
                break
            plan, link = self._plan(ordered, cache, fits), fits
        return plan

    def _plan(self, ordered: Sequence[RequestView], cache: CacheState, link: Optional[int]) -> Plan:
        """The step's plan with at most `link` pages swapped by choice (None: any number)."""
        # Dropping a cache throws away work, so a first pass only moves caches to host memory;
        # only if that runs nothing at all (device and host full) may caches be dropped.
        plan, chosen, free, host_free, loc, link = self._admit(ordered, cache, link, forced=False)
        if not chosen and not plan.swap_in:
            plan, chosen, free, host_free, loc, link = self._admit(ordered, cache, link, forced=True)
        # The token budget goes to decodes first (a decode token costs little beside the others)
        # and to prefill chunks after. A chunk ranked below a decode of this step would slow that
        # decode down: such chunks fill the step only up to `short_step` tokens.
        decodes = [r for r in chosen if r.num_remaining == 1][:cache.token_budget]
        plan.run += [(r.request_id, 1) for r in decodes]
        total, cap, capped = len(decodes), cache.token_budget, False
        first_decode = next((i for i, r in enumerate(chosen) if r.num_remaining == 1), len(chosen))
        for i, r in enumerate(chosen):
            if r.num_remaining > 1:
                if i > first_decode and not capped:  # the first chunk ranked below a decode
                    backlog = sum(q.num_remaining for q in ordered if q.num_remaining > 1)
                    slowdown = (self.idle_prefill_slowdown if backlog <= cache.token_budget
                                else self.max_prefill_slowdown)
                    cap, capped = max(total, self.short_step(decodes, chosen, cache, slowdown)), True
                n = min(r.num_remaining, cache.max_chunk, cap - total)
                if n < 1:
                    break
                plan.run.append((r.request_id, n))
                total += n
        chosen_ids = {r.request_id for r in chosen}
        idle = [r for r in ordered if r.request_id not in chosen_ids]
        # keep a watermark of free pages for the next steps' growth and arrivals
        uploading = set(plan.swap_in)
        for victim in reversed(idle):
            if free >= self.watermark_pages:
                break
            if victim.request_id in uploading or victim.request_id in self._uploaded:
                continue
            held = cache.host_pages_for(victim.own_pages)
            if (loc[victim.request_id] == "device" and victim.own_pages and held <= host_free
                    and victim.own_pages <= link):
                plan.swap_out.append(victim.request_id)
                loc[victim.request_id] = "host"
                free, host_free, link = free + victim.own_pages, host_free - held, link - victim.own_pages
        # prefetch the host-resident jobs next in line, while the watermark still holds
        if self.prefetch and not plan.swap_out and not plan.preempt:
            for r in idle:
                if loc[r.request_id] != "host":
                    continue
                if free - r.own_pages < self.watermark_pages or r.own_pages > link:
                    break
                plan.swap_in.append(r.request_id)
                free, link = free - r.own_pages, link - r.own_pages
        return plan

    def short_step(self, decodes: Sequence[RequestView], chosen: Sequence[RequestView], cache: CacheState,
                   slowdown: float) -> int:
        """The fewest tokens (a power of two) a step with these decodes may hold while its prefill
        throughput stays within `slowdown` of a full token budget's, by the cost model; the full
        budget where the short step does not pay.

        Shorter steps finish the decodes sooner; under load, prefill throughput is the capacity,
        and a step much shorter than the budget spends more of its time on fixed costs. A short
        step pays when the time it saves the step's decodes, together, exceeds a step of its
        own: the chunk it cuts may finish a step later. Where a step's fixed cost dominates (a
        small model) cutting the chunk saves the decodes little and costs the chunk a step."""
        d = len(decodes)
        dec_pages = max((r.num_pages + 1 for r in decodes), default=1)
        pre_pages = max(pages_for(r.num_tokens, cache.page_size) for r in chosen)

        def seconds(tokens: int) -> float:  # a step of `tokens`: these decodes and one chunk
            return self.cost_model.step_time([(1, dec_pages)] * d + [(tokens - d, pre_pages)])

        def rate(tokens: int) -> float:  # prefill tokens per second in a step of `tokens`
            return (tokens - d) / max(seconds(tokens), 1e-12)

        full = rate(cache.token_budget)
        tokens = 1 << max(0, d).bit_length()  # the first power of two with room for a chunk
        while tokens < cache.token_budget and rate(tokens) < (1 - slowdown) * full:
            tokens *= 2
        if tokens >= cache.token_budget or d * (seconds(cache.token_budget) - seconds(tokens)) <= seconds(tokens):
            return cache.token_budget
        return tokens

    def _admit(self, ordered: Sequence[RequestView], cache: CacheState, link: Optional[int], forced: bool):
        """Batch membership by rank, under the slots, pages and link budget:
        (plan, chosen, free, host_free, loc, link budget left).

        A job that lacks pages evicts device-resident jobs ranked below it, worst first, to host
        memory (its own upload frees its host pages first); nothing is evicted for a job that
        would not fit anyway. `forced` (nothing could run otherwise): caches may be dropped, and
        the link budget does not hold.
        """
        plan = Plan()
        free, host_free, slots = cache.free_pages, cache.free_host_pages, cache.max_batch
        untouched = link
        link = float("inf") if forced or link is None else link
        # One upload bigger than the whole budget may still go, alone: else a long job swapped out
        # would come back only when nothing else could run.
        oversize_ok = not forced and link < float("inf")
        loc: Dict[str, str] = {r.request_id: r.location for r in ordered}
        chosen: List[RequestView] = []
        for i, r in enumerate(ordered):
            if slots < 1:
                break
            if loc[r.request_id] == "gone":  # evicted earlier in this plan
                continue
            n = min(r.num_remaining, cache.max_chunk)
            on_host = r.own_pages if r.location == "host" else 0      # device pages its upload needs
            freed = cache.host_pages_for(on_host) if on_host else 0   # host pages the upload frees
            need = cache.pages_needed(r, n) + on_host
            room, victims, gain, moved = host_free + freed, [], 0, on_host
            for victim in (reversed(ordered[i + 1:]) if self.may_evict_for(r) else ()):
                if need <= free + gain:
                    break
                if loc[victim.request_id] != "device" or not victim.own_pages:
                    continue
                if victim.request_id in self._uploaded and not forced:
                    continue  # its upload has just landed: evicting it now moves it twice for nothing
                to_host = cache.host_pages_for(victim.own_pages) <= room and moved + victim.own_pages <= link
                if not to_host and not forced:
                    continue
                room -= cache.host_pages_for(victim.own_pages) if to_host else 0
                moved += victim.own_pages if to_host else 0
                victims.append((victim, to_host))
                gain += victim.own_pages
            alone = oversize_ok and on_host and moved > link == untouched
            if need > free + gain or (moved > link and not alone):
                continue
            link = 0 if alone else link - moved
            host_free += freed
            for victim, to_host in victims:
                (plan.swap_out if to_host else plan.preempt).append(victim.request_id)
                host_free -= cache.host_pages_for(victim.own_pages) if to_host else 0
                loc[victim.request_id] = "gone"
            if on_host:
                plan.swap_in.append(r.request_id)
                loc[r.request_id] = "device"
                if not forced:  # it runs from the next step: its upload overlaps this one
                    free += gain - on_host
                    continue
            chosen.append(r)
            free, slots = free + gain - need, slots - 1
        return plan, chosen, free, host_free, loc, link
