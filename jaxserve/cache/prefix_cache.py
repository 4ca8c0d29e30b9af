"""Device KV pages shared by prompt prefix: reference counts, chained page hashes, LRU eviction.

A full page is named by a hash chained over every token up to its end (and a model key), so two
requests whose prompts start with the same tokens name the same pages, and a page's name says
what it holds wherever it is computed (blake2b, not Python's per-process `hash`). A page no
request holds stays cached until its memory is needed; then the least recently used one goes.
Plain Python, no device work: this decides which pages hold what, the model runner fills them.
"""
from __future__ import annotations

import collections
import hashlib
from typing import Dict, List, Sequence

import numpy as np

from jaxserve.cache.page_allocator import OutOfPages


def page_hashes(tokens: Sequence[int], page_size: int, model_key: str = "", parent: bytes = b"") -> List[bytes]:
    """The chained hash of each full page of `tokens`; `parent`: the name of the page before
    them (to extend a sequence's names without hashing it again)."""
    out, parent = [], parent or hashlib.blake2b(model_key.encode(), digest_size=16).digest()
    ids = np.asarray(tokens, dtype=np.int64)
    for start in range(0, len(ids) - page_size + 1, page_size):
        parent = hashlib.blake2b(parent + ids[start:start + page_size].tobytes(), digest_size=16).digest()
        out.append(parent)
    return out


def matchable_pages(num_tokens: int, page_size: int) -> int:
    """Full pages of a sequence a cache hit may cover: its last token is always computed, since
    its forward pass gives the logits of the first new token."""
    return max(num_tokens - 1, 0) // page_size


def leading_run(names: Sequence[bytes], known) -> int:
    """How many of `names`, from the first, are in `known`."""
    n = 0
    while n < len(names) and names[n] in known:
        n += 1
    return n


class PrefixCache:
    """Owner of a pool's device pages when prefix caching is on (it replaces `PageAllocator`)."""

    def __init__(self, num_pages: int, page_size: int, model_key: str = ""):
        if num_pages < 1:
            raise ValueError(f"engine.num_pages must be >= 1, got {num_pages}")
        self.num_pages, self.page_size, self.model_key = num_pages, page_size, model_key
        self._free = list(range(num_pages - 1, -1, -1))  # never cached (or evicted): pop() low ids first
        self._refs: Dict[int, int] = {}  # held pages -> holders
        self._hash_of: Dict[int, bytes] = {}  # cached pages (held or not) -> their name
        self._page_of: Dict[bytes, int] = {}
        self._idle: "collections.OrderedDict[int, None]" = collections.OrderedDict()  # cached, unheld: LRU first
        # (page, name) of pages evicted since the owner last took them: their contents are intact
        # until the pages' new holders write them, so a host tier can still copy them
        self.evicted: List[tuple] = []
        self.num_shared = 0  # pages held by more than one request
        self.stats = {"evicted_pages": 0}

    @property
    def num_free(self) -> int:
        """Pages an `allocate` can hand out: never used, or cached and held by no request."""
        return len(self._free) + len(self._idle)

    @property
    def num_used(self) -> int:
        return len(self._refs)

    @property
    def num_cached(self) -> int:
        return len(self._hash_of)

    def refcount(self, page: int) -> int:
        return self._refs.get(page, 0)

    def hashes(self, tokens: Sequence[int], parent: bytes = b"") -> List[bytes]:
        return page_hashes(tokens, self.page_size, self.model_key, parent)

    def match(self, tokens: Sequence[int], names: Sequence[bytes] = ()) -> List[int]:
        """The pages of the longest cached prefix of `tokens` (whose page names are `names`, if
        known), now held by the caller; at most `matchable_pages` of them."""
        names = list(names or self.hashes(tokens))[:matchable_pages(len(tokens), self.page_size)]
        pages = [self._page_of[h] for h in names[:self.cached(names)]]
        for page in pages:
            self._hold(page)
        return pages

    def cached(self, names: Sequence[bytes]) -> int:
        """How many of `names`, from the first, name device pages (nothing is held)."""
        return leading_run(names, self._page_of)

    def allocate(self, n: int) -> List[int]:
        """n pages for new content, evicting the least recently used unheld cached pages if needed
        (listed in `evicted`)."""
        if n > self.num_free:
            raise OutOfPages(f"asked for {n} pages, {self.num_free} free")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)
                name = self._hash_of.pop(page)
                del self._page_of[name]
                self.evicted.append((page, name))
                self.stats["evicted_pages"] += 1
            self._refs[page] = 1
            pages.append(page)
        return pages

    def publish(self, pages: Sequence[int], hashes: Sequence[bytes]) -> None:
        """Names held, fully computed pages (a request's first len(hashes) pages) so later prompts
        can match them. A name already cached keeps its page; this copy stays private."""
        for page, h in zip(pages, hashes):
            if page not in self._refs:
                raise ValueError(f"page {page} is published but held by no request")
            if page in self._hash_of or h in self._page_of:
                continue
            self._hash_of[page], self._page_of[h] = h, page

    def free(self, pages: Sequence[int]) -> None:
        """One holder lets go of each page; a page no one holds stays cached if it is named."""
        for page in pages:
            refs = self._refs.get(page)
            if refs is None:
                raise ValueError(f"page {page} freed twice or never allocated")
            if refs > 1:
                self._refs[page] = refs - 1
                self.num_shared -= refs == 2
                continue
            del self._refs[page]
            if page in self._hash_of:
                self._idle[page] = None  # most recently used last
            else:
                self._free.append(page)

    def forget(self) -> None:
        """Drops every name (the pool's contents were lost); held pages stay held."""
        self._free += list(self._idle)
        self._idle.clear()
        self.evicted.clear()
        self._hash_of.clear()
        self._page_of.clear()

    def _hold(self, page: int) -> None:
        if page in self._refs:
            self._refs[page] += 1
            self.num_shared += self._refs[page] == 2
        else:
            del self._idle[page]
            self._refs[page] = 1
