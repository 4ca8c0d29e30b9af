"""The Gittins-index policy: known prefill, learned output lengths, on request metadata alone."""
import numpy as np
import pytest

from jaxserve.scheduling import GittinsPolicy
from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.gittins import OutputLengths
from jaxserve.scheduling.plan import CacheState, RequestView
from jaxserve.sim.queueing import gittins_ranks

COST = CostModel(coef=np.array([1e-3, 1e-4, 0, 1e-3, 1e-4, 0, 0]), page_size=16, max_batch=8, max_chunk=4096)


def view(rid, prompt=16, generated=0, arrival=0.0):
    computed = prompt + generated - 1 if generated else 0  # decoding jobs have all but the new token cached
    return RequestView(rid, arrival, 0, prompt + generated, computed, generated, 10_000,
                       -(-(prompt + generated) // 16) if generated else 0, "device" if generated else "none")


def cache(batch=8):
    return CacheState(page_size=16, free_pages=1000, total_pages=1000, max_batch=batch, token_budget=4096,
                      max_chunk=4096)


def learned(lengths, **kw):
    d = OutputLengths(prior_weight=1e-9, refresh=0.0, **kw)
    for n in lengths:
        d.observe(n)
    return d


def test_the_index_of_learned_lengths_is_the_one_server_gittins_index():
    sizes = [1] * 9 + [100]
    d, ranks = learned(sizes), gittins_ranks(sizes)
    for age in (0, 1, 50, 99):
        assert d.index(age, 0.0, 1.0) == pytest.approx(1 / ranks[age], rel=1e-6)


def test_a_known_prefill_puts_short_prompts_first():
    p = GittinsPolicy(cost_model=COST)
    plan = p.schedule([view("long", prompt=2000), view("short", prompt=100)], cache(batch=1))
    assert plan.run == [("short", 100)]


def test_output_lengths_are_learned_from_requests_that_finish_not_from_those_cut_short():
    p = GittinsPolicy(cost_model=COST, prior_weight=1e-9)
    p.lengths.refresh = 0.0
    for i in range(20):  # each request is seen at 6 tokens, then ends with its 7th
        p.schedule([view(f"r{i}", generated=6)], cache())
        p.finished(f"r{i}", 7, "stop" if i % 2 else "length")
        p.schedule([], cache())
    for i, reason in enumerate(("abort", "error", "handed_over")):  # lengths they never reached
        p.schedule([view(f"cut{i}", generated=2)], cache())
        p.finished(f"cut{i}", 3, reason)
    p.schedule([view("moved", generated=4)], cache())
    p.schedule([], cache())  # gone without an end: moved to another engine, nothing learned
    assert list(p.lengths.values) == [1, 2, 4, 7, 8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert p.lengths.counts[list(p.lengths.values).index(7)] == pytest.approx(20)
    assert p.lengths.counts.sum() == pytest.approx(20)


def test_heavy_tails_favour_the_young_and_even_lengths_the_old():
    heavy = learned(np.random.default_rng(0).pareto(1.1, 5000).astype(int) + 1)
    even = learned([50] * 100)
    token_s = 1e-3
    # heavy-tailed: a job that has run long is likely to run long yet; a fresh one goes first
    assert heavy.index(0, 0.0, token_s) > heavy.index(40, 0.0, token_s)
    # all of length 50: the older job is nearer its end and goes first (FCFS-like)
    assert even.index(40, 0.0, token_s) > even.index(5, 0.0, token_s)
    p = GittinsPolicy(cost_model=COST)
    p.lengths = heavy
    plan = p.schedule([view("old", generated=40, arrival=0.0), view("young", generated=1, arrival=1.0)],
                      cache(batch=1))
    assert plan.run == [("young", 1)]


def test_bad_prior_names_the_field():
    with pytest.raises(ValueError, match="scheduler.gittins"):
        GittinsPolicy(prior_weight=0)
