"""The token journal: a crashed engine's requests finish on a new one without regenerating tokens."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxserve.engine.engine import Engine, EngineConfig
from jaxserve.engine.journal import TokenJournal, replay
from jaxserve.sampling_params import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def requests():
    rng = np.random.default_rng(5)
    out = []
    for i in range(5):
        params = SamplingParams(max_tokens=24, temperature=0.0 if i % 2 else 0.8, seed=100 + i, logprobs=True)
        out.append((f"r{i}", rng.integers(3, 1000, size=int(rng.integers(4, 40))).tolist(), params))
    return out


def run(engine, reqs, steps=None):
    for rid, prompt, params in reqs:
        engine.add_request(rid, prompt, params)
    done, n = {}, 0
    while engine.has_unfinished() and (steps is None or n < steps):
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        n += 1
    return done


def test_resume_from_journal_equals_uninterrupted_and_regenerates_nothing(tiny, tmp_path):
    cfg, params, mesh, tokenizer = tiny
    config = EngineConfig(token_budget=32, max_chunk=16, max_batch=4)
    reference = run(Engine(cfg, params, mesh, tokenizer, config), requests())
    path = str(tmp_path / "journal.jsonl")
    crashed = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    early = run(crashed, requests(), steps=12)  # then the process "dies": nothing is closed
    pending = replay(path)
    assert pending and {p.request_id for p in pending} | set(early) == {rid for rid, _, _ in requests()}
    committed = {p.request_id: list(p.output_ids) for p in pending}
    assert any(committed.values())  # some had tokens when it died
    fresh = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    assert fresh.resume(pending) == len(pending)
    done = run(fresh, [])
    for rid in committed:
        assert done[rid].token_ids == reference[rid].token_ids, rid
        assert done[rid].token_ids[:len(committed[rid])] == committed[rid]
        assert done[rid].text == reference[rid].text
    assert replay(path) == []  # every request ended
    # each resumed request's tokens are in the journal exactly once: nothing committed before the
    # crash was redone (opening it compacted the finished requests away; the resumed ones' earlier
    # tokens moved into their add records)
    counts = {}
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["op"] in ("tokens", "add"):
                counts[rec["id"]] = counts.get(rec["id"], 0) + len(rec.get("ids", []))
    for rid in committed:
        assert counts[rid] == len(reference[rid].token_ids), rid


def test_replay_skips_a_torn_last_line_and_names_a_bad_one(tmp_path):
    path = str(tmp_path / "j.jsonl")
    from jaxserve.engine.request import Request
    j = TokenJournal(path)
    j.added(Request("a", [5, 6], SamplingParams(max_tokens=4, seed=1), 1, 0.0))
    j.committed("a", [7], [-0.5])
    j.added(Request("b", [5], SamplingParams(max_tokens=4, seed=2), 2, 1.0))
    j.finished("b", "length")
    j.sync()
    with open(path, "a") as f:
        f.write('{"op":"tokens","id":"a","ids":[8')  # the crash cut this write short
    (a,) = replay(path)
    assert (a.request_id, a.output_ids, a.logprobs) == ("a", [7], [-0.5])
    with open(path, "a") as f:
        f.write('\n{"op":"end","id":"a","reason":"stop"}\n')
    with pytest.raises(ValueError, match="j.jsonl:5"):
        replay(path)
    with pytest.raises(ValueError, match="fsync_every"):
        TokenJournal(str(tmp_path / "k.jsonl"), fsync_every=-1)


def _request(rid, arrival=0.0):
    from jaxserve.engine.request import Request
    return Request(rid, [5, 6], SamplingParams(max_tokens=64, seed=1), 1, arrival)


def test_the_journal_survives_repeated_crashes_with_torn_writes(tmp_path):
    """Crash, restart, crash again, each time mid-write: every restart reads every whole record."""
    path = str(tmp_path / "j.jsonl")
    j = TokenJournal(path)
    j.added(_request("a"))
    j.committed("a", [7], [-0.5])
    j.sync()
    with open(path, "a") as f:
        f.write('{"op":"tokens","id":"a","ids":[8')  # the first crash cut this write short
    for crash in range(3):  # restarted servers append, and crash mid-write again
        j = TokenJournal(path)
        (a,) = replay(path)
        assert a.output_ids == [7] + list(range(100, 100 + crash)), crash
        j.committed("a", [100 + crash], [-0.1])
        j.sync()
        with open(path, "a") as f:
            f.write('{"op":"end","id":"a","rea')  # torn again
    (a,) = replay(path)
    assert a.output_ids == [7, 100, 101, 102] and a.finish_reason is None
    j = TokenJournal(path)
    j.finished("a", "stop")
    assert replay(path) == []


def test_a_fragment_glued_to_a_record_by_an_older_writer_keeps_the_record(tmp_path):
    path = str(tmp_path / "j.jsonl")
    j = TokenJournal(path)
    j.added(_request("a"))
    j.close()
    with open(path, "a") as f:  # a torn write, then a writer that did not seal it appended
        f.write('{"op":"tokens","id":"a","ids":[8' + '{"op":"tokens","id":"a","ids":[9],"logprobs":[-1.0]}\n')
        f.write('{"op":"tokens","id":"a","ids":[10],"logprobs":[-1.0]}\n')
    (a,) = replay(path)
    assert a.output_ids == [9, 10]


def test_compaction_keeps_the_journal_near_the_size_of_the_unfinished_requests(tmp_path, monkeypatch):
    from jaxserve.engine import journal
    monkeypatch.setattr(journal, "KEEP_FINISHED", 4)  # the finished ones kept for reconnects
    path = str(tmp_path / "j.jsonl")
    j = TokenJournal(path, compact_bytes=4096)
    j.added(_request("long-lived", arrival=-1.0))
    sizes = []
    for i in range(400):  # many short requests come and go beside one that stays
        j.added(_request(f"r{i}", arrival=float(i)))
        j.committed(f"r{i}", [1, 2, 3], [-0.1] * 3)
        j.committed("long-lived", [i], [-0.2])
        j.finished(f"r{i}", "length")
        sizes.append(os.path.getsize(path))
    assert max(sizes) < 3 * 4096 + 4096, max(sizes)
    assert not os.path.exists(path + ".compact")
    (r,) = replay(path)
    assert r.request_id == "long-lived" and r.output_ids == list(range(400))
    assert r.logprobs == [-0.2] * 400
    assert [x.request_id for x in j.finished_requests()] == ["r396", "r397", "r398", "r399"]
    j.close()
    j = TokenJournal(path)  # reopened: the same state
    (r,) = replay(path)
    assert r.output_ids == list(range(400))
    done = j.finished_requests()
    assert [(x.request_id, x.output_ids, x.finish_reason) for x in done][-1] == ("r399", [1, 2, 3], "length")
    assert len(done) == 4


ORBAX_CONFIG = """
from jaxserve.config import default_config


def get_config():
    c = default_config()
    c.checkpoint.format = "orbax"
    c.checkpoint.path = {path!r}
    c.model = dict(dtype="float32", max_seq_len=512)
    return c
"""


def _start_server(port, journal, log, checkpoint, model_axis):
    """launch/serve.py on the tiny model's orbax checkpoint, over `model_axis` of 2 CPU devices."""
    config = os.path.join(os.path.dirname(checkpoint), "tiny_orbax.py")
    with open(config, "w") as f:
        f.write(ORBAX_CONFIG.format(path=checkpoint))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    with open(log, "a") as out:
        return subprocess.Popen([sys.executable, "launch/serve.py", f"--config={config}", "--served_model_name=tiny",
                                 f"--port={port}", f"--config.mesh.model={model_axis}", f"--journal={journal}",
                                 "--journal_fsync_every=1"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)


def _sse_chunks(response):
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def test_kill_9_mid_stream_then_restart_finishes_the_request(tiny_host, tmp_path):
    """A real server process is killed with SIGKILL mid-generation; a restarted one (same journal,
    params restored from the orbax checkpoint onto a different mesh) resumes the request, the
    client reconnects with its id and gets the rest; no token is generated twice and the text
    equals an uninterrupted run's."""
    import httpx
    from jaxserve.checkpoint import store
    from test_server import free_port, wait_healthy
    journal, log = str(tmp_path / "journal.jsonl"), str(tmp_path / "serve.log")
    checkpoint = str(tmp_path / "ckpt")
    store.save(checkpoint, *tiny_host)
    body = {"model": "tiny", "prompt": "The history of the printing press", "max_tokens": 300,
            "temperature": 0, "stream": True, "logprobs": 0}   # logprobs: one chunk per token
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _start_server(port, journal, log, checkpoint, model_axis=1)
    try:
        wait_healthy(url, proc)
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            chunks = _sse_chunks(r)
            first = next(chunks)
            request_id, before = first["id"], first["choices"][0]["text"]
            for _ in range(10):
                before += next(chunks)["choices"][0]["text"]
            os.kill(proc.pid, signal.SIGKILL)   # mid-generation, no chance to clean up
        proc.wait(30)
        (pending,) = replay(journal)
        assert pending.request_id == request_id and 11 <= len(pending.output_ids) < 300
        proc = _start_server(port, journal, log, checkpoint, model_axis=2)  # the new machine's mesh
        wait_healthy(url, proc)
        rest = ""   # the client reconnects with what it has: 11 tokens
        with httpx.stream("GET", f"{url}/v1/requests/{request_id}/stream?from_token=11", timeout=300) as r:
            assert r.status_code == 200
            finish = None
            for chunk in _sse_chunks(r):
                rest += chunk["choices"][0]["text"]
                finish = chunk["choices"][0]["finish_reason"] or finish
        text = before + rest
        assert finish == "length"
        assert httpx.get(f"{url}/v1/requests/{request_id}/stream").status_code == 404  # finished: gone
        assert httpx.get(f"{url}/v1/requests/nobody/stream").json()["error"]["param"] == "request_id"
        # every token was generated once: the journal holds exactly max_tokens of them
        with open(journal) as f:
            tokens = sum(len(rec["ids"]) for rec in map(json.loads, f) if rec["op"] == "tokens")
        assert tokens == 300 and replay(journal) == []
        # the same request without a crash gives the same text
        uninterrupted = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=300).json()
        assert uninterrupted["choices"][0]["text"] == text   # nothing missing, nothing twice
    finally:
        proc.kill()
        proc.wait(30)


def test_sigterm_stops_within_the_grace_and_leaves_in_flight_work_in_the_journal(tmp_path):
    import httpx
    from test_server import free_port, wait_healthy
    journal, log = str(tmp_path / "journal.jsonl"), str(tmp_path / "serve.log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "launch/serve.py", "--config=configs/tiny.py", f"--port={port}",
                                 f"--journal={journal}", "--journal_fsync_every=0", "--shutdown_grace_s=0.2"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_healthy(url, proc)
        body = {"model": "tiny", "prompt": "Spot VMs", "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            chunks = _sse_chunks(r)
            request_id = next(chunks)["id"]
            for _ in range(5):
                next(chunks)
            t = time.time()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):  # cut off at the end of the grace, not finished
                for _ in chunks:
                    pass
        assert proc.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once shut down
        assert time.time() - t < 20
        (pending,) = replay(journal)   # fsync left to the OS, yet the exit synced it
        assert pending.request_id == request_id and 6 <= len(pending.output_ids) < 480
        assert "journal synced; 1 unfinished requests in it" in open(log).read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sigterm_hands_in_flight_work_to_a_peer(tmp_path):
    """A server told to stop (SIGTERM) hands its unfinished request to its --peer, where the client
    reconnects and gets the rest; neither journal is left with unfinished work."""
    import httpx
    from test_server import free_port, wait_healthy
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAXSERVE_PEER_SECRET="shared-by-both")  # the peer route's key
    ports = free_port(), free_port()
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = []
    for i, extra in ((0, [f"--peer={urls[1]}", "--shutdown_grace_s=0.2"]), (1, [])):
        with open(tmp_path / f"serve{i}.log", "w") as out:
            procs.append(subprocess.Popen(
                [sys.executable, "launch/serve.py", "--config=configs/tiny.py", f"--port={ports[i]}",
                 f"--journal={tmp_path}/journal{i}.jsonl", *extra],
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
    try:
        for url, proc in zip(urls, procs):
            wait_healthy(url, proc)
        body = {"model": "tiny", "prompt": "Hand over", "max_tokens": 480, "temperature": 0, "stream": True}
        with httpx.stream("POST", urls[0] + "/v1/completions", json=body, timeout=120) as r:
            chunks = _sse_chunks(r)
            first = next(chunks)
            request_id, before = first["id"], first["choices"][0]["text"]
            for _ in range(5):
                before += next(chunks)["choices"][0]["text"]
            procs[0].send_signal(signal.SIGTERM)
            with pytest.raises(httpx.HTTPError):
                for _ in chunks:
                    pass
        assert procs[0].wait(30) in (0, -signal.SIGTERM)
        assert "handed 1 unfinished requests" in (tmp_path / "serve0.log").read_text()
        assert replay(str(tmp_path / "journal0.jsonl")) == []   # ended there: "handed_over"
        text = ""
        with httpx.stream("GET", f"{urls[1]}/v1/requests/{request_id}/stream", timeout=300) as r:
            for chunk in _sse_chunks(r):
                text += chunk["choices"][0]["text"]
        assert text.startswith(before)
        uninterrupted = httpx.post(urls[1] + "/v1/completions", json={**body, "stream": False}, timeout=300).json()
        assert uninterrupted["choices"][0]["text"] == text
        assert replay(str(tmp_path / "journal1.jsonl")) == []
        peer = {"Authorization": "Bearer shared-by-both"}
        bad = httpx.post(urls[1] + "/v1/requests/import", json={"requests": [{"id": "x"}]}, headers=peer)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "requests.0"
        stranger = httpx.post(urls[1] + "/v1/requests/import", json={"requests": []})
        assert stranger.status_code == 401
    finally:
        for p in procs:
            p.kill()


def test_every_reconnect_to_a_request_that_finished_while_detached_gets_its_output(tiny, tmp_path):
    """A resumed request ends before its client comes back: the first and the second reconnect
    both get the whole output (before, the second waited forever)."""
    import httpx
    with _server_resuming_two_requests(tiny, tmp_path) as (url, pending, reference, path):
        deadline = time.time() + 120
        while replay(path) and time.time() < deadline:  # they finish with nobody attached
            time.sleep(0.1)
        assert replay(path) == []
        for r in pending:
            for attempt in range(2):
                with httpx.stream("GET", f"{url}/v1/requests/{r.request_id}/stream", timeout=30) as resp:
                    assert resp.status_code == 200, (r.request_id, attempt)
                    chunks = list(_sse_chunks(resp))
                text = "".join(c["choices"][0]["text"] for c in chunks)
                assert text == reference[r.request_id].text, (r.request_id, attempt)
                assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_a_reconnected_stream_keeps_the_requests_logprobs(tiny, tmp_path):
    """A client that asked for logprobs reconnects to its resumed request with the tokens it has:
    every token after them comes with its logprob, as in the stream it started. (Without them a
    counting client under-counted multi-token chunks, asked for too early a token on its next
    reconnect, and got a token's text twice: the fault suite's kill9_twice caught it.)"""
    import httpx
    with _server_resuming_two_requests(tiny, tmp_path) as (url, pending, reference, _):
        assert all(0 < len(r.output_ids) < 24 for r in pending)
        for r in pending:
            have = len(r.output_ids)
            with httpx.stream("GET", f"{url}/v1/requests/{r.request_id}/stream?from_token={have}", timeout=60) as resp:
                assert resp.status_code == 200
                chunks = [c["choices"][0] for c in _sse_chunks(resp)]
            assert all(c["logprobs"] is not None for c in chunks), chunks
            got = [lp for c in chunks for lp in c["logprobs"]["token_logprobs"]]
            np.testing.assert_allclose(got, reference[r.request_id].logprobs[have:], atol=1e-4)
            assert chunks[-1]["finish_reason"] == "length"


@contextlib.contextmanager
def _server_resuming_two_requests(tiny, tmp_path):
    """A server (in this process) whose engine resumed two requests cut off after 6 steps from
    their journal: yields (url, the resumed requests, uninterrupted outputs by id, journal path)."""
    import threading

    import uvicorn
    from jaxserve.server import create_app
    from test_server import free_port, wait_healthy
    cfg, params, mesh, tokenizer = tiny
    config = EngineConfig(token_budget=32, max_chunk=16, max_batch=4)
    reqs = requests()[:2]
    reference = run(Engine(cfg, params, mesh, tokenizer, config), reqs)
    path = str(tmp_path / "journal.jsonl")
    run(Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1)), reqs, steps=6)
    pending = replay(path)
    assert pending
    engine = Engine(cfg, params, mesh, tokenizer, config, journal=TokenJournal(path, fsync_every=1))
    engine.resume(pending)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny"), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url)
        yield url, pending, reference, path
    finally:
        uv.should_exit = True
        thread.join(30)
