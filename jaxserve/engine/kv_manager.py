"""The one owner of a replica's KV memory: device pages, the host page pool, staged uploads.

The engine asks it to grow, release, swap out, swap in, export and import a request's cache;
only this module hands out or frees pages. The pool arrays themselves live in the model runner,
whose steps update them in place; transfers here go through `runner.cache` as well, so every
device operation on the pool is ordered after the steps dispatched before it.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional

import jax

from jaxserve.cache.page_allocator import PageAllocator, pages_for
from jaxserve.cache.prefix_cache import PrefixCache
from jaxserve.cache.swap import HostPagePool, gather_bucketed, write_staged
from jaxserve.engine.request import Request, Status


class KVManager:
    def __init__(self, num_pages: int, page_size: int, host_pages: int, mesh, runner, stats: dict,
                 prefix_cache: bool = False, model_key: str = ""):
        self.page_size, self.runner, self.stats = page_size, runner, stats
        # with prefix caching, full pages are named by their tokens and shared (cache/prefix_cache.py)
        self.prefix = PrefixCache(num_pages, page_size, model_key) if prefix_cache else None
        self.allocator = self.prefix or PageAllocator(num_pages)
        self.host_pool = HostPagePool(host_pages, mesh)
        self._staged: Dict[str, tuple] = {}  # uploads in flight: request_id -> (pages, device buffers)
        self._names: Dict[str, List[bytes]] = {}  # request_id -> its full pages' names so far
        self._published: Dict[str, int] = {}  # request_id -> how many of its pages are named

    def match(self, r: Request, n: int) -> int:
        """Gives a request with no cache the cached pages of its longest known prefix, so that
        its planned n-token chunk starts after them; returns the chunk's tokens now. The policy
        counted the unheld cached pages as free: a match whose remaining pages would no longer
        fit is dropped, and r runs as planned."""
        if self.prefix is None or r.pages or r.num_computed:
            return n
        tokens = r.token_ids(0, r.num_tokens)
        names = self.prefix.hashes(tokens)
        pages = self.prefix.match(tokens, names)
        self.stats["prefix_queried_tokens"] += r.num_tokens  # misses too: hit / queried is the hit rate
        hit = len(pages) * self.page_size
        rest = min(n, r.num_tokens - hit)
        if not pages or self.pages_needed(hit + rest) - len(pages) > self.prefix.num_free:
            self.prefix.free(pages)
            return n
        r.pages, r.num_computed = pages, hit
        self._names[r.request_id], self._published[r.request_id] = names, len(pages)
        self.stats["prefix_hit_tokens"] += hit
        return rest

    def can_grow(self, r: Request, num_tokens: int) -> bool:
        return self.pages_needed(num_tokens) - len(r.pages) <= self.allocator.num_free

    def computed(self, r: Request) -> None:
        """Names r's pages that its computed tokens (those of steps dispatched so far) fill."""
        if self.prefix is None:
            return
        full = r.num_computed // self.page_size
        names = self._names.setdefault(r.request_id, [])
        if full > len(names):  # a token sampled by the step in flight is not known yet: one page less
            names += self.prefix.hashes(r.token_ids(len(names) * self.page_size, full * self.page_size),
                                        names[-1] if names else b"")
        full, done = min(full, len(names)), self._published.get(r.request_id, 0)
        if full > done:
            self.prefix.publish(r.pages[done:full], names[done:full])
            self._published[r.request_id] = full

    def forget_cached(self) -> None:
        """The pool's contents were lost: no page holds what its name says any more."""
        if self.prefix is not None:
            self.prefix.forget()
            self._published = {rid: 0 for rid in self._published}

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def pages_needed(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def grow(self, r: Request, num_tokens: int) -> None:
        """Gives r the pages to hold its first num_tokens tokens."""
        r.pages += self.allocator.allocate(self.pages_needed(num_tokens) - len(r.pages))

    def release(self, r: Request) -> None:
        """Frees everything r holds (device pages, host copy, upload in flight)."""
        self._staged.pop(r.request_id, None)
        self._names.pop(r.request_id, None)
        self._published.pop(r.request_id, None)
        self.host_pool.drop(r.request_id)
        self.allocator.free(r.pages)
        r.pages = []

    def swap_out(self, r: Request) -> int:
        """Moves r's pages to the host pool; r keeps its computed tokens. Returns bytes moved."""
        self.write_staged(r.request_id)
        moved = self.host_pool.put(r.request_id, self.runner.cache, r.pages)
        self.allocator.free(r.pages)
        r.pages, r.status = [], Status.SWAPPED
        self.stats["swap_outs"] += 1
        self.stats["swap_out_bytes"] += moved
        return moved

    def start_upload(self, request_id: str) -> tuple:
        """Starts the host->device copy of a swapped request (see `swap_in`)."""
        return self.host_pool.upload(request_id)

    def swap_in(self, r: Request, upload: tuple, needed_now: bool) -> int:
        """Gives r's upload device pages; it lands in the pool before r runs. Returns bytes."""
        staged, n = upload
        pages = self.allocator.allocate(n)
        moved = sum(x.nbytes for x in staged.values()) * n // staged["k"].shape[1]
        r.pages, r.status = pages, Status.RUNNING
        self._staged[r.request_id] = (pages, staged)
        self.stats["swap_ins"] += 1
        self.stats["swap_in_bytes"] += moved
        if needed_now:  # not prefetched: this step waits for the transfer
            t = time.perf_counter()
            jax.block_until_ready(staged)
            self.stats["swap_stall_s"] += time.perf_counter() - t
            self.stats["swap_ins_unforeseen"] += 1
            self.write_staged(r.request_id)
        return moved

    def write_staged(self, request_id: Optional[str] = None) -> None:
        """Scatters finished (or, with an id, that request's) uploads into the device pool."""
        for rid in [request_id] if request_id is not None else list(self._staged):
            if rid in self._staged:
                pages, staged = self._staged.pop(rid)
                self.runner.cache = write_staged(self.runner.cache, pages, staged)

    def export(self, r: Request, with_kv: bool) -> Optional[dict]:
        """Takes r's cache out of this replica: {"k", "v"} device arrays [L, >= its pages, ...], or
        None (no cache, or not wanted); r holds nothing here afterwards."""
        kv = None
        if with_kv and r.status is Status.RUNNING and r.pages:
            kv = gather_bucketed(self.runner.cache, r.pages)
        elif with_kv and r.status is Status.SWAPPED:
            on_device = self.runner.cache["k"].sharding
            kv = {name: jax.device_put(x, on_device) for name, x in self.host_pool.entries[r.request_id].data.items()}
        self.release(r)
        return kv

    def has_pages_for(self, r: Request) -> bool:
        """Whether the device pool has free pages for the KV of r's committed tokens."""
        return self.pages_needed(r.num_computed) <= self.allocator.num_free

    def import_(self, r: Request, kv: Optional[dict]) -> int:
        """Places an exported cache: in device pages if they are free, else in host memory, else
        nowhere (r recomputes). Sets r's pages and status; returns KV bytes copied in."""
        n = 0 if kv is None else self.pages_needed(r.num_computed)
        on_device = self.runner.cache["k"].sharding  # the pool's spec: only the page count differs
        if kv is not None and self.has_pages_for(r):
            pages = self.allocator.allocate(n)
            staged = {name: jax.device_put(x, on_device) for name, x in kv.items()}
            self.runner.cache = write_staged(self.runner.cache, pages, staged)
            r.pages, r.status = pages, Status.RUNNING
            return n * sum(x.nbytes // x.shape[1] for x in kv.values())
        if kv is not None and kv["k"].shape[1] <= self.host_pool.num_free:  # no room on the device: wait on the host
            r.pages, r.status = [], Status.SWAPPED
            return self.host_pool.store(r.request_id, {k: jax.device_put(x, on_device) for k, x in kv.items()}, n)
        if kv is not None:
            self.stats["recomputed_tokens"] += r.num_computed
        r.pages, r.num_computed, r.status = [], 0, Status.WAITING
        return 0

    def host_entry_pages(self, request_id: str) -> int:
        return self.host_pool.entries[request_id].num_pages
