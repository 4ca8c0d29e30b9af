"""/openapi.json is the server's contract: what it allows the server accepts, and what the
server sends matches it, streamed events included. Schemathesis generates requests from the
schema (valid and invalid) against the real server and checks every answer against it."""
import json
import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (content_type_conformance, not_a_server_error, positive_data_acceptance,
                                 response_schema_conformance, status_code_conformance, unsupported_method)

from jaxserve.server import protocol as p
from test_server import server  # noqa: F401 (the module's server: `jaxserve serve tiny`)

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          positive_data_acceptance, unsupported_method]
# what a streamed route's events are: its chunks, or an error that ends the stream
EVENTS = {"/v1/completions": p.CompletionResponse, "/v1/chat/completions": p.ChatCompletionChunk}


def content_type(response) -> str:
    return (response.headers.get("content-type") or [""])[0]


def beyond_the_schema(case, response) -> bool:
    """A 400 for what no JSON schema can state, and only when the request does break it: the
    prompt and output beyond the context (a token count), min_tokens above max_tokens (two
    fields), text with lone surrogates (JSON escapes them; no tokenizer encodes them)."""
    if response.status_code != 400 or "json" not in content_type(response):
        return False
    error = response.json()["error"]
    message = error["message"]
    window = re.search(r"window is (\d+) tokens and the prompt has (\d+).*; (\d+) were requested", message)
    if error.get("code") == "context_length_exceeded":
        return window is not None and int(window[3]) > int(window[1]) - int(window[2])
    bounds = re.search(r"min_tokens=(\d+): must be an integer in \[0, max_tokens=(\d+)\]", message)
    if error.get("param") == "min_tokens" and bounds:
        return int(bounds[1]) > int(bounds[2])
    if "lone surrogates" in message:
        return re.search(r"\\ud[89a-f][0-9a-f]{2}", json.dumps(case.body)) is not None
    return False


def test_the_server_keeps_the_contract_its_openapi_schema_states(server):  # noqa: F811
    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def keeps_it(case):
            if isinstance(case.body, dict):  # still valid, and quick to answer: at most 4 choices of 8 tokens
                case.body.update({k: min(v, limit) for k, limit in (("n", 4), ("max_tokens", 8),
                                                                     ("max_completion_tokens", 8))
                                  if isinstance(v := case.body.get(k), (int, float)) and not isinstance(v, bool)})
            response = case.call(base_url=server, timeout=60)
            checks = [c for c in CHECKS if not (c is positive_data_acceptance and beyond_the_schema(case, response))]
            case.validate_response(response, checks=checks)
            if response.status_code == 200 and content_type(response).startswith("text/event-stream"):
                # schemathesis reads the first events only: each must be a chunk of the route's model
                for line in response.text.splitlines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        EVENTS[operation.path].model_validate_json(line[len("data: "):])
        keeps_it()


def test_integers_written_as_integral_floats_are_integers(server):  # noqa: F811
    # JSON Schema's "integer" includes 3.0: so does the server
    import httpx
    body = {"prompt": [5, 6.0, 7], "max_tokens": 3.0, "n": 2.0, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server + "/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert [c["index"] for c in r.json()["choices"]] == [0, 1] and r.json()["usage"] == {
        "prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
