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
from typing import Dict, List

from jaxserve.engine.request import Request
from jaxserve.sampling_params import SamplingParams


def request_record(r: Request) -> dict:
    """A request's resumable state as JSON data: what `request_from_record` (and a peer) rebuilds."""
    return {"id": r.request_id, "prompt": list(map(int, r.prompt_ids)), "params": dataclasses.asdict(r.params),
            "seed": int(r.seed), "arrival": r.arrival_time, "priority": r.priority,
            "ids": list(map(int, r.output_ids)), "logprobs": [float(x) for x in r.logprobs]}


def request_from_record(rec: dict) -> Request:
    """A waiting Request (no cache) from `request_record` data; KeyError/TypeError on bad data."""
    params = rec["params"]
    params = SamplingParams(**{**params, "stop": tuple(params.get("stop", ())),
                               "stop_token_ids": tuple(params.get("stop_token_ids", ()))})
    return Request(rec["id"], list(rec["prompt"]), params, int(rec["seed"]), float(rec["arrival"]),
                   int(rec.get("priority", 0)), output_ids=list(rec.get("ids", [])),
                   logprobs=list(rec.get("logprobs", [])))


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

    def added(self, r: Request) -> None:
        """A new request (or one taken over from a peer, with the tokens it already has)."""
        self._write({"op": "add", **request_record(r)})
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


def replay(path: str) -> List[Request]:
    """Every request the journal saw start and not end, in arrival order, with its committed tokens
    (as fresh Requests: no cache, waiting; `Engine.resume` takes them back).

    A torn last line (the crash came mid-write) is ignored; any other bad line is an error.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    requests: Dict[str, Request] = {}
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
            requests[rid] = request_from_record(rec)
        elif op == "tokens" and rid in requests:
            requests[rid].output_ids += rec["ids"]
            requests[rid].logprobs += rec["logprobs"]
        elif op == "end" and rid in requests:
            requests[rid].finish_reason = rec["reason"]
    return sorted((r for r in requests.values() if r.finish_reason is None), key=lambda r: r.arrival_time)
