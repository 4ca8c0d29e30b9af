"""Repetition, presence and frequency penalties: the formula against numpy and transformers, and
the device-side token counts against runs that need no bookkeeping (each request alone)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.model.sharding import make_mesh, shard_params
from jaxserve.sampling import BASE_MODES, Penalties, penalize, request_keys, sample

from test_engine import make_engine, mixed_prompts, run_all
from test_swap import ChaosPolicy


def numpy_penalized(logits, prompt, output, repetition, presence, frequency):
    """One row's penalized logits, written from OpenAI's and vLLM's definitions."""
    out = np.asarray(logits, np.float64).copy()
    counts = np.bincount(np.asarray(output, np.int64), minlength=len(out))
    for t in set(prompt) | set(output):
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    return out - frequency * counts - presence * (counts > 0)


def test_penalize_follows_the_definitions():
    rng = np.random.default_rng(0)
    B, V = 6, 40
    logits = rng.normal(size=(B, V)).astype(np.float32) * 3
    prompts = [rng.integers(0, V, rng.integers(1, 8)).tolist() for _ in range(B)]
    outputs = [rng.integers(0, V, rng.integers(0, 12)).tolist() for _ in range(B)]
    rep, pres, freq = (rng.uniform(0.5, 2, B), rng.uniform(-2, 2, B), rng.uniform(-2, 2, B))
    counts = np.stack([np.bincount(np.asarray(o, np.int64), minlength=V) for o in outputs]).astype(np.int32)
    in_prompt = np.zeros((B, V), bool)
    for i, p in enumerate(prompts):
        in_prompt[i, p] = True
    got = np.asarray(penalize(jnp.asarray(logits), Penalties(jnp.asarray(counts), jnp.asarray(in_prompt),
                                                             *(jnp.asarray(x, jnp.float32) for x in (rep, pres, freq)))))
    for i in range(B):
        np.testing.assert_allclose(got[i], numpy_penalized(logits[i], prompts[i], outputs[i], rep[i], pres[i], freq[i]),
                                   rtol=1e-5, atol=1e-5)


def test_rows_without_penalties_draw_the_same_in_a_penalized_step():
    rng = np.random.default_rng(1)
    B, V = 8, 50
    logits = jnp.asarray(rng.normal(size=(B, V)), jnp.float32)
    keys = jax.jit(request_keys)(jnp.arange(B, dtype=jnp.uint32), jnp.zeros(B, jnp.uint32))
    t = np.float32([0, 0.7, 1.3, 1.0] * 2)
    k, p = np.int32([0, 3, 0, 0] * 2), np.float32([1, 1, 0.8, 1] * 2)
    neutral = Penalties(jnp.asarray(rng.integers(0, 3, (B, V)), jnp.int32), jnp.asarray(rng.random((B, V)) < 0.3),
                        jnp.ones(B), jnp.zeros(B), jnp.zeros(B))  # counts, but nothing to apply them
    run = jax.jit(sample, static_argnames=("mode",))
    for base in BASE_MODES:
        plain = run(logits, t, k, p, keys, mode=base)
        penalized = run(logits, t, k, p, keys, mode=base + "+penalties", penalties=neutral)
        np.testing.assert_array_equal(plain[0], penalized[0])
        np.testing.assert_array_equal(plain[1], penalized[1])
    with pytest.raises(ValueError, match="penalties"):
        sample(logits, t, k, p, keys, mode="greedy+penalties")


class _PresenceFrequency:
    """transformers has no presence or frequency penalty: a logits processor over the generated tokens."""

    def __init__(self, prompt_len, presence, frequency):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        out = input_ids[:, self.prompt_len:]
        counts = torch.zeros_like(scores).scatter_add_(1, out, torch.ones_like(out, dtype=scores.dtype))
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)


PENALTIES = [dict(repetition_penalty=1.3), dict(presence_penalty=1.5), dict(frequency_penalty=0.7),
             dict(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=0.4), {}]


def test_greedy_with_penalties_matches_transformers_on_smollm2(smollm2, hf_smollm2):
    import transformers
    cfg, params, tokenizer = smollm2
    mesh = make_mesh(1, 1)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tokenizer, EngineConfig(token_budget=32, max_chunk=16))
    prompts = [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": q}]))
               for q in ("List the colours of the rainbow, then list them again.", "Count from one to twenty in words.")]
    requests = [(f"r{i}-{j}", prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, **kw))
                for i, prompt in enumerate(prompts) for j, kw in enumerate(PENALTIES)]
    out = run_all(engine, requests)  # every mix in one batch, prompts chunked
    for rid, prompt, params in requests:
        processors = transformers.LogitsProcessorList(
            [_PresenceFrequency(len(prompt), params.presence_penalty, params.frequency_penalty)])
        with torch.no_grad():
            ref = hf_smollm2.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False, pad_token_id=0,
                                      repetition_penalty=params.repetition_penalty, logits_processor=processors,
                                      eos_token_id=None)[0, len(prompt):].tolist()
        assert out[rid].token_ids == ref, rid
    plain = {rid[:2]: out[rid].token_ids for rid, _, p in requests if not p.penalized}
    assert all(out[rid].token_ids != plain[rid[:2]] for rid, _, p in requests if p.penalized)  # they did act


SETTINGS = {  # (engine settings, what must have happened)
    "preempted": (dict(num_pages=12, page_size=8, token_budget=64, max_chunk=32), "preemptions"),
    "swapped": (dict(max_batch=4, token_budget=64, max_chunk=32, host_pages=400, policy=ChaosPolicy()), "swap_outs"),
    "time-sliced": (dict(max_batch=2, token_budget=32, max_chunk=16, policy="mlfq"), "rows_set_again"),
}


@pytest.mark.parametrize("case", SETTINGS)
def test_token_counts_survive_row_reuse_preemption_and_swaps(tiny, case):
    """Penalized requests (greedy and seeded, with unpenalized ones among them) that lose their
    cache, go to the host, or lose their row of counts to others, with async steps: each ends
    as it does alone."""
    settings, happened = SETTINGS[case]
    settings = dict(settings)
    policy = settings.pop("policy", "fcfs")
    prompts = [p[:40] for p in mixed_prompts(8, seed=5)]
    kinds = [dict(temperature=0, repetition_penalty=1.5, frequency_penalty=0.5),
             dict(temperature=0.9, seed=3, presence_penalty=1.2, top_k=20),
             dict(temperature=0, presence_penalty=2.0), dict(temperature=0)]
    requests = [(f"r{i}", p, SamplingParams(max_tokens=20, ignore_eos=True, **kinds[i % 4])) for i, p in enumerate(prompts)]
    cfg, params, mesh, tok = tiny
    engine = Engine(cfg, params, mesh, tok, EngineConfig(**settings, **({} if isinstance(policy, ChaosPolicy)
                                                                          else {"policy": policy})),
                    policy=policy if isinstance(policy, ChaosPolicy) else None)
    rows_set, set_counts = [], engine.runner.set_counts
    engine.runner.set_counts = lambda row, *a: rows_set.append(row) or set_counts(row, *a)
    out = run_all(engine, requests)
    assert len(engine.penalty_rows) == 0  # every row came back
    assert (len(rows_set) > 6) if happened == "rows_set_again" else engine.stats[happened] > 0, engine.stats
    for rid, prompt, params in requests:
        solo = run_all(make_engine(tiny, **{k: v for k, v in settings.items() if k == "page_size"}),
                       [(rid, prompt, params)])[rid]
        assert out[rid].token_ids == solo.token_ids, rid


def test_bad_penalties_name_the_field():
    for field, value in [("repetition_penalty", 0.0), ("presence_penalty", 2.5), ("frequency_penalty", -3),
                         ("presence_penalty", float("nan")), ("repetition_penalty", True)]:
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
