"""A request's state on the host: tokens, progress, pages and timings.

`num_computed` counts the tokens whose keys/values are in the cache; everything after it is
still to be run. Generated tokens are committed once read from the device: they are never
regenerated. Tokens sampled on the device but not yet read (the engine reads a step's tokens
while the next step runs) are `num_pending`: they count in `num_tokens` but not in `token_ids`.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from jaxserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # not started, or preempted with its cache dropped
    RUNNING = "running"      # its pages are on the device
    SWAPPED = "swapped"      # its pages are in host memory
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    request_id: str
    prompt_ids: list
    params: SamplingParams
    seed: int
    arrival_time: float
    priority: int = 0
    output_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    top_logprobs: list = dataclasses.field(default_factory=list)  # [rank, ids, logprobs] a token (logprobs > 0)
    status: Status = Status.WAITING
    num_computed: int = 0                  # tokens with KV in the cache
    pages: list = dataclasses.field(default_factory=list)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    finish_reason: Optional[str] = None
    text: str = ""
    stop_after: int = 0  # characters of text no stop string may end within (SamplingParams.min_tokens)
    num_preemptions: int = 0
    prompt_text: Optional[str] = None
    num_pending: int = 0                   # sampled on the device, not read yet
    pending_row: int = -1                  # the latest pending token's row in its step's output

    def token_ids(self, start: int, stop: int) -> list:
        """Committed tokens start..stop-1 of prompt + output, without concatenating the two
        (a step takes one or a chunk of them from every running request)."""
        P = len(self.prompt_ids)
        if stop <= P:
            return self.prompt_ids[start:stop]
        if start >= P:
            return self.output_ids[start - P:stop - P]
        return self.prompt_ids[start:] + self.output_ids[:stop - P]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids) + self.num_pending

    @property
    def num_generated(self) -> int:
        return len(self.output_ids) + self.num_pending

    @property
    def num_remaining(self) -> int:
        """Tokens that must run through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed

    @property
    def in_prefill(self) -> bool:
        return self.num_remaining > 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
