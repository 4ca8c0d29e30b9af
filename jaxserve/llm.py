"""`LLM`: the offline, vLLM-like entry point for research code.

    llm = jaxserve.LLM(config)                      # an ml_collections config (see configs/)
    llm = jaxserve.LLM(model="configs/tiny.py", engine=dict(max_batch=8))  # a config file, sections overridden
    llm = jaxserve.LLM(model="smollm2_135m")        # a packaged config; or a GGUF file, a checkpoint folder
    outs = llm.generate(["Hello"], sampling_params=jaxserve.SamplingParams(max_tokens=32, temperature=0))
    outs[0].outputs[0].text                         # vLLM's shape; outs[0].text is the same text
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import time
from typing import List, Optional, Sequence, Union

import tqdm

from jaxserve.checkpoint.load import load
from jaxserve.config import validate
from jaxserve.engine.engine import Engine, EngineConfig, engine_cost_model
from jaxserve.engine.outputs import CompletionOutput, RequestOutput, position_logprobs
from jaxserve.model.sharding import make_mesh
from jaxserve.sampling_params import SamplingParams, fan_out
from jaxserve.scheduling import make_policy
from jaxserve.scheduling.cost_model import CostModel


def engine_from_config(config) -> Engine:
    """Loads the checkpoint onto the configured mesh and builds an Engine around it."""
    validate(config)
    mesh = make_mesh(config.mesh.data, config.mesh.model)
    cfg, params, tokenizer = load(config.checkpoint, config.model, mesh)
    engine_config = EngineConfig(policy=config.scheduler.policy, **config.engine)
    cost_model = engine_cost_model(cfg, engine_config)
    policy = policy_from_config(config.scheduler, cost_model)
    return Engine(cfg, params, mesh, tokenizer, engine_config, policy=policy, cost_model=cost_model)


def policy_from_config(scheduler, cost_model: CostModel):
    """The scheduling policy a config's `scheduler` section names, sharing the engine's cost model."""
    name = scheduler.policy
    if name == "fcfs":
        return make_policy(name)
    own = dict(scheduler[name]) if name in scheduler else {}  # e.g. scheduler.mlfq's quanta
    return make_policy(name, cost_model, watermark_pages=scheduler.watermark_pages, prefetch=scheduler.prefetch,
                       max_prefill_slowdown=scheduler.max_prefill_slowdown,
                       idle_prefill_slowdown=scheduler.idle_prefill_slowdown, **own)


def config_from_file(model: str):
    """The config MODEL names (as `jaxserve COMMAND MODEL`: a config file's `get_config()`, a
    packaged config's such as `tiny`, or the default one over a GGUF file or checkpoint directory)."""
    from jaxserve import configs

    path, arg = configs.split_spec(configs.config_spec(model))
    if not os.path.isfile(path):
        raise ValueError(f"model: no config file at {path!r}")
    spec = importlib.util.spec_from_file_location(f"jaxserve_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"model: {path!r} has no get_config()")
    return module.get_config() if arg is None else module.get_config(arg)


def override(config, overrides: dict):
    """config with its sections updated by {section: {field: value}}; an unknown name raises a
    ValueError naming it."""
    config = config.copy_and_resolve_references()
    for section, fields in overrides.items():
        if section not in config:
            raise ValueError(f"{section}: not a config section (one of {', '.join(sorted(config.keys()))})")
        if not isinstance(fields, dict):
            raise ValueError(f"{section}: must be a dict of fields, got {type(fields).__name__}")
        for name, value in fields.items():
            if name not in config[section]:
                raise ValueError(f"{section}.{name}: not a field of {section} "
                                 f"(one of {', '.join(sorted(config[section].keys()))})")
            config[section][name] = value
    return config


class LLM:
    def __init__(self, config=None, *, model: Optional[str] = None, **overrides):
        """`LLM(config)` with an ml_collections config, or `LLM(model=MODEL, **sections)` with a
        config file, a packaged config (`"tiny"`), a GGUF file or a checkpoint directory, and
        section overrides (`engine=dict(max_batch=8)`)."""
        if (config is None) == (model is None):
            raise ValueError("model: give a config or model=PATH to a config file, not both or neither")
        config = config_from_file(model) if model is not None else config
        self.engine = engine_from_config(override(config, overrides) if overrides else config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None, *,
                 sampling_params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None,
                 use_tqdm: bool = True) -> List[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order. `sampling_params`
        is vLLM's name for `params`. use_tqdm: a progress bar on stderr, as vLLM's, of finished
        prompts with the input and output tokens/s so far."""
        if params is not None and sampling_params is not None:
            raise ValueError("sampling_params: given twice (as params too)")
        params = sampling_params if params is None else params
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        subs = {rid: fan_out(rid, p) for rid, p in zip(ids, params)}
        for rid, prompt in zip(ids, prompts):
            for sub, p in subs[rid]:
                self.engine.add_request(sub, prompt, p)
        final = {}
        with tqdm.tqdm(total=sum(len(s) for s in subs.values()), desc="Processed prompts", unit="prompt", disable=not use_tqdm,
                       dynamic_ncols=True) as bar:
            start, tokens_in, tokens_out = time.perf_counter(), 0, 0
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    if out.finished:
                        final[out.request_id] = out
                        tokens_in += len(out.prompt_token_ids)
                        tokens_out += len(out.token_ids)
                        elapsed = max(time.perf_counter() - start, 1e-9)
                        bar.set_postfix_str(f"input: {tokens_in / elapsed:.1f} toks/s, "
                                            f"output: {tokens_out / elapsed:.1f} toks/s", refresh=False)
                        bar.update(1)
        return [self._merged(rid, [final[sub] for sub, _ in subs[rid]], prompt if isinstance(prompt, str) else None)
                for rid, prompt in zip(ids, prompts)]

    def _merged(self, request_id: str, outs: List[RequestOutput], prompt: Optional[str]) -> RequestOutput:
        """One RequestOutput of a prompt's completions (the first's fields, all n in .outputs,
        their logprobs with each token's text, as vLLM's)."""
        tokenizer = self.tokenizer
        decode = None if tokenizer is None else (lambda t: tokenizer.decode([t], skip_special_tokens=False))
        completions = [CompletionOutput(i, o.text, o.token_ids, o.finish_reason,
                                        position_logprobs(o.token_ids, o.logprobs, o.top_logprobs, decode))
                       for i, o in enumerate(outs)]
        return dataclasses.replace(outs[0], request_id=request_id, prompt=prompt, completions=completions)

    def chat(self, messages: Sequence[dict], params: Optional[SamplingParams] = None) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], params)[0]
