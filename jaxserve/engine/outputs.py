"""What the engine hands back to callers, per request and per step."""
from __future__ import annotations

import collections
import dataclasses
from typing import Dict, List, Optional

from jaxserve.sampling_params import MAX_LOGPROBS


@dataclasses.dataclass
class Logprob:
    """A token's log-probability in one position, as vLLM's: rank 1 is the likeliest token
    (None where it was not computed: a chosen token of a request asking for no alternatives)."""
    logprob: float
    rank: Optional[int] = None
    decoded_token: Optional[str] = None


@dataclasses.dataclass
class CompletionOutput:
    """One completion of a request, as vLLM's `RequestOutput.outputs[i]` holds it: logprobs, per
    token, maps the chosen token and the likeliest ones (SamplingParams.logprobs) to theirs."""
    index: int
    text: str
    token_ids: List[int]
    finish_reason: Optional[str]
    logprobs: Optional[List[Dict[int, Logprob]]]


def position_logprobs(token_ids: List[int], logprobs: Optional[List[float]], top: Optional[List[list]],
                      decode=None) -> Optional[List[Dict[int, Logprob]]]:
    """vLLM's logprobs of a completion from jaxserve's: the chosen tokens' logprobs and each
    position's [rank, ids, logprobs] of the likeliest tokens. decode: token id -> its text."""
    if logprobs is None:
        return None
    text = (lambda t: None) if decode is None else decode
    out = []
    for i, (token, lp) in enumerate(zip(token_ids, logprobs)):
        rank, ids, values = top[i] if top else (None, [], [])
        position = {t: Logprob(v, j + 1, text(t)) for j, (t, v) in enumerate(zip(ids, values))}
        position.setdefault(token, Logprob(lp, rank, text(token)))
        out.append(position)
    return out


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: List[int]
    token_ids: List[int]           # every generated token so far
    new_token_ids: List[int]       # generated in this step
    text: str                      # detokenized output so far (stop strings cut off)
    finished: bool
    finish_reason: Optional[str]   # "stop", "length" or "abort"
    logprobs: Optional[List[float]]  # of each chosen token (SamplingParams.logprobs not None)
    arrival_time: float
    first_token_time: Optional[float]
    finish_time: Optional[float]
    num_preemptions: int = 0
    prompt: Optional[str] = None   # the prompt's text, where the caller gave text (LLM.generate)
    completions: Optional[List[CompletionOutput]] = None  # SamplingParams.n > 1 (LLM.generate): all n
    # SamplingParams.logprobs = k > 0: each token's [rank of the chosen one, the k likeliest token
    # ids, their logprobs], under the model's distribution (before penalties and temperature)
    top_logprobs: Optional[List[list]] = None

    @property
    def outputs(self) -> List[CompletionOutput]:
        """vLLM's shape of the same answer: its completions (one, unless LLM.generate ran n; the
        fields above are the first's)."""
        if self.completions is not None:
            return list(self.completions)
        return [CompletionOutput(0, self.text, self.token_ids, self.finish_reason,
                                 position_logprobs(self.token_ids, self.logprobs, self.top_logprobs))]

    @property
    def ttft(self) -> Optional[float]:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def jct(self) -> Optional[float]:
        return None if self.finish_time is None else self.finish_time - self.arrival_time


def cut_at_stop(text: str, stops, after: int = 0) -> Optional[str]:
    """text up to the first of the stop strings found in it that ends past its first `after`
    characters (the text of a request's first min_tokens - 1 tokens), or None when none is."""
    for stop in stops:
        at = text.find(stop, max(0, after - len(stop) + 1))
        if at >= 0:
            return text[:at]
    return None


def final_output(request_id: str, prompt: List[int], ids: List[int], text: str, reason: str,
                 logprobs: Optional[List[float]], arrival: float, num_preemptions: int = 0,
                 top_logprobs: Optional[List[list]] = None) -> RequestOutput:
    """The whole output of a request that ended elsewhere (a crashed run, a peer), for a client
    that reconnects: every token new, no timings."""
    return RequestOutput(request_id=request_id, prompt_token_ids=list(prompt), token_ids=list(ids),
                         new_token_ids=list(ids), text=text, finished=True, finish_reason=reason,
                         logprobs=logprobs, arrival_time=arrival, first_token_time=None, finish_time=None,
                         num_preemptions=num_preemptions, top_logprobs=top_logprobs or None)


def finished_output(r, tokenizer=None) -> RequestOutput:
    """The final output of a finished request (a jaxserve.engine.request.Request) rebuilt from
    its tokens, as the engine gave it: detokenized incrementally, cut at its stop string."""
    text = ""
    if tokenizer is not None:
        from jaxserve.tokenizer import IncrementalDecoder
        text = IncrementalDecoder(tokenizer).push(list(r.output_ids))
        cut = cut_at_stop(text, r.params.stop) if r.finish_reason == "stop" else None
        text = text if cut is None else cut
    return final_output(r.request_id, r.prompt_ids, r.output_ids, text, r.finish_reason,
                        list(r.logprobs) if r.params.logprobs is not None else None, r.arrival_time,
                        r.num_preemptions, list(r.top_logprobs) if r.params.logprobs else None)


def finished_record(out: RequestOutput) -> dict:
    """A finished request's output as JSON data, for a peer whose clients may reconnect there
    (`output_from_finished_record` reads it back)."""
    return {"id": out.request_id, "prompt": list(out.prompt_token_ids), "ids": list(out.token_ids), "text": out.text,
            "reason": out.finish_reason, "logprobs": out.logprobs, "arrival": out.arrival_time,
            "top": out.top_logprobs}


def is_top_entry(entry, k: int) -> bool:
    """Whether entry is a token's [rank, k token ids, k logprobs] (Request.top_logprobs)."""
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)
    return (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], int) and entry[0] >= 1
            and isinstance(entry[1], list) and len(entry[1]) == k and all(isinstance(t, int) for t in entry[1])
            and isinstance(entry[2], list) and len(entry[2]) == k and all(map(number, entry[2])))


def _is_top_list(top, num_tokens: int) -> bool:
    """Whether top is one is_top_entry per generated token, all of one width k (1..MAX_LOGPROBS)."""
    if not isinstance(top, list) or len(top) != num_tokens:
        return False
    k = len(top[0][1]) if top and isinstance(top[0], list) and len(top[0]) == 3 and isinstance(top[0][1], list) else 1
    return 1 <= k <= MAX_LOGPROBS and all(is_top_entry(e, k) for e in top)


def output_from_finished_record(rec) -> RequestOutput:
    """`finished_record` data back, checked field by field (a peer's data is not trusted):
    ValueError "<field>: ..." on a bad record."""
    if not isinstance(rec, dict):
        raise ValueError("must be an object")
    ints = lambda xs: isinstance(xs, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in xs)
    checks = {"id": isinstance(rec.get("id"), str) and rec.get("id"), "prompt": ints(rec.get("prompt")),
              "ids": ints(rec.get("ids")), "text": isinstance(rec.get("text"), str),
              "reason": rec.get("reason") in ("stop", "length", "abort"),
              "logprobs": rec.get("logprobs") is None or (isinstance(rec.get("logprobs"), list) and all(
                  isinstance(x, (int, float)) for x in rec["logprobs"])),
              "arrival": isinstance(rec.get("arrival"), (int, float)),
              "top": rec.get("top") is None or _is_top_list(rec["top"], len(rec.get("ids") or []))}
    bad = next((name for name, ok in checks.items() if not ok), None)
    if bad is not None:
        raise ValueError(f"{bad}: missing or invalid")
    return final_output(rec["id"], rec["prompt"], rec["ids"], rec["text"], rec["reason"], rec["logprobs"],
                        float(rec["arrival"]), top_logprobs=rec.get("top"))


def keep_newest(kept: "collections.OrderedDict", key, value, limit: int) -> None:
    """Puts key -> value last in `kept`, forgetting the oldest entries beyond `limit` (the
    finished requests a journal or a server keeps for clients that reconnect)."""
    kept[key] = value
    kept.move_to_end(key)
    while len(kept) > limit:
        kept.popitem(last=False)
