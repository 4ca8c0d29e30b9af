"""A deferred switch: the new configuration compiles while the old replicas keep serving.

At a notice with a grace period the controller plans at once, and a background thread compiles
the decode shapes the new replicas will run right after the switch: each group's share of the
in-flight requests, with the pages the longest will have reached by then (the engine holds
decode steps at that shape until those requests end, `Engine.hold_decode_shape`), then the next
page bucket up. The switch happens once those have compiled, or at the deadline the cluster sets.
"""
from __future__ import annotations

import dataclasses
import threading
from typing import Callable, Sequence

from jaxserve import sampling
from jaxserve.engine import model_runner
from jaxserve.engine.engine import Engine, EngineConfig
from jaxserve.elastic.reparallelization import Plan, ReparallelizationEvent
from jaxserve.model.config import ModelConfig
from jaxserve.model.sharding import make_mesh
from jaxserve.scheduling.cost_model import step_shape

# How far requests grow before the switch: about as long as the compile (an unrolled 8B-shape
# decode step takes about 7 s on an H100); never past the deadline.
COMPILE_AHEAD_HORIZON_S = 10.0


@dataclasses.dataclass
class DeferredSwitch:
    args: dict                   # the re-parallelization to make at the switch
    plan: Plan
    event: ReparallelizationEvent
    compiler: threading.Thread
    ready: threading.Event       # the shapes needed right after the switch are compiled
    switch_by: float
    noticed: float


def decode_floor(replicas: Sequence[Engine], plan: Plan, group: int, horizon_s: float, page_size: int) -> tuple:
    """(rows, pages): the decode shape `group`'s replica will run after a switch up to `horizon_s`
    from now: its heir's requests or an even share of all in-flight ones, with the pages the
    longest reaches by then at the recent step rate."""
    requests = [r for e in replicas for r in e.requests.values()]
    if not requests:
        return 1, 1
    heir = plan.heirs[group]
    own = len(replicas[heir].requests) if heir is not None else 0
    rows = max(own, -(-len(requests) // plan.config.data))
    recent = sorted(t for e in replicas for _, t in e.step_log[-32:])
    step_s = max(recent[len(recent) // 2], 1e-4) if recent else float("inf")
    tokens = max(r.num_tokens for r in requests) + 1 + int(horizon_s / step_s)
    return rows, min(-(-tokens // page_size), replicas[0].max_pages_per_seq)


def start(cfg: ModelConfig, config: EngineConfig, replicas: Sequence[Engine], plan: Plan, event: ReparallelizationEvent,
          args: dict, switch_by: float, clock: Callable[[], float]) -> DeferredSwitch:
    """Sets `plan.decode_floor` and starts compiling its shapes for each new group's mesh."""
    horizon = min(switch_by - clock(), COMPILE_AHEAD_HORIZON_S)
    plan.decode_floor = [decode_floor(replicas, plan, g, horizon, config.page_size) for g in range(len(plan.groups))]
    max_pages = replicas[0].max_pages_per_seq

    def phases(rows, pages):  # the floor shape (the switch waits for it), then the next page bucket up
        now, later = (step_shape([1] * rows, [p], config.max_batch, max_pages) for p in (pages, 2 * pages))
        return [[now], [later] if later != now else []]
    jobs = [(make_mesh(1, plan.config.model, group), phases(rows, pages))
            for group, (rows, pages) in zip(plan.groups, plan.decode_floor)]
    ready = threading.Event()

    def compile_all():  # the shapes needed at the switch first; the switch need not wait for the rest
        try:
            for phase in (0, 1):
                for mesh, shapes in jobs:
                    event.shapes_compiled_ahead += model_runner.compile_ahead(
                        cfg, mesh, config.num_pages, config.page_size, config.max_batch, shapes[phase],
                        config.attention_impl, config.unroll_layers, modes=sampling.MODES)
                ready.set()
        finally:  # a failed compile must not hold the switch back: its steps compile on demand
            ready.set()
    compiler = threading.Thread(target=compile_all, name="jaxserve-compile-ahead")
    compiler.start()
    return DeferredSwitch(args, plan, event, compiler, ready, switch_by, clock())
