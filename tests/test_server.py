"""The OpenAI-compatible server, run for real on localhost and driven by the official client.

One server is `launch/serve.py` in a subprocess (the tiny model); a second runs in-process so
that tests can hold the engine back or make it fail.
"""
import asyncio
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import httpx
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import REPO
from jaxserve.server.health import wait_healthy  # noqa: F401 (the other server tests import it from here)

MODEL = "tiny"
CONTEXT = 512   # configs/tiny.py: max_seq_len


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`jaxserve serve tiny` (the console script), as a user starts it."""
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "jaxserve"), "serve", "tiny", f"--port={port}",
                                 "--max_body_bytes=65536", "--config.engine.max_batch=64"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
    except Exception:
        proc.kill()
        raise RuntimeError(log.read_text()[-3000:])
    yield url
    proc.send_signal(signal.SIGINT)
    try:
        assert proc.wait(30) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def inproc(tiny_config):
    """create_app + uvicorn in a thread of this process, whose engine tests can reach."""
    import uvicorn
    from jaxserve.llm import engine_from_config
    from jaxserve.server import create_app
    engine = engine_from_config(tiny_config)
    app = create_app(engine, MODEL, max_waiting=2, default_max_tokens=8)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    yield types.SimpleNamespace(url=url, engine=engine, engine_loop=app.state.server.engine_loop)
    uv.should_exit = True
    thread.join(30)


def metrics(url: str) -> dict:
    """{(sample name, frozenset(labels)): value} from /metrics, parsed as Prometheus does."""
    text = httpx.get(url + "/metrics").text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def metric(url, name, **labels):
    return metrics(url).get((name, frozenset(labels.items())))


def wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


# -- the official client ----------------------------------------------------------------------
def test_completions_streamed_and_whole_agree(client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    kw = dict(model=MODEL, prompt="The capital of France is", max_tokens=12, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 12
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices


def test_chat_streamed_and_whole_agree(client):
    kw = dict(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                     {"role": "user", "content": "What is 2+2?"}],
              max_tokens=10, temperature=0, seed=3, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 10
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 10


def test_token_id_prompt_logprobs_and_seeded_sampling(client):
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 5000, size=40)]
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=0,
                                    extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert out.usage.prompt_tokens == 40 and len(lp.token_logprobs) == 6 and all(x <= 0 for x in lp.token_logprobs)
    assert "".join(lp.tokens) == out.choices[0].text
    sampled = [client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=1.0, seed=s,
                                         extra_body={"top_k": 50, "ignore_eos": True}).choices[0].text
               for s in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                          logprobs=True, extra_body={"ignore_eos": True})
    assert len(chat.choices[0].logprobs.content) == 4


def test_penalties_give_the_engines_tokens_streamed_or_not(client, tiny):
    from test_engine import make_engine, run_all
    from jaxserve import SamplingParams
    prompt = [int(t) for t in np.random.default_rng(1).integers(3, 5000, size=30)]
    penalties = dict(presence_penalty=-2, frequency_penalty=-1)  # a random model repeats only when pushed
    kw = dict(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, **penalties,
              extra_body={"repetition_penalty": 0.5, "ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    ref = run_all(make_engine(tiny), [("a", prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                                    repetition_penalty=0.5, **penalties))])["a"]
    plain = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    assert whole == streamed == ref.text != plain
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True})
    answers = [client.chat.completions.create(**chat, frequency_penalty=f).choices[0].message.content for f in (-2, -2, 0)]
    assert answers[0] == answers[1] != answers[2]


def test_top_logprobs_in_both_routes_streamed_or_not(client):
    prompt = [int(t) for t in np.random.default_rng(2).integers(3, 5000, size=20)]
    kw = dict(model=MODEL, prompt=prompt, max_tokens=6, temperature=0, logprobs=3, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0].logprobs
    assert len(whole.top_logprobs) == 6 and all(len(top) == 3 for top in whole.top_logprobs)
    for token, lp, top in zip(whole.tokens, whole.token_logprobs, whole.top_logprobs):
        assert max(top.values()) == pytest.approx(lp, abs=1e-5) and top.get(token) == pytest.approx(lp, abs=1e-5)
    streamed = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices[0].logprobs]
    streamed_top = [t for c in streamed for t in c.top_logprobs]
    assert [sorted(t) for t in streamed_top] == [sorted(t) for t in whole.top_logprobs]
    assert all(t[k] == pytest.approx(w[k], abs=1e-5) for t, w in zip(streamed_top, whole.top_logprobs) for k in w)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0.9, seed=3,
                logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = client.chat.completions.create(**chat).choices[0].logprobs.content
    assert len(content) == 5 and all(len(c.top_logprobs) == 2 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob and c.logprob <= c.top_logprobs[0].logprob + 1e-5
               for c in content)
    chunks = [c.choices[0].logprobs for c in client.chat.completions.create(**chat, stream=True)
              if c.choices and c.choices[0].logprobs]
    pairs = lambda items: [(t.token, t.logprob) for x in items for t in x.top_logprobs]
    got, want = pairs([x for c in chunks for x in c.content]), pairs(content)
    assert [t for t, _ in got] == [t for t, _ in want] and [v for _, v in got] == pytest.approx([v for _, v in want])
    without = client.chat.completions.create(**{**chat, "logprobs": False}).choices[0].logprobs
    assert without is None  # top_logprobs needs logprobs


def test_n_choices_are_the_seeded_requests_of_seed_plus_i_streamed_or_not(client):
    # reference: one request per choice, choice i of a seeded request drawing from seed + i
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0,
              extra_body={"top_k": 50, "ignore_eos": True})
    alone = [client.completions.create(**kw, seed=11 + i).choices[0].text for i in range(3)]
    assert len(set(alone)) == 3
    whole = client.completions.create(**kw, seed=11, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2] and [c.text for c in whole.choices] == alone
    one = client.completions.create(**kw, seed=11).usage
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens == one.prompt_tokens  # counted once
    chunks = list(client.completions.create(**kw, seed=11, n=3, stream=True, stream_options={"include_usage": True}))
    texts = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in range(3)]
    assert texts == alone and chunks[-1].usage.completion_tokens == 24
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1, 2]
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6,
                temperature=1.0, seed=5, extra_body={"ignore_eos": True})
    alone = [client.chat.completions.create(**dict(chat, seed=5 + i)).choices[0].message.content for i in range(2)]
    both = client.chat.completions.create(**chat, n=2)
    assert [c.message.content for c in both.choices] == alone and both.usage.completion_tokens == 12
    chunks = list(client.chat.completions.create(**chat, n=2, stream=True))
    assert sorted(c.choices[0].index for c in chunks if c.choices[0].delta.role == "assistant") == [0, 1]
    assert ["".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
            for i in range(2)] == alone


def test_stop_string_is_cut_from_streamed_text_too(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=24, temperature=0, extra_body={"ignore_eos": True})
    free = client.completions.create(**kw).choices[0].text
    stop = free[len(free) // 2: len(free) // 2 + 4]
    assert stop.strip(), free
    whole = client.completions.create(**kw, stop=[stop])
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[stop], stream=True))
    assert whole.choices[0].finish_reason == "stop"
    assert streamed == whole.choices[0].text == free[:free.index(stop)]


def test_min_tokens_keeps_a_stop_string_from_ending_the_answer_early(client):
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    free = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    stop = free.strip()[:2]
    early = client.completions.create(**kw, stop=[stop])
    held = client.completions.create(**kw, stop=[stop], extra_body={"min_tokens": 8})
    assert early.choices[0].finish_reason == "stop" and early.usage.completion_tokens < 8
    assert held.usage.completion_tokens == 8 and len(held.choices[0].text) > len(early.choices[0].text)


def test_200_concurrent_streams_all_finish_with_their_token_counts(server):
    async def main():
        async with openai.AsyncOpenAI(base_url=server + "/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*[one(aclient, i) for i in range(200)])

    async def one(aclient, i):
        stream = await aclient.completions.create(
            model=MODEL, prompt=f"Request {i}:", max_tokens=1 + i % 6, temperature=0.5, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        pieces, usage, reason = 0, None, None
        async for chunk in stream:
            if chunk.choices:
                pieces += 1
                reason = chunk.choices[0].finish_reason or reason
            usage = chunk.usage or usage
        return pieces, usage.completion_tokens, reason
    results = asyncio.run(main())
    for i, (pieces, tokens, reason) in enumerate(results):
        assert tokens == 1 + i % 6 and reason == "length", (i, tokens, reason)
        assert 1 <= pieces <= tokens
    assert wait_for(lambda: metric(server, "jaxserve_kv_pages_in_use", pool="device") == 0)
    assert metric(server, "jaxserve_requests", state="running") == 0


# -- disconnects ------------------------------------------------------------------------------
def test_disconnect_mid_stream_aborts_and_frees_pages(server):
    aborted = metric(server, "jaxserve_requests_finished_total", reason="abort") or 0
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()   # kept referenced: a dropped iterator would close the connection
        events = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert len(events) == 3 and "[DONE]" not in events[-1]
        assert metric(server, "jaxserve_kv_pages_in_use", pool="device") > 0   # it holds pages now
        assert metric(server, "jaxserve_requests", state="running") == 1
    # leaving the block closed the connection mid-stream
    assert wait_for(lambda: metric(server, "jaxserve_kv_pages_in_use", pool="device") == 0)
    assert metric(server, "jaxserve_requests_finished_total", reason="abort") == aborted + 1
    assert metric(server, "jaxserve_requests", state="running") == 0


def test_disconnect_while_waiting_for_a_whole_answer_aborts(server):
    aborted = metric(server, "jaxserve_requests_finished_total", reason="abort") or 0
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):   # the client gives up long before 500 tokens
        httpx.post(server + "/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    assert wait_for(lambda: metric(server, "jaxserve_requests_finished_total", reason="abort") == aborted + 1)
    assert wait_for(lambda: metric(server, "jaxserve_kv_pages_in_use", pool="device") == 0)


# -- bad input --------------------------------------------------------------------------------
C, CHAT = "/v1/completions", "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("path, body, status, param", [
    (C, b"{not json", 400, None),
    (C, b"[1, 2]", 400, None),
    (C, b"", 400, None),
    (C, {"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": True}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    (C, {"prompt": "hi", "stop": ["x", ""]}, 400, "stop"),
    (C, {"prompt": 5}, 400, "prompt"),
    (C, {"prompt": "hi", "model": "gpt-4"}, 404, "model"),
    (C, {"prompt": list(range(3, 3 + CONTEXT))}, 400, "prompt"),
    (C, {"prompt": "hi " * 600}, 400, "prompt"),
    (C, {"prompt": [5, 10 ** 6]}, 400, "prompt"),
    (C, {"prompt": [5, -1]}, 400, "prompt"),
    (C, {"prompt": ""}, 400, "prompt"),
    (C, {"prompt": ["a", "b"]}, 400, "prompt"),
    (C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    (C, {"prompt": "hi", "max_tokens": CONTEXT}, 400, "max_tokens"),          # more than the context leaves
    (CHAT, {"messages": USER, "max_completion_tokens": CONTEXT}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "max_tokens": CONTEXT}, 400, "max_tokens"),
    (C, {"prompt": "hi", "temperature": -0.5}, 400, "temperature"),
    (C, b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (C, {"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    (C, {"prompt": "hi", "top_k": 2 ** 40}, 400, "top_k"),
    (C, {"prompt": "hi", "seed": 2 ** 32}, 400, "seed"),
    (C, {"prompt": "hi", "n": 0}, 400, "n"),
    (CHAT, {"messages": USER, "n": 129}, 400, "n"),
    (C, {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}, 400, "min_tokens"),
    (CHAT, {"messages": USER, "min_tokens": -1}, 400, "min_tokens"),
    (C, {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (CHAT, {"messages": USER, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    (C, {"prompt": "hi", "presence_penalty": 2.5}, 400, "presence_penalty"),
    (CHAT, {"messages": USER, "frequency_penalty": -3}, 400, "frequency_penalty"),
    (CHAT, {"messages": USER, "repetition_penalty": 0}, 400, "repetition_penalty"),
    (C, {"prompt": "hi", "stop": [""]}, 400, "stop"),
    (C, {"prompt": "hi", "stream_options": {"include_usage": "yes"}}, 400, "stream_options"),
    (C, b'{"prompt": "\\ud800"}', 400, "prompt"),
    (C, b'{"prompt": "hi", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),
    (C, b"[" * 30000 + b"]" * 30000, 400, None),
    (C, {"prompt": "x" * 70000}, 413, None),
    (CHAT, {"messages": []}, 400, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": "hi " * 600}]}, 400, "messages"),
    (CHAT, {"messages": USER, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    (CHAT, {"messages": USER, "model": "nope"}, 404, "model"),
])
def test_bad_input_gets_an_openai_error_naming_the_field(server, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(server + path, content=content, headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"], error
    if param:
        assert param in error["message"]


def test_wrong_content_type_unknown_route_and_method(server):
    r = httpx.post(server + C, content=b'{"prompt": "hi"}', headers={"Content-Type": "text/plain"})
    assert r.status_code == 400 and "application/json" in r.json()["error"]["message"]
    assert httpx.get(server + "/v1/nothing").status_code == 404
    assert httpx.get(server + C).status_code == 405

    def chunked():   # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 5000
    r = httpx.post(server + C, content=chunked(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_fuzzed_bodies_never_get_a_5xx_and_every_status_is_documented(server):
    spec = httpx.get(server + "/openapi.json").json()
    rng = np.random.default_rng(0)
    odd = [None, True, False, 0, -1, 1, 2 ** 63, 1.5, -1e308, "", "x", "\u0000", [], [1], ["a"], [[1]], {},
           {"include_usage": 1}, [{"role": "user"}], [{"role": "user", "content": None}]]
    fields = ["prompt", "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
              "seed", "stop", "stop_token_ids", "n", "stream_options", "logprobs", "top_logprobs", "priority",
              "ignore_eos", "echo", "best_of", "presence_penalty", "frequency_penalty", "repetition_penalty"]
    seen = set()
    with httpx.Client(base_url=server, timeout=60) as http:
        for i in range(120):
            path = C if i % 2 else CHAT
            body = {"prompt": "hi"} if path == C else {"messages": USER}
            body.update(max_tokens=2, stream=True)
            for field in rng.choice(fields, size=int(rng.integers(1, 4)), replace=False):
                body[str(field)] = odd[int(rng.integers(len(odd)))]
            body["stream"] = True   # a valid request only starts streaming; closing it aborts it
            with http.stream("POST", path, json=body) as r:
                assert r.status_code < 500, (body, r.read())
                seen.add((path, r.status_code))
    assert {status for _, status in seen} >= {200, 400}
    for path, status in seen:
        assert str(status) in spec["paths"][path]["post"]["responses"], (path, status)
    assert httpx.post(server + C, json={"prompt": "still here", "max_tokens": 2}).status_code == 200


def test_openapi_describes_every_endpoint(server):
    spec = httpx.get(server + "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= set(spec["paths"])
    schemas = spec["components"]["schemas"]
    completion = spec["paths"]["/v1/completions"]["post"]
    assert completion["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/CompletionRequest")
    assert {"200", "400", "404", "413", "429"} <= set(completion["responses"]) and "422" not in completion["responses"]
    assert "text/event-stream" in completion["responses"]["200"]["content"]
    props = schemas["CompletionRequest"]["properties"]
    assert {"prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "logprobs", "stream",
            "stream_options"} <= set(props)
    assert props["top_p"]["anyOf"][0]["exclusiveMinimum"] == 0
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert "HTTPValidationError" not in schemas


def test_metrics_in_prometheus_format(server, client):
    client.completions.create(model=MODEL, prompt="count me", max_tokens=5, extra_body={"ignore_eos": True})
    m = metrics(server)
    names = {name for name, _ in m}
    for name in ("jaxserve_time_to_first_token_seconds_count", "jaxserve_time_per_output_token_seconds_count",
                 "jaxserve_job_completion_time_seconds_count"):
        assert m[(name, frozenset())] > 0, name
    assert {"jaxserve_preemptions_total", "jaxserve_reparallelizations_total", "jaxserve_swap_bytes_total",
            "jaxserve_kv_pages_total", "jaxserve_generation_tokens_total", "jaxserve_prefix_cache_hit_tokens_total",
            "jaxserve_prefix_cache_queried_tokens_total", "jaxserve_prefix_cache_host_hit_tokens_total"} <= names
    assert m[("jaxserve_prefix_cache_queried_tokens_total", frozenset())] >= 2  # on by default: "count me" looked up
    assert ("jaxserve_requests", frozenset({("state", "waiting")})) in m
    assert m[("jaxserve_kv_pages_total", frozenset())] == 512
    assert m[("jaxserve_requests_finished_total", frozenset({("reason", "length")}))] >= 1
    # the series vLLM's dashboards read, under vLLM's names, labelled with the served model
    from jaxserve.server.metrics import VLLM_NAMES
    model = ("model_name", MODEL)
    labelled = {name for name, labels in m if model in labels}
    for name in VLLM_NAMES:
        assert {name, name + "_total", name + "_count"} & labelled, name
    assert m[("vllm:generation_tokens_total", frozenset({model}))] == m[("jaxserve_generation_tokens_total", frozenset())]
    assert m[("vllm:prompt_tokens_total", frozenset({model}))] == m[("jaxserve_prompt_tokens_total", frozenset())]
    assert 0 <= m[("vllm:kv_cache_usage_perc", frozenset({model}))] <= 1
    assert m[("vllm:request_success_total", frozenset({model, ("finished_reason", "length")}))] >= 1


# -- overload and engine failure (in-process server) ------------------------------------------
def test_queue_bound_answers_429_and_recovers(inproc):
    engine, gate = inproc.engine, threading.Event()
    real_step = engine.step
    engine.step = lambda: (gate.wait(), real_step())[1]   # hold the engine so requests pile up
    try:
        async def main():
            async with httpx.AsyncClient(base_url=inproc.url, timeout=60) as http:
                body = {"prompt": "wait", "max_tokens": 2}
                held = [asyncio.create_task(http.post(C, json=body)) for _ in range(2)]
                while inproc.engine_loop.num_waiting < 2:
                    await asyncio.sleep(0.05)
                refused = await http.post(C, json=body)
                gate.set()
                return refused, await asyncio.gather(*held)
        refused, held = asyncio.run(main())
    finally:
        engine.step = real_step
        gate.set()
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
    assert [r.status_code for r in held] == [200, 200]
    assert httpx.post(inproc.url + C, json={"prompt": "after", "max_tokens": 2}).status_code == 200
    assert metric(inproc.url, "jaxserve_requests_rejected_total", reason="queue_full") == 1


def test_engine_failure_fails_its_requests_and_the_server_goes_on(inproc):
    """A fault inside the device step (after the pool was donated to it): its requests fail with
    a clear error, the engine rebuilds the pool and goes on serving."""
    from jaxserve.engine.faults import DeviceFault
    engine = inproc.engine
    with DeviceFault() as fault:
        fault.armed = True
        whole = httpx.post(inproc.url + C, json={"prompt": "boom", "max_tokens": 3}, timeout=60)
        with httpx.stream("POST", inproc.url + CHAT, json={"messages": USER, "stream": True}, timeout=60) as r:
            events = [line for line in r.iter_lines() if line.startswith("data:")]
    assert whole.status_code == 500 and whole.json()["error"]["code"] == "engine_failure"
    assert r.status_code == 200 and any('"error"' in e for e in events) and events[-1] == "data: [DONE]"
    assert engine.allocator.num_used == 0 and not engine.has_unfinished()
    assert httpx.get(inproc.url + "/health").status_code == 200
    ok = httpx.post(inproc.url + C, json={"prompt": "fine again", "max_tokens": 3, "ignore_eos": True}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3


def test_a_chat_request_without_max_tokens_gets_the_default_not_the_context(inproc):
    r = httpx.post(inproc.url + CHAT, json={"messages": USER, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8


def test_mlfq_queue_lengths_are_exported_when_the_policy_has_them(inproc):
    inproc.engine.policy.queue_lengths = lambda: [2, 0, 1]
    try:
        httpx.post(inproc.url + C, json={"prompt": "tick", "max_tokens": 1})
        assert wait_for(lambda: metric(inproc.url, "jaxserve_mlfq_queue_length", level="2") == 1)
    finally:
        del inproc.engine.policy.queue_lengths


# -- the load client --------------------------------------------------------------------------
def test_bench_serve_replays_a_trace(server, tmp_path):
    trace = tmp_path / "trace.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                     "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n"
                     "2023-11-16 18:15:51.2224670,879,55\n2023-11-16 18:15:51.3910170,91,3\n"
                     "2023-11-16 18:15:52.0000000,20,7\n2023-11-16 18:15:53.5000000,1000,1\n")
    result = tmp_path / "result.json"
    from test_cli import jaxserve
    proc = jaxserve("bench", "serve", f"--base_url={server}", f"--trace={trace}", "--num_requests=6",
                    "--request_rate=10", "--max_input_len=64", "--max_output_len=8", f"--result_json={result}",
                    cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Request throughput" in proc.stdout and "p99 TTFT" in proc.stdout
    summary = json.loads(result.read_text())["summary"]
    assert summary["completed"] == 6 and summary["failed"] == 0
    assert summary["total_output_tokens"] == 8 + 8 + 8 + 3 + 7 + 1   # capped at 8, ignore_eos
    assert summary["p50_ttft_ms"] > 0 and summary["mean_jct_ms"] >= summary["mean_ttft_ms"]
    assert not math.isnan(summary["output_throughput"])
