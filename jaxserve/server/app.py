"""The FastAPI application: OpenAI-compatible routes over one engine running in its own thread.

    app = create_app(engine, "smollm2_135m")        # then uvicorn.run(app, port=8000)

Handlers validate and tokenize on the event loop, hand the request to the engine thread and
either stream server-sent events or wait for the last output. A client that goes away (mid-
stream or while waiting) aborts its request, which frees its pages.
"""
from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
import time
import uuid
from typing import List, Optional

import jinja2
from fastapi import FastAPI, Query, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from jaxserve.engine.outputs import RequestOutput, finished_record, output_from_finished_record
from jaxserve.sampling_params import SamplingParams, fan_out
from jaxserve.server import errors, protocol as p, responses
from jaxserve.server.auth import PEER_ROUTE, Credentials
from jaxserve.server.engine_loop import EngineFailure, EngineLoop, EngineUnavailable, Overloaded
from jaxserve.server.errors import APIError
from jaxserve.server.metrics import CONTENT_TYPE, ServerMetrics

DEFAULT_MAX_BODY_BYTES = 4 << 20
DEFAULT_MAX_WAITING = 1024  # requests waiting for their first token; beyond it 429

_ERRORS = {
    400: {"model": p.ErrorResponse, "description": "Invalid request; `error.param` names the field."},
    401: {"model": p.ErrorResponse, "description": "The API key (or, for the peer route, the peer secret) is "
                                                   "missing or wrong."},
    403: {"model": p.ErrorResponse, "description": "The peer route is disabled (no peer secret)."},
    404: {"model": p.ErrorResponse, "description": "Unknown model."},
    413: {"model": p.ErrorResponse, "description": "Request body too large."},
    429: {"model": p.ErrorResponse, "description": "Too many requests waiting to start; retry later."},
    500: {"model": p.ErrorResponse, "description": "The engine failed while running the request."},
    503: {"model": p.ErrorResponse, "description": "The engine is not running."},
}
def _sse(chunk: str) -> dict:
    """A streamed answer's media type; its schema is each server-sent event's (as OpenAPI 3.2's
    itemSchema, which conformance checkers apply to `schema`)."""
    data = {"type": "string", "contentMediaType": "application/json",
            "description": f"A {chunk} as JSON; an ErrorResponse if the engine fails mid-stream; `[DONE]` last."}
    return {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {"data": data}},
                                  "description": f"With `stream: true`: `data: <{chunk} JSON>` events, then "
                                                 "`data: [DONE]`."}}
_CLIENT_CLOSED = 499   # nginx's code; nobody receives it
RETRY_LATER = {"Retry-After": "5"}  # 503: the server is shutting down or restarting (its journal resumes the work)


DEFAULT_MAX_TOKENS = 1024  # a chat request that names no limit: at most this many (or what fits)


class OpenAIServer:
    def __init__(self, engine, model_name: str, max_waiting: int = DEFAULT_MAX_WAITING,
                 default_max_tokens: int = DEFAULT_MAX_TOKENS):
        self.model_name, self.default_max_tokens = model_name, default_max_tokens
        self.tokenizer = engine.tokenizer
        self.max_context = engine.max_context
        self.metrics = ServerMetrics(model_name)
        self.engine_loop = EngineLoop(engine, self.metrics, max_waiting)
        self.created = int(time.time())

    # -- routes -------------------------------------------------------------------------------
    async def completions(self, body: p.CompletionRequest, request: Request) -> p.CompletionResponse:
        """Completes a prompt (text or token ids)."""
        self._check_model(body.model)
        prompt_ids = await asyncio.to_thread(self._completion_prompt, body.prompt)
        max_tokens = self._max_tokens(body.max_tokens, "max_tokens", len(prompt_ids), default=16)
        params = self._params(body, max_tokens, logprobs=body.logprobs)
        return await self._serve(request, body, "cmpl", prompt_ids, params, responses.completion,
                                 responses.completion_events)

    async def chat_completions(self, body: p.ChatCompletionRequest, request: Request) -> p.ChatCompletionResponse:
        """Answers a conversation, rendered with the model's chat template."""
        self._check_model(body.model)
        prompt_ids = await asyncio.to_thread(self._chat_prompt, body.messages)
        field = "max_tokens" if body.max_completion_tokens is None and body.max_tokens is not None else \
            "max_completion_tokens"
        max_tokens = self._max_tokens(body.max_completion_tokens or body.max_tokens, field, len(prompt_ids),
                                      default=self.default_max_tokens)
        params = self._params(body, max_tokens, logprobs=(body.top_logprobs or 0) if body.logprobs else None)
        try:
            return await self._serve(request, body, "chatcmpl", prompt_ids, params, responses.chat,
                                     responses.chat_events)
        except APIError as e:
            if e.param == "prompt":   # the engine's name for what the client sent as messages
                e.param, e.message = "messages", "messages" + e.message[len("prompt"):]
            raise

    async def models(self) -> p.ModelList:
        """The one served model."""
        return p.ModelList(data=[p.ModelCard(id=self.model_name, created=self.created,
                                             max_model_len=self.max_context)])

    async def health(self) -> dict:
        """200 while the engine thread runs, else 503."""
        if not self.engine_loop.alive:
            raise APIError(503, "the engine is not running", code="engine_unavailable", headers=RETRY_LATER)
        return {"status": "ok"}

    async def prometheus(self) -> Response:
        """Prometheus text format: request states, queues, KV pages, swaps, preemptions, latencies."""
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # -- request handling (tokenizing runs in a worker thread: long prompts must not stall
    #    the event loop that streams everyone's tokens) ----------------------------------------
    def _check_model(self, model: Optional[str]) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           "model", "model_not_found")

    def _encode(self, text: str, field: str) -> List[int]:
        if self.tokenizer is None:
            raise APIError(400, f"{field}: this model has no tokenizer; send token ids", field)
        return self.tokenizer.encode(text)

    def _completion_prompt(self, prompt: p.Prompt) -> List[int]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: a batch of {len(prompt)} prompts; send one request per prompt",
                               "prompt")
            prompt = prompt[0]
        return self._encode(prompt, "prompt") if isinstance(prompt, str) else list(prompt)

    def _chat_prompt(self, messages: List[p.ChatMessage]) -> List[int]:
        if self.tokenizer is None:
            raise APIError(400, "messages: this model has no tokenizer for chat", "messages")
        try:
            text = self.tokenizer.apply_chat_template([{"role": m.role, "content": m.text()} for m in messages])
        except (ValueError, jinja2.TemplateError) as e:   # the template itself may reject a conversation
            raise APIError(400, f"messages: {e}", "messages") from None
        return self.tokenizer.encode(text)

    def _max_tokens(self, requested: Optional[int], field: str, prompt_len: int, default: int) -> int:
        """The request's limit: what it asked for if it fits the context (else 400 with the
        numbers, as vLLM answers), or the default cut to what fits."""
        room = self.max_context - prompt_len
        if room < 1:
            return requested or 1  # the prompt alone is too long: the engine names the prompt
        if requested is None:
            return min(default, room)
        if requested > room:
            raise APIError(400, f"{field}: this model's context window is {self.max_context} tokens and the prompt "
                                f"has {prompt_len}, so at most {room} tokens can be generated; {requested} were "
                                f"requested", field, "context_length_exceeded")
        return requested

    @staticmethod
    def _params(body: p.SamplingFields, max_tokens: int, logprobs: Optional[int]) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **body.sampling_kwargs())
        except ValueError as e:
            raise APIError.from_value_error(e) from None

    async def _serve(self, request: Request, body: p.SamplingFields, prefix: str, prompt_ids, params,
                     whole, events):
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        subs = fan_out(request_id, params)  # one engine request per choice
        ids, streams = [rid for rid, _ in subs], []
        try:
            for rid, sub in subs:
                streams.append(await self._add(rid, prompt_ids, sub, body.priority))
        except APIError:
            for rid in ids[:len(streams)]:
                self.engine_loop.abort(rid)
            raise
        reply = responses.Reply(request_id, self.model_name, self.tokenizer, params.stop, params.logprobs is not None,
                                body.include_usage)
        if body.stream:
            return StreamingResponse(self._aborting_when_closed(ids, events(reply, streams)),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        outs = await self._final(ids, streams, request)
        return Response(status_code=_CLIENT_CLOSED) if outs is None else whole(reply, outs)

    async def _add(self, request_id, prompt_ids, params, priority):
        try:
            return await self.engine_loop.add(request_id, prompt_ids, params, priority)
        except ValueError as e:
            self.metrics.rejected.labels("invalid").inc()
            raise APIError.from_value_error(e) from None
        except Overloaded as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineUnavailable as e:
            raise APIError(503, str(e), code="engine_unavailable", headers=RETRY_LATER) from None
        except EngineFailure as e:
            raise APIError(500, str(e), code="engine_failure") from None

    async def _aborting_when_closed(self, request_ids: List[str], events):
        # Starlette cancels the body iterator when the client disconnects; the finally aborts.
        try:
            async for event in events:
                yield event
        finally:
            for request_id in request_ids:  # before any await: a cancelled task may not get further
                self.engine_loop.abort(request_id)
            await events.aclose()

    async def _final(self, request_ids: List[str], streams, request: Request):
        """The last output of each stream, or None if the client went away first (the requests
        are then aborted)."""
        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass
        final = asyncio.ensure_future(asyncio.gather(*(s.final() for s in streams)))
        gone = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({final, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not final.done():
                return None
            try:
                return final.result()
            except EngineUnavailable as e:
                raise APIError(503, str(e), code="engine_unavailable", headers=RETRY_LATER) from None
            except EngineFailure as e:
                raise APIError(500, str(e), code="engine_failure") from None
        finally:
            gone.cancel()
            final.cancel()
            for request_id in request_ids:
                self.engine_loop.abort(request_id)

    async def reconnect(self, request_id: str, from_token: int = Query(
            0, ge=0, description="Tokens the client already has: the stream starts after their text.")):
        """The rest of a request resumed after a crash (or handed over by a peer), as server-sent
        events: from token `from_token` on (0: every token committed so far, then the rest)."""
        try:
            stream = self.engine_loop.attach(request_id)
        except KeyError:
            raise APIError(404, f"request_id={request_id!r}: no request resumed from the journal has this id",
                           "request_id", "not_found") from None
        except ValueError as e:
            raise APIError(409, str(e), "request_id", "already_attached") from None
        reply = responses.Reply(request_id, self.model_name, self.tokenizer, stream.stop, stream.logprobs)
        events = responses.chat_events if request_id.startswith("chatcmpl-") else responses.completion_events
        return StreamingResponse(self._aborting_when_closed([request_id], events(reply, [stream], from_token)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def take_over(self, body: p.ImportRequest) -> dict:
        """Resumes requests a peer hands over as it shuts down: {"requests": [request_record, ...],
        "finished": [...]} (the outputs of requests that ended while it drained). Their clients
        reconnect here at /v1/requests/{id}/stream."""
        from jaxserve.engine.journal import request_from_record
        requests = []
        for i, rec in enumerate(body.requests):
            try:
                requests.append(request_from_record(rec))
            except ValueError as e:
                raise APIError.from_value_error(ValueError(f"requests.{i}.{e}")) from None
            except (KeyError, TypeError) as e:
                raise APIError(400, f"requests.{i}: not a request record ({type(e).__name__}: {e})",
                               f"requests.{i}") from None
        ended = body.finished
        finished = [self._finished_record(i, rec) for i, rec in enumerate(ended)]
        try:
            accepted = await self.engine_loop.take_over(requests) if requests else 0
            self.engine_loop.keep_finished(finished)
            return {"accepted": accepted, "finished": len(finished)}
        except ValueError as e:
            raise APIError.from_value_error(e) from None
        except EngineUnavailable as e:
            raise APIError(503, str(e), code="engine_unavailable", headers=RETRY_LATER) from None

    @staticmethod
    def _finished_record(i: int, rec) -> RequestOutput:
        """A peer's ended request (for its reconnecting client); 400 naming the bad field."""
        try:
            return output_from_finished_record(rec)
        except ValueError as e:
            message = f"finished.{i}: {e}" if not isinstance(rec, dict) else f"finished.{i}.{e}"
            raise APIError.from_value_error(ValueError(message)) from None

    # -- assembly -----------------------------------------------------------------------------
    def routes(self, app: FastAPI) -> None:
        openai_errors = {k: v for k, v in _ERRORS.items() if k != 403}
        app.add_api_route("/v1/completions", self.completions, methods=["POST"],
                          response_model=p.CompletionResponse, tags=["openai"],
                          responses={200: {"content": _sse("CompletionResponse")}, **openai_errors})
        app.add_api_route("/v1/chat/completions", self.chat_completions, methods=["POST"],
                          response_model=p.ChatCompletionResponse, tags=["openai"],
                          responses={200: {"content": _sse("ChatCompletionChunk")}, **openai_errors})
        app.add_api_route("/v1/models", self.models, methods=["GET"], response_model=p.ModelList,
                          responses={401: _ERRORS[401]}, tags=["openai"])
        app.add_api_route("/v1/requests/{request_id}/stream", self.reconnect, methods=["GET"],
                          responses={200: {"content": _sse("CompletionResponse or ChatCompletionChunk")},
                                     **openai_errors}, tags=["jaxserve"])
        app.add_api_route(PEER_ROUTE, self.take_over, methods=["POST"], tags=["jaxserve"],
                          responses={k: v for k, v in _ERRORS.items() if k in (400, 401, 403, 503)})
        app.add_api_route("/health", self.health, methods=["GET"],
                          responses={503: _ERRORS[503]})
        app.add_api_route("/metrics", self.prometheus, methods=["GET"], response_class=PlainTextResponse)


def create_app(engine, model_name: str, *, max_waiting: int = DEFAULT_MAX_WAITING,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, peer_url: str = "",
               api_key: Optional[str] = None, peer_secret: Optional[str] = None,
               default_max_tokens: int = DEFAULT_MAX_TOKENS) -> FastAPI:
    """An app serving `engine` as `model_name`; its engine thread runs while the app is up.

    max_waiting bounds the requests waiting for their first token (429 beyond it);
    max_body_bytes bounds request bodies (413 beyond it); peer_url: a server to hand unfinished
    requests to when this one shuts down (a spot VM's notice); api_key: required on every /v1
    route (`Authorization: Bearer`); peer_secret: shared with the peers that hand requests over
    (without it this server takes none). See jaxserve.server.auth. default_max_tokens: the
    limit of a chat request that sets none (cut to what fits the context).
    """
    server = OpenAIServer(engine, model_name, max_waiting, default_max_tokens)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.engine_loop.start(asyncio.get_running_loop())
        try:
            yield
        finally:
            await asyncio.to_thread(server.engine_loop.stop)
            journal = getattr(engine, "journal", None)
            if journal is not None:  # the engine thread is done: make its records durable first
                journal.sync()
            ended = server.engine_loop.finished_while_draining
            if peer_url and (getattr(engine, "requests", None) or ended):
                await asyncio.to_thread(_hand_over, engine, peer_url, peer_secret, ended)
            if journal is not None:
                journal.close()
                logging.getLogger(__name__).warning("journal synced; %d unfinished requests in it",
                                                    len(engine.requests))
            mirror = getattr(getattr(engine, "runner", None), "mirror", None)
            if mirror is not None:  # serving over several processes: release the followers last
                mirror.stop()

    app = FastAPI(title="jaxserve", version=importlib.metadata.version("jaxserve"),
                  description="OpenAI-compatible serving of one model.", lifespan=lifespan)
    app.add_middleware(errors.BodyLimit, max_bytes=max_body_bytes)
    app.add_middleware(Credentials, api_key=api_key, peer_secret=peer_secret)  # outermost: checked first
    app.state.server = server
    errors.install(app)
    server.routes(app)
    app.openapi = lambda: _openapi(app, getattr(getattr(engine, "cfg", None), "vocab_size", None))
    return app


def _hand_over(engine, peer_url: str, peer_secret: Optional[str], ended=()) -> None:
    """Sends the stopped engine's unfinished requests to a peer server; those it accepts are
    ended here (journal: "handed_over"); if it cannot take them they stay in the journal. The
    outputs of requests that ended during the drain go along, for clients cut off before their end."""
    import httpx

    from jaxserve.engine.journal import request_record
    log = logging.getLogger(__name__)
    requests = list(engine.requests.values())
    finished = [finished_record(o) for o in ended]
    try:
        r = httpx.post(peer_url.rstrip("/") + PEER_ROUTE,
                       json={"requests": [request_record(x) for x in requests], "finished": finished},
                       headers={"Authorization": f"Bearer {peer_secret}"} if peer_secret else {}, timeout=10)
        r.raise_for_status()
    except httpx.HTTPError as e:
        log.error("could not hand %d requests to %s (%s); they stay in the journal", len(requests), peer_url, e)
        return
    for x in requests:
        engine.abort(x.request_id, "handed_over")  # ended here (and in the journal)
    log.warning("handed %d unfinished requests to %s", len(requests), peer_url)


def _openapi(app: FastAPI, vocab_size: Optional[int]) -> dict:
    """FastAPI's description, less the 422 it documents by default (invalid bodies get 400
    here), and with token ids bounded by the served model's vocabulary."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        if vocab_size:
            _bound_token_ids(schema, vocab_size - 1)
        for path in schema["paths"].values():
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        app.openapi_schema = schema
    return app.openapi_schema


def _bound_token_ids(node, largest: int) -> None:
    if isinstance(node, dict):
        if node.pop("x-token-id", False):
            node["maximum"] = largest
        for value in node.values():
            _bound_token_ids(value, largest)
    elif isinstance(node, list):
        for value in node:
            _bound_token_ids(value, largest)
