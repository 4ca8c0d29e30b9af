"""Scheduling policies: each sees request metadata only and returns a Plan."""
from jaxserve.scheduling.fcfs import FCFSPolicy
from jaxserve.scheduling.mlfq import MLFQPolicy
from jaxserve.scheduling.priority import PriorityPolicy

POLICIES = {"fcfs": FCFSPolicy, "mlfq": MLFQPolicy, "priority": PriorityPolicy}


def make_policy(name: str, **kwargs):
    if name not in POLICIES:
        raise ValueError(f"scheduler.policy={name!r} is not one of {sorted(POLICIES)}")
    return POLICIES[name](**kwargs)
