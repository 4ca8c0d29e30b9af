"""The vLLM-shaped face of `LLM`: a config file with section overrides, `sampling_params=`, and
outputs read as `o.prompt` and `o.outputs[0].text / .token_ids / .finish_reason / .logprobs`."""
import dataclasses
import os

import pytest

import jaxserve
from jaxserve.llm import override

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "tiny.py")


def test_a_config_file_with_overrides_gives_the_config_apis_answers_in_vllms_shape(tiny_config):
    greedy = jaxserve.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=True)
    prompts = ["The capital of France is", "One, two, three,"]
    llm = jaxserve.LLM(model=TINY, engine=dict(max_batch=2, token_budget=64))
    assert llm.engine.config.max_batch == 2 and llm.engine.config.token_budget == 64
    outs = llm.generate(prompts, sampling_params=greedy)
    want = jaxserve.LLM(tiny_config).generate(prompts, greedy)
    for out, ref, prompt in zip(outs, want, prompts):
        (completion,) = out.outputs
        assert out.prompt == prompt and out.prompt_token_ids == ref.prompt_token_ids
        assert completion.token_ids == ref.token_ids and len(completion.token_ids) == 6
        assert completion.text == ref.text == out.text and completion.finish_reason == "length"
        assert [d[t].logprob for d, t in zip(completion.logprobs, completion.token_ids)] == out.logprobs
        assert len(completion.logprobs) == 6
    assert llm.generate([[5, 6, 7]], sampling_params=greedy)[0].prompt is None  # token ids: no text
    with pytest.raises(ValueError, match="sampling_params: given twice"):
        llm.generate(prompts, greedy, sampling_params=greedy)


def test_generate_shows_vllms_progress_bar_unless_told_not_to(tiny_config, capsys):
    llm = jaxserve.LLM(tiny_config)
    params = jaxserve.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    capsys.readouterr()
    outs = llm.generate(["One, two,", "a b c d"], params)
    bar = capsys.readouterr().err
    assert "Processed prompts" in bar and "2/2" in bar
    tokens_out = float(bar.rsplit("output: ", 1)[1].split(" toks/s")[0])
    assert tokens_out > 0 and sum(len(o.token_ids) for o in outs) == 8
    llm.generate(["One, two,"], params, use_tqdm=False)
    assert capsys.readouterr().err == ""


def test_bad_models_and_overrides_name_the_field_before_anything_loads(tiny_config):
    with pytest.raises(ValueError, match="model: no config file at"):
        jaxserve.LLM(model=os.path.join(REPO, "configs", "nope.py"))
    with pytest.raises(ValueError, match="model: give a config or model="):
        jaxserve.LLM(tiny_config, model=TINY)
    with pytest.raises(ValueError, match=r"engine\.max_batchh: not a field of engine \(one of .*max_batch"):
        jaxserve.LLM(model=TINY, engine=dict(max_batchh=2))
    with pytest.raises(ValueError, match="enigne: not a config section"):
        override(tiny_config, {"enigne": {"max_batch": 2}})
    with pytest.raises(ValueError, match="engine: must be a dict"):
        override(tiny_config, {"engine": 3})
    assert tiny_config.engine.max_batch != 3 and override(tiny_config, {"engine": {"max_batch": 3}}).engine.max_batch == 3


def test_min_tokens_holds_off_stop_tokens_and_stop_strings(tiny_config):
    llm = jaxserve.LLM(tiny_config)
    prompt = ["One, two, three,"]
    greedy = dict(max_tokens=12, temperature=0.0)
    free = llm.generate(prompt, jaxserve.SamplingParams(**greedy), use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[1]
    first = free.token_ids.index(stop_id)
    stopped = llm.generate(prompt, jaxserve.SamplingParams(**greedy, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    assert stopped.outputs[0].finish_reason == "stop" and len(stopped.token_ids) == first + 1
    for params in (jaxserve.SamplingParams(**greedy, stop_token_ids=[stop_id], min_tokens=6),
                   jaxserve.SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop_token_ids=[stop_id],
                                           min_tokens=6)):
        held = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
        assert len(held.token_ids) >= 6 and stop_id not in held.token_ids[:6], held.token_ids
        if params.temperature == 0:  # the same tokens up to the one it may not draw yet
            assert held.token_ids[:first] == free.token_ids[:first]
    # a stop string in the first min_tokens - 1 tokens' text does not end the output either
    stop = llm.tokenizer.decode(free.token_ids[1:2])
    cut = llm.generate(prompt, jaxserve.SamplingParams(**greedy, stop=[stop]), use_tqdm=False)[0].outputs[0]
    held = llm.generate(prompt, jaxserve.SamplingParams(**greedy, stop=[stop], min_tokens=8), use_tqdm=False)[0]
    assert len(held.token_ids) >= 8 and len(cut.token_ids) < 8
    assert held.outputs[0].text.startswith(llm.tokenizer.decode(held.token_ids[:7]))
    with pytest.raises(ValueError, match=r"min_tokens=13: must be an integer in \[0, max_tokens=12\]"):
        jaxserve.SamplingParams(max_tokens=12, min_tokens=13)
    with pytest.raises(ValueError, match="min_tokens=2: needs at most 8 stop and end-of-sequence token ids"):
        llm.generate(prompt, jaxserve.SamplingParams(min_tokens=2, stop_token_ids=list(range(10, 20))))


def test_n_completions_per_prompt_each_from_a_seed_of_its_own(tiny_config):
    llm = jaxserve.LLM(tiny_config)
    prompts = ["One, two,", "a b c"]
    drawn = jaxserve.SamplingParams(max_tokens=6, temperature=1.0, seed=7, n=3, ignore_eos=True)
    outs = llm.generate(prompts, drawn, use_tqdm=False)
    again = llm.generate(prompts, drawn, use_tqdm=False)
    for out, rerun, prompt in zip(outs, again, prompts):
        assert out.prompt == prompt and [c.index for c in out.outputs] == [0, 1, 2]
        ids = [tuple(c.token_ids) for c in out.outputs]
        assert all(len(i) == 6 for i in ids) and len(set(ids)) == 3, ids  # three different draws
        assert ids == [tuple(c.token_ids) for c in rerun.outputs]  # reproducible
        # the i-th completion is the one a single request of seed 7 + i draws
        for i in (0, 2):
            one = llm.generate([prompt], dataclasses.replace(drawn, n=1, seed=7 + i), use_tqdm=False)[0]
            assert tuple(one.token_ids) == ids[i]
    greedy = llm.generate(prompts[:1], jaxserve.SamplingParams(max_tokens=6, temperature=0.0, n=2), use_tqdm=False)[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids == greedy.token_ids
    with pytest.raises(ValueError, match="n=0: must be an integer >= 1"):
        jaxserve.SamplingParams(n=0)
    with pytest.raises(ValueError, match="n=2: the engine runs one completion a request"):
        llm.engine.add_request("x", [1, 2], jaxserve.SamplingParams(n=2))
