"""How serving reacts when devices come or go: SpotServe, its baselines and its ablations.

One definition that the serving cluster (elastic/cluster.py) and the spot simulator
(sim/spot_simulator.py) both follow. A method is a set of choices, as SpotServe's artifact
composes them (Hsword/SpotServe, branch artifact: scheduler/scheduler.py, global_server/Switch.py):

  shape      "adaptive": re-plan (data, model[, pipe]) for the devices at hand (the controller);
             "largest": one replica shape, planned for the most devices the trace ever has, and
             replicas of it come and go (rerouting); "initial": the shape planned for the devices
             at the start, only the number of replicas changes (the ablation without the controller).
  keep       "all": every replica is re-formed at a change; "untouched": replicas that lost no
             device serve on, the lost ones' requests start over elsewhere (rerouting).
  params     "resident": taken from the devices that hold them; "checkpoint": re-read.
  resume     in-flight requests resume from their last committed token, their KV migrated (the
             interruption arranger's stateful recovery); otherwise they start over.
  mapper     "kuhn_munkres": new positions matched to devices to keep resident bytes in place;
             "rank_order": devices taken in order (the ablation without the device mapper).
  overlap    the migration planner: the new replicas start as their parts arrive, with nothing
             re-deployed (in the engine: the deferred switch compiles the new shapes while the old
             replicas serve); otherwise they start once everything has moved, after a re-deploy
             (the artifact's ablation level 2: FT waits for all parameters, then starts again).
  at_notice  act at a preemption notice, within its grace period; otherwise when the devices go.
  skip_noop  no switch when the new plan would use the same shape on the same devices.
"""
from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class Recovery:
    name: str
    shape: str = "adaptive"
    keep: str = "all"
    params: str = "resident"
    resume: bool = True
    mapper: str = "kuhn_munkres"
    overlap: bool = True
    at_notice: bool = True
    skip_noop: bool = False

    def __post_init__(self):
        for field, allowed in (("shape", ("adaptive", "largest", "initial")), ("keep", ("all", "untouched")),
                               ("params", ("resident", "checkpoint")), ("mapper", ("kuhn_munkres", "rank_order"))):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Recovery.{field}={getattr(self, field)!r}: expected one of {allowed}")


SPOTSERVE = Recovery("spotserve")
# the artifact's baselines: restart re-deploys from the checkpoint when the devices go, every
# in-flight request starting over; rerouting keeps one replica shape and drops the replicas hit
RESTART = Recovery("restart", params="checkpoint", resume=False, overlap=False, at_notice=False, skip_noop=True)
REROUTE = Recovery("reroute", shape="largest", keep="untouched", params="checkpoint", resume=False, overlap=False,
                   at_notice=False)

# The artifact's ablation levels (scripts_ae/ablation_plot.py), each removing one more component.
WITHOUT_CONTROLLER = dataclasses.replace(SPOTSERVE, name="-controller", shape="initial")
WITHOUT_MIGRATION_PLANNER = dataclasses.replace(WITHOUT_CONTROLLER, name="-migration_planner", overlap=False)
WITHOUT_INTERRUPTION_ARRANGER = dataclasses.replace(WITHOUT_MIGRATION_PLANNER, name="-interruption_arranger",
                                                    resume=False)
WITHOUT_DEVICE_MAPPER = dataclasses.replace(WITHOUT_INTERRUPTION_ARRANGER, name="-device_mapper", mapper="rank_order")

METHODS: Dict[str, Recovery] = {r.name: r for r in (
    SPOTSERVE, RESTART, REROUTE, WITHOUT_CONTROLLER, WITHOUT_MIGRATION_PLANNER, WITHOUT_INTERRUPTION_ARRANGER,
    WITHOUT_DEVICE_MAPPER)}
ABLATIONS = ("spotserve", "-controller", "-migration_planner", "-interruption_arranger", "-device_mapper")


def recovery(method) -> Recovery:
    """A Recovery, or the one named `method` (one of METHODS)."""
    if isinstance(method, Recovery):
        return method
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {', '.join(METHODS)}")
    return METHODS[method]
