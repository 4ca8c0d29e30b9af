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


def finished_output(r, tokenizer=None) -> RequestOutput:
    """The final output of a finished request (a jaxserve.engine.request.Request) rebuilt from
    its tokens, as the engine gave it: detokenized incrementally, cut at its stop string."""
    text = ""
    if tokenizer is not None:
        from jaxserve.tokenizer import IncrementalDecoder
        text = IncrementalDecoder(tokenizer).push(list(r.output_ids))
        for stop in r.params.stop if r.finish_reason == "stop" else ():
            at = text.find(stop)
            if at >= 0:
                text = text[:at]
                break
    return RequestOutput(request_id=r.request_id, prompt_token_ids=list(r.prompt_ids), token_ids=list(r.output_ids),
                         new_token_ids=list(r.output_ids), text=text, finished=True, finish_reason=r.finish_reason,
                         logprobs=list(r.logprobs) if r.params.logprobs else None, arrival_time=r.arrival_time,
                         first_token_time=None, finish_time=None, num_preemptions=r.num_preemptions)
