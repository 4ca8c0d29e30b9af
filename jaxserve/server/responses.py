"""Engine outputs as OpenAI objects: whole responses, or server-sent events of text deltas."""
from __future__ import annotations

import dataclasses
from typing import AsyncIterator, List, Optional, Sequence

from fastapi.sse import format_sse_event

from jaxserve.engine.outputs import RequestOutput
from jaxserve.server import protocol as p
from jaxserve.server.engine_loop import EngineFailure, EngineUnavailable, RequestStream
from jaxserve.tokenizer import Tokenizer

DONE = format_sse_event(data_str="[DONE]")


@dataclasses.dataclass
class Reply:
    """What shapes one request's answer, beyond the engine's outputs."""
    request_id: str
    model: str
    tokenizer: Optional[Tokenizer]
    stop: Sequence[str] = ()
    logprobs: bool = False
    include_usage: bool = False


def usage(out: RequestOutput) -> p.Usage:
    n_prompt, n_out = len(out.prompt_token_ids), len(out.token_ids)
    return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)


def _finish_reason(out: RequestOutput) -> p.FinishReason:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


def _token_texts(tokenizer: Optional[Tokenizer], ids: Sequence[int]) -> List[str]:
    if tokenizer is None:
        return [f"token_id:{i}" for i in ids]
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _completion_logprobs(reply: Reply, ids, logprobs, offset: int) -> Optional[p.CompletionLogprobs]:
    if not reply.logprobs:
        return None
    texts = _token_texts(reply.tokenizer, ids)
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    return p.CompletionLogprobs(tokens=texts, token_logprobs=list(logprobs), text_offset=offsets)


def _chat_logprobs(reply: Reply, ids, logprobs) -> Optional[p.ChatLogprobs]:
    if not reply.logprobs:
        return None
    return p.ChatLogprobs(content=[p.ChatTokenLogprob(token=t, logprob=lp, bytes=list(t.encode()))
                                   for t, lp in zip(_token_texts(reply.tokenizer, ids), logprobs)])


def completion(reply: Reply, out: RequestOutput) -> p.CompletionResponse:
    choice = p.CompletionChoice(text=out.text, finish_reason=_finish_reason(out),
                                logprobs=_completion_logprobs(reply, out.token_ids, out.logprobs or [], 0))
    return p.CompletionResponse(id=reply.request_id, model=reply.model, choices=[choice], usage=usage(out))


def chat(reply: Reply, out: RequestOutput) -> p.ChatCompletionResponse:
    choice = p.ChatChoice(message=p.AssistantMessage(content=out.text), finish_reason=_finish_reason(out),
                          logprobs=_chat_logprobs(reply, out.token_ids, out.logprobs or []))
    return p.ChatCompletionResponse(id=reply.request_id, model=reply.model, choices=[choice], usage=usage(out))


class _TextDeltas:
    """Cuts the growing output text into deltas, holding back the tail that a stop string,
    once complete, would still cut off (the engine truncates the text where it begins)."""

    def __init__(self, stop: Sequence[str]):
        self.holdback = max((len(s) for s in stop), default=1) - 1
        self.sent = 0

    def next(self, out: RequestOutput) -> str:
        end = len(out.text) if out.finished else len(out.text) - self.holdback
        if end <= self.sent:
            return ""
        delta, self.sent = out.text[self.sent:end], end
        return delta


def _event(model) -> bytes:
    return format_sse_event(data_str=model.model_dump_json())


def _error_event(e: Exception) -> bytes:
    status = 503 if isinstance(e, EngineUnavailable) else 500
    error = p.ErrorResponse(error=p.ErrorDetail(message=str(e), type="server_error", code=str(status)))
    return _event(error)


def _new_logprobs(out: RequestOutput) -> list:
    return out.logprobs[len(out.logprobs) - len(out.new_token_ids):] if out.logprobs else []


def _skip(deltas: _TextDeltas, reply: Reply, out: RequestOutput, skip_tokens: int) -> Optional[RequestOutput]:
    """The first output a stream sends, or None to wait for a later one. A reconnecting client
    has the first skip_tokens tokens: the stream starts after their text, and the first output
    carries every token from there (with their logprobs). A client can be ahead of a resumed
    request (a crash lost journal records it had streamed): nothing is sent until the request
    has regenerated them."""
    if len(out.token_ids) < skip_tokens and not out.finished:
        return None
    if skip_tokens and reply.tokenizer is not None:
        deltas.sent = len(reply.tokenizer.decode(out.token_ids[:skip_tokens]))
    return dataclasses.replace(out, new_token_ids=list(out.token_ids[skip_tokens:]))


async def completion_events(reply: Reply, stream: RequestStream, skip_tokens: int = 0) -> AsyncIterator[bytes]:
    deltas, offset, first = _TextDeltas(reply.stop), 0, True
    try:
        async for out in stream:
            if first:
                out = _skip(deltas, reply, out, skip_tokens)
                if out is None:
                    continue
                offset, first = deltas.sent, False
            text = deltas.next(out)
            if not (text or out.finished or (reply.logprobs and out.new_token_ids)):
                continue
            logprobs = _completion_logprobs(reply, out.new_token_ids, _new_logprobs(out), offset)
            offset = deltas.sent
            choice = p.CompletionChoice(text=text, finish_reason=_finish_reason(out), logprobs=logprobs)
            yield _event(p.CompletionResponse(id=reply.request_id, model=reply.model, choices=[choice]))
        if reply.include_usage:
            yield _event(p.CompletionResponse(id=reply.request_id, model=reply.model, choices=[], usage=usage(out)))
    except (EngineFailure, EngineUnavailable) as e:
        yield _error_event(e)
    yield DONE


async def chat_events(reply: Reply, stream: RequestStream, skip_tokens: int = 0) -> AsyncIterator[bytes]:
    deltas, first = _TextDeltas(reply.stop), True

    def chunk(choices, **kw) -> bytes:
        return _event(p.ChatCompletionChunk(id=reply.request_id, model=reply.model, choices=choices, **kw))
    try:
        yield chunk([p.ChatChunkChoice(delta=p.Delta(role="assistant", content=""))])
        async for out in stream:
            if first:
                out = _skip(deltas, reply, out, skip_tokens)
                if out is None:
                    continue
                first = False
            text = deltas.next(out)
            if not (text or out.finished or (reply.logprobs and out.new_token_ids)):
                continue
            yield chunk([p.ChatChunkChoice(delta=p.Delta(content=text), finish_reason=_finish_reason(out),
                                           logprobs=_chat_logprobs(reply, out.new_token_ids, _new_logprobs(out)))])
        if reply.include_usage:
            yield chunk([], usage=usage(out))
    except (EngineFailure, EngineUnavailable) as e:
        yield _error_event(e)
    yield DONE
