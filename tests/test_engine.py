"""The paged, continuously batched engine on the tiny model (and SmolLM2 for one end-to-end check)."""
import itertools

import numpy as np
import pytest

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.dense_generate import generate as dense_generate
from jaxserve import sampling
from jaxserve.engine import model_runner
from jaxserve.model.sharding import make_mesh, shard_params

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def make_engine(tiny, **kw):
    cfg, params, mesh, tokenizer = tiny
    return Engine(cfg, params, mesh, tokenizer, EngineConfig(**kw))


def run_all(engine, requests):
    """requests: list of (id, prompt, params); returns {id: final output}."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    final = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


def mixed_prompts(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 1000, size=int(rng.integers(1, 90))).tolist() for _ in range(n)]


def alone(tiny, prompt, params, **kw):
    return run_all(make_engine(tiny, **kw), [("solo", prompt, params)])["solo"].token_ids


def test_batch_of_16_with_chunked_prefill_equals_each_alone(tiny):
    prompts = mixed_prompts()
    engine = make_engine(tiny, token_budget=48, max_chunk=32, max_batch=8)
    batched = run_all(engine, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert engine.num_steps > 12 + max(map(len, prompts)) // 48  # prompts really were chunked
    for i, p in enumerate(prompts):
        assert batched[f"r{i}"].token_ids == alone(tiny, p, GREEDY), i
        assert batched[f"r{i}"].finish_reason == "length"


def test_engine_matches_dense_reference_loop(tiny):
    cfg, params, mesh, _ = tiny
    prompts = mixed_prompts(4, seed=1)
    engine = run_all(make_engine(tiny), [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    dense = dense_generate(params, cfg, mesh, prompts, 12)
    assert [engine[f"r{i}"].token_ids for i in range(4)] == dense


def test_out_of_pages_waits_preempts_and_still_gives_the_same_tokens(tiny):
    prompts = mixed_prompts()
    small = dict(num_pages=12, page_size=8)  # 96 tokens of KV: also the context window
    engine = make_engine(tiny, token_budget=64, max_chunk=32, **small)
    out = run_all(engine, [(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)])
    assert sum(o.num_preemptions for o in out.values()) > 0  # memory pressure really happened
    for i, p in enumerate(prompts):
        assert out[f"r{i}"].token_ids == alone(tiny, p, GREEDY, **small), i
    assert engine.allocator.num_free == 12


def test_every_page_is_free_after_finish_and_abort(tiny):
    engine = make_engine(tiny, num_pages=64, page_size=4)
    prompts = mixed_prompts(8, seed=2)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=30, temperature=0.8, seed=i))
    for _ in range(6):
        engine.step()
    assert engine.allocator.num_used > 0
    engine.abort("r0")
    engine.abort("r5")
    outs = {}
    while engine.has_unfinished():
        for o in engine.step():
            outs[o.request_id] = o
    assert outs["r0"].finish_reason == "abort" and outs["r5"].finish_reason == "abort"
    assert all(outs[f"r{i}"].finish_reason == "length" for i in (1, 2, 3, 4, 6, 7))
    assert engine.allocator.num_free == 64 and engine.allocator.num_used == 0


def test_seeded_sampling_is_independent_of_batch_composition(tiny):
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    prompt = mixed_prompts(1, seed=3)[0]
    solo = alone(tiny, prompt, params)
    others = [(f"o{i}", p, SamplingParams(max_tokens=15, temperature=0.7, seed=i)) for i, p in enumerate(mixed_prompts(6, seed=4))]
    crowd = run_all(make_engine(tiny, token_budget=40, max_chunk=16), others[:3] + [("me", prompt, params)] + others[3:])
    assert crowd["me"].token_ids == solo
    assert alone(tiny, prompt, SamplingParams(**{**params.__dict__, "seed": 99})) != solo


def test_unseeded_requests_sample_differently_across_engines_and_a_seed_reproduces(tiny):
    """Unseeded requests get seeds from OS entropy (not a fixed generator), so two engines, like
    a restarted server or two replicas, do not draw the same "random" text."""
    prompt = mixed_prompts(1, seed=5)[0]
    free = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)
    texts = set()
    for _ in range(3):
        engine = make_engine(tiny)
        out = run_all(engine, [("r", prompt, free)])
        texts.add(tuple(out["r"].token_ids))
    assert len(texts) == 3
    seeded = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, seed=7)
    assert alone(tiny, prompt, seeded) == alone(tiny, prompt, seeded)


def test_stops_max_tokens_and_logprobs(tiny):
    cfg, params, mesh, tokenizer = tiny
    prompt = mixed_prompts(1, seed=5)[0]
    free_run = alone(tiny, prompt, GREEDY)
    stop_tok = free_run[4]
    out = run_all(make_engine(tiny), [
        ("stop_id", prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[stop_tok])),
        ("len", prompt, SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, logprobs=True)),
    ])
    first = free_run.index(stop_tok)
    assert out["stop_id"].token_ids == free_run[:first + 1] and out["stop_id"].finish_reason == "stop"
    assert out["len"].token_ids == free_run[:3] and out["len"].finish_reason == "length"
    assert len(out["len"].logprobs) == 3 and all(lp <= 0 for lp in out["len"].logprobs)
    # a stop string cuts the text where it begins
    text = tokenizer.decode(free_run)
    needle = text[len(text) // 2: len(text) // 2 + 3]
    if needle.strip():
        o = run_all(make_engine(tiny), [("s", prompt, SamplingParams(max_tokens=12, temperature=0, stop=[needle]))])["s"]
        assert o.finish_reason == "stop" and needle not in o.text and text.startswith(o.text)
    o = out["len"]
    assert o.arrival_time <= o.first_token_time <= o.finish_time


def test_long_mixed_run_compiles_a_bounded_number_of_times(tiny):
    rng = np.random.default_rng(7)
    engine = make_engine(tiny, token_budget=64, max_chunk=32, max_batch=8)
    before = model_runner.TRACE_COUNT["forward"]
    ids = itertools.count()
    for wave in range(3):  # arrivals keep coming while others run
        for _ in range(10):
            engine.add_request(f"r{next(ids)}", rng.integers(3, 1000, size=int(rng.integers(1, 120))).tolist(),
                               SamplingParams(max_tokens=int(rng.integers(1, 40)), temperature=0.5))
        for _ in range(15):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    first = model_runner.TRACE_COUNT["forward"] - before
    # buckets: batch {1,2,4,8} x chunk {1,16,32} x pages {1,..,16} could reach dozens; a run uses few
    assert 0 < first <= 24, first
    for i in range(10):
        engine.add_request(f"again{i}", rng.integers(3, 1000, size=int(rng.integers(1, 120))).tolist(),
                           SamplingParams(max_tokens=20))
    while engine.has_unfinished():
        engine.step()
    assert model_runner.TRACE_COUNT["forward"] - before - first <= 2  # steady state: (almost) no new shapes


@pytest.mark.parametrize("call, field", [
    (lambda e: e.add_request("x", [], GREEDY), "prompt"),
    (lambda e: e.add_request("x", list(range(3, 600)), GREEDY), "prompt"),
    (lambda e: e.add_request("x", [1, 2, 10 ** 6], GREEDY), "prompt"),
    (lambda e: e.add_request("x", [5], SamplingParams(max_tokens=0)), "max_tokens"),
    (lambda e: e.add_request("x", [5], SamplingParams(temperature=-1)), "temperature"),
    (lambda e: e.add_request("x", [5], SamplingParams(top_p=0)), "top_p"),
    (lambda e: e.add_request("x", [5], SamplingParams(top_p=1.5)), "top_p"),
    (lambda e: e.add_request("keep", [5], GREEDY), "request_id"),
    (lambda e: e.abort("nobody"), "request_id"),
])
def test_bad_input_names_the_field_and_the_engine_keeps_serving(tiny, call, field):
    engine = make_engine(tiny)
    engine.add_request("keep", [5, 6, 7], GREEDY)
    engine.step()
    with pytest.raises(ValueError, match=field):
        call(engine)
    out = run_all(engine, [])
    assert out["keep"].token_ids == alone(tiny, [5, 6, 7], GREEDY)


def test_llm_generate_on_smollm2_answers_and_matches_dense(smollm2):
    import jaxserve
    from jaxserve.engine.engine import Engine
    cfg, params, tokenizer = smollm2
    mesh = make_mesh(1, 1)
    p = shard_params(params, cfg, mesh)
    engine = Engine(cfg, p, mesh, tokenizer, EngineConfig(token_budget=32, max_chunk=16))
    chats = [tokenizer.apply_chat_template([{"role": "user", "content": q}])
             for q in ("What is the capital of France?", "What is 2+2?")]
    out = run_all(engine, [(f"q{i}", c, SamplingParams(max_tokens=24, temperature=0)) for i, c in enumerate(chats)])
    assert "Paris" in out["q0"].text and out["q0"].finish_reason == "stop"
    ref = dense_generate(p, cfg, mesh, [tokenizer.encode(c) for c in chats], 24,
                         stop_token_ids=tokenizer.eos_token_ids)
    assert [out["q0"].token_ids, out["q1"].token_ids] == ref
    assert isinstance(jaxserve.LLM, type)


def test_precompile_covers_every_shape_a_run_reaches_and_leaves_the_cache_intact(tiny):
    import dataclasses
    cfg, params, mesh, tokenizer = tiny
    # a model config no other test uses: its step shapes are compiled by nothing before this test
    small = (dataclasses.replace(cfg, max_seq_len=72), params, mesh, tokenizer)  # 5 pages a sequence
    rng = np.random.default_rng(3)
    requests = []
    for i in range(6):
        prompt = rng.integers(3, 1000, size=int(rng.integers(1, 50))).tolist()
        requests.append((f"r{i}", prompt, SamplingParams(max_tokens=71 - len(prompt), seed=100 + i)))
    requests[1] = (*requests[1][:2], SamplingParams(max_tokens=10, temperature=0.0))
    requests[2] = (*requests[2][:2], SamplingParams(max_tokens=10, temperature=0.8, top_p=0.9, seed=2))
    requests[3] = (*requests[3][:2], SamplingParams(max_tokens=10, temperature=0.8, seed=3, repetition_penalty=1.2))
    requests[4] = (*requests[4][:2], SamplingParams(max_tokens=10, temperature=0, presence_penalty=1.0, logprobs=3))
    requests[5] = (*requests[5][:2], SamplingParams(max_tokens=10, temperature=0.5, seed=5, logprobs=12))
    engine = make_engine(small, token_budget=32, max_chunk=32, max_batch=2, num_pages=16)
    launched, launch = [], engine.runner.launch
    engine.runner.launch = lambda shape, step, sample, mode, **kw: launched.append((shape, mode, kw.get("top"))) or launch(
        shape, step, sample, mode, **kw)
    compiled = engine.precompile()
    # each shape also ran once (first runs do one-time work), in each sampling mode it was compiled in
    shapes = model_runner.step_shapes(2, 32, engine.runner.max_pages_per_seq)
    row_counts = len({s.seqs for s in shapes})  # each also ran top_step in every width once
    assert len(set(launched)) == len(launched) == sum(map(len, model_runner._sampling_modes(shapes))) + row_counts * len(
        sampling.TOP_K_BUCKETS)
    assert {s for s, _, _ in launched} == set(shapes)
    engine.runner.launch = launch
    assert compiled > 0 and engine.precompile() == 0  # the second call finds everything compiled
    before = dict(model_runner.TRACE_COUNT)
    from jax._src import monitoring
    backend_compiles = []
    listener = lambda event, duration, **kw: backend_compiles.append(event) if "backend_compile" in event else None
    monitoring.register_event_duration_secs_listener(listener)
    try:
        out = run_all(engine, requests)
    finally:
        monitoring.unregister_event_duration_listener(listener)
    assert model_runner.TRACE_COUNT == before  # nothing new traced: shapes nor sampling modes
    assert backend_compiles == []  # nor compiled by XLA
    plain = run_all(make_engine(small, token_budget=32, max_chunk=32, max_batch=2, num_pages=16), requests)
    for rid, _, _ in requests:  # the padding-only warm-up calls wrote nothing into the pool
        assert out[rid].token_ids == plain[rid].token_ids


def test_the_engine_refits_the_cost_model_its_policy_shares_while_serving(tiny):
    engine = make_engine(tiny, policy="mlfq", max_batch=4, token_budget=32, max_chunk=16)
    assert engine.policy.cost_model is engine.cost_model
    engine.precompile()  # as a server does: no compilation inside the steps it times
    engine.cost_model.coef = engine.cost_model.coef * 20  # a model far off this machine
    before = engine.cost_model.coef.copy()
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    run_all(engine, [(f"r{i}", p, params) for i, p in enumerate(mixed_prompts(8, seed=5))])
    assert engine.num_steps >= 40
    assert not np.array_equal(engine.cost_model.coef, before)  # fitted to the steps it ran
    # the fit predicts this engine's own recent steps better than the model it started from
    X = np.array([f for f, _ in engine.step_log])
    y = np.array([t for _, t in engine.step_log])
    assert np.median(np.abs(X @ engine.cost_model.coef - y)) < np.median(np.abs(X @ before - y))
