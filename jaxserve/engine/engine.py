"""The iteration-level engine loop: ask the policy for a plan, carry it out, commit tokens.

Requests join and leave between steps (continuous batching); long prompts run in chunks
mixed with decodes under a per-step token budget. The policy decides; this module only obeys:
it asks the KV manager for pages and transfers, runs the step and applies stop rules.

Host work overlaps the device (`EngineConfig.async_scheduling`): a step is scheduled, packed
and dispatched while the previous one runs, and the previous one's tokens are read (committed,
journaled, streamed, checked against stop rules) only after that. The policy sees each request
one step behind: a request whose last read token ends it may have computed one token more,
which is dropped, never streamed or journaled.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import jax
import numpy as np

from jaxserve.cache import paged_kv
from jaxserve.engine.journal import TokenJournal
from jaxserve.engine.kv_manager import KVManager
from jaxserve.engine.model_runner import (BANNED_TOKENS, UNROLL_CHOICES, Chunk, Dispatched, ModelRunner,
                                         counts_bytes, enable_compile_cache)
from jaxserve.engine.outputs import RequestOutput, cut_at_stop, is_top_entry
from jaxserve.engine.penalty_rows import PenaltyRows
from jaxserve.engine.request import Request, Status
from jaxserve.model.config import ModelConfig
from jaxserve.model.sharding import param_bytes_per_device
from jaxserve.sampling_params import SamplingParams
from jaxserve.scheduling import make_policy
from jaxserve.scheduling.cost_model import CostModel, bucket
from jaxserve.scheduling.plan import CacheState, RequestView
from jaxserve.tokenizer import IncrementalDecoder, Tokenizer

REFIT_STEPS = 256  # the cost model is refitted to the recent steps this often while serving


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 512
    max_batch: int = 32
    token_budget: int = 256   # tokens per step, prefill chunks and decodes together
    max_chunk: int = 256      # longest prefill chunk
    host_pages: int = 0       # host (pinned) memory, in pages, for swapped-out KV; 0 = none
    attention_impl: str = "auto"  # auto | reference | pallas | mgpu | tpu (attention_kernels.resolve_impl)
    unroll_layers: str = "auto"   # decode steps' layer loop unrolled: auto (UNROLL_LAYERS_GPU on GPU) | on | off
    policy: str = "fcfs"
    async_scheduling: bool = True  # schedule and dispatch step N+1 while step N runs
    compile_cache_dir: str = ""    # JAX's persistent compilation cache: a restart compiles nothing
    prefix_cache: bool = True      # share the KV pages of common prompt prefixes (cache/prefix_cache.py)
    # and keep the pages the device evicts in the host pool too (off: it costs more than it saves
    # on the H200 so far, docs/benchmarks.md)
    prefix_host_tier: bool = False

    def __post_init__(self):
        for name in ("page_size", "num_pages", "max_batch", "token_budget", "max_chunk"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"engine.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.host_pages, int) or self.host_pages < 0:
            raise ValueError(f"engine.host_pages must be an integer >= 0, got {self.host_pages!r}")
        for name in ("prefix_cache", "prefix_host_tier"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"engine.{name} must be true or false, got {getattr(self, name)!r}")
        if self.prefix_host_tier and not (self.prefix_cache and self.host_pages):
            raise ValueError("engine.prefix_host_tier=true needs engine.prefix_cache=true and engine.host_pages > 0 "
                             f"(got prefix_cache={self.prefix_cache}, host_pages={self.host_pages})")
        if self.unroll_layers not in UNROLL_CHOICES:
            raise ValueError(f"engine.unroll_layers={self.unroll_layers!r} is not one of {UNROLL_CHOICES}")


def replica_device_bytes(cfg: ModelConfig, config: EngineConfig, model: int = 1) -> int:
    """What an engine allocates on each device of a (1, model) mesh: its params at that degree,
    its KV pool and its penalty counts, as their shardings lay them out."""
    return (param_bytes_per_device(cfg, model) + paged_kv.pool_bytes_per_device(cfg, config.num_pages, config.page_size, model)
            + counts_bytes(cfg.vocab_size, bucket(config.max_batch)))


def engine_cost_model(cfg: ModelConfig, config: EngineConfig) -> CostModel:
    """A cost model (default coefficients until calibrated) for this model and these engine limits."""
    return CostModel(page_size=config.page_size, max_batch=config.max_batch, max_chunk=config.max_chunk,
                     max_pages=-(-cfg.max_seq_len // config.page_size),
                     page_bytes=paged_kv.pool_bytes_per_page(cfg, config.page_size))


class Engine:
    def __init__(self, cfg: ModelConfig, params, mesh, tokenizer: Optional[Tokenizer] = None,
                 config: EngineConfig = EngineConfig(), policy=None,
                 clock: Callable[[], float] = time.monotonic, seed: Optional[int] = None,
                 cost_model: Optional[CostModel] = None, journal: Optional[TokenJournal] = None):
        """journal: where each request's progress is recorded durably (see `resume`). seed: of
        the seeds given to requests that bring none; None (default) draws from OS entropy, so
        that unseeded sampling differs across restarts and replicas."""
        self.cfg, self.config, self.tokenizer, self.clock = cfg, config, tokenizer, clock
        self.journal = journal
        self.cost_model = cost_model or engine_cost_model(cfg, config)
        if jax.process_count() > 1:
            from jaxserve.parallel.multihost import check_supported
            check_supported(config)
        self.policy = policy or make_policy(config.policy, self.cost_model)
        if config.compile_cache_dir:
            enable_compile_cache(config.compile_cache_dir)
        self.runner = ModelRunner(cfg, params, mesh, config.num_pages, config.page_size, config.max_batch,
                                  attention_impl=config.attention_impl, unroll_layers=config.unroll_layers)
        # Cumulative counters for metrics: read-only for callers. host_s: time in step() not
        # spent waiting for the device (device_wait_s); idle_dispatches: steps sent to a device that
        # had already finished the step before (the host, not the device, set the pace).
        self.stats = {"preemptions": 0, "recomputed_tokens": 0, "swap_out_bytes": 0, "swap_in_bytes": 0,
                      "swap_outs": 0, "swap_ins": 0, "swap_ins_unforeseen": 0, "swap_stall_s": 0.0,
                      "reparallelizations": 0, "finished": 0, "aborted": 0, "host_s": 0.0, "device_wait_s": 0.0,
                      "idle_dispatches": 0, "dropped_tokens": 0, "failed": 0, "prefix_hit_tokens": 0, "prefix_queried_tokens": 0,
                      "prompt_tokens_computed": 0,
                      "prefix_deferred": 0, "prefix_host_hit_tokens": 0, "prefix_spilled_pages": 0,
                      "prefix_restored_pages": 0, "swap_shared_pages_kept": 0}
        self.penalty_rows = PenaltyRows(self.runner)
        self.kv = KVManager(config.num_pages, config.page_size, config.host_pages, mesh, self.runner, self.stats,
                            prefix_cache=config.prefix_cache, host_tier=config.prefix_host_tier,
                            model_key=repr(cfg))
        self.step_log: List[tuple] = []      # (cost features, seconds) of recent steps, for calibration
        self._unfitted, self._fits = 0, 0     # steps since the last refit; refits so far
        self._swaps_beside = mesh.devices.flat[0].platform != "cpu"  # DMA beside compute
        self.max_context = min(cfg.max_seq_len, config.num_pages * config.page_size)
        self.requests: Dict[str, Request] = {}
        self._decoders: Dict[str, IncrementalDecoder] = {}
        self._aborted: List[Request] = []
        self._in_flight: collections.deque = collections.deque()  # _StepRecord, oldest first
        self._floor_requests: Optional[set] = None  # the requests a held decode shape is for (hold_decode_shape)
        self._held: List[RequestOutput] = []  # outputs of steps read outside step() (drain)
        self._last_read = 0.0
        self._dispatched = False  # whether the last dispatch() sent a step
        self._dispatching: List[Request] = []
        self._rng = np.random.default_rng(seed)
        eos = set(cfg.eos_token_ids) | set(tokenizer.eos_token_ids if tokenizer else ())
        self.eos_token_ids = frozenset(eos)
        self.num_steps = 0

    @property
    def allocator(self):
        return self.kv.allocator

    @property
    def host_pool(self):
        return self.kv.host_pool

    # -- public API ---------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Union[str, Sequence[int]],
                    params: Optional[SamplingParams] = None, arrival_time: Optional[float] = None,
                    priority: int = 0) -> None:
        """Queues a request; raises ValueError naming the field on bad input (nothing is queued)."""
        params = SamplingParams() if params is None else params
        prompt_text = None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: text needs a tokenizer; pass token ids")
            prompt_text, prompt = prompt, self.tokenizer.encode(prompt)
        prompt = self._check_request(request_id, prompt, params)
        seed = params.seed if params.seed is not None else int(self._rng.integers(2 ** 32))
        now = self.clock() if arrival_time is None else arrival_time
        self.requests[request_id] = Request(request_id, prompt, params, seed, now, priority,
                                            prompt_text=prompt_text)
        if self.tokenizer is not None:
            self._decoders[request_id] = IncrementalDecoder(self.tokenizer)
        if self.journal is not None:
            self.journal.added(self.requests[request_id])

    def _check_request(self, request_id, prompt, params, output_ids=()) -> list:
        """The prompt as a list of ints, or ValueError naming the bad field."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id={request_id!r}: must be a non-empty string")
        if request_id in self.requests:
            raise ValueError(f"request_id={request_id!r}: already in use")
        if not isinstance(params, SamplingParams):
            raise ValueError(f"params: expected SamplingParams, got {type(params).__name__}")
        params._check()  # a dataclass can be changed after it was built
        if params.n != 1:
            raise ValueError(f"n={params.n}: the engine runs one completion a request (LLM.generate runs n)")
        if params.penalized and jax.process_count() > 1:
            raise ValueError(f"{params.penalties_on[0]}: penalties are not supported across processes yet")
        banned = len(self._min_tokens_banned(params)) if params.min_tokens else 0
        if banned > BANNED_TOKENS:
            raise ValueError(f"min_tokens={params.min_tokens}: needs at most {BANNED_TOKENS} stop and end-of-sequence "
                             f"token ids, got {banned}")
        for field, ids in (("prompt", prompt), ("output_ids", output_ids)):
            if not isinstance(ids, (list, tuple)) or not all(
                    isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in ids):
                raise ValueError(f"{field}: must be a list of token ids (integers)")
            bad = [t for t in ids if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"{field}: token id {bad[0]} is outside the vocabulary [0, {self.cfg.vocab_size})")
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt: must not be empty")
        if len(prompt) + len(output_ids) >= self.max_context:
            raise ValueError(f"prompt: {len(prompt)} tokens" + (f" and {len(output_ids)} generated" if output_ids else "")
                             + f" do not fit the context window of {self.max_context} tokens (one must be left "
                               "to generate)")
        return prompt

    def _check_resumed(self, r: Request) -> None:
        """A journaled or handed-over request, checked as strictly as a new one (a peer's record
        is not trusted), with the state a new request does not have."""
        if not isinstance(r, Request):
            raise ValueError(f"requests: expected Request, got {type(r).__name__}")
        self._check_request(r.request_id, r.prompt_ids, r.params, r.output_ids)
        if not isinstance(r.seed, int) or isinstance(r.seed, bool) or not 0 <= r.seed < 2 ** 32:
            raise ValueError(f"seed={r.seed!r}: must be an integer in [0, 2**32)")
        if not isinstance(r.arrival_time, (int, float)) or not np.isfinite(r.arrival_time):
            raise ValueError(f"arrival={r.arrival_time!r}: must be a finite number")
        if not isinstance(r.priority, int) or isinstance(r.priority, bool):
            raise ValueError(f"priority={r.priority!r}: must be an integer")
        if not isinstance(r.logprobs, list) or (r.params.logprobs is not None and (
                len(r.logprobs) != len(r.output_ids) or not all(isinstance(x, (int, float)) for x in r.logprobs))):
            raise ValueError(f"logprobs: must be one number per generated token ({len(r.output_ids)})")
        if not isinstance(r.top_logprobs, list) or (r.params.logprobs and (
                len(r.top_logprobs) != len(r.output_ids) or not all(is_top_entry(e, r.params.logprobs)
                                                                   for e in r.top_logprobs))):
            raise ValueError(f"top_logprobs: must be one [rank, {r.params.logprobs} token ids, as many logprobs] "
                             f"per generated token ({len(r.output_ids)})")
        if len(r.output_ids) > r.params.max_tokens:
            raise ValueError(f"output_ids: {len(r.output_ids)} tokens, more than max_tokens={r.params.max_tokens}")

    def resume_valid(self, journaled: Sequence[Request]) -> List[tuple]:
        """`resume` for a journal read at start-up: a record this engine cannot take (a context
        window smaller than when it was written, a corrupted field) must not stop the server.
        Those are ended in the journal ("invalid") and returned as (request_id, error)."""
        rejected = []
        for r in journaled:
            try:
                self.resume([r])
            except ValueError as e:
                rejected.append((r.request_id, str(e)))
                if self.journal is not None and isinstance(r, Request):
                    self.journal.finished(str(r.request_id), "invalid")
        return rejected

    def resume(self, journaled: Sequence[Request], journal_them: bool = False) -> int:
        """Takes back requests a journal recorded as unfinished (after a crash or kill -9), or
        that a peer handed over (then `journal_them`: this engine's journal records them).

        Each keeps its committed tokens, which are never generated again: its cache is recomputed
        from prompt + committed tokens and decoding goes on from there, with the same sampling
        keys (seed, token index), so the output equals an uninterrupted run. Returns how many.
        """
        seen = set()
        for i, r in enumerate(journaled):  # checked first: either all are taken back or none
            try:
                self._check_resumed(r)
                if r.request_id in seen:
                    raise ValueError(f"request_id={r.request_id!r}: appears twice")
            except ValueError as e:
                raise ValueError(f"requests.{i}.{e}") from None
            seen.add(r.request_id)
        for r in journaled:
            # another process's clock: keep its order among this engine's requests, never ahead
            r.arrival_time = min(r.arrival_time, self.clock())
            if journal_them and self.journal is not None:
                self.journal.added(r)
            if r.params.logprobs is None:
                r.logprobs = []
            if not r.params.logprobs:
                r.top_logprobs = []
            decoder = IncrementalDecoder(self.tokenizer) if self.tokenizer is not None else None
            if decoder is not None:
                if r.params.min_tokens > 1:  # the text no stop string may end in (see _commit)
                    r.stop_after = len(IncrementalDecoder(self.tokenizer).push(r.output_ids[:r.params.min_tokens - 1]))
                r.text = decoder.push(list(r.output_ids))
            self.import_request(r, None, decoder)
            last = r.output_ids[-1] if r.output_ids else None
            if last is not None and ((last in self.eos_token_ids and not r.params.ignore_eos)
                                     or last in r.params.stop_token_ids):
                self._finish(r, "stop")  # it ended before its end was recorded
            elif len(r.output_ids) >= r.params.max_tokens:
                self._finish(r, "length")
        return len(journaled)

    def abort(self, request_id: str, reason: str = "abort") -> None:
        """Ends a request now (its client went away; or `reason="handed_over"` to a peer)."""
        r = self.requests.get(request_id)
        if r is None:
            raise ValueError(f"request_id={request_id!r}: no such unfinished request")
        self._finish(r, reason)
        self._aborted.append(r)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._in_flight) or bool(self._held)

    def step(self) -> List[RequestOutput]:
        """Runs one iteration; returns an output for every request that progressed or ended.

        With async scheduling, the outputs are those of the step before the one dispatched now."""
        self.dispatch()
        return self.collect()

    def hold_decode_shape(self, rows: int, pages: int) -> None:
        """Decode steps run at least (rows, pages), the shape compiled ahead for this mesh by a
        deferred switch, until the requests here now grow into it or have all ended; from then
        on they run the shapes a fresh engine would."""
        self.runner.decode_floor = (rows, pages)
        self._floor_requests = set(self.requests)

    def dispatch(self) -> None:
        """Schedules the next step and sends it to the device, without waiting for it."""
        t = time.perf_counter()
        if self._in_flight and _is_ready(self._in_flight[-1].dispatched.tokens):
            self.stats["idle_dispatches"] += 1
        self.kv.write_staged()
        if self._floor_requests is not None and self._floor_requests.isdisjoint(self.requests):
            self.runner.decode_floor = self._floor_requests = None  # what it was held for has ended
        record = self._schedule()
        if record is not None:
            self._in_flight.append(record)
        self._dispatched = record is not None
        self.stats["host_s"] += time.perf_counter() - t

    def collect(self) -> List[RequestOutput]:
        """Reads the steps that `dispatch` left behind: all but the one just dispatched when
        scheduling is async, so that it runs while the host works on these."""
        t = time.perf_counter()
        wait0 = self.stats["device_wait_s"]
        touched = {r.request_id: (r, []) for r in self._aborted}
        self._aborted = []
        keep = 1 if self.config.async_scheduling and self._dispatched else 0
        while len(self._in_flight) > keep:
            self._read(self._in_flight[0], touched)  # popped once read: a failed one stays for fail_step
            self._in_flight.popleft()
        outputs, self._held = self._held + [self._output(r, new) for r, new in touched.values()], []
        self.stats["host_s"] += time.perf_counter() - t - (self.stats["device_wait_s"] - wait0)
        return outputs

    def fail_step(self) -> List[RequestOutput]:
        """After `step` raised (on the host, or on the device after the pool was donated to it):
        ends the requests of the steps in flight, with finish reason "error" and no end in the
        journal (a restarted server resumes them), and makes the engine usable again: a pool
        the failed step took is rebuilt, and the requests whose pages were in it recompute them.
        Returns the failed requests' outputs."""
        failed = {r.request_id: r for r in self._dispatching}
        for record in self._in_flight:
            failed.update((r.request_id, r) for r, _ in record.scheduled)
        # swapped out while a failed step ran: their host copies were read from the pool it left
        tainted = {rid for record in self._in_flight for rid in record.swapped_after}
        self._in_flight.clear()
        self._dispatching, self._held, self._dispatched = [], [], False
        outputs = []
        for rid, r in failed.items():
            if self.requests.get(rid) is r:
                self._finish(r, "error", journal=False)
                outputs.append(self._output(r, []))
        lost = self.runner.recover()
        self.penalty_rows.clear()  # the counts held the dropped tokens of the failed steps
        self.kv.forget_cached()  # a failed step may have left named pages unwritten
        for r in self.requests.values():
            r.num_pending, r.pending_row = 0, -1
            if lost and (r.status is Status.RUNNING or self.kv.holds_device_pages(r)  # their KV went with the pool
                         or (r.status is Status.SWAPPED and r.request_id in tainted)):
                self._preempt(r, counted=False)
        return outputs

    def drain(self) -> List[RequestOutput]:
        """Reads every step in flight; returns the outputs not yet returned."""
        self._dispatched = False
        return self.collect()

    def _schedule(self) -> Optional["_StepRecord"]:
        start = self.clock()
        views = [self._view(r) for r in self.requests.values() if not self._finishing(r)]
        plan = self.policy.schedule(views, self.cache_state(), start)
        # Uploads start first: they free host pages that this step's swap-outs may need, and
        # swap-outs free the device pages that the uploads land in. Swap-outs go before the
        # preemptions: a page two victims share is then kept by the swapped one, as planned,
        # not copied by it once the other let go. One that finds no host room recomputes.
        uploads = {rid: self.kv.start_upload(rid) for rid in plan.swap_in}
        swap_bytes = 0
        for rid in plan.swap_out:
            moved = self.kv.swap_out(self.requests[rid])
            if moved is None:
                self._preempt(self.requests[rid])
            else:
                for record in self._in_flight:
                    record.swapped_after.append(rid)
            swap_bytes += moved or 0
        for rid in plan.preempt:
            self._preempt(self.requests[rid])
        running = {rid for rid, _ in plan.run}
        swap_bytes += sum(self.kv.swap_in(self.requests[rid], uploads[rid], rid in running) for rid in plan.swap_in)
        scheduled = []
        for rid, n in plan.run:
            r = self.requests[rid]
            if r.status is Status.SWAPPED:
                if rid in uploads:  # its swap-in found fewer free pages than planned (kv.swap_in)
                    continue
                raise RuntimeError(f"policy {self.policy.name} ran {rid} without swapping it in")
            if r.status is Status.WAITING:  # its prefill starts after its cached prefix, if any
                n = self.kv.match(r, n)
            if self.kv.prefix is not None and not self.kv.can_grow(r, r.num_computed + n):
                # a preempted request's shared pages stay held by the others: fewer pages came
                # free than the policy counted; r waits for the next plan
                if r.status is Status.WAITING:
                    self.kv.release(r)
                    r.num_computed = 0
                self.stats["prefix_deferred"] += 1
                continue
            self.kv.grow(r, r.num_computed + n)
            r.status = Status.RUNNING
            scheduled.append((r, n))
            self.stats["prompt_tokens_computed"] += max(0, min(r.num_computed + n, len(r.prompt_ids)) - r.num_computed)
        if not scheduled:
            return None
        self.num_steps += 1
        self._dispatching = [r for r, _ in scheduled]  # whom a failure in dispatch concerns
        # the chunks that end their request's known tokens draw its next token
        draws = {r.request_id for r, n in scheduled if n == r.num_remaining}
        penalized = {rid for rid in draws if self.requests[rid].params.penalized}
        dispatched = self.runner.dispatch([self._chunk(r, n, r.request_id in draws, penalized) for r, n in scheduled])
        self._dispatching = []
        produced = []
        for (r, n), row in zip(scheduled, dispatched.rows):
            r.num_computed += n
            self.kv.computed(r)
            produced.append(r.num_remaining == 0)  # the whole known sequence is cached: a token is new
            if produced[-1]:
                r.num_pending += 1
                r.pending_row = row
        features = self.cost_model.features([(n, len(r.pages)) for r, n in scheduled], swap_bytes)
        return _StepRecord(dispatched, scheduled, produced, features, start, [])

    def _read(self, record: "_StepRecord", touched: dict) -> None:
        """Waits for a dispatched step's tokens and commits them."""
        t = time.perf_counter()
        tokens, logprobs = record.dispatched.read()
        top = record.dispatched.read_top()
        self.stats["device_wait_s"] += time.perf_counter() - t
        now = self.clock()
        for i, ((r, _), produced, token, logprob) in enumerate(zip(record.scheduled, record.produced, tokens, logprobs)):
            if not produced:
                continue
            r.num_pending -= 1
            if self.requests.get(r.request_id) is not r:  # it ended meanwhile: one token too many
                self.stats["dropped_tokens"] += 1
                continue
            k = r.params.logprobs
            entry = [int(top[2][i]), top[0][i, :k].tolist(), top[1][i, :k].tolist()] if k else None
            self._commit(r, int(token), float(logprob), now, entry)
            touched.setdefault(r.request_id, (r, []))[1].append(int(token))
        self.step_log.append((record.features, now - max(record.start, self._last_read)))
        self._last_read = now
        del self.step_log[:-4096]
        # keep the cost model (the policy's too) fitted to this engine: first after a few
        # steps, then every REFIT_STEPS
        self._unfitted += 1
        if self._unfitted >= (REFIT_STEPS if self._fits else 32):
            self.calibrate()

    # -- moving requests between engines (re-parallelization) ---------------------------------
    def export_requests(self, with_kv: bool = True) -> list:
        """Removes every unfinished request, oldest first, as (Request, kv, decoder).

        kv is None when the request has no cache (or with_kv is False: it will be recomputed from
        its committed tokens); otherwise {"k", "v"} device or host arrays [L, >= its pages, ...]
        (bucketed, so that migrations compile per bucket rather than per page count).
        """
        self._held += self.drain()
        self.kv.write_staged()
        out = []
        for r in sorted(self.requests.values(), key=lambda r: (r.arrival_time, r.request_id)):
            kv = self.kv.export(r, with_kv)
            if kv is None:
                self.stats["recomputed_tokens"] += r.num_computed
                r.num_computed = 0
            r.status = Status.WAITING
            self.penalty_rows.release(r.request_id)
            out.append((r, kv, self._decoders.pop(r.request_id, None)))
        self.requests.clear()
        return out

    def has_pages_for(self, r: Request) -> bool:
        """Whether the device pool has free pages for the KV of r's committed tokens."""
        return self.kv.has_pages_for(r)

    @property
    def mesh(self):
        return self.runner.mesh

    @property
    def params(self):
        return self.runner.params

    def device_state(self) -> dict:
        """The device arrays this engine allocated: its params, KV pool and penalty counts
        (None once retired)."""
        return {"params": self.runner.params, "kv_pool": self.runner.cache, "counts": self.runner.counts}

    @property
    def max_pages_per_seq(self) -> int:
        return self.runner.max_pages_per_seq

    def retire(self, params: bool = False) -> None:
        """Lets go of the device KV pool (and with `params`, the parameters) of an engine whose
        requests have been exported, so that a replica replacing it can allocate in their room;
        buffers that another array still shares (resident shards a new replica reuses) stay."""
        self.runner.cache = self.runner.counts = self.kv.host_pool = None
        if params:
            self.runner.params = None

    def block_until_ready(self) -> None:
        jax.block_until_ready(self.runner.cache)

    def count_reparallelization(self) -> None:
        self.stats["reparallelizations"] += 1

    def import_request(self, r: Request, kv: Optional[dict], decoder=None) -> int:
        """Takes over a request exported by another engine; returns KV bytes copied in."""
        if r.request_id in self.requests:
            raise ValueError(f"request_id={r.request_id!r}: already in use")
        moved = self.kv.import_(r, kv)
        self.requests[r.request_id] = r
        if decoder is not None:
            self._decoders[r.request_id] = decoder
        elif self.tokenizer is not None:
            self._decoders[r.request_id] = IncrementalDecoder(self.tokenizer)
        return moved

    def cache_state(self) -> CacheState:
        c = self.config
        # On an accelerator swaps are DMA beside compute: policies weigh them by the link's time
        # per page. On CPU they are copies inside the step, already in its fitted time.
        link = self.cost_model.swap_s_per_page() if self._swaps_beside else 0.0
        return CacheState(page_size=c.page_size, free_pages=self.kv.num_free, total_pages=c.num_pages,
                          free_host_pages=self.host_pool.num_free, max_batch=c.max_batch,
                          token_budget=c.token_budget, max_chunk=c.max_chunk, swap_s_per_page=link)

    @property
    def host_pages_in_use(self) -> int:
        return self.host_pool.used

    def precompile(self, progress: bool = False) -> int:
        """Compiles every step shape up front (see ModelRunner.precompile), and the page transfers
        of swapping and the host tier; returns how many step shapes."""
        self._held += self.drain()
        compiled = self.runner.precompile(self.config.token_budget, progress=progress)
        if self.host_pool.capacity:
            self.runner.padding_step()  # the transfers are compiled for the pool as steps leave it
            self.kv.warm_transfers(self.runner.max_pages_per_seq)
        return compiled

    def calibrate(self) -> CostModel:
        """Refits the cost model (shared with the policy) to the steps run so far."""
        self._unfitted = 0
        if len(self.step_log) >= 8:
            self._fits += 1
            coef = self.cost_model.fit([f for f, _ in self.step_log], [t for _, t in self.step_log]).coef
            if self._swaps_beside:  # transfers beside compute add little step time: the fit would
                coef[-1] = self.cost_model.coef[-1]  # take the link for free; keep its speed
            self.cost_model.coef = coef
        return self.cost_model

    # -- internals ----------------------------------------------------------------------------
    def _finishing(self, r: Request) -> bool:
        """Whether r's token still on the device ends it for sure (length): it is not scheduled."""
        return r.num_pending > 0 and (r.num_generated >= r.params.max_tokens or r.num_tokens >= self.max_context)

    def _view(self, r: Request) -> RequestView:
        if r.status is Status.SWAPPED:  # its own pages on the host, the shared ones kept on the device
            kept = self.kv.kept_pages_of(r)
            location, pages, shared = "host", self.kv.host_entry_pages(r.request_id) + kept, kept
        else:
            location, pages = ("device" if r.status is Status.RUNNING else "none"), len(r.pages)
            shared = self.kv.shared_pages(r) if r.status is Status.RUNNING else 0
        cached = self.kv.cached_tokens(r) if r.status is Status.WAITING else 0
        return RequestView(r.request_id, r.arrival_time, r.priority, r.num_tokens, r.num_computed,
                           r.num_generated, r.params.max_tokens, pages, location, num_cached=cached,
                           shared_pages=shared)

    def _chunk(self, r: Request, n: int, draws: bool, penalized: set) -> Chunk:
        """r's work in this step: n tokens. draws: whether it draws r's next token (earlier
        prefill chunks do not); penalized: the requests that draw with penalties in it."""
        p = r.params
        tokens, prev_row = r.token_ids(r.num_computed, r.num_computed + n), -1
        if len(tokens) < n:  # the last token was sampled by the step in flight: it stays on the device
            tokens, prev_row = tokens + [0], r.pending_row
        banned = self._min_tokens_banned(p) if r.num_generated < p.min_tokens else ()
        penalty_row = self.penalty_rows.row_for(r, penalized) if r.request_id in penalized else -1
        return Chunk(tokens, r.num_computed, r.pages, p.temperature, p.top_k, p.top_p, r.seed, r.num_generated,
                     prev_row, banned, penalty_row, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
                     top_logprobs=(p.logprobs or 0) if draws else 0)

    def _min_tokens_banned(self, p: SamplingParams) -> tuple:
        """What a request may not sample before its min_tokens: its stop tokens, and
        end-of-sequence unless it ignores it."""
        return tuple(sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.eos_token_ids)))

    def _preempt(self, r: Request, counted: bool = True) -> None:
        """Drops r's cache; it keeps its committed tokens and recomputes their KV when readmitted.
        counted=False: the cache was lost (a failed step), not taken by the scheduler."""
        self.kv.release(r)
        self.stats["recomputed_tokens"] += r.num_computed
        r.num_computed, r.status = 0, Status.WAITING
        if counted:
            self.stats["preemptions"] += 1
            r.num_preemptions += 1

    def _commit(self, r: Request, token: int, logprob: float, now: float, top: Optional[list] = None) -> None:
        """Appends a token read from the device (with its logprob, and its [rank, ids, logprobs]
        of the likeliest tokens when r asks for them) and applies r's stop rules."""
        r.output_ids.append(token)
        if self.journal is not None:
            self.journal.committed(r.request_id, [token], [logprob], None if top is None else [top])
        if r.params.logprobs is not None:
            r.logprobs.append(logprob)
        if top is not None:
            r.top_logprobs.append(top)
        if r.first_token_time is None:
            r.first_token_time = now
        decoder = self._decoders.get(r.request_id)
        if decoder is not None:
            r.text += decoder.push([token])
        p = r.params
        if len(r.output_ids) < p.min_tokens:  # as vLLM: no stop ends an output shorter than min_tokens
            r.stop_after = len(r.text)
        else:
            if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
                return self._finish(r, "stop", now)
            cut = cut_at_stop(r.text, p.stop, r.stop_after)
            if cut is not None:
                r.text = cut
                return self._finish(r, "stop", now)
        # committed tokens only: a token the next step is computing still fits the context
        if len(r.output_ids) >= p.max_tokens or len(r.prompt_ids) + len(r.output_ids) >= self.max_context:
            return self._finish(r, "length", now)

    def _finish(self, r: Request, reason: str, now: Optional[float] = None, journal: bool = True) -> None:
        """Ends r here. journal=False leaves it unfinished in the journal: a restart resumes it."""
        if journal and self.journal is not None:
            self.journal.finished(r.request_id, reason)
        self.kv.release(r)
        self.penalty_rows.release(r.request_id)
        told = getattr(self.policy, "finished", None)  # optional: policies that learn from ends
        if told is not None:
            told(r.request_id, len(r.output_ids), reason)
        r.status, r.finish_reason = Status.FINISHED, reason
        r.finish_time = self.clock() if now is None else now
        self.stats[{"abort": "aborted", "error": "failed"}.get(reason, "finished")] += 1
        del self.requests[r.request_id]
        self._decoders.pop(r.request_id, None)

    def _output(self, r: Request, new_ids: List[int]) -> RequestOutput:
        return RequestOutput(
            request_id=r.request_id, prompt_token_ids=r.prompt_ids, token_ids=list(r.output_ids),
            new_token_ids=new_ids, text=r.text, finished=r.finished, finish_reason=r.finish_reason,
            logprobs=list(r.logprobs) if r.params.logprobs is not None else None,
            top_logprobs=list(r.top_logprobs) if r.params.logprobs else None, arrival_time=r.arrival_time,
            first_token_time=r.first_token_time, finish_time=r.finish_time,
            num_preemptions=r.num_preemptions)


class _StepRecord(NamedTuple):
    """A dispatched step, until its tokens are read."""
    dispatched: Dispatched
    scheduled: list       # (Request, tokens run)
    produced: list        # whether each sampled a new token
    features: np.ndarray  # cost-model features of the step
    start: float          # engine clock when it was scheduled
    swapped_after: list   # requests swapped out while it ran: their copies read the pool it leaves


def _is_ready(tokens) -> bool:
    """Whether a dispatched step's tokens are computed (a host array always is)."""
    return getattr(tokens, "is_ready", lambda: True)()
