"""Top-k log-probabilities (SamplingParams.logprobs = k): against numpy and transformers' logits,
through the vLLM-shaped API, and kept by the journal across a crash."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.engine.journal import TokenJournal, replay
from jaxserve.model.sharding import make_mesh, shard_params
from jaxserve.sampling import top_logprobs

from test_engine import run_all
from test_sampling import log_softmax


def test_top_logprobs_are_the_k_likeliest_and_the_chosen_tokens_rank():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 300)).astype(np.float32) * 4
    chosen = np.array([0, 17, 299, 5, 120], np.int32)
    logits[1, [5, 7, 40, 260, 299]] = logits[1].max() + 1  # ties, across blocks: the lower index first
    ref = log_softmax(logits)
    for k in (6, 20):  # one stage, and the two-stage top-k above 8 (blocks of 256: the vocabulary padded)
        ids, values, rank = map(np.asarray, jax.jit(top_logprobs, static_argnames="k")(
            jnp.asarray(logits), jnp.asarray(chosen), k=k))
        for i in range(5):
            order = np.argsort(-ref[i], kind="stable")
            assert ids[i].tolist() == order[:k].tolist(), (k, i)
            np.testing.assert_allclose(values[i], ref[i, order[:k]], rtol=1e-5, atol=1e-5)
            assert rank[i] == 1 + (ref[i] > ref[i, chosen[i]]).sum()


def test_engine_top_logprobs_match_transformers_on_smollm2(smollm2, hf_smollm2):
    cfg, params, tokenizer = smollm2
    mesh = make_mesh(1, 1)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tokenizer, EngineConfig(token_budget=32, max_chunk=16))
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers."}]))
    kinds = {"greedy": dict(temperature=0, logprobs=5), "sampled": dict(temperature=1.0, seed=4, logprobs=3),
             "penalized": dict(temperature=0, logprobs=2, presence_penalty=2.0), "chosen only": dict(temperature=0, logprobs=0),
             "none": dict(temperature=0)}
    out = run_all(engine, [(name, prompt, SamplingParams(max_tokens=16, ignore_eos=True, **kw))
                           for name, kw in kinds.items()])
    assert out["none"].logprobs is None and out["none"].top_logprobs is None
    assert out["chosen only"].top_logprobs is None and len(out["chosen only"].logprobs) == 16
    for name in ("greedy", "sampled", "penalized"):
        o, k = out[name], kinds[name]["logprobs"]
        with torch.no_grad():  # one pass over prompt + output: the distribution of each output position
            logits = hf_smollm2(torch.tensor([prompt + o.token_ids[:-1]])).logits[0, len(prompt) - 1:].numpy()
        ref = log_softmax(logits)
        assert len(o.top_logprobs) == len(o.token_ids) == 16
        for i, (rank, ids, values) in enumerate(o.top_logprobs):
            assert ids == np.argsort(-ref[i])[:k].tolist(), (name, i)
            np.testing.assert_allclose(values, ref[i, ids], atol=2e-4)
            np.testing.assert_allclose(o.logprobs[i], ref[i, o.token_ids[i]], atol=2e-4)
            assert rank == 1 + (ref[i] > ref[i, o.token_ids[i]] + 1e-4).sum(), (name, i)
        if name == "greedy":
            assert all(rank == 1 for rank, _, _ in o.top_logprobs)
    assert any(rank > 1 for rank, _, _ in out["sampled"].top_logprobs + out["penalized"].top_logprobs)


def test_llm_outputs_carry_vllm_shaped_logprobs(tiny_config):
    import jaxserve
    llm = jaxserve.LLM(tiny_config)
    out = llm.generate(["Hello there"], sampling_params=jaxserve.SamplingParams(
        max_tokens=5, temperature=0.7, seed=2, logprobs=3, n=2), use_tqdm=False)[0]
    for completion in out.outputs:
        assert len(completion.logprobs) == len(completion.token_ids) == 5
        for token, position in zip(completion.token_ids, completion.logprobs):
            assert token in position and 3 <= len(position) <= 4  # the 3 likeliest, and the chosen one
            ranked = sorted((lp.rank, lp.logprob) for t, lp in position.items() if t != token or lp.rank <= 3)
            assert [r for r, _ in ranked][:3] == [1, 2, 3] and ranked[0][1] >= ranked[1][1] >= ranked[2][1]
            assert all(lp.decoded_token == llm.tokenizer.decode([t], skip_special_tokens=False)
                       for t, lp in position.items())
    with pytest.raises(ValueError, match="logprobs"):
        jaxserve.SamplingParams(logprobs=21)


def test_a_crash_keeps_the_top_logprobs_committed_before_it(tiny, tmp_path):
    cfg, params, mesh, tokenizer = tiny
    config = EngineConfig(token_budget=32, max_chunk=16, max_batch=4)
    rng = np.random.default_rng(8)
    reqs = [(f"r{i}", rng.integers(3, 1000, size=int(rng.integers(4, 40))).tolist(),
             SamplingParams(max_tokens=20, temperature=0.8 * (i % 2), seed=i, logprobs=4, ignore_eos=True))
            for i in range(4)]
    reference = run_all(Engine(cfg, params, mesh, tokenizer, config), reqs)
    path = str(tmp_path / "journal.jsonl")
    crashed = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    for rid, prompt, p in reqs:
        crashed.add_request(rid, prompt, p)
    for _ in range(10):
        crashed.step()
    pending = replay(path)  # then the process "dies"
    assert any(len(r.top_logprobs) == len(r.output_ids) > 0 for r in pending)
    fresh = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    fresh.resume(pending)
    done = run_all(fresh, [])
    for r in pending:
        got, want = done[r.request_id].top_logprobs, reference[r.request_id].top_logprobs
        assert [e[:2] for e in got] == [e[:2] for e in want], r.request_id
        np.testing.assert_allclose([e[2] for e in got], [e[2] for e in want], atol=1e-4)


def test_a_peers_finished_record_is_checked_entry_by_entry_like_a_journaled_request():
    from jaxserve.engine.outputs import finished_record, output_from_finished_record, final_output
    top = [[1, [5, 9], [-0.1, -2.5]], [2, [7, 3], [-0.3, -1.0]]]
    out = final_output("r", [1, 2], [5, 3], "ab", "length", [-0.1, -1.0], 0.0, 0, top)
    rec = finished_record(out)
    assert output_from_finished_record(rec).top_logprobs == top
    bad = {"widths differ": [top[0], [2, [7], [-0.3]]], "rank below 1": [top[0], [0, [7, 3], [-0.3, -1.0]]],
           "ids not integers": [top[0], [2, [7.0, 3], [-0.3, -1.0]]], "too few entries": [top[0]],
           "logprob not a number": [top[0], [2, [7, 3], ["x", -1.0]]], "not a triple": [top[0], [2, [7, 3]]],
           "wider than 20": [[1, list(range(21)), [0.0] * 21]] * 2}
    for why, entries in bad.items():
        with pytest.raises(ValueError, match="^top: missing or invalid"):
            output_from_finished_record(dict(rec, top=entries))
            pytest.fail(why)
