"""The engine's step as one device call, and the overlapped (async) loop against the plain one."""
import numpy as np
import pytest

from jaxserve import SamplingParams
from jaxserve.engine import model_runner
from test_engine import make_engine


def serve(engine, requests):
    """Runs requests to the end; returns {id: (final output, every streamed token in order)}."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    streamed, final = {rid: [] for rid, _, _ in requests}, {}
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id] += out.new_token_ids
            if out.finished:
                final[out.request_id] = out
    return {rid: (final[rid], streamed[rid]) for rid in final}


def workload(n=12, seed=0, sampled=False):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(3, 1000, size=int(rng.integers(1, 70))).tolist()
        params = SamplingParams(max_tokens=int(rng.integers(1, 24)), ignore_eos=True,
                                temperature=0.8 if sampled and i % 2 else 0.0, top_p=0.9 if i % 4 == 1 else 1.0,
                                seed=i if sampled else None)
        out.append((f"r{i}", prompt, params))
    return out


def test_every_step_is_one_forward_call_whatever_the_mix(tiny, monkeypatch):
    calls, shapes = [], []
    real = model_runner.forward_step

    def counting(*args, **kw):
        calls.append(1)
        shapes.append(args[3].layout.block_seq.shape[0] > 0 and bool((args[3].layout.decode_lens > 0).any()))
        return real(*args, **kw)
    monkeypatch.setattr(model_runner, "forward_step", counting)
    engine = make_engine(tiny, token_budget=48, max_chunk=32, max_batch=8)
    serve(engine, workload())
    assert len(calls) == engine.num_steps > 0
    assert sum(shapes) >= 3  # steps that held decodes and prefill chunks together


@pytest.mark.parametrize("policy", ["fcfs", "mlfq", "priority", "gittins"])
def test_overlapped_loop_gives_the_plain_loops_tokens_for_every_policy(tiny, policy):
    # few pages and a host pool: requests wait, are preempted or swapped while others run
    kw = dict(token_budget=40, max_chunk=16, max_batch=6, num_pages=24, host_pages=32, policy=policy)
    requests = workload(14, seed=3)
    plain = serve(make_engine(tiny, async_scheduling=False, **kw), requests)
    engine = make_engine(tiny, async_scheduling=True, **kw)
    overlapped = serve(engine, requests)
    assert plain.keys() == overlapped.keys() == {rid for rid, _, _ in requests}
    for rid, prompt, params in requests:
        (a, a_stream), (b, b_stream) = plain[rid], overlapped[rid]
        assert b.token_ids == a.token_ids, rid
        assert b_stream == b.token_ids == a_stream  # every token streamed once, in order
        assert len(b.token_ids) == params.max_tokens
    assert engine.allocator.num_used == 0 and engine.host_pool.used == 0  # nothing leaked


def test_seeded_sampling_is_reproducible_overlapped_or_not(tiny):
    requests = workload(10, seed=5, sampled=True)
    runs = [serve(make_engine(tiny, token_budget=32, max_chunk=16, max_batch=4, async_scheduling=a), requests)
            for a in (True, True, False)]
    for rid, _, _ in requests:
        assert runs[0][rid][0].token_ids == runs[1][rid][0].token_ids == runs[2][rid][0].token_ids, rid


def test_a_stop_seen_late_drops_the_extra_token_and_frees_its_pages(tiny):
    prompt = list(range(5, 40))
    free = serve(make_engine(tiny, async_scheduling=False), [("a", prompt, SamplingParams(max_tokens=16, seed=3))])
    tokens = free["a"][0].token_ids
    stop = tokens[5]
    params = SamplingParams(max_tokens=16, stop_token_ids=[stop], seed=3)
    want = tokens[:tokens.index(stop) + 1]
    engine = make_engine(tiny, async_scheduling=True)
    out = serve(engine, [("a", prompt, params), ("b", prompt[:7], SamplingParams(max_tokens=12))])
    final, streamed = out["a"]
    assert final.token_ids == streamed == want and final.finish_reason == "stop"
    assert engine.stats["dropped_tokens"] >= 1  # the step after the stop had computed one more
    assert engine.allocator.num_used == 0


@pytest.mark.parametrize("max_tokens", [5, 50])
def test_a_request_that_reaches_the_context_gets_every_token_that_fits(tiny, max_tokens):
    # with the loop overlapped, the next step's token was counted as committed and the request
    # ended one token short of its context window
    runs = []
    for overlapped in (False, True):
        engine = make_engine(tiny, num_pages=8, page_size=16, max_batch=2, async_scheduling=overlapped)
        prompt = list(range(3, 3 + engine.max_context - 5))
        final, streamed = serve(engine, [("a", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                     temperature=0.0))])["a"]
        assert len(final.token_ids) == 5 and final.finish_reason == "length", overlapped
        assert streamed == final.token_ids
        runs.append(final.token_ids)
    assert runs[0] == runs[1]
