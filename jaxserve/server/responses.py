"""Engine outputs as OpenAI objects: whole responses, or server-sent events of text deltas."""
from __future__ import annotations

import asyncio
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


def usage(outs: Sequence[RequestOutput]) -> p.Usage:
    """Counts of a request's choices: its prompt once, every choice's tokens."""
    n_prompt, n_out = len(outs[0].prompt_token_ids), sum(len(o.token_ids) for o in outs)
    return p.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)


def _finish_reason(out: RequestOutput) -> p.FinishReason:
    return out.finish_reason if out.finish_reason in ("stop", "length") else None


def _token_texts(tokenizer: Optional[Tokenizer], ids: Sequence[int]) -> List[str]:
    if tokenizer is None:
        return [f"token_id:{i}" for i in ids]
    return [tokenizer.decode([i], skip_special_tokens=False) for i in ids]


def _top_texts(reply: Reply, top) -> list:
    """[(token text, logprob)] of each position's likeliest tokens ([rank, ids, logprobs] entries)."""
    return [list(zip(_token_texts(reply.tokenizer, ids), values)) for _, ids, values in top]


def _completion_logprobs(reply: Reply, ids, logprobs, top, offset: int) -> Optional[p.CompletionLogprobs]:
    if not reply.logprobs:
        return None
    texts = _token_texts(reply.tokenizer, ids)
    offsets = []
    for t in texts:
        offsets.append(offset)
        offset += len(t)
    tops = [dict(position) for position in _top_texts(reply, top)] if top else None
    return p.CompletionLogprobs(tokens=texts, token_logprobs=list(logprobs), top_logprobs=tops, text_offset=offsets)


def _chat_logprobs(reply: Reply, ids, logprobs, top) -> Optional[p.ChatLogprobs]:
    if not reply.logprobs:
        return None
    tops = _top_texts(reply, top) if top else [[] for _ in ids]
    return p.ChatLogprobs(content=[
        p.ChatTokenLogprob(token=t, logprob=lp, bytes=list(t.encode()),
                           top_logprobs=[p.ChatTopLogprob(token=s, logprob=v, bytes=list(s.encode())) for s, v in alts])
        for t, lp, alts in zip(_token_texts(reply.tokenizer, ids), logprobs, tops)])


def _all_logprobs(out: RequestOutput) -> tuple:
    return out.logprobs or [], out.top_logprobs or []


def completion(reply: Reply, outs: Sequence[RequestOutput]) -> p.CompletionResponse:
    choices = [p.CompletionChoice(index=i, text=out.text, finish_reason=_finish_reason(out),
                                  logprobs=_completion_logprobs(reply, out.token_ids, *_all_logprobs(out), 0))
               for i, out in enumerate(outs)]
    return p.CompletionResponse(id=reply.request_id, model=reply.model, choices=choices, usage=usage(outs))


def chat(reply: Reply, outs: Sequence[RequestOutput]) -> p.ChatCompletionResponse:
    choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=out.text), finish_reason=_finish_reason(out),
                            logprobs=_chat_logprobs(reply, out.token_ids, *_all_logprobs(out)))
               for i, out in enumerate(outs)]
    return p.ChatCompletionResponse(id=reply.request_id, model=reply.model, choices=choices, usage=usage(outs))


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


def _new_logprobs(out: RequestOutput) -> tuple:
    """The logprobs and top logprobs of an output's new tokens."""
    new = len(out.new_token_ids)
    return tuple(xs[len(xs) - new:] if xs else [] for xs in _all_logprobs(out))


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


async def _merged(streams: Sequence[RequestStream]) -> AsyncIterator[tuple]:
    """(choice index, output) of every stream's outputs, as they come; an error of any ends it."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - raised where the events are read
            queue.put_nowait((i, e))
    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        ended = 0
        while ended < len(streams):
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            ended += item.finished
            yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _Choice:
    """What a stream has sent of one choice so far."""

    def __init__(self, reply: Reply, skip_tokens: int):
        self.deltas, self.skip_tokens, self.last = _TextDeltas(reply.stop), skip_tokens, None

    def next(self, reply: Reply, out: RequestOutput) -> Optional[tuple]:
        """(output, text delta, text offset before it) to send for `out`, or None for nothing."""
        if self.last is None:
            out = _skip(self.deltas, reply, out, self.skip_tokens)
            if out is None:
                return None
        self.last, offset = out, self.deltas.sent
        text = self.deltas.next(out)
        if not (text or out.finished or (reply.logprobs and out.new_token_ids)):
            return None
        return out, text, offset


async def _choice_events(reply: Reply, streams: Sequence[RequestStream], skip_tokens: int, event, usage_event,
                         first=()) -> AsyncIterator[bytes]:
    """The server-sent events of a request's choices: event(i, out, text, offset) for what each
    output adds, then usage_event(last outputs) when asked for, then [DONE]."""
    choices = [_Choice(reply, skip_tokens) for _ in streams]
    try:
        for e in first:
            yield e
        async for i, out in _merged(streams):
            sent = choices[i].next(reply, out)
            if sent is not None:
                yield event(i, *sent)
        if reply.include_usage:
            yield usage_event([c.last for c in choices])
    except (EngineFailure, EngineUnavailable) as e:
        yield _error_event(e)
    yield DONE


def completion_events(reply: Reply, streams: Sequence[RequestStream], skip_tokens: int = 0) -> AsyncIterator[bytes]:
    def event(i, out, text, offset):
        logprobs = _completion_logprobs(reply, out.new_token_ids, *_new_logprobs(out), offset)
        choice = p.CompletionChoice(index=i, text=text, finish_reason=_finish_reason(out), logprobs=logprobs)
        return _event(p.CompletionResponse(id=reply.request_id, model=reply.model, choices=[choice]))

    def usage_event(outs):
        return _event(p.CompletionResponse(id=reply.request_id, model=reply.model, choices=[], usage=usage(outs)))
    return _choice_events(reply, streams, skip_tokens, event, usage_event)


def chat_events(reply: Reply, streams: Sequence[RequestStream], skip_tokens: int = 0) -> AsyncIterator[bytes]:
    def chunk(choices, **kw) -> bytes:
        return _event(p.ChatCompletionChunk(id=reply.request_id, model=reply.model, choices=choices, **kw))

    def event(i, out, text, offset):
        return chunk([p.ChatChunkChoice(index=i, delta=p.Delta(content=text), finish_reason=_finish_reason(out),
                                        logprobs=_chat_logprobs(reply, out.new_token_ids, *_new_logprobs(out)))])
    roles = [chunk([p.ChatChunkChoice(index=i, delta=p.Delta(role="assistant", content=""))])
             for i in range(len(streams))]
    return _choice_events(reply, streams, skip_tokens, event, lambda outs: chunk([], usage=usage(outs)), roles)
