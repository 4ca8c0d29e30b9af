"""What the engine hands back to callers, per request and per step."""
from __future__ import annotations

import dataclasses
from typing import List, Optional


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: List[int]
    token_ids: List[int]           # every generated token so far
    new_token_ids: List[int]       # generated in this step
    text: str                      # detokenized output so far (stop strings cut off)
    finished: bool
    finish_reason: Optional[str]   # "stop", "length" or "abort"
    logprobs: Optional[List[float]]
    arrival_time: float
    first_token_time: Optional[float]
    finish_time: Optional[float]
    num_preemptions: int = 0

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def jct(self) -> Optional[float]:
        return None if self.finish_time is None else self.finish_time - self.arrival_time
