"""KV swapping between the device pool and host memory, in the real engine (tiny model)."""
import numpy as np
import pytest

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.scheduling import FCFSPolicy, GittinsPolicy, MLFQPolicy, PriorityPolicy
from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.plan import Plan

from test_engine import mixed_prompts, run_all


def engine_with(tiny, policy, **kw):
    cfg, params, mesh, tok = tiny
    return Engine(cfg, params, mesh, tok, EngineConfig(**kw), policy=policy)


class ChaosPolicy:
    """FCFS, but every step it pulls random jobs off the batch and swaps them to host."""
    name = "chaos"

    def __init__(self, seed=0, p=0.4):
        self.fcfs, self.rng, self.p = FCFSPolicy(), np.random.default_rng(seed), p

    def schedule(self, requests, cache, now):
        plan = self.fcfs.schedule(requests, cache, now)
        by_id = {r.request_id: r for r in requests}
        host_free = cache.free_host_pages
        keep = []
        for rid, n in plan.run:
            r = by_id[rid]
            if r.location == "device" and r.num_pages and self.rng.random() < self.p and r.num_pages <= host_free:
                plan.swap_out.append(rid)
                host_free -= r.num_pages
            else:
                keep.append((rid, n))  # (FCFS itself swaps in the host-resident jobs it runs)
        plan.run = keep
        return plan


PARAMS = [SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
          SamplingParams(max_tokens=14, temperature=0.9, top_p=0.95, seed=7, ignore_eos=True)]


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_swapped_jobs_produce_exactly_their_unswapped_tokens(tiny, params):
    prompts = mixed_prompts(8, seed=11)
    reqs = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    plain = run_all(engine_with(tiny, FCFSPolicy(), max_batch=4, token_budget=64, max_chunk=32), reqs)
    engine = engine_with(tiny, ChaosPolicy(), max_batch=4, token_budget=64, max_chunk=32, host_pages=400)
    swapped = run_all(engine, reqs)
    assert engine.stats["swap_outs"] >= 10 and engine.stats["swap_ins"] >= 10
    assert engine.stats["preemptions"] == 0 and engine.stats["recomputed_tokens"] == 0
    for rid, _, _ in reqs:
        assert swapped[rid].token_ids == plain[rid].token_ids, rid
    assert engine.allocator.num_used == 0 and engine.host_pool.used == 0 and not engine.host_pool.entries


class PingPong:
    """Runs one job a little, then swaps it out and back `cycles` times, then lets it finish."""
    name = "pingpong"

    def __init__(self, cycles):
        self.fcfs, self.cycles, self.done = FCFSPolicy(), cycles, 0

    def schedule(self, requests, cache, now):
        if not requests:  # its last token is still on the device and ends it: nothing to run
            return Plan()
        (r,) = requests
        if r.num_generated < 3 or self.done >= 2 * self.cycles:
            return self.fcfs.schedule(requests, cache, now)  # swaps `r` in if it is on the host
        self.done += 1
        return Plan(swap_out=[r.request_id]) if r.location == "device" else Plan(swap_in=[r.request_id])


def test_no_page_leaks_across_thousands_of_swap_cycles(tiny):
    prompt = mixed_prompts(1, seed=12)[0]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    plain = run_all(engine_with(tiny, FCFSPolicy()), [("a", prompt, params)])["a"].token_ids
    engine = engine_with(tiny, PingPong(cycles=1500), num_pages=64, host_pages=16)
    engine.add_request("a", prompt, params)
    steps = 0
    while engine.has_unfinished():
        outs = engine.step()
        steps += 1
        if steps % 500 == 0:  # mid-way, every page is either on the device or in the host pool
            r = engine.requests["a"]
            on_host = sum(e.num_pages for e in engine.host_pool.entries.values())
            assert engine.allocator.num_used + on_host == -(-r.num_computed // 16)
            assert engine.allocator.num_used + engine.allocator.num_free == 64
    assert engine.stats["swap_outs"] == 1500 and engine.stats["swap_ins"] == 1500
    assert outs[-1].token_ids == plain
    assert engine.allocator.num_free == 64 and engine.host_pool.used == 0 and not engine.host_pool.entries


@pytest.mark.parametrize("policy", ["mlfq", "priority", "gittins"])
def test_preemptive_policies_under_memory_pressure_keep_outputs_and_pages(tiny, policy):
    prompts = mixed_prompts(12, seed=13)
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reqs = [(f"r{i}", p, params) for i, p in enumerate(prompts)]
    plain = run_all(engine_with(tiny, FCFSPolicy()), reqs)
    cost = CostModel(coef=np.array([1e-3, 1e-4, 0, 1e-3, 1e-4, 0, 0]), page_size=8, max_chunk=32)
    pol = {"mlfq": lambda: MLFQPolicy(base_quantum_s=0.002, cost_model=cost, watermark_pages=2),
           "priority": lambda: PriorityPolicy(watermark_pages=2),
           "gittins": lambda: GittinsPolicy(cost_model=cost, watermark_pages=2)}[policy]()
    engine = engine_with(tiny, pol, num_pages=24, page_size=8, host_pages=200, max_batch=4, token_budget=48,
                         max_chunk=32)
    for i, (rid, p, sp) in enumerate(reqs):  # later requests get higher priority: forces preemption
        engine.add_request(rid, p, sp, priority=-i)
    out = {}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = o
    assert engine.stats["swap_outs"] > 0
    for rid, _, _ in reqs:
        assert out[rid].token_ids == plain[rid].token_ids, rid
    assert engine.allocator.num_used == 0 and engine.host_pool.used == 0


def test_the_host_pool_counts_the_pages_its_buffers_hold(tiny):
    """A swapped-out copy of n pages is a bucket(n)-page buffer: the pool counts that, so pinned
    memory never exceeds host_pages (before, 5 pages were counted for an 8-page buffer)."""
    import jax.numpy as jnp
    from jaxserve.cache.swap import HostPagePool
    cfg, _, mesh, _ = tiny
    pool = {n: jnp.ones((cfg.num_layers, 33, 16, cfg.num_kv_heads, cfg.head_dim), jnp.float32) for n in "kv"}
    host = HostPagePool(10, mesh)
    host.put("a", pool, [1, 2, 3, 4, 5])
    assert host.used == 8 and host.num_free == 2
    page_bytes = sum(x.nbytes for x in pool.values()) // 33
    held = sum(x.nbytes for e in host.entries.values() for x in e.data.values())
    assert held == host.used * page_bytes
    host.put("b", pool, [6, 7])
    assert host.used == 10
    with pytest.raises(RuntimeError, match="host pool full"):
        host.put("c", pool, [8])
    host.drop("a")
    staged, n = host.upload("b")
    assert (host.used, n) == (0, 2)
