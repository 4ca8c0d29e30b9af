"""A durable journal of every request's progress, so that a restarted server finishes them.

JSON lines: `add` (prompt, sampling parameters, seed, arrival, and any tokens it already has),
`tokens` (tokens committed since the last record, with their logprobs) and `end` (finish
reason). Tokens are written as they are committed and made durable (fsync) every `fsync_every`
token records: a crash loses at most that many steps of tokens, which the restarted engine
regenerates identically (sampling keys depend only on the request's seed and the token's
index). Replaying the journal gives every unfinished request with the tokens it had committed.
Any number of crashes at any point leave a readable journal (a torn tail is sealed on open),
and compaction keeps it about the size of the unfinished requests.

Where it lives: a local file (appended, fsync'd), or a bucket URL (`gs://...`), where objects
cannot be appended to: there the journal is a folder of numbered segment objects, one written at
each sync with the records since the last one, replayed in order; compaction writes a `base`
segment (replay starts at the newest) and deletes the older ones. An object is written whole or
not at all, so a crash leaves no torn record there. Writes go through the engine thread.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import re
import time
from typing import Dict, List

from jaxserve import paths
from jaxserve.engine.outputs import keep_newest
from jaxserve.engine.request import Request
from jaxserve.sampling_params import SamplingParams

KEEP_FINISHED = 256  # finished requests a journal keeps (tokens included) for reconnecting clients


def request_record(r: Request) -> dict:
    """A request's resumable state as JSON data: what `request_from_record` (and a peer) rebuilds."""
    return {"id": r.request_id, "prompt": list(map(int, r.prompt_ids)), "params": dataclasses.asdict(r.params),
            "seed": int(r.seed), "arrival": r.arrival_time, "priority": r.priority,
            "ids": list(map(int, r.output_ids)), "logprobs": [float(x) for x in r.logprobs],
            **({"top": list(r.top_logprobs)} if r.top_logprobs else {})}


def request_from_record(rec: dict) -> Request:
    """A waiting Request (no cache) from `request_record` data, its values as found (the engine
    checks them when it takes the request); KeyError/TypeError/ValueError on a bad record."""
    params = rec["params"]
    if not isinstance(params, dict):
        raise ValueError("params: must be an object of sampling parameters")
    params = SamplingParams(**{**params, "stop": tuple(params.get("stop", ())),
                               "stop_token_ids": tuple(params.get("stop_token_ids", ()))})
    prompt, ids, logprobs, top = rec["prompt"], rec.get("ids", []), rec.get("logprobs", []), rec.get("top", [])
    listed = lambda x: list(x) if isinstance(x, list) else x
    return Request(rec["id"], listed(prompt), params, rec["seed"], rec["arrival"], rec.get("priority", 0),
                   output_ids=listed(ids), logprobs=listed(logprobs), top_logprobs=listed(top))


class TokenJournal:
    """The engine's writer of one journal, a local file or a bucket folder (`open_log`); the
    engine thread is its only caller.

    Opening it seals a torn tail (a crash mid-write): a file is cut back to its last whole
    record, so that new records never glue onto a fragment. It keeps the unfinished requests'
    state in memory and compacts the journal when it passes `compact_bytes` (or, on a bucket,
    SegmentLog.MAX_SEGMENTS objects), and on open: the live requests are written out anew, which
    atomically replaces the old journal, so it stays about the size of what is unfinished however
    long the server runs.
    """

    def __init__(self, path: str, fsync_every: int = 16, compact_bytes: int = 64 << 20):
        if fsync_every < 0:
            raise ValueError(f"journal fsync_every must be >= 0, got {fsync_every}")
        if compact_bytes < 1:
            raise ValueError(f"journal compact_bytes must be >= 1, got {compact_bytes}")
        self.path, self.fsync_every, self.compact_bytes = path, fsync_every, compact_bytes
        self._log = open_log(path)
        self._live, self._done, good_bytes, ended = _scan(self._log.read(), path)
        self._log.seal(good_bytes)
        self._compact_at = compact_bytes
        self._unsynced = 0
        if ended:
            self.compact()

    def _write(self, record: dict) -> None:
        self._log.append(_line(record))

    def added(self, r: Request) -> None:
        """A new request (or one taken over from a peer, with the tokens it already has)."""
        record = request_record(r)
        self._live[r.request_id] = record
        self._write({"op": "add", **record})
        self.sync()  # a request the client was told about must survive

    def committed(self, request_id: str, token_ids: list, logprobs: list, top=None) -> None:
        """Tokens committed, with their logprobs and, when asked for, their [rank, ids, logprobs]."""
        ids, lps = list(map(int, token_ids)), [float(x) for x in logprobs]
        live = self._live.get(request_id)
        if live is not None:
            live["ids"] += ids
            live["logprobs"] += lps
            if top:
                live.setdefault("top", []).extend(top)
        self._write({"op": "tokens", "id": request_id, "ids": ids, "logprobs": lps, **({"top": list(top)} if top else {})})
        self._unsynced += 1
        if self.fsync_every and self._unsynced >= self.fsync_every and self._log.sync(urgent=False):
            self._unsynced = 0

    def finished(self, request_id: str, reason: str) -> None:
        record = self._live.pop(request_id, None)
        if record is not None:  # kept a while, for clients that reconnect after a crash
            keep_newest(self._done, request_id, {**record, "reason": reason}, KEEP_FINISHED)
        self._write({"op": "end", "id": request_id, "reason": reason})
        self.sync()  # an end lost in a crash would resume a finished request
        if self._log.size >= self._compact_at or self._log.crowded():
            self.compact()

    def unfinished_requests(self) -> List[Request]:
        """What `replay` gives, from the state this journal read when it opened (and kept since)."""
        return _unfinished(self._live)

    def finished_requests(self) -> List[Request]:
        """The last KEEP_FINISHED requests that ended, oldest first, with their tokens and
        `finish_reason`: a client cut off by a crash may reconnect for one that ended meanwhile."""
        out = []
        for record in self._done.values():
            r = request_from_record(record)
            r.finish_reason = record["reason"]
            out.append(r)
        return out

    def compact(self) -> None:
        """Rewrites the journal as one `add` record per unfinished request (with its committed
        tokens), after the last KEEP_FINISHED finished ones (add and end), replacing the old
        journal atomically: a crash at any point leaves one whole journal or the other."""
        lines = []
        for rid, record in self._done.items():  # oldest first: replay keeps the newest
            lines.append(_line({"op": "add", **{k: v for k, v in record.items() if k != "reason"}}))
            lines.append(_line({"op": "end", "id": rid, "reason": record["reason"]}))
        for record in sorted(self._live.values(), key=lambda r: r["arrival"]):
            lines.append(_line({"op": "add", **record}))
        self._log.replace("".join(lines))
        self._unsynced = 0
        # the live state alone may pass the threshold: compact again only when the journal doubles
        self._compact_at = max(self.compact_bytes, 2 * self._log.size)

    def sync(self) -> None:
        """Makes everything written so far durable."""
        self._log.sync(urgent=True)
        self._unsynced = 0

    def close(self) -> None:
        self._log.close()


class FileLog:
    """A journal in one local file: appended through a buffered handle, fsync'd at each sync."""

    def __init__(self, path: str):
        self.path = str(paths.as_path(path))
        self._f = None

    def read(self) -> bytes:
        if not os.path.exists(self.path):
            return b""
        with open(self.path, "rb") as f:
            return f.read()

    def seal(self, good_bytes: int) -> None:
        """Cuts a torn tail (a crash mid-write) back to the last whole record, then opens for appending."""
        if os.path.exists(self.path) and os.path.getsize(self.path) > good_bytes:
            with open(self.path, "r+b") as f:
                f.truncate(good_bytes)
                f.flush()
                os.fsync(f.fileno())
        self._open()

    def _open(self) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self.size = self._f.tell()

    def append(self, text: str) -> None:
        self._f.write(text)
        self.size += len(text)

    def crowded(self) -> bool:
        return False  # one file: only its size calls for compaction

    def sync(self, urgent: bool = True) -> bool:
        """Makes what was appended durable; returns whether it did (a file always does)."""
        self._f.flush()
        os.fsync(self._f.fileno())
        return True

    def replace(self, text: str) -> None:
        """The whole journal becomes `text`: written aside, synced, renamed over the old file."""
        self._f.close()
        tmp = self.path + ".compact"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        _sync_dir(self.path)
        self._open()

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self.sync()
            self._f.close()


class SegmentLog:
    """A journal in a bucket folder: `seg-<n>.jsonl` objects, one per sync, read in order from the
    newest that starts with a `base` record (a compaction); older ones are deleted after it.

    Each sync is an object upload (tens of ms to a real bucket, on the engine thread), so token
    records, which a restarted engine can regenerate, are uploaded at most every
    TOKEN_SYNC_INTERVAL_S; adds and ends (urgent) are uploaded at once.
    """

    TOKEN_SYNC_INTERVAL_S = 0.5
    MAX_SEGMENTS = 1000  # replay reads one object per segment: compact before a restart reads thousands

    BASE = '{"op":"base"}\n'  # ignored by _scan: it only marks where replay starts
    _NAME = re.compile(r"^seg-(\d{9})\.jsonl$")

    def __init__(self, path: str):
        self.root = paths.as_path(path)  # a bucket prefix: nothing to create before the first object
        self._pending, self.size, self._last_put, self._since_base = [], 0, 0.0, 0

    def _segments(self) -> list:
        return sorted((int(m.group(1)), p) for p in paths.list_dir(self.root) if (m := self._NAME.match(p.name)))

    def read(self) -> bytes:
        segments = self._segments()
        self._next = segments[-1][0] + 1 if segments else 0
        texts = []
        for _, p in reversed(segments):
            text = p.read_bytes()
            texts.append(text)
            if text.startswith(self.BASE.encode()):
                break
        data = b"".join(reversed(texts))
        self.size, self._since_base = len(data), len(texts)
        return data

    def crowded(self) -> bool:
        return self._since_base >= self.MAX_SEGMENTS

    def seal(self, good_bytes: int) -> None:
        pass  # an object is written whole or not at all: no torn tail

    def append(self, text: str) -> None:
        self._pending.append(text)
        self.size += len(text)

    def _put(self, text: str):
        p = self.root / f"seg-{self._next:09d}.jsonl"
        p.write_text(text)
        self._next += 1
        self._since_base += 1
        self._last_put = time.monotonic()
        return p

    def sync(self, urgent: bool = True) -> bool:
        """Uploads what was appended as the next segment; returns whether it did (a non-urgent
        sync within TOKEN_SYNC_INTERVAL_S of the last upload waits for a later one)."""
        if not urgent and time.monotonic() - self._last_put < self.TOKEN_SYNC_INTERVAL_S:
            return False
        if self._pending:
            self._put("".join(self._pending))
            self._pending = []
        return True

    def replace(self, text: str) -> None:
        older = self._segments()
        self._put(self.BASE + text)
        self._pending, self.size, self._since_base = [], len(self.BASE) + len(text), 1
        for _, p in older:  # replay starts at the base segment: these are only clutter now
            try:
                p.unlink()
            except OSError:
                pass

    def close(self) -> None:
        self.sync()


def open_log(path: str):
    """The journal's storage for `path`: segments in a bucket folder, or one local file."""
    return SegmentLog(path) if paths.is_remote(path) else FileLog(path)


def _line(record: dict) -> str:
    return json.dumps(record, separators=(",", ":")) + "\n"


def _unfinished(live: Dict[str, dict]) -> List[Request]:
    return sorted((request_from_record(rec) for rec in live.values()), key=lambda r: r.arrival_time)


def _sync_dir(path: str) -> None:
    """Makes a rename in path's folder durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _parse(line: str):
    """A record from one line, or None. A line that a crash cut short and a later writer (before
    journals sealed their tails on open) appended to holds a whole record at its end: taken."""
    for text in (line, line[max(0, line.rfind('{"op":')):]):
        try:
            rec = json.loads(text)
        except ValueError:
            continue
        if isinstance(rec, dict) and "op" in rec:
            return rec
    return None


def _scan(data: bytes, path: str):
    """(unfinished request records by id, the last KEEP_FINISHED finished ones (with "reason"),
    bytes up to the end of the last whole record, whether any request ended) of a journal's
    bytes. A bad last line (a torn write) is left out; any other bad line is an error."""
    live: Dict[str, dict] = {}
    done: "collections.OrderedDict[str, dict]" = collections.OrderedDict()
    if not data:
        return live, done, 0, False
    lines = data.split(b"\n")
    good, offset, ended = 0, 0, False
    for n, raw in enumerate(lines, 1):
        end = offset + len(raw) + 1  # with its newline
        last = n == len(lines)       # no newline after it: cut short, or empty
        if raw.strip():
            rec = None if last else _parse(raw.decode("utf-8", errors="replace"))
            if rec is None:
                if all(not rest.strip() for rest in lines[n:]):
                    break  # the crash cut this write short
                raise ValueError(f"{path}:{n}: not a journal record")
            op, rid = rec.get("op"), rec.get("id")
            if op == "add":
                live[rid] = {k: v for k, v in rec.items() if k != "op"}
                live[rid].setdefault("ids", [])
                live[rid].setdefault("logprobs", [])
            elif op == "tokens" and rid in live:
                live[rid]["ids"] += rec["ids"]
                live[rid]["logprobs"] += rec["logprobs"]
                if rec.get("top"):
                    live[rid].setdefault("top", []).extend(rec["top"])
            elif op == "end":
                ended = True
                rec_done = live.pop(rid, None)
                if rec_done is not None:
                    keep_newest(done, rid, {**rec_done, "reason": rec.get("reason")}, KEEP_FINISHED)
        if not last:
            good = end
        offset = end
    return live, done, good, ended


def replay(path: str) -> List[Request]:
    """Every request the journal saw start and not end, in arrival order, with its committed tokens
    (as fresh Requests: no cache, waiting; `Engine.resume` takes them back).

    A torn last line (the crash came mid-write) is ignored; any other bad line is an error.
    """
    return _unfinished(_scan(open_log(path).read(), path)[0])
