"""What a scheduling policy sees (request metadata only) and what it returns (a step plan).

Policies never touch the model, the cache or the clock source: the same policy drives the
real engine and the discrete-event simulator.
"""
from __future__ import annotations

import dataclasses
from typing import List, Tuple

from jaxserve.cache.page_allocator import pages_for
from jaxserve.scheduling.cost_model import bucket


@dataclasses.dataclass(frozen=True)
class RequestView:
    request_id: str
    arrival_time: float
    priority: int
    num_tokens: int        # prompt + generated so far
    num_computed: int      # tokens whose KV is in the cache (device or host)
    num_generated: int
    max_tokens: int
    num_pages: int         # pages held
    location: str          # "none" (no cache), "device" or "host"
    # With prefix caching: tokens of a request with no cache of its own that the cache holds for
    # it (its prefill starts after them), and pages it holds that others hold too (taking its
    # cache away frees none of them).
    num_cached: int = 0
    shared_pages: int = 0

    @property
    def num_remaining(self) -> int:
        """Tokens still to compute before its next token."""
        return self.num_tokens - self.num_computed - self.num_cached

    @property
    def own_pages(self) -> int:
        """Pages that preempting or swapping it out frees (and that a swap-out copies)."""
        return self.num_pages - self.shared_pages


@dataclasses.dataclass(frozen=True)
class CacheState:
    page_size: int
    free_pages: int        # device pages free now
    total_pages: int
    free_host_pages: int = 0
    max_batch: int = 64
    token_budget: int = 512  # tokens run per step (prefill chunks + decodes)
    max_chunk: int = 512     # longest prefill chunk
    # Seconds the host link takes to move one page while the step computes beside it (0: swaps
    # cost no step time that a policy should weigh, e.g. none configured). Preemptive policies
    # keep the swaps they choose within what the link moves during the step's compute.
    swap_s_per_page: float = 0.0

    def pages_needed(self, r: RequestView, n: int) -> int:
        """New pages `r` needs to run its next `n` tokens (a cached prefix's pages count: the
        unheld ones it takes are among the free pages)."""
        return max(0, pages_for(r.num_computed + r.num_cached + n, self.page_size) - r.num_pages)

    @staticmethod
    def host_pages_for(num_pages: int) -> int:
        """Host pages that a swapped-out copy of `num_pages` device pages takes: copies are
        bucketed (one compiled transfer per power of two) and the host pool counts what it holds."""
        return bucket(num_pages)


@dataclasses.dataclass
class Plan:
    run: List[Tuple[str, int]] = dataclasses.field(default_factory=list)  # (request_id, tokens this step)
    preempt: List[str] = dataclasses.field(default_factory=list)          # drop their cache, recompute later
    swap_out: List[str] = dataclasses.field(default_factory=list)         # device -> host
    swap_in: List[str] = dataclasses.field(default_factory=list)          # host -> device

    def __bool__(self):
        return bool(self.run or self.preempt or self.swap_out or self.swap_in)
