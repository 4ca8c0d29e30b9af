"""Scheduling policies on request metadata alone, with a fake clock: no model, no device."""
import numpy as np
import pytest

from jaxserve.scheduling import FCFSPolicy, MLFQPolicy, PriorityPolicy, make_policy
from jaxserve.scheduling.cost_model import CostModel
from jaxserve.scheduling.plan import CacheState, RequestView

# 1 ms per call + 0.1 ms per (padded) token: prefill of 16 tokens ~2.6 ms, of 1024 ~ 104 ms
COST = CostModel(coef=np.array([1e-3, 1e-4, 0, 1e-3, 1e-4, 0, 0]), page_size=16, max_batch=8, max_chunk=4096)


def view(rid, arrival=0.0, prompt=16, computed=0, generated=0, pages=0, location="none", priority=0):
    return RequestView(rid, arrival, priority, prompt + generated, computed, generated, 100, pages, location)


def cache(free=100, host=0, batch=8, budget=4096):
    return CacheState(page_size=16, free_pages=free, total_pages=100, free_host_pages=host, max_batch=batch,
                      token_budget=budget, max_chunk=4096)


def mlfq(**kw):
    return MLFQPolicy(num_levels=5, base_quantum_s=0.01, quantum_growth=2.0, starvation_s=1.0, cost_model=COST, **kw)


def test_skip_join_uses_the_profiled_prefill_time():
    p = mlfq()
    assert p.quanta == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16])
    short, mid, long = view("s", prompt=16), view("m", prompt=150), view("l", prompt=1024)
    p.schedule([short, mid, long], cache(), now=0.0)
    # prefill times: 16 -> 2.6 ms (Q0), 150 -> 1+0.1*256 = 26.6 ms (Q2), 1024 -> 103.4 ms (Q4)
    assert [p.jobs[r].level for r in "sml"] == [0, 2, 4]


def test_demotion_after_a_quantum_of_service_and_token_level_preemption():
    p = mlfq()
    job = view("a", prompt=16, computed=16, generated=1, pages=2, location="device")
    now = 0.0
    levels = []
    for _ in range(40):  # each step lasts 5 ms
        plan = p.schedule([job], cache(), now)
        assert plan.run == [("a", 1)]
        levels.append(p.jobs["a"].level)
        now += 0.005
    # service per level: 10 ms -> 2 steps in Q0, 4 in Q1, 8 in Q2, 16 in Q3
    assert levels[:2] == [0, 0] and levels[2:6] == [1] * 4 and levels[6:14] == [2] * 8 and levels[14:30] == [3] * 16
    assert levels[30] == 4
    # a new short job outranks the demoted one and takes the only batch slot at once
    new = view("b", arrival=now, prompt=16)
    plan = p.schedule([job, new], cache(batch=1), now)
    assert plan.run == [("b", 16)]
    assert p.queue_lengths() == [1, 0, 0, 0, 1]


def test_starved_jobs_are_promoted_to_the_top_queue():
    p = mlfq()
    old = view("old", prompt=1024)
    p.schedule([old], cache(), 0.0)
    assert p.jobs["old"].level == 4
    now = 0.0
    for i in range(30):  # a stream of short jobs keeps the single slot busy
        now += 0.05
        plan = p.schedule([old, view(f"s{i}", arrival=now, prompt=16)], cache(batch=1), now)
        if p.jobs["old"].level == 0:
            break
        assert [rid for rid, _ in plan.run] == [f"s{i}"]
    assert p.jobs["old"].level == 0 and now > 1.0  # promoted once it waited over starvation_s
    assert [rid for rid, _ in plan.run] == ["old"]  # and, older within Q0, it runs at once


def test_swap_out_worst_ranked_then_preempt_when_host_is_full():
    p = PriorityPolicy()
    hi = view("hi", prompt=48, priority=0, arrival=5.0)                      # needs 3 pages
    mid = view("mid", computed=16, generated=1, pages=2, location="device", priority=1)
    low = view("low", computed=16, generated=1, pages=2, location="device", priority=2)
    plan = p.schedule([hi, mid, low], cache(free=1, host=10, batch=2), 0.0)
    assert plan.swap_out == ["low"] and plan.preempt == []
    assert ("hi", 48) in plan.run and ("mid", 1) in plan.run
    # host full: a job not started yet waits rather than throw away another job's work...
    plan = p.schedule([hi, mid, low], cache(free=1, host=0, batch=2), 0.0)
    assert plan.preempt == [] and plan.swap_out == [] and plan.run == [("mid", 1), ("low", 1)]
    # ...and a started job drops a lower-ranked cache only when nothing could run otherwise
    grow = view("grow", prompt=32, computed=32, generated=1, pages=2, location="device", priority=0)  # next page
    full = view("full", prompt=32, computed=32, generated=1, pages=2, location="device", priority=1)
    plan = p.schedule([grow, full], cache(free=0, host=0, batch=2), 0.0)
    assert plan.preempt == ["full"] and plan.run == [("grow", 1)]
    plan = p.schedule([grow, mid], cache(free=0, host=0, batch=2), 0.0)
    assert plan.preempt == [] and plan.run == [("mid", 1)]  # mid fits: it runs, grow waits


def test_watermark_offloads_idle_jobs_and_prefetch_brings_back_the_next_in_line():
    p = PriorityPolicy(watermark_pages=4)
    run = view("run", computed=16, generated=1, pages=2, location="device", priority=0)
    idle = view("idle", computed=16, generated=1, pages=3, location="device", priority=5)
    plan = p.schedule([run, idle], cache(free=2, host=10, batch=1), 0.0)
    assert plan.run == [("run", 1)] and plan.swap_out == ["idle"]
    swapped = view("idle", computed=16, generated=1, pages=3, location="host", priority=5)
    plan = p.schedule([run, swapped], cache(free=10, host=7, batch=1), 0.0)
    assert plan.run == [("run", 1)] and plan.swap_in == ["idle"]  # uploaded ahead of its turn
    plan = p.schedule([run, swapped], cache(free=6, host=7, batch=1), 0.0)
    assert plan.swap_in == []  # 6 - 3 would break the watermark


def test_host_resident_job_is_uploaded_then_runs_from_the_next_step():
    p = PriorityPolicy()
    back = view("back", computed=16, generated=1, pages=2, location="host", priority=0)
    plan = p.schedule([back], cache(free=3, host=0), 0.0)
    assert plan.swap_in == ["back"] and plan.run == []  # its upload overlaps a step, not holds one
    uploaded = view("back", computed=16, generated=1, pages=2, location="device", priority=0)
    assert p.schedule([uploaded], cache(free=1, host=2), 0.01).run == [("back", 1)]


def test_fcfs_runs_to_completion_and_waits_to_admit():
    p = FCFSPolicy()
    first = view("first", arrival=0.0, computed=16, generated=1, pages=2, location="device")
    second = view("second", arrival=1.0, prompt=200)  # needs 13 pages
    plan = p.schedule([second, first], cache(free=5), 0.0)
    assert plan.run == [("first", 1)]  # no room for the whole prompt: second waits
    plan = p.schedule([second, first], cache(free=50), 0.0)
    assert plan.run == [("first", 1), ("second", 200)]


def test_default_quanta_are_decode_steps_of_the_cost_model_as_refitted():
    import dataclasses
    p = MLFQPolicy(cost_model=dataclasses.replace(COST, coef=COST.coef.copy()))
    step = COST.step_time([(1, 1)])
    assert p.quanta == pytest.approx([3 * step * 2 ** i for i in range(6)])
    p.cost_model.coef *= 10  # a refit on a slower machine: the queues stretch with it
    assert p.quanta[0] == pytest.approx(30 * step)
    assert MLFQPolicy(base_quantum_s=0.5, cost_model=COST).quanta[0] == 0.5  # an explicit base wins
    with pytest.raises(ValueError, match="scheduler.mlfq"):
        MLFQPolicy(base_quantum_steps=0, cost_model=COST)


def test_make_policy_names_the_field():
    assert isinstance(make_policy("mlfq"), MLFQPolicy)
    with pytest.raises(ValueError, match="scheduler.policy"):
        make_policy("lottery")


def test_a_promoted_job_waits_for_free_pages_instead_of_evicting():
    p = mlfq(watermark_pages=0)
    old = view("old", prompt=64)        # 4 pages to start
    runner = view("run", prompt=32, computed=32, generated=1, pages=3, location="device", arrival=1.0)
    p.schedule([old, runner], cache(free=0, host=100, batch=1), 0.0)
    p.jobs["old"].level = p.jobs["run"].level = 3           # both demoted
    plan = p.schedule([old, runner], cache(free=0, host=100, batch=1), 2.0)  # old starved: promoted
    assert p.jobs["old"].level == 0 and p.jobs["old"].promoted
    assert plan.swap_out == [] and plan.preempt == [] and plan.run == [("run", 1)]
    plan = p.schedule([old, runner], cache(free=4, host=100, batch=1), 2.1)  # pages free up: it runs
    assert plan.run == [("old", 64)] and plan.swap_out == []


def test_a_chunk_ranked_below_a_decode_gets_a_short_step_and_one_above_the_whole_budget():
    decode = view("d", prompt=16, computed=16, generated=1, pages=2, location="device", priority=0)
    below = view("p", prompt=1000, priority=1)
    queued = view("q", prompt=4000, priority=2)  # more prefill waits than one budget holds
    plan = PriorityPolicy(cost_model=COST).schedule([decode, below, queued], cache())
    # by COST, 128-token steps keep prefill within 10% of a full budget's rate (64 do not)
    assert plan.run == [("d", 1), ("p", 127)]
    above = view("p", prompt=1000, priority=-1)
    assert PriorityPolicy(cost_model=COST).schedule([decode, above, queued], cache()).run == [("d", 1), ("p", 1000)]
    # no slowdown allowed: the chunk fills the budget as before
    plan = PriorityPolicy(cost_model=COST, max_prefill_slowdown=0.0).schedule([decode, below, queued], cache())
    assert plan.run == [("d", 1), ("p", 1000)]


def test_with_all_waiting_prefill_inside_one_budget_the_step_may_be_shorter():
    decode = view("d", prompt=16, computed=16, generated=1, pages=2, location="device", priority=0)
    below = view("p", prompt=1000, priority=1)
    # 1,000 waiting tokens fit the 4,096 budget: up to half the prefill rate may go (16 tokens
    # keep more than half of it by COST, 8 do not), so the decode's step is short
    assert PriorityPolicy(cost_model=COST).schedule([decode, below], cache()).run == [("d", 1), ("p", 15)]
    # set to the backlog's slowdown, the backlog's step
    plan = PriorityPolicy(cost_model=COST, idle_prefill_slowdown=0.1).schedule([decode, below], cache())
    assert plan.run == [("d", 1), ("p", 127)]
    with pytest.raises(ValueError, match="scheduler.idle_prefill_slowdown"):
        PriorityPolicy(cost_model=COST, idle_prefill_slowdown=1.0)


def test_a_short_step_that_saves_the_decodes_less_than_a_step_is_not_taken():
    decode = view("d", prompt=16, computed=16, generated=1, pages=2, location="device", priority=0)
    below = view("p", prompt=3000, priority=1)  # all the waiting prefill fits the budget: the idle rule
    # by COST (per-token cost dominates) a 16-token step keeps half the prefill rate and saves
    # the decode far more than the step itself takes: the chunk is cut
    assert PriorityPolicy(cost_model=COST).schedule([decode, below], cache(free=400)).run == [("d", 1), ("p", 15)]
    # a step's fixed cost dominates (a small model on a CPU): cutting the chunk would save the
    # decode 2% of a step and cost the chunk a whole step, so it fills the budget
    fixed = CostModel(coef=np.array([1e-2, 1e-7, 0, 1e-2, 1e-7, 0, 0]), page_size=16, max_batch=8, max_chunk=4096)
    assert PriorityPolicy(cost_model=fixed).schedule([decode, below], cache(free=400)).run == [("d", 1), ("p", 3000)]


def test_a_long_job_on_host_comes_back_though_its_upload_exceeds_the_link_budget():
    # the link moves 2 pages during this step's compute; the job needs 40 back: it goes alone,
    # uploaded this step to run from the next, rather than wait for a step with nothing to run
    on_host = view("big", prompt=600, computed=600, generated=1, pages=40, location="host", priority=0)
    running = view("run", prompt=16, computed=16, generated=1, pages=2, location="device", priority=1)
    link = CacheState(page_size=16, free_pages=60, total_pages=100, free_host_pages=100, max_batch=8,
                      token_budget=4096, max_chunk=4096, swap_s_per_page=COST.step_time([(1, 2)]) / 2)
    plan = PriorityPolicy(cost_model=COST).schedule([on_host, running], link)
    assert plan.swap_in == ["big"] and plan.run == [("run", 1)] and not plan.swap_out


def test_a_job_whose_upload_just_landed_is_not_evicted_before_it_runs():
    on_host = view("a", prompt=60, computed=60, generated=1, pages=4, location="host", priority=0)
    p = PriorityPolicy(cost_model=COST)
    plan = p.schedule([on_host], cache(free=10, host=16))
    assert plan.swap_in == ["a"] and plan.run == []  # uploaded now, runs from the next step
    landed = view("a", prompt=60, computed=60, generated=1, pages=4, location="device", priority=0)
    better = view("b", prompt=150, priority=-1)  # needs 10 pages: only evicting "a" would make room
    plan = p.schedule([landed, better], cache(free=6, host=16))
    assert "a" not in plan.swap_out and ("a", 1) in plan.run
    # a step later "a" is an ordinary running job again, and the better one may evict it
    plan = p.schedule([landed, better], cache(free=6, host=16))
    assert plan.swap_out == ["a"] and plan.run == [("b", 150)]


# -- what a prefix cache holds: the policies see it ----------------------------------------------
def test_a_cached_prefix_counts_as_done_for_skip_join_and_chunk_sizes():
    p = mlfq()
    cold = view("cold", prompt=1024)
    warm = RequestView("warm", 0.0, 0, 1024, 0, 0, 100, 0, "none", num_cached=1008)  # 16 tokens left
    plan = p.schedule([cold, warm], cache(free=200), now=0.0)
    assert p.jobs["warm"].level == 0 and p.jobs["cold"].level == 4  # its first token is 16 tokens away
    assert ("warm", 16) in plan.run and ("cold", 1024) in plan.run
    assert cache().pages_needed(warm, 16) == 64  # the cached pages it takes are counted too


def test_a_victim_frees_only_the_pages_it_does_not_share():
    hi = view("hi", prompt=48, priority=0, arrival=5.0)  # needs 3 pages
    mid = RequestView("mid", 0.0, 1, 33, 32, 1, 100, 3, "device")
    for shared, victims in ((0, ["low"]), (4, ["low", "mid"])):  # worst ranked first, until 3 pages are free
        low = RequestView("low", 0.0, 2, 65, 64, 1, 100, 5, "device", shared_pages=shared)
        plan = PriorityPolicy().schedule([hi, mid, low], cache(free=0, host=10, batch=2), 0.0)
        assert plan.swap_out == victims and ("hi", 48) in plan.run


def test_the_simulator_skips_the_prefill_of_cached_prefixes():
    from jaxserve.sim.simulator import SimConfig, Simulator
    from jaxserve.sim.workload import Job

    def jobs(cached):
        return [Job(f"j{i}", 0.05 * i, 1024, 8, cached_len=cached) for i in range(20)]
    cold, warm = ([Simulator(mlfq(), COST, SimConfig(num_pages=4096)).run(jobs(c)) for c in (0, 960)])
    mean = lambda js: sum(j.ttft for j in js) / len(js)
    assert mean(warm) < 0.3 * mean(cold)


def test_prefill_steps_pad_at_most_a_quarter_octave_and_precompile_covers_every_shape():
    """A prefill step's GEMMs are compute bound, so each padded row costs a real token's time:
    past 512 tokens a step rounds up to a quarter of an octave (639 tokens ran as 1,024 before)."""
    from jaxserve.scheduling.cost_model import FINE_TOKENS, step_shape, step_shapes
    max_batch, budget, max_pages = 128, 2048, 256
    reachable = set(step_shapes(max_batch, budget, max_pages))
    for total in range(2, budget + 1):
        shape = step_shape([total], [max_pages], max_batch, max_pages)
        assert shape in reachable
        assert shape.tokens >= total and shape.tokens % 16 == 0
        if total > FINE_TOKENS:
            octave = 1 << (total - 1).bit_length()
            assert shape.tokens - total < octave // 8, (total, shape.tokens)
    assert step_shape([512 + 127], [8], max_batch, max_pages).tokens == 640
