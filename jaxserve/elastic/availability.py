"""Spot-instance availability traces: when nodes come and go.

Reads the formats of SpotServe's artifact: a CSV of `t_ms,add|remove,nodeN` rows, or JSON lines
`[t_ms, "add"|"remove"|"DONE", {"nodes": [...]}]`. Each event is known `grace_s` before it
happens (30 s on AWS), which is when a notice is delivered.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from typing import List, Optional


@dataclasses.dataclass(frozen=True)
class AvailabilityEvent:
    time_s: float
    kind: str          # "add" or "remove"
    nodes: tuple


def read_availability(path: str) -> List[AvailabilityEvent]:
    events = []
    with open(path) as f:
        if path.endswith(".jsonl"):
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    t, kind, info = json.loads(line)
                except ValueError as e:
                    raise ValueError(f"{path}:{n}: not a [t_ms, kind, {{nodes}}] line ({e})") from e
                if kind == "DONE":
                    break
                events.append(AvailabilityEvent(t / 1000.0, kind, tuple(info["nodes"])))
        else:
            for n, row in enumerate(csv.reader(f), 1):
                if len(row) != 3:
                    raise ValueError(f"{path}:{n}: expected t_ms,add|remove,node")
                events.append(AvailabilityEvent(float(row[0]) / 1000.0, row[1], (row[2],)))
    for e in events:
        if e.kind not in ("add", "remove"):
            raise ValueError(f"{path}: unknown event kind {e.kind!r}")
    return sorted(events, key=lambda e: e.time_s)


def read_end(path: str) -> Optional[float]:
    """When the trace ends (its DONE line, in seconds), or None (CSV traces have none)."""
    if not path.endswith(".jsonl"):
        return None
    with open(path) as f:
        for line in f:
            if line.strip():
                t, kind, _ = json.loads(line)
                if kind == "DONE":
                    return t / 1000.0
    return None


def node_seconds(events: List[AvailabilityEvent], end: float) -> float:
    """Node-seconds alive from the first event to `end` (what a spot fleet is billed for)."""
    total, last, alive = 0.0, None, 0
    for t, count in node_counts(events):
        if last is not None:
            total += alive * (min(t, end) - last)
        last, alive = min(t, end), count
    return total + alive * max(0.0, end - last) if last is not None else 0.0


def node_counts(events: List[AvailabilityEvent]) -> List[tuple]:
    """(time, nodes alive) after each event."""
    alive, out = set(), []
    for e in events:
        alive = alive | set(e.nodes) if e.kind == "add" else alive - set(e.nodes)
        out.append((e.time_s, len(alive)))
    return out
