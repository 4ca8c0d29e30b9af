"""The iteration-level engine loop: ask the policy for a plan, carry it out, commit tokens.

Requests join and leave between steps (continuous batching); long prompts run in chunks
mixed with decodes under a per-step token budget. The policy decides; this module only obeys:
it allocates and frees pages, drops preempted caches, runs the model and applies stop rules.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np

from jaxserve.cache.page_allocator import PageAllocator, pages_for
from jaxserve.engine.model_runner import Chunk, ModelRunner
from jaxserve.engine.outputs import RequestOutput
from jaxserve.engine.request import Request, Status
from jaxserve.model.config import ModelConfig
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduling import make_policy
from jaxserve.scheduling.plan import CacheState, RequestView
from jaxserve.tokenizer import IncrementalDecoder, Tokenizer


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 512
    max_batch: int = 32
    token_budget: int = 256   # tokens per step, prefill chunks and decodes together
    max_chunk: int = 256      # longest prefill chunk
    policy: str = "fcfs"

    def __post_init__(self):
        for name in ("page_size", "num_pages", "max_batch", "token_budget", "max_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be a positive integer, got {getattr(self, name)!r}")


class Engine:
    def __init__(self, cfg: ModelConfig, params, mesh, tokenizer: Optional[Tokenizer] = None,
                 config: EngineConfig = EngineConfig(), policy=None,
                 clock: Callable[[], float] = time.monotonic, seed: int = 0):
        self.cfg, self.config, self.tokenizer, self.clock = cfg, config, tokenizer, clock
        self.policy = policy or make_policy(config.policy)
        self.allocator = PageAllocator(config.num_pages)
        self.runner = ModelRunner(cfg, params, mesh, config.num_pages, config.page_size, config.max_batch)
        self.max_context = min(cfg.max_seq_len, config.num_pages * config.page_size)
        self.requests: Dict[str, Request] = {}
        self._decoders: Dict[str, IncrementalDecoder] = {}
        self._aborted: List[Request] = []
        self._rng = np.random.default_rng(seed)
        eos = set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        self.num_steps = 0
        # Cumulative counters for metrics: read-only for callers.
        self.stats = {"preemptions": 0, "recomputed_tokens": 0, "swap_out_bytes": 0, "swap_in_bytes": 0,
                      "reparallelizations": 0, "finished": 0, "aborted": 0}

    # -- public API ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, Sequence[int]],
                    params: Optional[SamplingParams] = None, arrival_time: Optional[float] = None,
                    priority: int = 0) -> None:
        """Queues a request; raises ValueError naming the field on bad input (nothing is queued)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r}: must be a non-empty string")
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r}: already in use")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        prompt_text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer; pass token ids")
            prompt_text, prompt = prompt, self.tokenizer.encode(prompt)
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        bad = [t for t in prompt if not 0 <= t < self.cfg.vocab_size]
        if bad:
            raise ValueError(f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        if len(prompt) >= self.max_context:
            raise ValueError(f"prompt: {len(prompt)} tokens do not fit the context window of "
                             f"{self.max_context} tokens (one must be left to generate)")
        seed = params.seed if params.seed is not None else int(self._rng.integers(2 ** 32))
        now = self.clock() if arrival_time is None else arrival_time
        self.requests[request_id] = Request(request_id, prompt, params, seed, now, priority,
                                            prompt_text=prompt_text)
        if self.tokenizer is not None:
            self._decoders[request_id] = IncrementalDecoder(self.tokenizer)

    def abort(self, request_id: str) -> None:
        r = self.requests.get(request_id)
        if r is None:
            raise ValueError(f"request_id={request_id!r}: no such unfinished request")
        self._finish(r, "abort")
        self._aborted.append(r)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def step(self) -> List[RequestOutput]:
        """Runs one iteration; returns an output for every request that progressed or ended."""
        self.num_steps += 1
        views = [self._view(r) for r in self.requests.values()]
        plan = self.policy.schedule(views, self.cache_state(), self.clock())
        for rid in plan.preempt:
            self._preempt(self.requests[rid])
        if plan.swap_in or plan.swap_out:
            raise NotImplementedError("this engine has no host page pool yet")
        scheduled = []
        for rid, n in plan.run:
            r = self.requests[rid]
            r.pages += self.allocator.allocate(pages_for(r.num_computed + n, self.config.page_size) - len(r.pages))
            r.status = Status.RUNNING
            scheduled.append((r, n))
        touched = {r.request_id: (r, []) for r in self._aborted}
        self._aborted = []
        prefill = [(r, n) for r, n in scheduled if n > 1]
        decode = [(r, n) for r, n in scheduled if n == 1]
        for group in (prefill, decode):
            if not group:
                continue
            tokens, logprobs = self.runner.run([self._chunk(r, n) for r, n in group])
            now = self.clock()
            for (r, n), token, logprob in zip(group, tokens, logprobs):
                r.num_computed += n
                if r.num_remaining == 0:  # the whole known sequence is cached: this token is new
                    self._commit(r, int(token), float(logprob), now)
                    touched.setdefault(r.request_id, (r, []))[1].append(int(token))
        return [self._output(r, new) for r, new in touched.values()]

    def cache_state(self) -> CacheState:
        c = self.config
        return CacheState(page_size=c.page_size, free_pages=self.allocator.num_free, total_pages=c.num_pages,
                          max_batch=c.max_batch, token_budget=c.token_budget, max_chunk=c.max_chunk)

    # -- internals ----------------------------------------------------------------------------
    def _view(self, r: Request) -> RequestView:
        location = "device" if r.status is Status.RUNNING else ("host" if r.status is Status.SWAPPED else "none")
        return RequestView(r.request_id, r.arrival_time, r.priority, r.num_tokens, r.num_computed,
                           len(r.output_ids), r.params.max_tokens, len(r.pages), location)

    def _chunk(self, r: Request, n: int) -> Chunk:
        p = r.params
        return Chunk(r.all_ids[r.num_computed: r.num_computed + n], r.num_computed, r.pages,
                     p.temperature, p.top_k, p.top_p, r.seed, len(r.output_ids))

    def _preempt(self, r: Request) -> None:
        """Drops r's cache; it keeps its committed tokens and recomputes their KV when readmitted."""
        self.allocator.free(r.pages)
        self.stats["preemptions"] += 1
        self.stats["recomputed_tokens"] += r.num_computed
        r.pages, r.num_computed, r.status = [], 0, Status.WAITING
        r.num_preemptions += 1

    def _commit(self, r: Request, token: int, logprob: float, now: float) -> None:
        r.output_ids.append(token)
        if r.params.logprobs:
            r.logprobs.append(logprob)
        if r.first_token_time is None:
            r.first_token_time = now
        decoder = self._decoders.get(r.request_id)
        if decoder is not None:
            r.text += decoder.push([token])
        p = r.params
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            return self._finish(r, "stop", now)
        for s in p.stop:
            at = r.text.find(s)
            if at >= 0:
                r.text = r.text[:at]
                return self._finish(r, "stop", now)
        if len(r.output_ids) >= p.max_tokens or r.num_tokens >= self.max_context:
            return self._finish(r, "length", now)

    def _finish(self, r: Request, reason: str, now: Optional[float] = None) -> None:
        self.allocator.free(r.pages)
        r.pages, r.status, r.finish_reason = [], Status.FINISHED, reason
        r.finish_time = self.clock() if now is None else now
        self.stats["aborted" if reason == "abort" else "finished"] += 1
        del self.requests[r.request_id]
        self._decoders.pop(r.request_id, None)

    def _output(self, r: Request, new_ids: List[int]) -> RequestOutput:
        return RequestOutput(
            request_id=r.request_id, prompt_token_ids=r.prompt_ids, token_ids=list(r.output_ids),
            new_token_ids=new_ids, text=r.text, finished=r.finished, finish_reason=r.finish_reason,
            logprobs=list(r.logprobs) if r.params.logprobs else None, arrival_time=r.arrival_time,
            first_token_time=r.first_token_time, finish_time=r.finish_time,
            num_preemptions=r.num_preemptions)
