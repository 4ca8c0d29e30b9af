"""Faults inside the device step: the step fails after the KV pool was donated to it.

The fault is a host callback inside the jitted step that raises while the step executes, so the
failure comes from the runtime, after donation, as a device error would. Only the requests in
the failed step fail; the engine rebuilds the pool, the others recompute their cache and finish
with exactly an uninterrupted run's tokens, and the failed ones stay unfinished in the journal,
from which a restarted engine finishes them with the same tokens too.
"""
import jax
import numpy as np
import pytest

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.engine.faults import DeviceFault
from jaxserve.engine.journal import TokenJournal, replay


def requests(n=5):
    rng = np.random.default_rng(11)
    shared = rng.integers(3, 1000, size=32).tolist()  # a common prefix: with prefix caching, shared pages
    return [(f"r{i}", shared + rng.integers(3, 1000, size=int(rng.integers(5, 40))).tolist(),
             SamplingParams(max_tokens=20, temperature=0.0 if i % 2 else 0.9, seed=i, ignore_eos=True))
            for i in range(n)]


def finish(engine, done=None):
    done = {} if done is None else done
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return done


@pytest.mark.parametrize("async_scheduling, prefix_cache", [(True, False), (False, False), (True, True)])
def test_a_device_fault_fails_only_its_step_and_the_rest_finish_identically(tiny, tmp_path, async_scheduling,
                                                                            prefix_cache):
    cfg, params, mesh, tokenizer = tiny
    config = EngineConfig(token_budget=24, max_chunk=16, max_batch=3, async_scheduling=async_scheduling,
                          prefix_cache=prefix_cache)
    ref_engine = Engine(cfg, params, mesh, tokenizer, config)
    for rid, prompt, p in requests():
        ref_engine.add_request(rid, prompt, p)
    reference = finish(ref_engine)

    with DeviceFault() as fault:
        check_fault(tiny, tmp_path, config, reference, fault)


def check_fault(tiny, tmp_path, config, reference, fault):
    cfg, params, mesh, tokenizer = tiny
    path = str(tmp_path / "journal.jsonl")
    engine = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    for rid, prompt, p in requests():
        engine.add_request(rid, prompt, p)
    done = {}
    for _ in range(6):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    in_flight = {r.request_id for rec in engine._in_flight for r, _ in rec.scheduled}
    fault.armed = True
    with pytest.raises(Exception, match="injected device fault"):
        for _ in range(3):  # the error surfaces at dispatch or when the tokens are read
            engine.step()
    fault.armed = False
    pool_before = engine.runner.cache
    failed = engine.fail_step()
    failed_ids = {out.request_id for out in failed}
    assert failed_ids and all(out.finish_reason == "error" for out in failed)
    assert in_flight <= failed_ids | set(done)          # the step in flight when it broke is among them
    assert len(failed_ids) < len(requests())             # not everyone: the waiting ones go on
    assert engine.runner.cache is not pool_before         # the donated pool was rebuilt
    jax.block_until_ready(engine.runner.cache)

    finish(engine, done)
    for rid in set(reference) - failed_ids:              # every other request: the uninterrupted tokens
        assert done[rid].token_ids == reference[rid].token_ids, rid
    assert engine.allocator.num_used == 0

    # the failed ones were not ended in the journal: a restarted engine finishes them identically
    pending = replay(path)
    assert {r.request_id for r in pending} == failed_ids
    fresh = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    fresh.resume(pending)
    resumed = finish(fresh)
    for rid in failed_ids:
        assert resumed[rid].token_ids == reference[rid].token_ids, rid
    assert replay(path) == []


def test_health_answers_503_once_the_engine_gives_up_after_repeated_faults(tiny_config):
    """A device that keeps failing: after MAX_CONSECUTIVE_FAILURES failed steps the engine thread
    stops and /health says so, so that an orchestrator restarts the server (the journal resumes
    the work); before that, /health answers 200 while the engine recovers."""
    import httpx
    from jaxserve.server.engine_loop import MAX_CONSECUTIVE_FAILURES
    from test_auth import serve
    url, engine, stop = serve(tiny_config)
    try:
        with DeviceFault() as fault:
            fault.armed = True
            codes = []
            for i in range(MAX_CONSECUTIVE_FAILURES + 1):
                codes.append(httpx.post(url + "/v1/completions", json={"prompt": f"try {i}", "max_tokens": 2},
                                        timeout=60).status_code)
                if i == 0:
                    assert httpx.get(url + "/health").status_code == 200  # recovered, still serving
        assert codes[0] == 500 and all(c in (500, 503) for c in codes), codes
        assert httpx.get(url + "/health").status_code == 503
    finally:
        stop()


def test_a_swapped_request_whose_shared_pages_were_in_the_lost_pool_recomputes_them(tiny):
    """With prefix caching a swapped-out request keeps its shared pages on the device: when a
    fault takes the pool, those are lost too, and it must recompute, not resume from them."""
    from test_swap import ChaosPolicy

    class HoldSwapped(ChaosPolicy):
        """Random swap-outs; while `hold`, no swap-ins (the swapped stay swapped through the fault)."""
        hold = False

        def schedule(self, views, cache, now):
            plan = super().schedule(views, cache, now)
            if self.hold:
                plan.run = [(rid, n) for rid, n in plan.run if rid not in plan.swap_in]
                plan.swap_in = []
            return plan

    cfg, params, mesh, tokenizer = tiny
    config = EngineConfig(token_budget=24, max_chunk=16, max_batch=4, page_size=8, num_pages=64, host_pages=128)
    ref = Engine(cfg, params, mesh, tokenizer, EngineConfig(prefix_cache=False))
    reqs = requests(8)
    for rid, prompt, p in reqs:
        ref.add_request(rid, prompt, p)
    reference = finish(ref)
    policy = HoldSwapped(seed=3, p=0.5)
    engine = Engine(cfg, params, mesh, tokenizer, config, policy=policy)
    for rid, prompt, p in reqs:
        engine.add_request(rid, prompt, p)
    done = {}
    for _ in range(60):
        if engine.kv.kept_pages:
            break
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert engine.kv.kept_pages  # a swapped-out request holds shared pages on the device
    policy.hold = True
    with DeviceFault() as fault:
        fault.armed = True
        with pytest.raises(Exception, match="injected device fault"):
            for _ in range(3):
                engine.step()
        fault.armed = False
    failed = {o.request_id for o in engine.fail_step()}
    assert engine.kv.kept_pages == 0  # what they kept went with the pool: they recompute
    policy.hold = False
    finish(engine, done)
    for rid in set(reference) - failed:
        assert done[rid].token_ids == reference[rid].token_ids, rid
    assert engine.allocator.num_used == 0 and engine.host_pool.used == 0


def test_a_request_swapped_out_while_the_failing_step_ran_recomputes_its_cache(tiny, monkeypatch):
    """A request that sits out a step keeps its pages in the pool that step takes. Swapped out
    while that step runs, its host copy is read from the pool the step leaves; if the step
    fails (its error seen when its tokens are read, as on a GPU), the copy is of a lost pool:
    the request must recompute, not swap back in what the failed step left."""
    from jaxserve.scheduling.fcfs import FCFSPolicy

    class SitOutThenSwap:
        """FCFS; on cue, one running request sits out a step, then is swapped out in the next."""
        name = "sit-out-then-swap"

        def __init__(self):
            self.fcfs, self.victim, self.phase = FCFSPolicy(), None, 0

        def schedule(self, views, cache, now):
            plan = self.fcfs.schedule(views, cache, now)
            if self.phase in (1, 2):
                plan.run = [(rid, n) for rid, n in plan.run if rid != self.victim]
                if self.phase == 2:
                    plan.swap_out.append(self.victim)
                self.phase += 1
            return plan

    cfg, params, mesh, tokenizer = tiny
    config = EngineConfig(token_budget=64, max_chunk=32, max_batch=4, host_pages=128, prefix_cache=False)
    reqs = requests(4)
    ref = Engine(cfg, params, mesh, tokenizer, config)
    for rid, prompt, p in reqs:
        ref.add_request(rid, prompt, p)
    reference = finish(ref)
    policy = SitOutThenSwap()
    engine = Engine(cfg, params, mesh, tokenizer, config, policy=policy)
    for rid, prompt, p in reqs:
        engine.add_request(rid, prompt, p)
    done = {}
    for _ in range(4):  # every request prefilled and decoding
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    done.update((o.request_id, o) for o in engine.drain() if o.finished)  # nothing in flight
    policy.victim, policy.phase = "r1", 1
    assert engine.requests["r1"].pages and engine.requests["r1"].output_ids
    read = engine._read

    def failing_read(record, touched):  # the first step dispatched from here failed on the device
        for x in engine.runner.cache.values():
            x.delete()  # a failed step's outputs, the pool among them, are gone
        raise RuntimeError("injected device fault")

    monkeypatch.setattr(engine, "_read", failing_read)
    with pytest.raises(RuntimeError, match="injected device fault"):
        for _ in range(3):
            engine.step()
    monkeypatch.setattr(engine, "_read", read)
    assert policy.phase == 3 and engine.stats["swap_outs"] == 1  # r1 went to the host as the step ran
    failed = {o.request_id for o in engine.fail_step()}
    assert "r1" not in failed and engine.requests["r1"].status.name == "WAITING"
    assert "r1" not in engine.host_pool.entries
    finish(engine, done)
    for rid in set(reference) - failed:
        assert done[rid].token_ids == reference[rid].token_ids, rid
    assert engine.allocator.num_used == 0 and engine.host_pool.used == 0
