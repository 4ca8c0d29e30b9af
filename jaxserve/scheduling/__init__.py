"""Scheduling policies: each sees request metadata only and returns a Plan."""
from jaxserve.scheduling.fcfs import FCFSPolicy
from jaxserve.scheduling.gittins import GittinsPolicy
from jaxserve.scheduling.mlfq import MLFQPolicy
from jaxserve.scheduling.priority import PriorityPolicy

POLICIES = {"fcfs": FCFSPolicy, "mlfq": MLFQPolicy, "priority": PriorityPolicy, "gittins": GittinsPolicy}


def check_policy_name(name: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"scheduler.policy={name!r} is not one of {sorted(POLICIES)}")


def make_policy(name: str, cost_model=None, **kwargs):
    """The policy `name`; cost_model: the engine's (shared, refitted while serving), for the
    policies that estimate job sizes with it (all but FCFS)."""
    check_policy_name(name)
    if name == "fcfs":
        return FCFSPolicy()
    return POLICIES[name](cost_model=cost_model, **kwargs)
