"""The one owner of a replica's KV memory: device pages, the host page pool, staged uploads.

The engine asks it to grow, release, swap out, swap in, export and import a request's cache;
only this module hands out or frees pages. The pool arrays themselves live in the model runner,
whose steps update them in place; transfers here go through `runner.cache` as well, so every
device operation on the pool is ordered after the steps dispatched before it.

With prefix caching and a host pool, named pages the device evicts are copied to the host pool
(read before their new holders' writes, which are dispatched later) and come back on a hit; a
swapped-out request leaves the pages it shares on the device, held, and copies only its own.
"""
from __future__ import annotations

import time
from typing import Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.cache.page_allocator import PageAllocator, pages_for
from jaxserve.cache.prefix_cache import PrefixCache, matchable_pages
from jaxserve.cache.swap import HostPagePool, gather_bucketed, write_staged
from jaxserve.scheduling.cost_model import bucket
from jaxserve.engine.request import Request, Status


class KVManager:
    def __init__(self, num_pages: int, page_size: int, host_pages: int, mesh, runner, stats: dict,
                 prefix_cache: bool = False, host_tier: bool = False, model_key: str = ""):
        self.page_size, self.runner, self.stats = page_size, runner, stats
        # with prefix caching, full pages are named by their tokens and shared (cache/prefix_cache.py)
        self.prefix = PrefixCache(num_pages, page_size, model_key) if prefix_cache else None
        self.allocator = self.prefix or PageAllocator(num_pages)
        self.host_pool = HostPagePool(host_pages, mesh)
        self.host_tier = host_tier and self.prefix is not None and host_pages > 0  # evicted named pages kept there
        self._staged: Dict[str, tuple] = {}  # uploads in flight: request_id -> (pages, device buffers)
        self._names: Dict[str, List[bytes]] = {}  # request_id -> its full pages' names so far
        self._published: Dict[str, int] = {}  # request_id -> how many of its pages are named
        self._kept: Dict[str, List[tuple]] = {}  # swapped request -> [(index, page)] shared pages it holds
        self._prompt_names: Dict[str, tuple] = {}  # waiting request -> (tokens hashed, their names)

    def _allocate(self, n: int) -> List[int]:
        """n device pages; named pages this evicts are copied to the host tier first."""
        pages = self.allocator.allocate(n)
        if self.prefix is not None and self.prefix.evicted:
            evicted, self.prefix.evicted = self.prefix.evicted, []
            if self.host_tier:
                self._spill(evicted)
        return pages

    def _spill(self, evicted: Sequence[tuple]) -> None:
        """Copies evicted named pages the host tier lacks to it. The gather reads the pool as
        the steps dispatched so far leave it: before any write of the pages' new holders."""
        fresh = [(p, h) for p, h in evicted if not self.host_pool.has_cached(h)]
        self.host_pool.touch([h for _, h in evicted if self.host_pool.has_cached(h)])
        if fresh:
            self.stats["prefix_spilled_pages"] += self.host_pool.cache_pages(
                [h for _, h in fresh], self.runner.cache, [p for p, _ in fresh])

    def _restore(self, names: Sequence[bytes]) -> List[int]:
        """New device pages holding the host tier's copies of `names` (in order), named."""
        # uploads first: the pages allocated next may evict others, whose spill may drop these
        staged = self.host_pool.upload_cached(names)
        pages = self._allocate(len(names))
        self.runner.cache = write_staged(self.runner.cache, pages, staged)
        self.prefix.publish(pages, names)
        self.stats["prefix_restored_pages"] += len(pages)
        return pages

    def prompt_names(self, r: Request) -> List[bytes]:
        """The names of r's full pages of known tokens (hashed once per token count)."""
        known = self._prompt_names.get(r.request_id)
        if known is None or known[0] != r.num_tokens:
            known = (r.num_tokens, self.prefix.hashes(r.token_ids(0, r.num_tokens)))
            self._prompt_names[r.request_id] = known
        return known[1]

    def cached_tokens(self, r: Request) -> int:
        """Tokens of r's longest prefix cached on the device or the host (for a request with no
        cache of its own, whose prefill would start after them; 0 without prefix caching)."""
        if self.prefix is None or r.pages or r.num_computed:
            return 0
        names = self.prompt_names(r)[:matchable_pages(r.num_tokens, self.page_size)]
        n = self.prefix.cached(names)
        if self.host_tier:
            n += self.host_pool.cached_prefix(names[n:])
        return n * self.page_size

    def match(self, r: Request, n: int) -> int:
        """Gives a request with no cache the cached pages of its longest known prefix, so that
        its planned n-token chunk starts after them; returns the chunk's tokens now. The policy
        counted the unheld cached pages as free: a match whose remaining pages would no longer
        fit is dropped, and r runs as planned."""
        if self.prefix is None or r.pages or r.num_computed:
            return n
        names = list(self.prompt_names(r))
        self._prompt_names.pop(r.request_id, None)
        pages = self.prefix.match(r.token_ids(0, r.num_tokens), names)
        self.stats["prefix_queried_tokens"] += r.num_tokens  # misses too: hit / queried is the hit rate
        usable = matchable_pages(r.num_tokens, self.page_size)
        on_host = self.host_pool.cached_prefix(names[len(pages):usable]) if self.host_tier else 0
        hit = (len(pages) + on_host) * self.page_size
        rest = min(n, r.num_tokens - hit)
        if not hit or self.pages_needed(hit + rest) - len(pages) > self.prefix.num_free:
            self.prefix.free(pages)
            self._names[r.request_id] = names  # `computed` names its pages from these
            return n
        if on_host:
            pages += self._restore(names[len(pages):len(pages) + on_host])
            self.stats["prefix_host_hit_tokens"] += on_host * self.page_size
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
            self.host_pool.forget_cached()  # its copies may have been read from the lost pool
            self._published = {rid: 0 for rid in self._published}

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def pages_needed(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def grow(self, r: Request, num_tokens: int) -> None:
        """Gives r the pages to hold its first num_tokens tokens."""
        r.pages += self._allocate(self.pages_needed(num_tokens) - len(r.pages))

    def release(self, r: Request) -> None:
        """Frees everything r holds (device pages, host copy, upload in flight)."""
        self._staged.pop(r.request_id, None)
        self._names.pop(r.request_id, None)
        self._published.pop(r.request_id, None)
        self._prompt_names.pop(r.request_id, None)
        self.host_pool.drop(r.request_id)
        self.allocator.free(r.pages + [p for _, p in self._kept.pop(r.request_id, [])])
        r.pages = []

    def shared_pages(self, r: Request) -> int:
        """Of r's device pages, those other requests hold too: releasing r frees none of them."""
        if self.prefix is None or not self.prefix.num_shared:
            return 0
        return sum(self.prefix.refcount(p) > 1 for p in r.pages)

    def swap_out(self, r: Request) -> Optional[int]:
        """Moves r's pages to the host pool; r keeps its computed tokens. Pages it shares stay on
        the device, held, and are not copied. Returns bytes moved, or None (and moves nothing)
        when the host pool has no room for them."""
        kept = [(i, p) for i, p in enumerate(r.pages) if self.prefix is not None and self.prefix.refcount(p) > 1]
        own = [p for p in r.pages if self.prefix is None or self.prefix.refcount(p) == 1]
        if bucket(len(own)) > self.host_pool.num_free:
            return None
        self.write_staged(r.request_id)
        moved = self.host_pool.put(r.request_id, self.runner.cache, own)
        self.allocator.free(own)
        if kept:
            self._kept[r.request_id] = kept
            self.stats["swap_shared_pages_kept"] += len(kept)
        r.pages, r.status = [], Status.SWAPPED
        self.stats["swap_outs"] += 1
        self.stats["swap_out_bytes"] += moved
        return moved

    def kept_pages_of(self, r: Request) -> int:
        return len(self._kept.get(r.request_id, ()))

    def holds_device_pages(self, r: Request) -> bool:
        """Whether r holds device pages: its own, or (swapped out) shared ones it kept."""
        return bool(r.pages) or r.request_id in self._kept

    @property
    def kept_pages(self) -> int:
        """Shared device pages that swapped-out requests hold (see `swap_out`)."""
        return sum(map(len, self._kept.values()))

    def warm_transfers(self, max_pages: int) -> int:
        """Runs each page transfer once at every bucket it can take, through the swap and
        host-tier paths on page 0 with every write dropped, so that they compile nothing while
        serving. Swaps take buckets the host pool has room for; the tier's spills any up to
        max_pages (one request's pages), and its hits any up to the pages it can hold (a hit of
        3 runs at a 4-page bucket). Returns the number of buckets."""
        self.host_pool.reserve(self.runner.cache)
        buckets = [1 << i for i in range(bucket(max_pages).bit_length())]
        for n in buckets:
            if n <= self.host_pool.num_free:
                self.host_pool.put("warm-up", self.runner.cache, [0] * n)
                staged, _ = self.host_pool.upload("warm-up")
                self.runner.cache = write_staged(self.runner.cache, [], staged)
            if self.host_tier:
                names = [b"warm-up %d" % i for i in range(n)]
                kept = self.host_pool.cache_pages(names, self.runner.cache, [0] * n)
                if kept and n <= bucket(self.host_pool.capacity):  # held pages padded to n
                    hit = names[:kept] + names[:1] * (n - kept)
                    self.runner.cache = write_staged(self.runner.cache, [], self.host_pool.upload_cached(hit))
                self.host_pool.forget_cached()  # nothing is cached before serving
        return len(buckets)

    def start_upload(self, request_id: str) -> tuple:
        """Starts the host->device copy of a swapped request (see `swap_in`)."""
        return self.host_pool.upload(request_id)

    def swap_in(self, r: Request, upload: tuple, needed_now: bool) -> int:
        """Gives r's upload device pages; it lands in the pool before r runs. Returns bytes. With
        prefix caching a plan may count pages that a preempted request's shared pages still
        hold as free: if r's do not fit, its copy goes back to the host and r stays swapped."""
        staged, n = upload
        if n > self.allocator.num_free:
            self.stats["prefix_deferred"] += 1
            if staged["k"].shape[1] <= self.host_pool.num_free:
                self.host_pool.store(r.request_id, staged, n)
                return 0
            self.stats["recomputed_tokens"] += r.num_computed  # this step's swap-outs took its room
            self.release(r)
            r.num_computed, r.status = 0, Status.WAITING
            return 0
        pages = self._allocate(n)
        moved = sum(x.nbytes for x in staged.values()) * n // staged["k"].shape[1]
        r.pages, r.status = _around_kept(self._kept.pop(r.request_id, []), pages), Status.RUNNING
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
            entry = self.host_pool.entries[r.request_id]
            kv = {name: jax.device_put(x, on_device) for name, x in entry.data.items()}
            kept = self._kept.get(r.request_id)
            if kept:  # its shared pages stayed on the device: put them back in their places
                shared = gather_bucketed(self.runner.cache, [p for _, p in kept])
                total = entry.num_pages + len(kept)
                order = np.zeros(bucket(total), np.int32)  # bucketed, as every exported buffer is
                # rows of [its own pages' buffer, the kept pages' buffer], in the request's order
                order[:total] = _around_kept([(i, kv["k"].shape[1] + j) for j, (i, _) in enumerate(kept)],
                                             range(entry.num_pages))
                kv = {name: jnp.concatenate([kv[name], shared[name]], axis=1)[:, order] for name in kv}
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
            pages = self._allocate(n)
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


def _around_kept(kept: Sequence[tuple], own: Sequence) -> list:
    """A swapped request's page list again: its own entries, in order, around the (index, entry)
    ones it kept on the device."""
    at, rest = dict(kept), iter(own)
    return [at[i] if i in at else next(rest) for i in range(len(at) + len(own))]
