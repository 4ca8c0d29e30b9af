"""Replay a request trace against any OpenAI-compatible endpoint and report serving latencies.

    jaxserve serve tiny --port=8000 &
    jaxserve bench serve --base_url=http://127.0.0.1:8000 --num_requests=200 --request_rate=4

The trace (default: the shipped sample of the Azure LLM 2023 conversation trace, jaxserve/bench/data) gives arrival times and prompt /
output lengths. Arrivals are rescaled to --request_rate (keeping the trace's burstiness) and
lengths capped, so that a CPU run finishes in minutes. Prompts are random token ids of the
recorded length (the completions endpoint takes token ids) or random words (--prompt=text, and
always for chat); `ignore_eos` makes outputs as long as recorded. Reports request throughput,
output tokens/s, and TTFT, TPOT and JCT percentiles, as `vllm bench serve` does.
"""
import asyncio
import csv
import dataclasses
import datetime
import json
import os
import sys
import time
from typing import List, Optional

import numpy as np
from absl import flags

from jaxserve.bench.data import SAMPLE_TRACE
from jaxserve.cli import run

_BASE_URL = flags.DEFINE_string("base_url", "http://127.0.0.1:8000", "Server root.")
_ENDPOINT = flags.DEFINE_enum("endpoint", "/v1/completions", ["/v1/completions", "/v1/chat/completions"],
                              "API to call.")
_MODEL = flags.DEFINE_string("model", "", "Model id to send; default: the server's first model.")
_TRACE = flags.DEFINE_string("trace", SAMPLE_TRACE, "CSV with TIMESTAMP, ContextTokens, GeneratedTokens.")
_START = flags.DEFINE_integer("start", 0, "First trace row to replay.", lower_bound=0)
_NUM = flags.DEFINE_integer("num_requests", 200, "Rows to replay.", lower_bound=1)
_RATE = flags.DEFINE_float("request_rate", 0.0, "Mean arrivals per second after rescaling the trace's "
                           "arrival times; 0 = as recorded, inf = all at once.", lower_bound=0.0)
_LENGTH_SCALE = flags.DEFINE_float("length_scale", 1.0, "Multiplies prompt and output lengths before capping.",
                                   lower_bound=0.0)
_MAX_INPUT = flags.DEFINE_integer("max_input_len", 256, "Cap on prompt tokens.", lower_bound=1)
_MAX_OUTPUT = flags.DEFINE_integer("max_output_len", 64, "Cap on output tokens.", lower_bound=1)
_PROMPT = flags.DEFINE_enum("prompt", "tokens", ["tokens", "text"], "Random token ids or random words.")
_VOCAB = flags.DEFINE_list("token_range", ["100", "10000"], "Random prompt token ids are drawn from [lo, hi).")
_IGNORE_EOS = flags.DEFINE_bool("ignore_eos", True, "Ask for exactly the recorded output length (a "
                                "jaxserve/vLLM extension).")
_CONCURRENCY = flags.DEFINE_integer("max_concurrency", 0, "Most requests in flight; 0 = no limit.", lower_bound=0)
_SEED = flags.DEFINE_integer("seed", 0, "Seed for prompts.")
_RESULT = flags.DEFINE_string("result_json", "results/bench_serve.json", "Also write the summary and per-request "
                              "records here ('' = nowhere).")

_WORDS = ("the of and to in is was for on that with as by at from it an be this are or his which "
          "time people year way day man thing woman life child world school state family student "
          "group country problem hand part place case week company system program question work").split()


@dataclasses.dataclass
class TraceRequest:
    arrival: float       # seconds after the start of the replay
    prompt_len: int
    output_len: int


@dataclasses.dataclass
class Record:
    prompt_len: int
    output_len: int            # asked for
    ok: bool = False
    error: str = ""
    output_tokens: int = 0     # received
    ttft: float = 0.0
    jct: float = 0.0
    tpot: Optional[float] = None


def _timestamp(s: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than datetime parses.
    whole, _, frac = s.strip().partition(".")
    t = datetime.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").timestamp()
    return t + (float("0." + frac) if frac else 0.0)


def load_trace(path: str, start: int, num: int, rate: float, length_scale: float, max_input: int,
               max_output: int) -> List[TraceRequest]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"trace not found: {path}")
    rows = []
    with open(path, newline="") as f:
        for i, row in enumerate(csv.DictReader(f)):
            if i >= start + num:
                break
            if i >= start:
                try:
                    rows.append((_timestamp(row["TIMESTAMP"]), int(row["ContextTokens"]), int(row["GeneratedTokens"])))
                except (KeyError, ValueError) as e:
                    raise ValueError(f"{path}: row {i + 2} is not TIMESTAMP,ContextTokens,GeneratedTokens ({e})")
    if not rows:
        raise ValueError(f"{path}: no rows from --start={start}")
    t0 = rows[0][0]
    arrivals = np.array([t - t0 for t, _, _ in rows])
    if np.isinf(rate):
        arrivals[:] = 0.0
    elif rate > 0 and len(rows) > 1 and arrivals[-1] > 0:
        arrivals *= (len(rows) - 1) / arrivals[-1] / rate   # same shape, mean rate `rate`

    def cap(n, limit):
        return int(min(limit, max(1, round(n * length_scale))))
    return [TraceRequest(float(a), cap(p, max_input), cap(o, max_output)) for a, (_, p, o) in zip(arrivals, rows)]


def make_prompt(rng: np.random.Generator, n: int, kind: str, token_range):
    if kind == "tokens":
        return rng.integers(int(token_range[0]), int(token_range[1]), size=n).tolist()
    return " ".join(rng.choice(_WORDS, size=n).tolist())   # about one token per word


async def send(client, url: str, model: str, chat: bool, prompt, req: TraceRequest, ignore_eos: bool) -> Record:
    rec = Record(req.prompt_len, req.output_len)
    body = {"model": model, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    start = time.perf_counter()
    chunks = 0
    try:
        async with client.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:200]}"
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    rec.error = str(event["error"].get("message"))
                    return rec
                for choice in event.get("choices") or []:
                    text = choice.get("text") if not chat else (choice.get("delta") or {}).get("content")
                    if text:
                        chunks += 1
                        if chunks == 1:
                            rec.ttft = time.perf_counter() - start
                if event.get("usage"):
                    rec.output_tokens = event["usage"]["completion_tokens"]
    except Exception as e:  # noqa: BLE001 - a failed request is a result, not a crash
        rec.error = f"{type(e).__name__}: {e}"
        return rec
    rec.jct = time.perf_counter() - start
    rec.output_tokens = rec.output_tokens or chunks
    if rec.output_tokens > 1 and chunks:
        rec.tpot = (rec.jct - rec.ttft) / (rec.output_tokens - 1)
    rec.ok = chunks > 0
    rec.error = "" if rec.ok else "no output"
    return rec


async def replay(trace: List[TraceRequest]):
    import httpx
    from tqdm import tqdm

    base = _BASE_URL.value.rstrip("/")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model = _MODEL.value
        if not model:
            models = (await client.get(base + "/v1/models")).json()
            model = models["data"][0]["id"]
        rng = np.random.default_rng(_SEED.value)
        chat = _ENDPOINT.value == "/v1/chat/completions"
        kind = "text" if chat else _PROMPT.value
        prompts = [make_prompt(rng, r.prompt_len, kind, _VOCAB.value) for r in trace]
        gate = asyncio.Semaphore(_CONCURRENCY.value) if _CONCURRENCY.value else None
        bar = tqdm(total=len(trace), desc="requests", unit="req", file=sys.stderr)
        start = time.perf_counter()

        async def one(req: TraceRequest, prompt) -> Record:
            await asyncio.sleep(max(0.0, start + req.arrival - time.perf_counter()))
            if gate is None:
                rec = await send(client, base + _ENDPOINT.value, model, chat, prompt, req, _IGNORE_EOS.value)
            else:
                async with gate:
                    rec = await send(client, base + _ENDPOINT.value, model, chat, prompt, req, _IGNORE_EOS.value)
            bar.update(1)
            return rec
        records = await asyncio.gather(*[one(r, p) for r, p in zip(trace, prompts)])
        duration = time.perf_counter() - start
        bar.close()
    return model, records, duration


def summarize(records: List[Record], duration: float) -> dict:
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    summary = {"completed": len(ok), "failed": len(records) - len(ok), "duration_s": duration,
               "request_throughput": len(ok) / duration, "output_throughput": out_tokens / duration,
               "total_token_throughput": (out_tokens + sum(r.prompt_len for r in ok)) / duration,
               "total_output_tokens": out_tokens}
    for name in ("ttft", "tpot", "jct"):
        values = np.array([getattr(r, name) for r in ok if getattr(r, name) is not None]) * 1000
        for stat, fn in (("mean", np.mean), ("p50", np.median), ("p90", lambda v: np.percentile(v, 90)),
                         ("p99", lambda v: np.percentile(v, 99))):
            summary[f"{stat}_{name}_ms"] = float(fn(values)) if len(values) else None
    errors = [r.error for r in records if not r.ok]
    if errors:
        summary["first_error"] = errors[0]
    return summary


def report(summary: dict) -> str:
    lines = ["{:=^60}".format(" Serving Benchmark Result "),
             f"{'Successful requests:':<40}{summary['completed']:>20}",
             f"{'Failed requests:':<40}{summary['failed']:>20}",
             f"{'Benchmark duration (s):':<40}{summary['duration_s']:>20.2f}",
             f"{'Total generated tokens:':<40}{summary['total_output_tokens']:>20}",
             f"{'Request throughput (req/s):':<40}{summary['request_throughput']:>20.2f}",
             f"{'Output token throughput (tok/s):':<40}{summary['output_throughput']:>20.2f}",
             f"{'Total token throughput (tok/s):':<40}{summary['total_token_throughput']:>20.2f}"]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("jct", "Job Completion Time")):
        lines.append("{:-^60}".format(title))
        for stat in ("mean", "p50", "p90", "p99"):
            v = summary[f"{stat}_{name}_ms"]
            lines.append(f"{f'{stat} {name.upper()} (ms):':<40}{'n/a' if v is None else f'{v:.2f}':>20}")
    if "first_error" in summary:
        lines.append(f"first error: {summary['first_error']}")
    lines.append("=" * 60)
    return "\n".join(lines)


def main(argv):
    del argv
    trace = load_trace(_TRACE.value, _START.value, _NUM.value, _RATE.value, _LENGTH_SCALE.value,
                       _MAX_INPUT.value, _MAX_OUTPUT.value)
    model, records, duration = asyncio.run(replay(trace))
    summary = summarize(records, duration)
    summary.update(model=model, endpoint=_ENDPOINT.value, num_requests=len(trace), request_rate=_RATE.value,
                   trace=os.path.basename(_TRACE.value))
    print(report(summary))
    if _RESULT.value:
        os.makedirs(os.path.dirname(os.path.abspath(_RESULT.value)), exist_ok=True)
        with open(_RESULT.value, "w") as f:
            json.dump({"summary": summary, "requests": [dataclasses.asdict(r) for r in records]}, f, indent=1)
    if not summary["completed"]:
        sys.exit(1)

