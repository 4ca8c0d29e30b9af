"""What a re-parallelization is: where it goes (a plan) and what it cost (an event)."""
from __future__ import annotations

import dataclasses
from typing import Optional

from jaxserve.elastic.planner import ParallelConfig


@dataclasses.dataclass
class ReparallelizationEvent:
    kind: str                    # "preemption" or "acquisition"
    grace: bool
    old_shape: tuple
    new_shape: tuple
    devices_lost: int
    time_to_resume_s: float = 0.0
    param_bytes_moved: int = 0
    kv_bytes_moved: int = 0
    checkpoint_bytes_read: int = 0
    tokens_recomputed: int = 0
    requests_migrated: int = 0
    deferred_s: float = 0.0      # notice to switch: the old replicas served meanwhile (defer=True)
    shapes_compiled_ahead: int = 0
    # how the old and new replicas' memory was sequenced ("overlap", "release_pools", "via_host")
    # and the most any of its devices held meanwhile, measured over the live arrays
    memory_order: str = "overlap"
    peak_device_bytes: int = 0
    done: bool = False           # False while a deferred switch is pending


@dataclasses.dataclass
class Plan:
    """Where a re-parallelization goes: the new configuration and its device groups."""
    config: ParallelConfig
    groups: list
    heirs: list                  # per group, the old replica it inherits (or None)
    decode_floor: Optional[list] = None  # per group, the smallest (rows, pages) decode shape to run
