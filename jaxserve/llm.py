"""`LLM`: the offline, vLLM-like entry point for research code.

    llm = jaxserve.LLM(config)                      # an ml_collections config (see configs/)
    outs = llm.generate(["Hello"], jaxserve.SamplingParams(max_tokens=32, temperature=0))
"""
from __future__ import annotations

import itertools
from typing import List, Optional, Sequence, Union

from jaxserve.checkpoint.load import load
from jaxserve.config import validate
from jaxserve.engine.engine import Engine, EngineConfig, engine_cost_model
from jaxserve.engine.outputs import RequestOutput
from jaxserve.parallel.sharding import make_mesh
from jaxserve.sampling_params import SamplingParams
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


class LLM:
    def __init__(self, config):
        self.engine = engine_from_config(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(self, prompts: Sequence[Union[str, Sequence[int]]],
                 params: Optional[Union[SamplingParams, Sequence[SamplingParams]]] = None) -> List[RequestOutput]:
        """Runs every prompt to completion; outputs come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} given for {len(prompts)} prompts")
        ids = [f"llm-{next(self._ids)}" for _ in prompts]
        for rid, prompt, p in zip(ids, prompts, params):
            self.engine.add_request(rid, prompt, p)
        final = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    final[out.request_id] = out
        return [final[rid] for rid in ids]

    def chat(self, messages: Sequence[dict], params: Optional[SamplingParams] = None) -> RequestOutput:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate([prompt], params)[0]
