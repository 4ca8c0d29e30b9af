"""No preemptive policy serves fewer requests than FCFS at a load FCFS keeps up with (issue 16).

The simulator in FastServe's setting (OPT-13B on one A100, swaps over PCIe beside compute) on
the prefill-heavy, heavy-tailed synthetic workload: before swaps were held to what the link
moves during a step's compute, MLFQ's swap traffic set the step's pace at 3 requests/s and it
served two thirds of FCFS's requests per second.
"""
import pytest

from jaxserve.scheduling import make_policy
from jaxserve.sim.settings import fastserve_setting
from jaxserve.sim.simulator import Simulator
from jaxserve.sim.workload import summarize, synthetic

RATES = (0.5, 2.5, 3.0)


def replay(name, rate):
    cost, config = fastserve_setting()
    jobs = synthetic(1000, rate)
    policy = make_policy("fcfs") if name == "fcfs" else make_policy(name, cost_model=cost)
    sim = Simulator(policy, cost, config)
    sim.run(jobs)
    span = max(j.finish for j in jobs) - min(j.arrival for j in jobs)
    return summarize(jobs)["jct_avg"], len(jobs) / span, sim.stats


@pytest.fixture(scope="module")
def fcfs():
    return {rate: replay("fcfs", rate) for rate in RATES}


@pytest.mark.parametrize("name", ["mlfq", "priority", "gittins"])
def test_no_preemptive_policy_serves_fewer_requests_than_fcfs_where_fcfs_keeps_up(fcfs, name):
    lightest = fcfs[RATES[0]][0]
    kept_up = [rate for rate in RATES if fcfs[rate][0] <= 10 * lightest]
    assert RATES[-1] in kept_up  # the heaviest load here is one FCFS keeps up with
    for rate in kept_up:
        jct, throughput, stats = replay(name, rate)
        assert throughput >= fcfs[rate][1] * (1 - 1e-3), (name, rate, throughput, fcfs[rate][1], stats)
        assert jct <= 1.05 * fcfs[rate][0], (name, rate, jct, fcfs[rate][0])
