"""Who may call the server: the API key on /v1 routes, the peer secret on the hand-over route,
and the checks an imported request record goes through (a peer's data is not trusted)."""
import json
import threading

import httpx
import openai
import pytest

from test_server import free_port, wait_healthy

KEY, SECRET = "sk-test-key", "peer-secret-1"


def serve(tiny_config, **auth):
    import uvicorn
    from jaxserve.llm import engine_from_config
    from jaxserve.server import create_app
    engine = engine_from_config(tiny_config)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, "tiny", **auth), host="127.0.0.1", port=port,
                                       log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url)
    return url, engine, lambda: (setattr(uv, "should_exit", True), thread.join(30))


@pytest.fixture(scope="module")
def guarded(tiny_config):
    url, engine, stop = serve(tiny_config, api_key=KEY, peer_secret=SECRET)
    yield url, engine
    stop()


def record(**changes):
    rec = {"id": "cmpl-peer-1", "prompt": [5, 6, 7], "params": {"max_tokens": 4, "temperature": 0.0},
           "seed": 1, "arrival": 0.0, "priority": 0, "ids": [], "logprobs": []}
    rec.update(changes)
    return {"requests": [rec]}


def test_v1_routes_need_the_api_key_and_probes_stay_open(guarded):
    url, _ = guarded
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.post(url + "/v1/completions", json={"prompt": "hi"}).status_code == 401
    assert httpx.get(url + "/v1/requests/anything/stream").status_code == 401
    assert httpx.head(url + "/v1/models").status_code == 401
    # a method no route serves is 405 for anyone (the schema lists the methods; nothing runs)
    assert httpx.request("TRACE", url + "/v1/models").status_code == 405
    assert httpx.request("DELETE", url + "/v1/requests/import").status_code == 405
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.get(url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=3, temperature=0)
    assert out.usage.completion_tokens >= 1


def test_the_peer_route_needs_the_peer_secret_not_the_api_key(guarded):
    url, engine = guarded
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(url + "/v1/requests/import", json=record(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_peer_secret", headers
    assert "cmpl-peer-1" not in engine.requests


@pytest.mark.parametrize("changes, param", [
    ({"seed": 2 ** 40}, "requests.0.seed"),                     # crashed the step before
    ({"seed": -1}, "requests.0.seed"),
    ({"prompt": list(range(5, 600))}, "requests.0.prompt"),     # longer than the context: blocked FCFS
    ({"prompt": [5, 10 ** 9]}, "requests.0.prompt"),
    ({"prompt": []}, "requests.0.prompt"),
    ({"prompt": "text"}, "requests.0.prompt"),
    ({"ids": [1, -4]}, "requests.0.output_ids"),
    ({"ids": [1, 2, 3, 4, 5]}, "requests.0.output_ids"),        # more than max_tokens
    ({"id": ""}, "requests.0.request_id"),
    ({"arrival": float("nan")}, "requests.0.arrival"),
    ({"priority": "high"}, "requests.0.priority"),
    ({"params": {"max_tokens": 0}}, "requests.0.max_tokens"),
    ({"params": {"max_tokens": 4, "logprobs": True}, "ids": [3], "logprobs": []}, "requests.0.logprobs"),
    ({"params": "greedy"}, "requests.0.params"),
    ({"params": {"max_tokens": 4, "colour": "red"}}, "requests.0"),
])
def test_an_imported_record_is_checked_like_a_new_request(guarded, changes, param):
    url, engine = guarded
    auth = {"Authorization": f"Bearer {SECRET}"}
    body = record(**changes)
    # sent as Python's json writes it: NaN included, as a careless peer would
    r = httpx.post(url + "/v1/requests/import", content=json.dumps(body),
                   headers={**auth, "Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert "cmpl-peer-1" not in engine.requests
    ok = httpx.post(url + "/v1/completions", json={"prompt": "still serving", "max_tokens": 2},
                    headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert ok.status_code == 200


def test_a_good_record_with_the_secret_is_taken_over_and_finishes(guarded):
    url, engine = guarded
    r = httpx.post(url + "/v1/requests/import", json=record(id="cmpl-peer-ok"),
                   headers={"Authorization": f"Bearer {SECRET}"})
    assert r.status_code == 200 and r.json() == {"accepted": 1, "finished": 0}
    with httpx.stream("GET", url + "/v1/requests/cmpl-peer-ok/stream", headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as s:
        lines = [line for line in s.iter_lines() if line.startswith("data:")]
    assert s.status_code == 200 and lines[-1] == "data: [DONE]"


def test_without_a_peer_secret_the_peer_route_is_closed(tiny_config):
    url, engine, stop = serve(tiny_config)
    try:
        r = httpx.post(url + "/v1/requests/import", json=record())
        assert r.status_code == 403 and r.json()["error"]["code"] == "peer_disabled"
        assert httpx.get(url + "/v1/models").status_code == 200  # no API key set: open
    finally:
        stop()


def test_a_peer_hands_over_the_output_of_a_request_that_ended_while_it_drained(guarded):
    url, _ = guarded
    auth = {"Authorization": f"Bearer {SECRET}"}
    done = {"id": "cmpl-ended", "prompt": [5, 6], "ids": [7, 8], "text": "seven eight", "reason": "length",
            "logprobs": None, "arrival": 0.0}
    r = httpx.post(url + "/v1/requests/import", json={"requests": [], "finished": [done]}, headers=auth)
    assert r.status_code == 200 and r.json() == {"accepted": 0, "finished": 1}
    for _ in range(2):  # every reconnect gets it
        with httpx.stream("GET", url + "/v1/requests/cmpl-ended/stream", headers={"Authorization": f"Bearer {KEY}"},
                          timeout=30) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert "".join(c["choices"][0]["text"] for c in chunks) == "seven eight"
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    bad = httpx.post(url + "/v1/requests/import", json={"requests": [], "finished": [{**done, "ids": "x"}]},
                     headers=auth)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "finished.0.ids"
