"""A durable journal of every request's progress, so that a restarted server finishes them.

Append-only JSON lines: `add` (prompt, sampling parameters, seed, arrival), `tokens` (tokens
committed since the last record, with their logprobs) and `end` (finish reason). Tokens are
written as they are committed and made durable (fsync) every `fsync_every` token records: a
crash loses at most that many steps of tokens, which the restarted engine regenerates
identically (sampling keys depend only on the request's seed and the token's index). Replaying
the journal gives every unfinished request with the tokens it had committed.

A plain file on local disk (or any mounted bucket path); writes go through one buffered handle
owned by the engine thread.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Dict, List, Optional

from jaxserve.sampling_params import SamplingParams


@dataclasses.dataclass
class JournaledRequest:
    request_id: str
    prompt_ids: list
    params: SamplingParams
    seed: int
    arrival_time: float
    priority: int = 0
    output_ids: list = dataclasses.field(default_factory=list)
    logprobs: list = dataclasses.field(default_factory=list)
    finish_reason: Optional[str] = None


class TokenJournal:
    def __init__(self, path: str, fsync_every: int = 16):
        if fsync_every < 0:
            raise ValueError(f"journal fsync_every must be >= 0, got {fsync_every}")
        self.path, self.fsync_every = path, fsync_every
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(path, "a", encoding="utf-8")
        self._unsynced = 0

    def _write(self, record: dict) -> None:
        self._f.write(json.dumps(record, separators=(",", ":")) + "\n")

    def added(self, request_id: str, prompt_ids: list, params: SamplingParams, seed: int,
              arrival_time: float, priority: int = 0) -> None:
        self._write({"op": "add", "id": request_id, "prompt": list(map(int, prompt_ids)),
                     "params": dataclasses.asdict(params), "seed": int(seed), "arrival": arrival_time,
                     "priority": priority})
        self.sync()  # a request the client was told about must survive

    def committed(self, request_id: str, token_ids: list, logprobs: list) -> None:
        self._write({"op": "tokens", "id": request_id, "ids": list(map(int, token_ids)),
                     "logprobs": [float(x) for x in logprobs]})
        self._unsynced += 1
        if self.fsync_every and self._unsynced >= self.fsync_every:
            self.sync()

    def finished(self, request_id: str, reason: str) -> None:
        self._write({"op": "end", "id": request_id, "reason": reason})
        self.sync()  # an end lost in a crash would resume a finished request

    def sync(self) -> None:
        """Makes everything written so far durable."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._unsynced = 0

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()


def replay(path: str) -> List[JournaledRequest]:
    """Every request the journal saw start and not end, in arrival order, with its committed tokens.

    A torn last line (the crash came mid-write) is ignored; any other bad line is an error.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    requests: Dict[str, JournaledRequest] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if n >= len(lines) - 1:  # the last line may be cut short by the crash
                break
            raise ValueError(f"{path}:{n}: not a journal record")
        op, rid = rec.get("op"), rec.get("id")
        if op == "add":
            requests[rid] = JournaledRequest(rid, rec["prompt"], SamplingParams(**rec["params"]), rec["seed"],
                                             rec["arrival"], rec.get("priority", 0))
        elif op == "tokens" and rid in requests:
            requests[rid].output_ids += rec["ids"]
            requests[rid].logprobs += rec["logprobs"]
        elif op == "end" and rid in requests:
            requests[rid].finish_reason = rec["reason"]
    return sorted((r for r in requests.values() if r.finish_reason is None), key=lambda r: r.arrival_time)
