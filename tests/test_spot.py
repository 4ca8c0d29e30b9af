"""SpotServe on 8 fake CPU devices: every (data, model) shape, preemption with and without grace."""
import dataclasses

import jax
import pytest

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.checkpoint import store
from jaxserve.elastic import matching, planner
from jaxserve.elastic.cluster import ServingCluster
from jaxserve.model.sharding import make_mesh, shard_params

from test_engine import mixed_prompts

GREEDY = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.8, seed=3, ignore_eos=True)
CONFIG = EngineConfig(num_pages=128, max_batch=8, token_budget=64, max_chunk=32)


@pytest.fixture(scope="module")
def requests():
    return [(f"r{i}", p, GREEDY if i % 2 else SEEDED) for i, p in enumerate(mixed_prompts(6, seed=21))]


@pytest.fixture(scope="module")
def reference(tiny_host, requests):
    """Outputs of one device, uninterrupted."""
    cfg, params, tok = tiny_host
    mesh = make_mesh(1, 1)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tok, CONFIG)
    return drain(engine, requests)


def drain(server, requests, steps_before=None, event=None):
    for rid, prompt, params in requests:
        server.add_request(rid, prompt, params)
    out, steps = {}, 0
    while server.has_unfinished():
        if steps == steps_before:
            event()
        for o in server.step():
            if o.finished:
                out[o.request_id] = o.token_ids
        steps += 1
    return out


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2, 2), (1, 4), (4, 1), (1, 8), (2, 4), (4, 2), (8, 1)])
def test_every_mesh_shape_gives_the_single_device_outputs(tiny_host, requests, reference, shape):
    cfg, params, tok = tiny_host
    cluster = ServingCluster(cfg, params, jax.devices()[:shape[0] * shape[1]], *shape, CONFIG, tok)
    assert cluster.shape == shape
    assert drain(cluster, requests) == reference


def test_preempting_4_of_8_with_grace_loses_and_recomputes_nothing(tiny_host, requests, reference):
    cfg, params, tok = tiny_host
    devices = jax.devices()
    cluster = ServingCluster(cfg, params, devices, 2, 4, CONFIG, tok)
    events = []
    out = drain(cluster, requests, steps_before=4, event=lambda: events.append(
        cluster.notify_preemption(devices[2:6], grace_s=30.0)))
    (e,) = events
    assert out == reference  # no request lost: each one's final tokens are the reference run's
    assert e.tokens_recomputed == 0 and e.checkpoint_bytes_read == 0
    assert e.requests_migrated == len(requests) and e.kv_bytes_moved > 0
    assert cluster.shape[0] * cluster.shape[1] <= 4 and set(cluster.devices) == set(devices[:2] + devices[6:])
    # survivors kept their own shards where the new layout allowed
    assert e.param_bytes_moved < cluster.param_bytes * cluster.shape[0]


def test_deferred_preemption_compiles_the_new_mesh_while_the_old_one_serves(tiny_host, requests, reference,
                                                                           monkeypatch):
    """defer=True: the notice only plans; the new meshes' decode steps compile in the background
    while the old replicas keep stepping, and the step after the switch compiles nothing."""
    import threading
    from jaxserve.engine import model_runner
    cfg, params, tok = tiny_host
    devices = jax.devices()
    go = threading.Event()  # holds the background compile back until the old replicas have served
    real = model_runner.compile_ahead
    monkeypatch.setattr(model_runner, "compile_ahead", lambda *a, **k: go.wait() and real(*a, **k))
    cluster = ServingCluster(cfg, params, devices, 2, 4, CONFIG, tok)
    for rid, prompt, p in requests:
        cluster.add_request(rid, prompt, p)
    out, event, served_pending, switch_compiles = {}, None, 0, None

    def step():
        for o in cluster.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    while cluster.has_unfinished():
        running = [r for e in cluster.replicas for r in e.requests.values()]
        if event is None and len(running) == len(requests) and all(len(r.output_ids) >= 2 for r in running):
            # every request decoding: the switch's first step is a decode step, compiled ahead
            event = cluster.notify_preemption(devices[2:6], grace_s=600.0, defer=True)
            for _ in range(2):
                step()
                assert not event.done and cluster.shape == (2, 4)  # still serving on all 8 devices
                served_pending += 1
            go.set()
            cluster._pending.ready.wait()
            traced = dict(model_runner.TRACE_COUNT)
            step()  # switches, then steps on the new meshes
            assert event.done
            switch_compiles = {k: model_runner.TRACE_COUNT[k] - traced[k] for k in traced}
        step()
    assert out == reference
    assert served_pending == 2 and event.tokens_recomputed == 0
    assert event.shapes_compiled_ahead >= 1 and event.deferred_s > 0
    assert set(cluster.devices) == set(devices[:2] + devices[6:])
    assert switch_compiles == {"forward": 0, "sample": 0}  # its step shapes were ready


def test_a_held_decode_shape_ends_with_the_requests_it_was_held_for(tiny_host, requests, reference):
    """A deferred switch holds a replica's decode steps at the shape it compiled ahead
    (Engine.hold_decode_shape); once the requests it was held for have ended, a new request's
    steps have the shapes a fresh engine would give them, not the held one."""
    from jaxserve.engine import model_runner
    cfg, params, tok = tiny_host
    mesh = make_mesh(1, 1)
    engine = Engine(cfg, shard_params(params, cfg, mesh), mesh, tok, CONFIG)
    runner, shapes = engine.runner, []

    def recording(chunks, held=runner.pack):
        packed = held(chunks)
        natural = model_runner.pack(chunks, runner.page_size, runner.max_batch, runner.max_pages_per_seq,
                                    runner.num_pages)
        shapes.append((packed[0], natural[0]))
        return packed
    runner.pack = recording
    for rid, prompt, p in requests:
        engine.add_request(rid, prompt, p)
    engine.hold_decode_shape(8, runner.max_pages_per_seq)  # far more pages than these requests reach
    out = drain(engine, [])
    assert out == reference
    held = [s for s, natural in shapes if s != natural]
    assert held and all(s.pages >= runner.max_pages_per_seq for s in held)  # the hold applied to them
    shapes.clear()
    assert drain(engine, [("later", [5, 6, 7], GREEDY)])["later"] == reference_for(engine, [5, 6, 7])
    assert len(shapes) >= GREEDY.max_tokens and all(s == natural for s, natural in shapes)


def reference_for(engine, prompt):
    fresh = Engine(engine.cfg, engine.runner.params, engine.runner.mesh, engine.tokenizer, CONFIG)
    return drain(fresh, [("x", prompt, GREEDY)])["x"]


@pytest.mark.parametrize("named", ["half", "all"])
def test_a_sigterm_notice_is_planned_for_by_the_next_step(tiny_host, requests, reference, named):
    """The handler only records the notice; the next step plans for the devices it names (here
    half of them). A notice that takes every device (in one process, jax.local_devices() is all of
    them) leaves nothing to plan onto: serving goes on, and the cluster says why."""
    import os
    import signal
    cfg, params, tok = tiny_host
    devices = jax.devices()
    cluster = ServingCluster(cfg, params, devices, 2, 4, CONFIG, tok)
    previous = signal.getsignal(signal.SIGTERM)
    try:
        cluster.install_sigterm_handler(grace_s=600.0, devices=(lambda: devices[2:6]) if named == "half" else None)
        out = drain(cluster, requests, steps_before=4, event=lambda: os.kill(os.getpid(), signal.SIGTERM))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert out == reference  # no request lost: each one's final tokens are the reference run's
    if named == "half":
        (e,) = cluster.events
        assert e.kind == "preemption" and e.done and e.devices_lost == 4 and e.tokens_recomputed == 0
        assert set(cluster.devices) == set(devices[:2] + devices[6:]) and cluster.notice_error is None
    else:
        assert not cluster.events and cluster.devices == devices and cluster.shape == (2, 4)
        assert "takes all 8 devices" in cluster.notice_error


def test_preemption_without_grace_restores_params_from_the_checkpoint_and_recomputes_kv(tiny_host, requests, reference, tmp_path):
    cfg, params, tok = tiny_host
    store.save(str(tmp_path), cfg, params)
    devices = jax.devices()
    cluster = ServingCluster(cfg, params, devices, 1, 8, CONFIG, tok, checkpoint_path=str(tmp_path))
    events = []
    out = drain(cluster, requests, steps_before=5, event=lambda: events.append(
        cluster.notify_preemption(devices[4:], grace_s=0.0)))
    (e,) = events
    assert out == reference
    assert e.checkpoint_bytes_read == cluster.param_bytes * cluster.shape[0]
    assert e.tokens_recomputed > 0 and e.kv_bytes_moved == 0


@pytest.mark.parametrize("method", ["restart", "reroute", "-controller", "-migration_planner",
                                    "-interruption_arranger", "-device_mapper"])
def test_every_recovery_method_ends_every_request_as_the_reference_run(tiny_host, requests, reference, tmp_path,
                                                                       method):
    """The baselines and SpotServe's ablation levels (elastic.recovery, the simulator's too) on
    the real engine: a (2, 2) cluster loses a device mid-decode; each request's final tokens are
    the uninterrupted run's, whether it resumed or started over."""
    from jaxserve.elastic.recovery import recovery
    cfg, params, tok = tiny_host
    store.save(str(tmp_path), cfg, params)
    devices = jax.devices()[:4]
    cluster = ServingCluster(cfg, params, devices, 2, 2, CONFIG, tok, checkpoint_path=str(tmp_path), method=method)
    events = []
    out = drain(cluster, requests, steps_before=4, event=lambda: events.append(
        cluster.notify_preemption(devices[3:], grace_s=1e-3)))
    (e,) = events
    assert len(out) == len(requests) and out == reference
    assert e.done and set(cluster.devices) == set(devices[:3])
    r = recovery(method)
    assert cluster.shape == (1, 2) if r.shape != "adaptive" or r.keep == "untouched" else cluster.shape[0] * cluster.shape[1] <= 3
    if r.params == "checkpoint" and r.keep == "all":
        assert e.checkpoint_bytes_read == cluster.param_bytes * cluster.shape[0]
    if not r.resume:
        assert e.kv_bytes_moved == 0 and e.requests_migrated > 0


def test_acquisition_grows_the_mesh_again(tiny_host, requests, reference):
    cfg, params, tok = tiny_host
    devices = jax.devices()
    cluster = ServingCluster(cfg, params, devices[:2], 1, 2, CONFIG, tok)
    events = []
    out = drain(cluster, requests, steps_before=3, event=lambda: events.append(cluster.notify_acquisition(devices[2:6])))
    assert out == reference and events[0].new_shape[0] * events[0].new_shape[1] > 2


def test_matching_reuses_resident_shards_known_optimum():
    A, B, C, D = "A", "B", "C", "D"
    # old (1,4) on A..D; the survivors come in shuffled order: the identity mapping keeps everything
    old = {A: (0, 0, 4), B: (0, 1, 4), C: (0, 2, 4), D: (0, 3, 4)}
    groups, heirs = matching.match(old, [D, B, A, C], 1, 4, param_bytes=400.0, kv_bytes={0: 100.0})
    assert groups == [[A, B, C, D]] and heirs == [0]
    assert matching.resident_bytes(groups, old, 400.0, 4) == 400.0
    # old (2,2): replica 1 (C, D) holds far more KV; with B, C, D left and a (1,2) mesh, keep C, D
    old = {A: (0, 0, 2), B: (0, 1, 2), C: (1, 0, 2), D: (1, 1, 2)}
    groups, heirs = matching.match(old, [B, C, D], 1, 2, param_bytes=100.0, kv_bytes={0: 10.0, 1: 1000.0})
    assert groups == [[C, D]] and heirs == [1]  # the new replica inherits replica 1's requests
    # shrinking (1,4) -> (1,2): each survivor is given the half that contains its quarter
    old = {A: (0, 0, 4), B: (0, 1, 4), C: (0, 2, 4), D: (0, 3, 4)}
    groups, _ = matching.match(old, [D, A], 1, 2, param_bytes=400.0, kv_bytes={})
    assert groups == [[A, D]]


def test_matching_of_pipelined_replicas():
    A, B, C, D = "A", "B", "C", "D"
    # (pipe 2, model 2) on A..D, survivors shuffled: the identity keeps every byte
    old = {A: (0, (0, 0), (2, 2)), B: (0, (0, 1), (2, 2)), C: (0, (1, 0), (2, 2)), D: (0, (1, 1), (2, 2))}
    groups, _ = matching.match(old, [C, A, D, B], 1, 2, param_bytes=400.0, kv_bytes={0: 40.0}, pipe=2)
    assert groups == [[A, B, C, D]]
    # two stages (A first half of the layers, B second) -> four: each keeps a quarter it holds
    old = {A: (0, (0, 0), (2, 1)), B: (0, (1, 0), (2, 1))}
    groups, _ = matching.match(old, [B, C, A, D], 1, 1, param_bytes=400.0, kv_bytes={}, pipe=4)
    stage = {d: i for i, d in enumerate(groups[0])}
    assert stage[A] in (0, 1) and stage[B] in (2, 3)
    assert matching.resident_bytes(groups, old, 400.0, 1, pipe=4) == 200.0


def test_planner_prefers_low_latency_that_covers_the_load():
    step = lambda model, batch, pipe=1: 0.04 / model + (0.002 if model > 1 else 0)
    fast = planner.choose(8, 8, 1e9, 0, 16e9, step, 16, arrival_tokens_per_s=100)
    assert (fast.data, fast.model) == (1, 8)  # one replica spread over 8 devices is quickest
    busy = planner.choose(8, 8, 1e9, 0, 16e9, step, 16, arrival_tokens_per_s=3000)
    assert busy.throughput >= 3000 and busy.data > 1
    with pytest.raises(ValueError, match="do not fit"):
        planner.choose(2, 8, 40e9, 0, 16e9, step, 16)


def test_the_memory_model_is_what_an_engine_allocates(tiny_host):
    """The planner's count of a replica's device memory equals the bytes its devices hold."""
    import gc
    from jaxserve.elastic.migration import live_device_bytes
    cfg, params, tok = tiny_host
    devices = jax.devices()[6:8]
    gc.collect()
    before = live_device_bytes()
    cluster = ServingCluster(cfg, params, devices, 1, 2, CONFIG, tok)
    held = live_device_bytes()
    need = cluster.memory_model().replica_device_bytes(2)
    for d in devices:  # all but the few bytes of the previous step's tokens
        assert 0 <= held[d] - before.get(d, 0) - need < 1024
    assert cluster.memory_model().replica_device_bytes(1) > 1.5 * need  # the params and pool split in two


def test_planning_onto_devices_just_too_small(tiny_host):
    """A replica of one device does not fit, one of two does: the planner picks two or refuses."""
    cfg, params, tok = tiny_host
    devices = jax.devices()[6:8]
    probe = ServingCluster(cfg, params, devices, 1, 2, CONFIG, tok)
    one, two = (probe.memory_model().replica_device_bytes(m) for m in (1, 2))
    with pytest.raises(ValueError, match="data=1, model=1 does not fit: a replica of model=1 needs"):
        ServingCluster(cfg, params, devices[:1], 1, 1, CONFIG, tok, device_bytes=one - 1)
    cluster = ServingCluster(cfg, params, devices, 1, 2, CONFIG, tok, device_bytes=one - 1)
    assert (cluster.choose_config(2).data, cluster.choose_config(2).model) == (1, 2)
    assert probe.choose_config(1).model == 1  # with the memory to spare, one device would do
    with pytest.raises(ValueError, match="no configuration of 1 devices fits"):
        cluster.notify_preemption(devices[1:], grace_s=30.0)
    assert cluster.shape == (1, 2) and not cluster.events  # refused before anything moved
    with pytest.raises(ValueError, match="host memory"):  # two replicas' host page pools, room for one
        ServingCluster(cfg, params, devices, 2, 1, dataclasses.replace(CONFIG, host_pages=64), tok,
                       host_bytes=1.5 * 64 * probe._page_bytes())


@pytest.mark.parametrize("num_pages,order", [(128, "via_host"), (1024, "release_pools")])
def test_a_switch_never_holds_more_than_fits(tiny_host, requests, reference, num_pages, order):
    """Two devices become one that holds the new replica with 1 MB to spare, not the old and
    new side by side: the switch gives the old arrays up first (the pools, or with them the
    params, through host memory), no device ever holds more, and every output is the reference's."""
    import gc
    from jaxserve.elastic.migration import live_device_bytes
    cfg, params, tok = tiny_host
    devices = jax.devices()[6:8]
    config = dataclasses.replace(CONFIG, num_pages=num_pages)
    need = ServingCluster(cfg, params, devices, 1, 2, config, tok).memory_model().replica_device_bytes(1)
    gc.collect()
    other = max(live_device_bytes().get(d, 0) for d in devices)  # what earlier tests left there
    room = other + need + 2 ** 20
    runs = {}
    for limit in (room, None):
        gc.collect()
        cluster = ServingCluster(cfg, params, devices, 1, 2, config, tok, device_bytes=limit)
        events = []
        out = drain(cluster, requests, steps_before=4, event=lambda: events.append(
            cluster.notify_preemption(devices[1:], grace_s=30.0)))
        assert out == reference and events[0].tokens_recomputed == 0
        runs[limit] = events[0]
    assert runs[room].memory_order == order and runs[room].peak_device_bytes <= room
    assert runs[None].memory_order == "overlap" and runs[None].peak_device_bytes > room  # side by side


def test_swapped_out_requests_migrate_too(tiny_host, requests, reference):
    """Under memory pressure some requests sit in host memory when the notice comes."""
    from jaxserve.scheduling import PriorityPolicy
    cfg, params, tok = tiny_host
    devices = jax.devices()
    small = EngineConfig(num_pages=14, page_size=8, host_pages=200, max_batch=4, token_budget=64, max_chunk=32)
    policies = []

    def make_policy(cost_model):
        policies.append(PriorityPolicy(watermark_pages=2, cost_model=cost_model))
        return policies[-1]
    cluster = ServingCluster(cfg, params, devices[:4], 2, 2, small, tok, make_policy=make_policy)
    for i, (rid, prompt, p) in enumerate(requests):
        cluster.add_request(rid, prompt, p, priority=-i)  # later ones outrank: forces swaps
    out, swapped_at_notice = {}, None
    while cluster.has_unfinished():
        if swapped_at_notice is None and any(e.host_pool.used for e in cluster.replicas):
            swapped_at_notice = sum(e.host_pool.used for e in cluster.replicas)
            event = cluster.notify_preemption(devices[:2], grace_s=30.0)
            assert event.tokens_recomputed == 0
        for o in cluster.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    assert swapped_at_notice  # the notice really found swapped-out KV
    assert out == {rid: reference[rid] for rid, _, _ in requests}
    # every replica's policy sizes jobs with its own engine's cost model (the one it refits)
    assert policies and all(e.policy.cost_model is e.cost_model for e in cluster.replicas)


def _spot_setting(**kw):
    from jaxserve.sim.spot_simulator import LayerProfile, SpotSetting
    profile = LayerProfile(num_layers=4, init={1: {1: 50.0, 4: 100.0}, 2: {1: 30.0, 4: 60.0}},
                           incr={1: {1: 5.0, 4: 6.0}, 2: {1: 3.0, 4: 3.5}})
    base = dict(profile=profile, param_bytes=8e9, kv_bytes_per_token=1e5, num_kv_heads=8, devices_per_node=2,
                device_bytes=16e9, link_bytes_s=1e9, checkpoint_bytes_s=1e9, restart_s=5.0, max_batch=4,
                max_model=2, max_pipe=2, min_replica_devices=2, required_rps=0.0)
    base.update(kw)
    return SpotSetting(**base)


def test_spot_simulator_recovers_in_place_where_baselines_start_over():
    """Same controller code as the engine (planner + matching), priced: SpotServe keeps every
    request's progress through a preemption with notice; restart redoes in-flight work."""
    from jaxserve.elastic.availability import AvailabilityEvent
    from jaxserve.sim.spot_simulator import SpotSimulator
    from jaxserve.sim.workload import poisson
    events = [AvailabilityEvent(0.0, "add", ("n0", "n1", "n2")), AvailabilityEvent(30.0, "remove", ("n1",)),
              AvailabilityEvent(60.0, "add", ("n3",))]
    results = {}
    for method in ("spotserve", "restart", "reroute"):
        jobs = poisson(60, 1.0, prompt_len=64, output_len=200, seed=1)
        sim = SpotSimulator(_spot_setting(devices_per_node=1), method, grace_s=10.0)  # replicas span nodes
        sim.run(jobs, events)
        assert all(j.finish is not None and j.finish >= j.arrival for j in jobs)  # nobody lost
        results[method] = (sim, max(j.finish - j.arrival for j in jobs))
    spot, _ = results["spotserve"]
    assert spot.restarted == 0 and not any(e["late"] for e in spot.events)
    moved = [e for e in spot.events if e["kind"] == "preemption"][0]
    assert moved["param_bytes_moved"] == 4e9  # n1's half moves to n2; n0 keeps its half
    assert results["restart"][0].restarted > 0  # in-flight requests started over
    assert results["spotserve"][1] < results["restart"][1]


def test_simulated_reroute_keeps_the_shape_planned_for_the_largest_cluster():
    """As the artifact's rerouting baseline: the replica shape is planned once for the most
    devices the trace ever has; fewer devices serve with fewer replicas of that shape."""
    from jaxserve.elastic.availability import AvailabilityEvent
    from jaxserve.sim.spot_simulator import LayerProfile, SpotSimulator
    from jaxserve.sim.workload import poisson
    profile = LayerProfile(num_layers=4, init={m: {4: 100.0 / m} for m in (1, 2, 4)},
                           incr={m: {4: 6.0 / m} for m in (1, 2, 4)})
    setting = _spot_setting(profile=profile, devices_per_node=1, max_model=4, max_pipe=1, min_replica_devices=1)
    events = [AvailabilityEvent(0.0, "add", ("n0", "n1")), AvailabilityEvent(20.0, "add", ("n2", "n3"))]
    jobs = {m: poisson(20, 1.0, prompt_len=64, output_len=50, seed=2) for m in ("reroute", "spotserve")}
    sims = {m: SpotSimulator(setting, m, grace_s=10.0) for m in jobs}
    for m, sim in sims.items():
        sim.run(jobs[m], events)
        assert all(j.finish is not None for j in jobs[m])
    assert sims["reroute"].plan(2).model == 2 and sims["reroute"].plan(4).model == 4
    assert [(r.model, r.pipe) for r in sims["reroute"].replicas] == [(4, 1)]
    # two devices are too few for a replica of 4: reroute serves nothing until the others come
    assert min(j.first_token for j in jobs["reroute"]) > 20.0
    assert min(j.first_token for j in jobs["spotserve"]) < 20.0  # SpotServe plans for what it has


def _two_of_three_nodes():
    """n0, n1 serve a (1, 2) replica; n2 comes, then n0 goes: the survivors n1, n2 serve (1, 2) again."""
    from jaxserve.elastic.availability import AvailabilityEvent
    return [AvailabilityEvent(0.0, "add", ("n0", "n1")), AvailabilityEvent(20.0, "add", ("n2",)),
            AvailabilityEvent(60.0, "remove", ("n0",))]


def test_simulated_ablation_levels_each_remove_what_they_name():
    """The artifact's ablation levels, cumulative: without the controller the initial shape
    stays; without the migration planner a switch also re-deploys; without the interruption
    arranger in-flight requests start over; without the device mapper devices go in rank order
    and resident parameter slices are not kept where they are."""
    from jaxserve.elastic.availability import AvailabilityEvent
    from jaxserve.elastic.recovery import ABLATIONS
    from jaxserve.sim.spot_simulator import LayerProfile, SpotSimulator
    from jaxserve.sim.workload import poisson
    setting = _spot_setting(devices_per_node=1, max_pipe=1)
    runs = {}
    for method in ABLATIONS:
        jobs = poisson(100, 1.0, prompt_len=64, output_len=200, seed=3)
        sim = SpotSimulator(setting, method, grace_s=10.0)
        sim.run(jobs, _two_of_three_nodes())
        assert all(j.finish is not None for j in jobs)
        runs[method] = (sim, [e for e in sim.events if e["kind"] == "preemption"][0])
    assert runs["spotserve"][0].restarted == 0 and runs["-controller"][0].restarted == 0
    assert runs["-controller"][1]["pause_s"] < setting.restart_s <= runs["-migration_planner"][1]["pause_s"]
    assert runs["-migration_planner"][0].restarted == 0 < runs["-interruption_arranger"][0].restarted
    assert runs["-interruption_arranger"][1]["kv_bytes_moved"] == 0 < runs["-migration_planner"][1]["kv_bytes_moved"]
    # n1 keeps its half of the params under Kuhn-Munkres (n2 receives n0's); in rank order both move
    assert runs["-interruption_arranger"][1]["param_bytes_moved"] == setting.param_bytes / 2
    assert runs["-device_mapper"][1]["param_bytes_moved"] == setting.param_bytes
    # without the controller: 4 devices at the start plan (1, 2) replicas, and 4 later stay (2, 2), not (1, 4)
    events = [AvailabilityEvent(0.0, "add", ("n0", "n1")), AvailabilityEvent(20.0, "add", ("n2", "n3"))]
    profile = LayerProfile(num_layers=4, init={m: {4: 100.0 / m} for m in (1, 2, 4)},
                           incr={m: {4: 6.0 / m} for m in (1, 2, 4)})
    for method, shape in (("spotserve", (1, 4)), ("-controller", (2, 2))):
        sim = SpotSimulator(_spot_setting(profile=profile, devices_per_node=1, max_pipe=1, max_model=4), method,
                            grace_s=10.0)
        sim.run(poisson(40, 1.0, prompt_len=64, output_len=50, seed=2), events)
        assert (len(sim.replicas), sim.replicas[0].model) == shape


def test_simulated_restart_skips_events_that_change_nothing():
    """As the artifact's restart baseline: a node that joins or leaves without changing the plan
    or the devices it uses re-deploys nothing; losing a device in use restarts everything."""
    from jaxserve.elastic.availability import AvailabilityEvent
    from jaxserve.sim.spot_simulator import SpotSimulator
    from jaxserve.sim.workload import poisson
    setting = _spot_setting(devices_per_node=1, max_pipe=1)
    for tail, restarts in (("n2", False), ("n0", True)):
        events = [AvailabilityEvent(0.0, "add", ("n0", "n1")), AvailabilityEvent(20.0, "add", ("n2",)),
                  AvailabilityEvent(60.0, "remove", (tail,))]
        jobs = poisson(100, 1.0, prompt_len=64, output_len=200, seed=3)
        sim = SpotSimulator(setting, "restart", grace_s=10.0)
        sim.run(jobs, events)
        assert all(j.finish is not None for j in jobs)
        assert [bool(e.get("unchanged")) for e in sim.events] == [True, not restarts]
        assert (sim.restarted > 0) == restarts


def test_the_artifacts_latency_estimator_prices_micro_batched_pipelines():
    """solver.py's get_approx_latency: (pipe + M - 1) stage times of a micro-batch, the prefill's
    over M, the best power of two M, plus the embedding twice; without it, stage after stage."""
    from jaxserve.sim.spot_simulator import LayerProfile
    table = {8: {1: 32.2, 2: 42.778, 4: 80.624}}
    kw = dict(num_layers=44, init=table, incr={8: {1: 1.758, 2: 1.764, 4: 1.932}}, pp_init_comm=7.0,
              pp_incr_comm=0.1, fix_factor=1.1)
    micro = LayerProfile(**kw, micro_batches=True, embed=(0.33, 0.402, 0.614))
    plain = LayerProfile(**kw)
    assert micro.prefill_s(8, 2, 4) == pytest.approx((32.2 * 22 * 5 / 4 + 7.0 / 4 + 2 * 0.614) * 1.1 / 1e3)
    assert plain.prefill_s(8, 2, 4) == pytest.approx((80.624 * 22 * 2 + 7.0) * 1.1 / 1e3)
    assert micro.decode_s(8, 2, 4) == plain.decode_s(8, 2, 4) == pytest.approx((1.932 * 22 * 2 + 0.1) * 1.1 / 1e3)


def test_spot_node_seconds_and_the_trace_end():
    from jaxserve.bench.data import SPOT_TRACES
    from jaxserve.elastic.availability import AvailabilityEvent, node_seconds, read_end
    events = [AvailabilityEvent(0.0, "add", ("a", "b")), AvailabilityEvent(10.0, "add", ("c",)),
              AvailabilityEvent(30.0, "remove", ("a", "b"))]
    assert node_seconds(events, 40.0) == 2 * 10 + 3 * 20 + 1 * 10
    assert read_end(SPOT_TRACES["trace_AS.jsonl"]) == 1320.0 and read_end(SPOT_TRACES["g4dn_full.csv"]) is None


def test_requests_sharing_cached_pages_migrate_with_the_same_outputs(tiny_host):
    """Prefix caching on, requests sharing a system prompt's pages, random ones swapped out each
    step (their shared pages kept on the device), the notice while some are: every output as on
    one device without the cache."""
    import dataclasses
    import numpy as np
    from test_swap import ChaosPolicy
    cfg, params, tok = tiny_host
    rng = np.random.default_rng(4)
    system = rng.integers(3, 1000, size=32).tolist()
    reqs = [(f"s{i}", system + rng.integers(3, 1000, size=int(rng.integers(20, 50))).tolist(), GREEDY if i % 2 else SEEDED)
            for i in range(12)]
    mesh = make_mesh(1, 1)
    plain = dataclasses.replace(CONFIG, prefix_cache=False)
    want = drain(Engine(cfg, shard_params(params, cfg, mesh), mesh, tok, plain), reqs)
    devices = jax.devices()
    small = EngineConfig(num_pages=40, page_size=8, host_pages=200, max_batch=4, token_budget=48, max_chunk=32,
                         prefix_cache=True)
    cluster = ServingCluster(cfg, params, devices[:4], 2, 2, small, tok,
                             make_policy=lambda cost_model: ChaosPolicy(seed=2, p=0.3))  # random swap-outs
    out, noticed = {}, False
    for i, (rid, prompt, p) in enumerate(reqs):
        cluster.add_request(rid, prompt, p)
        if i == 1:  # the first two name the system prompt's pages before the others arrive
            for _ in range(3):
                out.update((o.request_id, o.token_ids) for o in cluster.step() if o.finished)
    while cluster.has_unfinished():
        if not noticed and any(e.kv.kept_pages for e in cluster.replicas):
            noticed = True
            assert cluster.notify_preemption(devices[:2], grace_s=30.0).tokens_recomputed == 0
        for o in cluster.step():
            if o.finished:
                out[o.request_id] = o.token_ids
    assert noticed  # the notice found swapped requests whose shared pages stayed on the device
    assert out == want
