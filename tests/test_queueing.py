"""The one-server bound of the scheduling benchmark: known queueing results, no model needed."""
import numpy as np
import pytest

from jaxserve.sim.queueing import gittins_ranks, simulate


def poisson_jobs(sizes, load, seed):
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.exponential(sizes.mean() / load, len(sizes)))


def test_fcfs_matches_pollaczek_khinchine():
    sizes = np.random.default_rng(0).geometric(1 / 50, 20000)
    arrivals = poisson_jobs(sizes, 0.7, 1)
    rate = 0.7 / sizes.mean()
    expected = sizes.mean() + rate * (sizes.astype(float) ** 2).mean() / (2 * (1 - 0.7))
    assert simulate(arrivals, sizes, "fcfs").mean() == pytest.approx(expected, rel=0.08)


def test_gittins_ranks_of_a_bimodal_distribution():
    # Nine jobs of 1 unit, one of 100: a fresh job is worth a try (9 in 10 finish after 1 unit);
    # past that it is the long one, whose index rises as it nears its end.
    ranks = gittins_ranks([1] * 9 + [100])
    assert ranks[0] == pytest.approx(10 / 9)
    assert ranks[1] == pytest.approx(99) and ranks[50] == pytest.approx(50) and ranks[99] == pytest.approx(1)


def test_gittins_is_fcfs_when_sizes_age_well_and_srpt_like_when_they_do_not():
    rng = np.random.default_rng(2)
    uniform = rng.integers(1, 300, 5000)       # increasing hazard rate: never worth preempting
    arrivals = poisson_jobs(uniform, 0.85, 3)
    fcfs, gittins, srpt = (simulate(arrivals, uniform, p).mean() for p in ("fcfs", "gittins", "srpt"))
    assert gittins == pytest.approx(fcfs) and srpt < 0.8 * fcfs
    bimodal = np.where(rng.random(5000) < 0.9, 1, 100)
    arrivals = poisson_jobs(bimodal, 0.85, 4)
    fcfs, gittins, srpt = (simulate(arrivals, bimodal, p).mean() for p in ("fcfs", "gittins", "srpt"))
    assert gittins < 0.3 * fcfs and gittins == pytest.approx(srpt, rel=0.1)


def test_every_job_gets_exactly_its_service():
    rng = np.random.default_rng(5)
    sizes = rng.integers(1, 60, 400)
    arrivals = poisson_jobs(sizes, 0.9, 6)
    for policy in ("fcfs", "gittins", "srpt"):
        jct = simulate(arrivals, sizes, policy, quantum=3)
        assert np.all(jct >= sizes - 1e-9)
        # Work-conserving: the last completion is the same for every policy.
        assert (arrivals + jct).max() == pytest.approx((arrivals + simulate(arrivals, sizes, "fcfs")).max())


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="policy"):
        simulate([0.0], [1], "lifo")
    with pytest.raises(ValueError, match="sizes"):
        gittins_ranks([0, 3])
