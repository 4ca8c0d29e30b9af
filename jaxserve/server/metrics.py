"""Prometheus metrics of a serving engine, for `GET /metrics`.

The engine thread records a snapshot of the engine's state after every step (and after
adds/aborts) and observes latencies as outputs come back; scrapes read only the snapshot, so
they never touch the engine from another thread.

Beside jaxserve's own series, the ones a vLLM dashboard reads carry vLLM's names and its
`model_name` label (`vllm:num_requests_running`, `vllm:kv_cache_usage_perc`,
`vllm:time_to_first_token_seconds`, ...: `VLLM_NAMES`).
"""
from __future__ import annotations

from typing import Optional, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from jaxserve.engine.outputs import RequestOutput

CONTENT_TYPE = CONTENT_TYPE_LATEST

_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_JCT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)

# engine.stats key -> (metric name, help)
_ENGINE_COUNTERS = {
    "preemptions": ("jaxserve_preemptions", "Requests preempted (cache dropped or swapped out)."),
    "recomputed_tokens": ("jaxserve_recomputed_tokens", "Tokens whose KV was recomputed after preemption."),
    "reparallelizations": ("jaxserve_reparallelizations", "Times the engine changed its parallel layout."),
    "prefix_hit_tokens": ("jaxserve_prefix_cache_hit_tokens", "Tokens whose KV came from the prefix cache."),
    "prefix_queried_tokens": ("jaxserve_prefix_cache_queried_tokens",
                              "Tokens of the requests looked up in the prefix cache (hit rate: hit / queried)."),
    "prefix_host_hit_tokens": ("jaxserve_prefix_cache_host_hit_tokens",
                               "Of the prefix cache's hit tokens, those whose KV came back from host memory."),
}


def request_states(engine) -> dict:
    """Unfinished requests in the engine by state: {"waiting": n, "running": n, "swapped": n}."""
    states = {"waiting": 0, "running": 0, "swapped": 0}
    for r in engine.requests.values():
        states[r.status.value] = states.get(r.status.value, 0) + 1
    return states


def _value(obj, name: str):
    """An optional engine attribute, as a method or a plain value (None when absent)."""
    v = getattr(obj, name, None)
    return v() if callable(v) else v


# vLLM's series (its v1 engine's names) that jaxserve has a counterpart of
VLLM_NAMES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
              "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:num_preemptions", "vllm:request_success",
              "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds",
              "vllm:e2e_request_latency_seconds")


class ServerMetrics:
    def __init__(self, model_name: str = "jaxserve"):
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self._snapshot: Optional[dict] = None
        r = self.registry
        self.ttft = Histogram("jaxserve_time_to_first_token_seconds", "Arrival to first output token.",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jaxserve_time_per_output_token_seconds",
                              "Mean time between output tokens after the first, per finished request.",
                              buckets=_TPOT_BUCKETS, registry=r)
        self.jct = Histogram("jaxserve_job_completion_time_seconds", "Arrival to last token (JCT).",
                             buckets=_JCT_BUCKETS, registry=r)
        self.finished = Counter("jaxserve_requests_finished", "Requests that ended, by reason.",
                                ["reason"], registry=r)
        self.rejected = Counter("jaxserve_requests_rejected", "Requests refused before queueing, by reason.",
                                ["reason"], registry=r)
        self.prompt_tokens = Counter("jaxserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter("jaxserve_generation_tokens", "Tokens generated.", registry=r)
        model = ["model_name"]
        self.vllm_ttft = Histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                                   model, buckets=_TTFT_BUCKETS, registry=r).labels(model_name)
        self.vllm_e2e = Histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                                  model, buckets=_JCT_BUCKETS, registry=r).labels(model_name)
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", model,
                                          registry=r).labels(model_name)
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                              model, registry=r).labels(model_name)
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                    model + ["finished_reason"], registry=r)
        r.register(_SnapshotCollector(self))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- called on the engine thread ----------------------------------------------------------
    def observe_engine(self, engine) -> None:
        self._snapshot = {
            "requests": request_states(engine),
            "queue_lengths": _value(engine.policy, "queue_lengths"),
            "device_pages": engine.allocator.num_used,
            "device_pages_total": engine.allocator.num_pages,
            "host_pages": _value(engine, "host_pages_in_use"),
            "stats": dict(engine.stats),
            "steps": engine.num_steps,
        }

    def observe_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        for o in outputs:
            self.generation_tokens.inc(len(o.new_token_ids))
            self.vllm_generation_tokens.inc(len(o.new_token_ids))
            if o.new_token_ids and len(o.token_ids) == len(o.new_token_ids) and o.ttft is not None:
                self.ttft.observe(o.ttft)
                self.vllm_ttft.observe(o.ttft)
            if not o.finished:
                continue
            self.finished.labels(o.finish_reason or "unknown").inc()
            self.prompt_tokens.inc(len(o.prompt_token_ids))
            self.vllm_prompt_tokens.inc(len(o.prompt_token_ids))
            if o.finish_reason == "abort":
                continue
            self.vllm_success.labels(self.model_name, o.finish_reason or "unknown").inc()
            self.jct.observe(o.jct)
            self.vllm_e2e.observe(o.jct)
            if len(o.token_ids) > 1:
                self.tpot.observe((o.finish_time - o.first_token_time) / (len(o.token_ids) - 1))


class _SnapshotCollector:
    """Exposes the latest engine snapshot as gauges and counters at scrape time."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        s = self.metrics._snapshot
        if s is None:
            return
        requests = GaugeMetricFamily("jaxserve_requests", "Unfinished requests in the engine, by state.",
                                     labels=["state"])
        for state, n in s["requests"].items():
            requests.add_metric([state], n)
        yield requests
        if s["queue_lengths"] is not None:
            levels = GaugeMetricFamily("jaxserve_mlfq_queue_length", "Requests per MLFQ level.", labels=["level"])
            for level, n in enumerate(s["queue_lengths"]):
                levels.add_metric([str(level)], n)
            yield levels
        pages = GaugeMetricFamily("jaxserve_kv_pages_in_use", "KV cache pages holding a request's keys and values.",
                                  labels=["pool"])
        pages.add_metric(["device"], s["device_pages"])
        if s["host_pages"] is not None:
            pages.add_metric(["host"], s["host_pages"])
        yield pages
        yield GaugeMetricFamily("jaxserve_kv_pages_total", "Device KV cache pages.", value=s["device_pages_total"])
        stats = s["stats"]
        swap = CounterMetricFamily("jaxserve_swap_bytes", "KV bytes moved between device and host.",
                                   labels=["direction"])
        swap.add_metric(["out"], stats.get("swap_out_bytes", 0))
        swap.add_metric(["in"], stats.get("swap_in_bytes", 0))
        yield swap
        for key, (name, doc) in _ENGINE_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        yield CounterMetricFamily("jaxserve_engine_steps", "Engine iterations run.", value=s["steps"])
        yield from self._vllm(s)

    def _vllm(self, s: dict):
        """The snapshot's series under vLLM's names."""
        model = [self.metrics.model_name]

        def family(kind, name, doc, value):
            f = kind(name, doc, labels=["model_name"])
            f.add_metric(model, value)
            return f
        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in model execution batches.",
                     s["requests"].get("running", 0))
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                     s["requests"].get("waiting", 0) + s["requests"].get("swapped", 0))
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                     s["device_pages"] / max(1, s["device_pages_total"]))
        stats = s["stats"]
        yield family(CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                     stats.get("preemptions", 0))
        yield family(CounterMetricFamily, "vllm:prefix_cache_queries",
                     "Prefix cache queries, in terms of number of queried tokens.", stats.get("prefix_queried_tokens", 0))
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits",
                     "Prefix cache hits, in terms of number of cached tokens.", stats.get("prefix_hit_tokens", 0))
