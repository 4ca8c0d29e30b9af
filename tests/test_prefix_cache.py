"""Prefix caching's page bookkeeping: shared pages, reference counts, LRU eviction, content names."""
import collections
import contextlib

import numpy as np
import pytest

from jaxserve.cache.page_allocator import OutOfPages
from jaxserve.cache.prefix_cache import PrefixCache, page_hashes

S = 4  # page size


def test_requests_with_a_common_prefix_share_its_full_pages_until_memory_is_needed():
    cache = PrefixCache(num_pages=6, page_size=S)
    system = list(range(100, 108))  # two full pages
    a, b = system + [1, 2, 3], system + [7, 8]
    assert cache.match(a) == []
    pa = cache.allocate(3)
    cache.publish(pa, cache.hashes(a))  # two full pages named; the partial third is private
    assert cache.num_cached == 2
    pb = cache.match(b)
    assert pb == pa[:2] and [cache.refcount(p) for p in pa] == [2, 2, 1]
    pb += cache.allocate(1)
    cache.free(pa)
    assert [cache.refcount(p) for p in pa] == [1, 1, 0] and cache.num_free == 3
    cache.free(pb)
    assert cache.num_free == 6 and cache.num_cached == 2  # unheld, still cached
    assert cache.match(system + [9]) == pa[:2]  # a later turn finds them
    cache.free(pa[:2])
    # memory pressure: never-used pages go first, then the least recently used cached page
    got = cache.allocate(5)
    assert cache.stats["evicted_pages"] == 1 and cache.num_cached == 1
    assert cache.match(system + [9]) == []  # the chain's first page went, so the prefix is gone
    cache.free(got)


def test_the_last_prompt_token_is_always_computed_and_models_do_not_share_pages():
    cache = PrefixCache(num_pages=4, page_size=S)
    prompt = list(range(8))
    pages = cache.allocate(2)
    cache.publish(pages, cache.hashes(prompt))
    assert cache.match(prompt) == pages[:1]  # an exact page-aligned hit leaves its last page to compute
    assert PrefixCache(4, S, model_key="other").hashes(prompt) != cache.hashes(prompt)
    with pytest.raises(ValueError, match="page 3 is published but held by no request"):
        cache.publish([3], cache.hashes(prompt)[:1])
    with pytest.raises(OutOfPages):
        cache.allocate(4)


def test_thousands_of_random_operations_keep_counts_and_contents_right():
    rng = np.random.default_rng(0)
    cache = PrefixCache(num_pages=64, page_size=S)
    written = {}  # page -> the name of what the (simulated) runner computed into it
    held = {}  # request -> its pages
    prompts = {}
    systems = [list(rng.integers(0, 50, size=S * n)) for n in (1, 2, 3)]
    holders = collections.Counter()
    queried = hit_tokens = 0
    for step in range(5000):
        if held and (rng.random() < 0.45 or cache.num_free < 12):
            rid = list(held)[rng.integers(len(held))]
            pages = held.pop(rid)
            cache.free(pages)
            holders.subtract(pages)
        else:
            rid = f"r{step}"
            if prompts and rng.random() < 0.4:  # a next turn: an earlier prompt, its answer, a new message
                prompt = prompts[list(prompts)[rng.integers(len(prompts))]] + list(rng.integers(0, 50, size=rng.integers(1, 9)))
            else:
                prompt = systems[rng.integers(3)] + list(rng.integers(0, 50, size=rng.integers(1, 12)))
            names = cache.hashes(prompt)
            hit = cache.match(prompt)
            queried, hit_tokens = queried + len(prompt), hit_tokens + len(hit) * S
            assert [written[p] for p in hit] == names[:len(hit)]  # a hit holds exactly those tokens
            new = cache.allocate(-(-(len(prompt) + 4) // S) - len(hit))  # the prompt and 4 outputs
            assert not any(holders[p] for p in new)  # never a page someone holds
            pages = hit + new
            for i, p in enumerate(new, start=len(hit)):
                written[p] = names[i] if i < len(names) else ("private", rid, i)
            cache.publish(pages[:len(names)], names)
            held[rid], prompts[rid] = pages, prompt
            holders.update(pages)
        assert all(cache.refcount(p) == holders[p] for p in range(64))
        assert cache.num_shared == sum(1 for p in range(64) if holders[p] > 1)
        assert cache.num_free + cache.num_used == 64 and cache.num_used == sum(1 for p in range(64) if holders[p])
    for pages in held.values():
        cache.free(pages)
    assert cache.num_free == 64 and cache.num_used == 0
    assert hit_tokens > 0.3 * queried and cache.stats["evicted_pages"] > 100


def test_page_names_chain_over_everything_before_them():
    a = page_hashes([1, 2, 3, 4, 5, 6, 7, 8], S)
    b = page_hashes([9, 2, 3, 4, 5, 6, 7, 8], S)
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # same second page's tokens, other prefix
    assert page_hashes([1, 2, 3, 4, 5, 6, 7], S) == a[:1]


# -- the engine with prefix caching on: the same tokens as with it off ---------------------------
def _engine(tiny, **kw):
    from test_engine import make_engine
    return make_engine(tiny, **kw)


def _run(engine, requests):
    from test_engine import run_all
    return {rid: out.token_ids for rid, out in run_all(engine, requests).items()}


@pytest.mark.parametrize("impl", ["reference", "pallas"])  # pallas: the GPU's kernels, interpreted
def test_conversations_reuse_their_earlier_turns_and_get_the_same_tokens(tiny, impl):
    from jaxserve import SamplingParams
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=10, temperature=0.9, top_k=40, seed=7, ignore_eos=True)
    rng = np.random.default_rng(3)
    system = rng.integers(3, 1000, size=37).tolist()
    first = {f"c{i}": system + rng.integers(3, 1000, size=int(rng.integers(2, 20))).tolist() for i in range(6)}
    kw = dict(page_size=8, num_pages=96, token_budget=64, max_chunk=32, max_batch=8, attention_impl=impl)
    off, on = _engine(tiny, prefix_cache=False, **kw), _engine(tiny, prefix_cache=True, **kw)

    def turn(prompts):
        reqs = [(rid, p, seeded if i % 2 else greedy) for i, (rid, p) in enumerate(prompts.items())]
        want, got = _run(off, reqs), _run(on, reqs)
        assert got == want
        return want

    answers = turn(first)
    hit_first = on.stats["prefix_hit_tokens"]
    assert hit_first >= 4 * 8 * 3  # the system prompt's 4 full pages, once the first request named them
    second = {f"{rid}.2": p + answers[rid] + rng.integers(3, 1000, size=5).tolist() for rid, p in first.items()}
    turn(second)
    hit_second = on.stats["prefix_hit_tokens"] - hit_first
    assert hit_second >= sum((len(p) - 1) // 8 * 8 for p in first.values())  # every earlier prompt's full pages
    assert off.stats["prefix_hit_tokens"] == 0
    assert on.stats["preemptions"] == 0  # so each request was looked up once, misses counted too
    assert on.stats["prefix_queried_tokens"] == sum(map(len, [*first.values(), *second.values()]))
    assert on.allocator.num_used == 0 and on.allocator.num_free == 96


@pytest.mark.parametrize("policy", ["fcfs", "mlfq", "priority"])
def test_shared_pages_survive_preemption_under_memory_pressure(tiny, policy):
    from jaxserve import SamplingParams
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(5)
    system = rng.integers(3, 1000, size=16).tolist()
    reqs = [(f"r{i}", system + rng.integers(3, 1000, size=int(rng.integers(1, 50))).tolist(), greedy) for i in range(16)]
    kw = dict(page_size=8, num_pages=12, token_budget=64, max_chunk=32, max_batch=8, policy=policy)
    on = _engine(tiny, prefix_cache=True, **kw)
    got = _run(on, reqs)
    assert on.stats["preemptions"] > 0, on.stats
    assert on.stats["prefix_hit_tokens"] > 0
    assert got == _run(_engine(tiny, prefix_cache=False, **kw), reqs)
    assert on.allocator.num_used == 0 and on.allocator.num_free == 12


def test_prefix_caching_config_is_checked():
    from jaxserve import EngineConfig
    with pytest.raises(ValueError, match="engine.prefix_cache must be true or false"):
        EngineConfig(prefix_cache="yes")
    assert EngineConfig(prefix_cache=True, host_pages=4, prefix_host_tier=True).prefix_host_tier
    assert EngineConfig().prefix_cache and not EngineConfig().prefix_host_tier  # the defaults
    with pytest.raises(ValueError, match="engine.prefix_host_tier=true needs engine.prefix_cache=true and "
                                         "engine.host_pages > 0"):
        EngineConfig(prefix_host_tier=True)


# -- the host tier: pages evicted from the device wait in host memory ----------------------------
def test_the_host_pool_keeps_evicted_pages_by_name_in_the_room_swaps_leave(tiny):
    import jax.numpy as jnp
    from jaxserve.cache.swap import HostPagePool
    cfg, _, mesh, _ = tiny
    shape = (cfg.num_layers, 9, 4, cfg.num_kv_heads, cfg.head_dim)
    pool = {n: jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) + i for i, n in enumerate("kv")}
    host = HostPagePool(8, mesh)
    names = [bytes([i]) * 16 for i in range(6)]
    assert host.cache_pages(names[:3], pool, [5, 6, 7]) == 3  # page by page, not a 4-page buffer
    assert host.cache_pages(names[3:5], pool, [1, 2]) == 2
    assert (host.num_cached, host.num_free) == (5, 8)
    assert host.cached_prefix(names) == 5 and host.cached_prefix(names[1:]) == 4 and host.cached_prefix(names[5:]) == 0
    # a hit uploads just its pages, in the asked order (padded to a power of two)
    staged = host.upload_cached([names[4], names[0], names[2]])
    assert staged["k"].shape[1] == 4
    for q, page in enumerate((2, 5, 7)):
        for n in "kv":
            assert np.array_equal(np.asarray(staged[n][:, q]), np.asarray(pool[n][:, page]))
    # a swap-out needs room: cached pages go, least recently used first (now 1, 3, 4, 0, 2)
    host.put("swapped", pool, [3, 4, 8])  # a 4-page buffer: 8 - 5 = 3 free, one page must go
    assert (host.used, host.num_cached) == (4, 4)
    assert [host.has_cached(n) for n in names[:5]] == [True, False, True, True, True]
    host.put("swapped2", pool, [1, 2, 3, 4])  # no room beside the swapped requests: every page goes
    assert host.num_cached == 0
    assert host.cache_pages(names[5:], pool, [1]) == 0


def test_evicted_pages_come_back_from_the_host_with_the_content_their_names_say(tiny):
    """Attention over a prefix does not depend on its pages' order, so outputs alone would not
    catch a restore that puts pages in the wrong places (and names them wrongly)."""
    import collections as col
    import types
    import jax.numpy as jnp
    from jaxserve.engine.kv_manager import KVManager
    cfg, _, mesh, _ = tiny
    shape = (cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim)
    original = {n: jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) * (i + 1) for i, n in enumerate("kv")}
    runner = types.SimpleNamespace(cache=dict(original))
    kv = KVManager(8, 4, 16, mesh, runner, col.defaultdict(int), prefix_cache=True, host_tier=True)
    names = [bytes([i]) * 16 for i in range(5)]
    first = kv._allocate(5)
    kv.prefix.publish(first, names)
    kv.prefix.free(first)
    everything = kv._allocate(8)  # evicts the 5 named pages: they go to the host first
    assert kv.stats["prefix_spilled_pages"] == 5 and kv.host_pool.cached_prefix(names) == 5
    runner.cache = {n: jnp.zeros(shape, jnp.float32) for n in "kv"}  # their new holders overwrite them
    kv.prefix.free(everything)
    target = kv._restore(names[1:4])
    for name, page in zip(names[1:4], target):
        src = first[names.index(name)]
        for n in "kv":
            assert np.array_equal(np.asarray(runner.cache[n][:, page]), np.asarray(original[n][:, src]))
    assert kv.prefix.match(list(range(4 * 4 + 1)), names[:4]) == []  # names[0] is not on the device
    assert kv.prefix.cached(names[1:4]) == 3


def test_a_restore_that_makes_the_device_evict_keeps_what_it_restores(tiny):
    """Restoring needs device pages; evicting named ones spills them to a full host tier, which
    makes room by dropping its least recently used pages: those being restored must survive."""
    import collections as col
    import types
    import jax.numpy as jnp
    from jaxserve.engine.kv_manager import KVManager
    cfg, _, mesh, _ = tiny
    shape = (cfg.num_layers, 4, 4, cfg.num_kv_heads, cfg.head_dim)
    runner = types.SimpleNamespace(cache={n: jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) for n in "kv"})
    kv = KVManager(4, 4, 4, mesh, runner, col.defaultdict(int), prefix_cache=True, host_tier=True)
    old, new = [bytes([i]) * 16 for i in range(4)], [bytes([9, i]) * 8 for i in range(4)]
    for names in (old, new):  # the second set evicts the first to the host (4 pages: full)
        pages = kv._allocate(4)
        kv.prefix.publish(pages, names)
        kv.prefix.free(pages)
    assert kv.host_pool.cached_prefix(old) == 4 and kv.host_pool.num_cached == 4
    restored = kv._restore(old[:2])  # evicts 2 of `new` to the host, which drops `old`'s block
    assert len(restored) == 2 and kv.prefix.cached(old[:2]) == 2


def _conversations(rng, n, system_len, user_len):
    system = rng.integers(3, 1000, size=system_len).tolist()
    return {f"c{i}": system + rng.integers(3, 1000, size=user_len).tolist() for i in range(n)}


def _two_turns(engines, first, params, rng):
    """Runs turn 1 and then turn 2 (turn 1 + its answer + a new message) on every engine; returns
    each engine's answers {request id: tokens}."""
    answers = [_run(e, [(rid, p, params) for rid, p in first.items()]) for e in engines]
    extra = {rid: rng.integers(3, 1000, size=6).tolist() for rid in first}
    for e, a in zip(engines, answers):
        second = [(f"{rid}.2", p + answers[0][rid] + extra[rid], params) for rid, p in first.items()]
        a.update(_run(e, second))
    return answers


def test_pages_evicted_from_the_device_come_back_from_the_host_tier(tiny):
    from jaxserve import SamplingParams
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(11)
    first = _conversations(rng, 8, system_len=24, user_len=40)  # 8 pages each, 3 of them shared
    kw = dict(page_size=8, num_pages=40, token_budget=64, max_chunk=32, max_batch=4)
    off = _engine(tiny, prefix_cache=False, **kw)
    device_only = _engine(tiny, prefix_cache=True, **kw)
    tiered = _engine(tiny, prefix_cache=True, host_pages=128, prefix_host_tier=True, **kw)
    want, got_device, got_tiered = _two_turns([off, device_only, tiered], first, greedy, rng)
    assert got_device == want and got_tiered == want
    # the first turn's pages did not all fit on the device: the host tier kept what it evicted
    assert tiered.stats["prefix_spilled_pages"] > 0 and tiered.stats["prefix_host_hit_tokens"] > 0
    assert tiered.stats["prefix_hit_tokens"] > device_only.stats["prefix_hit_tokens"]
    assert tiered.kv.host_pool.used == 0 and tiered.allocator.num_used == 0 and tiered.allocator.num_free == 40


def test_after_precompile_the_host_tier_compiles_nothing(tiny):
    from jaxserve import SamplingParams
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(12)
    first = _conversations(rng, 8, system_len=24, user_len=40)
    tiered = _engine(tiny, prefix_cache=True, host_pages=128, prefix_host_tier=True, page_size=8, num_pages=40,
                     token_budget=64, max_chunk=32, max_batch=4)
    tiered.precompile()
    with _xla_compiles() as compiles:
        _two_turns([tiered], first, greedy, rng)
    assert tiered.stats["prefix_host_hit_tokens"] > 0 and tiered.stats["prefix_spilled_pages"] > 0
    assert compiles == []


def test_a_host_tier_smaller_than_a_transfer_bucket_compiles_nothing_after_precompile(tiny):
    # 3 host pages: a spill of 4 evicted pages and a hit of 3 run at 4-page buckets, past the
    # swap buckets the host pool has room for
    import jax
    from jaxserve.cache.swap import write_staged
    jax.clear_caches()  # what other tests compiled (larger host pools warm larger buckets) does not count
    engine = _engine(tiny, prefix_cache=True, host_pages=3, prefix_host_tier=True, page_size=8, num_pages=40,
                     token_budget=64, max_chunk=32, max_batch=4)
    engine.precompile()
    with _xla_compiles() as compiles:
        names = [b"page %d" % i for i in range(4)]
        engine.kv._spill(list(zip([1, 2, 3, 4], names)))
        kept = [n for n in names if engine.kv.host_pool.has_cached(n)]
        assert len(kept) == 3
        staged = engine.kv.host_pool.upload_cached(kept)
        engine.runner.cache = write_staged(engine.runner.cache, [5, 6, 7], staged)
    assert compiles == []


@contextlib.contextmanager
def _xla_compiles():
    """Yields a list that collects an entry for every XLA compilation inside the block."""
    from jax._src import monitoring
    compiles = []
    listener = lambda event, duration, **kw: compiles.append(event) if "backend_compile" in event else None
    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        monitoring.unregister_event_duration_listener(listener)


@pytest.mark.parametrize("policy", ["mlfq", "priority"])
def test_swapping_out_leaves_shared_pages_on_the_device(tiny, policy):
    from jaxserve import SamplingParams
    greedy = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(7)
    system = rng.integers(3, 1000, size=32).tolist()
    reqs = [(f"r{i}", system + rng.integers(3, 1000, size=int(rng.integers(4, 30))).tolist(), greedy)
            for i in range(10)]
    kw = dict(page_size=8, num_pages=24, token_budget=48, max_chunk=32, max_batch=4, policy=policy)
    want = _run(_engine(tiny, prefix_cache=False, page_size=8, num_pages=128, max_batch=4), reqs)
    on = _engine(tiny, prefix_cache=True, host_pages=256, **kw)
    for i, (rid, p, sp) in enumerate(reqs):  # later requests outrank earlier ones: forces swaps
        on.add_request(rid, p, sp, priority=-i)
    got = {}
    while on.has_unfinished():
        got.update((o.request_id, o.token_ids) for o in on.step() if o.finished)
    assert got == want
    assert on.stats["swap_outs"] > 0 and on.stats["swap_shared_pages_kept"] > 0, on.stats
    assert on.kv.host_pool.used == 0 and on.allocator.num_used == 0 and on.allocator.num_free == 24


def test_a_plan_that_preempts_one_sharer_and_swaps_out_the_other_keeps_their_shared_pages(tiny):
    """Two requests hold a prefix's pages, no one else: the plan preempts A and swaps B out, with
    room on the host for B's own pages only. B must keep the shared pages (as the policy counted),
    not copy them once A let go (before, the swap-out asked for more room than there was)."""
    from jaxserve import SamplingParams
    from jaxserve.scheduling import FCFSPolicy
    from jaxserve.scheduling.plan import Plan

    class Scripted(FCFSPolicy):
        trigger = False

        def schedule(self, views, cache, now):
            if self.trigger:
                self.trigger = False
                return Plan(preempt=["a"], swap_out=["b"])
            return super().schedule(views, cache, now)

    greedy = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    rng = np.random.default_rng(2)
    system = rng.integers(3, 1000, size=32).tolist()  # 4 pages of 8
    reqs = [("a", system + rng.integers(3, 1000, size=20).tolist(), greedy),
            ("b", system + rng.integers(3, 1000, size=12).tolist(), greedy)]
    want = _run(_engine(tiny, prefix_cache=False, page_size=8, num_pages=64), reqs)
    cfg, params, mesh, tok = tiny
    from jaxserve import Engine, EngineConfig
    policy = Scripted()
    engine = Engine(cfg, params, mesh, tok, EngineConfig(page_size=8, num_pages=64, host_pages=4, token_budget=64,
                                                         max_chunk=64, max_batch=4), policy=policy)
    engine.add_request(*reqs[0])
    got = {}
    for _ in range(2):  # a computes and names the prefix
        got.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    engine.add_request(*reqs[1])
    for _ in range(3):  # b shares it
        got.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    b = engine.requests["b"]
    assert engine.kv.shared_pages(b) == 4 and len(b.pages) - 4 <= 4
    policy.trigger = True
    while engine.has_unfinished():
        got.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
    assert got == want
    assert engine.stats["swap_shared_pages_kept"] == 4 and engine.stats["swap_outs"] == 1
    assert engine.allocator.num_used == 0 and engine.host_pool.used == 0
