"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM's field names)."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

MAX_LOGPROBS = 20  # the most top log-probabilities a token can come with (OpenAI's limit)
PENALTIES_OFF = {"repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}  # each one's neutral value


@dataclasses.dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                 # 0 (or -1) = off
    seed: Optional[int] = None     # None: drawn by the engine
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    # None: no log-probabilities; 0: each chosen token's; k: and the k likeliest tokens' (vLLM's
    # meaning; True and False, jaxserve's older spelling, mean 0 and None)
    logprobs: Optional[int] = None
    min_tokens: int = 0            # tokens before end-of-sequence or a stop (token or string) may end it
    n: int = 1                     # completions of the prompt (LLM.generate; the engine runs one a request)
    repetition_penalty: float = 1.0  # > 0: logits of prompt and output tokens divided by it (1 = off)
    presence_penalty: float = 0.0    # in [-2, 2]: subtracted once from each output token's logit
    frequency_penalty: float = 0.0   # in [-2, 2]: subtracted per occurrence in the output

    @property
    def penalties_on(self) -> list:
        """The penalty fields not at their neutral values (PENALTIES_OFF)."""
        return [name for name, off in PENALTIES_OFF.items() if getattr(self, name) != off]

    @property
    def penalized(self) -> bool:
        """Whether any penalty is on (the step samples in a '+penalties' mode)."""
        return bool(self.penalties_on)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop)
        self.stop_token_ids = tuple(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.logprobs, bool):
            self.logprobs = 0 if self.logprobs else None
        self._check()

    def _check(self):
        def bad(field, why):
            raise ValueError(f"{field}={getattr(self, field)!r}: {why}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            bad("temperature", "must be a number >= 0")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (or -1 for off)")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32):
            bad("seed", "must be an integer in [0, 2**32)")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if not isinstance(self.n, int) or isinstance(self.n, bool) or self.n < 1:
            bad("n", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or not (
                0 <= self.min_tokens <= self.max_tokens):
            bad("min_tokens", f"must be an integer in [0, max_tokens={self.max_tokens}]")
        number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
        if not number(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be a number > 0 (1 = off)")
        for field in ("presence_penalty", "frequency_penalty"):
            if not number(getattr(self, field)) or not -2 <= getattr(self, field) <= 2:
                bad(field, "must be a number in [-2, 2] (0 = off)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")


def fan_out(request_id: str, params: SamplingParams) -> list:
    """[(request id, params)] of the engine requests that make a request's `n` completions: the
    request itself when n = 1, else `ID#i` for i < n, each of n = 1 and, when seeded, of seed +
    i (so completions differ, and each is reproducible). Their prompt pages are shared through
    the prefix cache."""
    if params.n == 1:
        return [(request_id, params)]
    return [(f"{request_id}#{i}", dataclasses.replace(params, n=1, seed=None if params.seed is None
                                                      else (params.seed + i) % 2 ** 32)) for i in range(params.n)]
