"""The OpenAI wire format: request and response models of the HTTP API.

FastAPI validates every request body against these models and derives `/openapi.json` from
them, so the constraints here are the API's documented contract (tests/test_openapi_conformance.py
holds the server to it). Numeric fields are strict (`"5"` and `true` are not integers; `5.0`
is, as JSON Schema says) and non-finite floats are refused, as OpenAI does.
Fields that OpenAI defines but jaxserve cannot honour accept only their neutral value, so that
a request never silently gets something other than what it asked for.
"""
from __future__ import annotations

import time
from typing import Annotated, Dict, List, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from jaxserve.sampling_params import MAX_LOGPROBS

INT32_MAX = 2 ** 31 - 1
MAX_N = 128  # completions one request may ask for (OpenAI's limit)


def _utf8(s: str) -> str:
    # JSON may carry lone surrogates (\ud800) that no tokenizer can encode.
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8), Field(description="Unicode text (no lone surrogates).")]
NonEmptyText = Annotated[Text, Field(min_length=1)]


def _integral(value):
    # JSON Schema's integers include 5.0; strict validation would refuse it (and "5" and true, as it should)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def Int(**bounds):
    """An integer field's type, bounded (ge, le, lt), integral floats taken as integers."""
    return Annotated[int, Field(**bounds), BeforeValidator(_integral)]


# A token id; the served model's vocabulary bounds it, which `app` writes into /openapi.json.
TokenId = Int(ge=0, le=INT32_MAX, json_schema_extra={"x-token-id": True})


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = Field(False, description="Send a last chunk with the usage counts.")


class SamplingFields(_Request):
    """Fields shared by both endpoints that map onto SamplingParams."""
    model: Optional[Text] = Field(None, description="The served model's id (GET /v1/models); "
                                  "omitted means the served model.")
    temperature: Optional[float] = Field(None, ge=0, description="0 = greedy. Default 1.")
    top_p: Optional[float] = Field(None, gt=0, le=1, description="Nucleus sampling mass. Default 1.")
    top_k: Optional[Int(ge=-1, le=INT32_MAX)] = Field(None, description="Extension: keep the k most "
                                 "likely tokens; 0 or -1 = off.")
    seed: Optional[Int(ge=0, lt=2 ** 32)] = Field(None, description="Makes sampling reproducible.")
    stop: Optional[Union[NonEmptyText, List[NonEmptyText]]] = Field(None, description="Strings that end the output "
                                                    "(not included in it).")
    stop_token_ids: Optional[List[TokenId]] = Field(None, description="Extension: token ids that end "
                                                    "the output.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past end-of-sequence.")
    min_tokens: Int(ge=0, le=INT32_MAX) = Field(0, description="Extension (as vLLM's), at most max_tokens: tokens to generate "
                            "before end-of-sequence, a stop token or a stop string may end the output.")
    n: Int(ge=1, le=MAX_N) = Field(1, description="Completions of the prompt, answered as choices 0..n-1 (each "
                   "counts as a request waiting to start; seeded, the i-th draws from seed + i).")
    stream: bool = Field(False, description="Stream the answer as server-sent events.")
    stream_options: Optional[StreamOptions] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Subtracted once from the logit "
                                              "of each token already in the output. Default 0.")
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2, description="Subtracted from the logit of "
                                               "each token once per time it is already in the output. Default 0.")
    repetition_penalty: Optional[float] = Field(None, gt=0, description="Extension (as vLLM's): the logits of "
                                                "tokens in the prompt or the output are divided by it (multiplied, "
                                                "when negative). Default 1 (off).")
    priority: Int(ge=-INT32_MAX, le=INT32_MAX) = Field(0, description="Extension: scheduling priority "
                          "for policies that use it.")
    user: Optional[Text] = None

    def sampling_kwargs(self) -> dict:
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        kw = dict(stop=stop, stop_token_ids=self.stop_token_ids or (), ignore_eos=self.ignore_eos,
                  seed=self.seed, top_k=self.top_k or 0, min_tokens=self.min_tokens, n=self.n)
        if self.temperature is not None:
            kw["temperature"] = self.temperature
        for name in ("top_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if getattr(self, name) is not None:
                kw[name] = getattr(self, name)
        return kw

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


TokenIds = Annotated[List[TokenId], Field(min_length=1)]
# A batch of prompts is a list of exactly one: one request per prompt.
Prompt = Union[NonEmptyText, TokenIds, Annotated[List[NonEmptyText], Field(min_length=1, max_length=1)],
               Annotated[List[TokenIds], Field(min_length=1, max_length=1)]]


class CompletionRequest(SamplingFields):
    prompt: Prompt = Field(description="Text, or a list of token ids, not empty. A list of prompts must "
                           "hold exactly one (send one request per prompt).")
    max_tokens: Optional[Int(ge=1, le=INT32_MAX)] = Field(16, description="Most tokens to generate. The "
                                      "prompt and these must fit the model's context window (max_model_len "
                                      "in GET /v1/models): else 400, code context_length_exceeded.")
    logprobs: Optional[Int(ge=0, le=MAX_LOGPROBS)] = Field(None, description="Return each chosen token's "
                                    "log-probability and those of this many likeliest tokens (0: none).")
    echo: Literal[False] = Field(False, description="Not supported: only false.")
    best_of: Optional[Literal[1]] = Field(None, description="Not supported: only 1.")


class TextPart(_Request):
    type: Literal["text"]
    text: Text


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[Text, List[TextPart]]] = None
    name: Optional[Text] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: List[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[Int(ge=1, le=INT32_MAX)] = Field(None, description="Deprecated alias of "
                                      "max_completion_tokens.")
    max_completion_tokens: Optional[Int(ge=1, le=INT32_MAX)] = Field(None, description="Most tokens to "
                                                 "generate; default: up to the context window. The prompt and "
                                                 "these must fit it: else 400, code context_length_exceeded.")
    logprobs: bool = Field(False, description="Return each chosen token's log-probability.")
    top_logprobs: Optional[Int(ge=0, le=MAX_LOGPROBS)] = Field(None, description="With logprobs: also "
                                                               "those of this many likeliest tokens.")


class ImportRequest(_Request):
    """The body of the peer route: a shutting-down peer's unfinished requests, and the outputs
    of those that ended while it drained (records of jaxserve.engine.journal)."""
    requests: List[dict] = Field(description="Request records to resume here.")
    finished: List[dict] = Field([], description="Finished request records, for clients that reconnect.")


# -- responses --------------------------------------------------------------------------------
FinishReason = Optional[Literal["stop", "length"]]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    tokens: List[str]
    token_logprobs: List[float]
    top_logprobs: Optional[List[Dict[str, float]]] = None
    text_offset: List[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class CompletionResponse(BaseModel):
    """A completion; streamed, each server-sent event carries one of these with a text delta."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class ChatTopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: List[int]


class ChatTokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: List[int]
    top_logprobs: List[ChatTopLogprob] = []


class ChatLogprobs(BaseModel):
    content: List[ChatTokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed chat completion."""
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "jaxserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
