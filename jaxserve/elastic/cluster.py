"""Serving one model on (data, model) replicas, and surviving the loss of devices.

Each data-parallel replica is an Engine on its own (1, model) sub-mesh, with its own batch and
KV page pool; requests are routed to the least-loaded replica. On a preemption notice the
controller picks a new configuration for the devices that remain (planner), maps it onto them
reusing resident shards (matching), migrates parameters and in-flight KV (migration) and
resumes every request from its last committed token. Without a grace period, parameters are
restored from the checkpoint straight into the new sharding and lost KV is recomputed.
"""
from __future__ import annotations

import signal
import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import numpy as np
from absl import logging

from jaxserve.cache.paged_kv import pool_bytes_per_page
from jaxserve.checkpoint import store
from jaxserve.engine.engine import Engine, EngineConfig, engine_cost_model, replica_device_bytes
from jaxserve.model.config import ModelConfig
from jaxserve.elastic import deferred_switch, matching, planner
from jaxserve.elastic.migration import device_bytes, live_device_bytes, reshard_tree
from jaxserve.elastic.recovery import recovery
from jaxserve.elastic.reparallelization import Plan, ReparallelizationEvent
from jaxserve.model.sharding import make_mesh, param_bytes_per_device, param_shardings, shard_params


class ServingCluster:
    def __init__(self, cfg: ModelConfig, params, devices: Sequence, data: int, model: int,
                 engine_config: EngineConfig = EngineConfig(), tokenizer=None, checkpoint_path: Optional[str] = None,
                 make_policy: Optional[Callable] = None, device_bytes: Optional[float] = None,
                 clock: Callable[[], float] = time.monotonic, method="spotserve",
                 host_bytes: float = float("inf")):
        """params: a parameter tree placed anywhere (host numpy or device arrays).

        device_bytes: each device's memory for the planner (default: what the device reports,
        else 16 GiB); host_bytes: the host's, for the replicas' host page pools. A (data, model)
        whose replicas do not fit them is refused here, and re-plans pick only shapes that fit.

        make_policy: cost_model -> a scheduling policy for each replica's engine (default: the
        engine config's), given that engine's cost model so that its refits reach the policy.
        method: how to react to a change of devices, an `elastic.recovery` definition (the spot
        simulator follows the same) or its name: "spotserve" (re-plan, match, migrate), a
        baseline, "restart" (when the devices go, re-deploy a new plan from the checkpoint and
        restart every in-flight request from scratch) or "reroute" (keep the replica shape, drop
        replicas that lost a device and send their requests to the survivors from scratch; new
        replicas from the checkpoint), or an ablation level of SpotServe's.
        """
        self.recovery = recovery(method)
        self.method = self.recovery.name
        if self.recovery.params == "checkpoint" and not checkpoint_path:
            raise ValueError(f"method={self.method!r} re-reads the parameters: it needs a checkpoint_path")
        self.cfg, self.engine_config, self.tokenizer = cfg, engine_config, tokenizer
        self.checkpoint_path, self.make_policy, self.clock = checkpoint_path, make_policy, clock
        self.devices = list(devices)
        self.device_bytes = device_bytes or _device_memory(self.devices[0])
        self.host_bytes = host_bytes
        self.events: List[ReparallelizationEvent] = []
        self.param_bytes = param_bytes_per_device(cfg, 1)  # one device holds them all
        memory = self.memory_model()
        if not memory.fits(data, model):
            raise ValueError(f"data={data}, model={model} does not fit: {memory.why_not(model)}")
        groups = [self.devices[r * model:(r + 1) * model] for r in range(data)]
        self.replicas: List[Engine] = []
        for group in groups:
            mesh = make_mesh(1, model, group)
            placed, _ = reshard_tree(self._as_device_tree(params, mesh), param_shardings(cfg, mesh))
            self.replicas.append(self._engine(placed, mesh))
        self._route: Dict[str, int] = {}
        self._pending: Optional[deferred_switch.DeferredSwitch] = None
        self._held: list = []  # outputs read while re-parallelizing, returned by the next step
        self._notice: Optional[tuple] = None  # a SIGTERM's (devices, deadline), acted on by the next step
        self._removal: Optional[tuple] = None  # (args, event, deadline): acted on when the devices go
        self._initial_model = model  # the shape a recovery without the controller keeps
        self.notice_error: Optional[str] = None  # why the last such notice could not be planned for

    # -- serving ------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return (len(self.replicas), self.replicas[0].mesh.shape["model"])

    def add_request(self, request_id, prompt, params=None, arrival_time=None, priority=0):
        if request_id in self._route:
            raise ValueError(f"request_id={request_id!r}: already in use")
        i = min(range(len(self.replicas)), key=lambda k: len(self.replicas[k].requests))
        self.replicas[i].add_request(request_id, prompt, params, arrival_time, priority)
        self._route[request_id] = i

    def abort(self, request_id):
        if request_id not in self._route:
            raise ValueError(f"request_id={request_id!r}: no such unfinished request")
        self.replicas[self._route[request_id]].abort(request_id)

    def has_unfinished(self) -> bool:
        """Requests to serve, or a deferred switch still to make (its devices are going away)."""
        return (bool(self._held) or self._pending is not None or self._notice is not None
                or self._removal is not None or any(e.has_unfinished() for e in self.replicas))

    def step(self):
        if self._notice is not None:
            self._plan_for_notice()
        if self._removal is not None and (self.clock() >= self._removal[2]
                                          or not any(e.has_unfinished() for e in self.replicas)):
            self._finish_pending()
        p = self._pending
        if p is not None:
            if not any(e.has_unfinished() for e in self.replicas):  # nothing to serve meanwhile
                p.ready.wait(None if p.switch_by == float("inf") else max(0.0, p.switch_by - self.clock()))
            if p.ready.is_set() or self.clock() >= p.switch_by:
                self._finish_pending()
        outputs, self._held = self._held, []
        busy = [e for e in self.replicas if e.has_unfinished()]
        for e in busy:  # every replica's step is on its devices before the host reads any
            e.dispatch()
        for e in busy:
            outputs += e.collect()
        for o in outputs:
            if o.finished:
                self._route.pop(o.request_id, None)
        return outputs

    # -- elasticity ---------------------------------------------------------------------------
    def notify_preemption(self, devices: Sequence, grace_s: float = 30.0, defer: bool = False
                          ) -> ReparallelizationEvent:
        """`devices` will be taken away in `grace_s` seconds (0: they are already gone).

        defer (with a grace period, a recovery with the migration planner): only plan now. The
        new configuration's step shapes compile in a background thread while the current
        replicas keep serving, and `step` switches once they have compiled, or half-way through
        the grace period at the latest; the returned event is filled in then (`event.done`).
        Without it the switch happens here and the first steps on a new mesh wait for XLA. A
        recovery that acts when the devices go (restart, reroute) serves on until the deadline.
        """
        self._finish_pending()  # one re-parallelization at a time
        gone = set(devices)
        survivors = [d for d in self.devices if d not in gone]
        args = dict(survivors=survivors, lost=frozenset() if grace_s > 0 else frozenset(gone),
                    kind="preemption", grace=grace_s > 0, devices_lost=len(gone & set(self.devices)))
        if grace_s > 0 and not self.recovery.at_notice:
            event = ReparallelizationEvent("preemption", True, self.shape, self.shape, args["devices_lost"])
            self._removal = (dict(args, lost=frozenset(gone)), event, self.clock() + grace_s)
            return event
        if defer and grace_s > 0 and self.recovery.overlap:
            return self._defer(args, switch_by=self.clock() + grace_s / 2)
        return self._reparallelize(**args)

    def notify_acquisition(self, devices: Sequence, defer: bool = False) -> ReparallelizationEvent:
        """New devices to grow onto; `defer` as in `notify_preemption` (no deadline: the switch
        waits for the compiles)."""
        self._finish_pending()
        new = [d for d in devices if d not in self.devices]
        args = dict(survivors=self.devices + new, lost=frozenset(), kind="acquisition", grace=True, devices_lost=0)
        if defer and self.recovery.overlap:
            return self._defer(args, switch_by=float("inf"))
        return self._reparallelize(**args)

    def install_sigterm_handler(self, grace_s: float = 30.0, devices=None):
        """On SIGTERM (a spot VM's notice), re-parallelize away from the devices it takes:
        `devices`, a sequence or a callable that returns one when the signal comes (default:
        this process's, `jax.local_devices()`, as when a multi-host job loses this host's VM).

        The handler only records the notice, since it may run in the middle of a step. The next
        `step` plans for it with the grace still left (defer=True) and switches once the new
        meshes have compiled. A notice that takes every device of the cluster leaves nothing to
        plan onto: `notice_error` says so and serving goes on until the devices go (the
        server's journal and peer handover are what survive that)."""
        def handler(signum, frame):
            named = devices() if callable(devices) else (jax.local_devices() if devices is None else devices)
            self._notice = (list(named), self.clock() + grace_s)
        signal.signal(signal.SIGTERM, handler)

    def _plan_for_notice(self) -> None:
        named, deadline = self._notice
        self._notice = None
        gone = [d for d in self.devices if d in set(named)]
        if not gone:
            return
        if len(gone) == len(self.devices):
            self.notice_error = (f"the notice takes all {len(gone)} devices of this cluster: nothing to "
                                 f"re-parallelize onto; serving until they go")
            logging.warning(self.notice_error)
            return
        self.notice_error = None
        self.notify_preemption(gone, max(0.0, deadline - self.clock()), defer=True)

    def _plan(self, survivors) -> Plan:
        new = self.choose_config(len(survivors))
        placement, kv_bytes = {}, {}
        for r_idx, e in enumerate(self.replicas):
            devs = list(e.mesh.devices.flat)
            for m, d in enumerate(devs):
                placement[d] = (r_idx, m, len(devs))
            kv_bytes[r_idx] = sum(len(r.pages) for r in e.requests.values()) * self._page_bytes()
        if self.recovery.mapper == "kuhn_munkres":
            groups, heirs = matching.match(placement, survivors, new.data, new.model, self.param_bytes, kv_bytes)
        else:
            groups, heirs = matching.in_rank_order(len(self.replicas), survivors, new.data, new.model)
        return Plan(new, groups, heirs)

    def _defer(self, args: dict, switch_by: float) -> ReparallelizationEvent:
        plan = self._plan(args["survivors"])
        event = ReparallelizationEvent(args["kind"], args["grace"], self.shape,
                                       (plan.config.data, plan.config.model), args["devices_lost"])
        self._pending = deferred_switch.start(self.cfg, self.engine_config, self.replicas, plan, event, args,
                                              switch_by, self.clock)
        return event

    def _finish_pending(self) -> None:
        """Makes the switch a notice left pending (deferred, or waiting for the devices to go)."""
        if self._removal is not None:
            (args, event, _), self._removal = self._removal, None
            self._reparallelize(**args, event=event)
        p, self._pending = self._pending, None
        if p is None:
            return
        p.event.deferred_s = self.clock() - p.noticed
        self._reparallelize(**p.args, plan=p.plan, event=p.event)

    def memory_model(self) -> planner.MemoryModel:
        """What each replica allocates: on each device what its engine does at its degree
        (`replica_device_bytes`), on the host its page pool."""
        def device_need(model):
            return replica_device_bytes(self.cfg, self.engine_config, model)
        host_pool = self.engine_config.host_pages * self._page_bytes()
        return planner.MemoryModel(device_need, self.device_bytes, host_pool, self.host_bytes)

    def choose_config(self, num_devices: int) -> planner.ParallelConfig:
        kv_bytes = sum(len(r.pages) for e in self.replicas for r in e.requests.values()) * \
            self._page_bytes()
        cost = self.replicas[0].cost_model
        pages = max(1, self.cfg.max_seq_len // self.engine_config.page_size // 4)

        def step_time(model, batch, pipe=1):  # tensor parallelism splits the work, plus a per-layer all-reduce
            t = cost.step_time([(1, pages)] * batch)
            return t / model + (0 if model == 1 else 2 * self.cfg.num_layers * 20e-6)
        fixed = None
        if self.recovery.shape != "adaptive":  # the replica shape stays; only the replicas' number follows
            model = self._initial_model
            fixed = (num_devices // model, model)
            if fixed[0] < 1:
                raise ValueError(f"fewer than model={model} devices remain for one replica of the kept shape")
        return planner.choose(num_devices, self.cfg.num_kv_heads, self.param_bytes, kv_bytes, self.device_bytes,
                              step_time, self.engine_config.max_batch, memory=self.memory_model(), fixed=fixed)

    def _reparallelize(self, survivors, lost, kind, grace, devices_lost, plan: Optional[Plan] = None,
                       event: Optional[ReparallelizationEvent] = None) -> ReparallelizationEvent:
        if self.recovery.keep == "untouched":
            return self._reroute(survivors, lost, kind, grace, devices_lost, event)
        start = self.clock()
        if self.recovery.params == "checkpoint":  # nothing is carried over: every byte comes from the checkpoint
            lost = frozenset(self.devices)
        plan = plan or self._plan(survivors)
        new, groups, heirs = plan.config, plan.groups, plan.heirs
        event = event or ReparallelizationEvent(kind, grace, self.shape, (new.data, new.model), devices_lost)
        event.new_shape = (new.data, new.model)
        peak = _PeakMemory(set(self.devices) | set(survivors))
        # Export every in-flight request; KV survives where all of its replica's devices do.
        exported = []  # (request, kv, decoder, old replica)
        for r_idx, e in enumerate(self.replicas):
            intact = not (set(e.mesh.devices.flat) & lost)
            before = e.stats["recomputed_tokens"]
            self._held += e.drain()
            exported += [(*x, r_idx) for x in e.export_requests(with_kv=intact)]
            event.tokens_recomputed += e.stats["recomputed_tokens"] - before
        if not self.recovery.resume:
            exported = [(self._from_scratch(r), None, None, old) for r, _, _, old in exported]
        peak.sample()
        event.memory_order = order = self._memory_order(plan, [kv for _, kv, _, _ in exported])
        if order != "overlap":  # the old pools go before the new params come; exported KV waits on the host
            exported = [(r, None if kv is None else jax.device_get(kv), d, old) for r, kv, d, old in exported]
            for e in self.replicas:
                e.retire()
            peak.sample()
        # the new params: from a replica whose devices all survive (the one the group inherits,
        # else the one sharing the most devices with it: what is resident stays), else the checkpoint
        sources = [e for e in self.replicas if not (set(e.mesh.devices.flat) & lost)]
        host_params = jax.device_get(sources[0].params) if order == "via_host" and sources else None
        if order == "via_host":
            for e in self.replicas:
                e.retire(params=True)
        meshes = [make_mesh(1, new.model, group) for group in groups]
        placed = []
        for group, heir, mesh in zip(groups, heirs, meshes):
            placed.append(self._place_params(mesh, self.replicas[heir] if heir is not None else None,
                                             sources, host_params, event))
            peak.sample()
        sources = host_params = None
        for e in self.replicas:  # shards the new params reuse stay alive through them
            e.retire(params=True)
        self.replicas = []
        peak.sample()
        replicas = [self._engine(params, mesh) for params, mesh in zip(placed, meshes)]
        del placed
        peak.sample()
        self.replicas, self.devices = replicas, list(survivors)
        # Resume the most urgent (oldest) requests first: each on the replica that inherits its old
        # one (where its KV mostly is already) while its pages last, else on the least loaded.
        self._route = {}
        inherited_by = {old: k for k, old in enumerate(heirs) if old is not None}
        for r, kv, decoder, old in sorted(exported, key=lambda x: x[0].arrival_time):
            k = inherited_by.get(old)
            if k is None or (kv is not None and not replicas[k].has_pages_for(r)):
                k = min(range(len(replicas)), key=lambda j: len(replicas[j].requests))
            event.kv_bytes_moved += replicas[k].import_request(r, kv, decoder)
            self._route[r.request_id] = k
            event.requests_migrated += 1
        del exported
        for e in replicas:
            e.count_reparallelization()
        for e, floor in zip(replicas, plan.decode_floor or []):
            e.hold_decode_shape(*floor)  # its decode shapes were compiled ahead at least this large
        for e in replicas:
            e.block_until_ready()
        event.peak_device_bytes = peak.sample()
        event.time_to_resume_s = self.clock() - start
        event.done = True
        self.events.append(event)
        return event

    def _place_params(self, mesh, inherited: Optional[Engine], sources: list, host_params,
                      event: ReparallelizationEvent):
        """A new replica's params: from host memory (via_host), else from the intact replica it
        inherits or the one sharing the most devices with it (what is resident stays), else
        from the checkpoint."""
        if host_params is not None:
            event.param_bytes_moved += self.param_bytes
            return shard_params(host_params, self.cfg, mesh)
        group = set(mesh.devices.flat)
        if sources:
            source = min(sources, key=lambda e: (e is not inherited, -len(set(e.mesh.devices.flat) & group)))
            params, moved = reshard_tree(source.params, param_shardings(self.cfg, mesh))
            event.param_bytes_moved += moved
            return params
        if not self.checkpoint_path:
            raise RuntimeError("parameters were lost with no grace period and no checkpoint to restore")
        event.checkpoint_bytes_read += self.param_bytes
        return store.restore(self.checkpoint_path, self.cfg, mesh)

    def _memory_order(self, plan: Plan, exported_kv: list) -> str:
        """How to sequence the switch so that no device holds more than `device_bytes`. The new
        params are placed, then the old params and pools go, then the new pools come; with
        "overlap" the old pools (and exported KV) stay while the new params are placed, with
        "release_pools" they go first (exported KV waits on the host), with "via_host" the
        params pass through host memory too. Counted as the shardings lay the arrays out, over
        what each device holds now."""
        held = live_device_bytes()
        on_device = device_bytes([kv for kv in exported_kv if kv is not None])
        states = [e.device_state() for e in self.replicas]
        pools = device_bytes([(s["kv_pool"], s["counts"]) for s in states])  # what retire() lets go of
        params = device_bytes([s["params"] for s in states])
        model = plan.config.model
        new_params = param_bytes_per_device(self.cfg, model)
        new_rest = replica_device_bytes(self.cfg, self.engine_config, model) - new_params  # pool, counts
        devices = [d for group in plan.groups for d in group]
        limit = self.device_bytes

        def fits(*stages):
            return all(stage(d) <= limit for stage in stages for d in devices)

        def kept(d):  # what stays through the switch: exported KV, arrays not the engines'
            return held.get(d, 0) - pools.get(d, 0) - params.get(d, 0)
        if fits(lambda d: held.get(d, 0) + new_params, lambda d: kept(d) + new_params + new_rest):
            return "overlap"
        if fits(lambda d: kept(d) + params.get(d, 0) - on_device.get(d, 0) + new_params,
                lambda d: kept(d) - on_device.get(d, 0) + new_params + new_rest):
            return "release_pools"
        return "via_host"

    def _reroute(self, survivors, lost, kind, grace, devices_lost, event=None) -> ReparallelizationEvent:
        """Baseline: replicas keep their shape; one that lost a device is dropped, its requests
        restart; free devices form new replicas of the shape, from the checkpoint."""
        start = self.clock()
        old_shape, model = self.shape, self.shape[1]
        alive = set(survivors)
        keep = [e for e in self.replicas if set(e.mesh.devices.flat) <= alive]
        event = event or ReparallelizationEvent(kind, grace, old_shape, old_shape, devices_lost)
        orphans = []
        for e in self.replicas:
            if e not in keep:
                self._held += e.drain()
                orphans += [(self._from_scratch(r), None, None) for r, _, _ in e.export_requests(with_kv=False)]
        used = {d for e in keep for d in e.mesh.devices.flat}
        free = [d for d in survivors if d not in used]
        while len(free) >= model:  # idle devices form new replicas of the same shape
            group, free = free[:model], free[model:]
            mesh = make_mesh(1, model, group)
            sources = keep if self.recovery.params == "resident" else []
            keep.append(self._engine(self._place_params(mesh, None, sources, None, event), mesh))
        if not keep:
            raise RuntimeError(f"reroute: fewer than {model} devices remain for one replica")
        self.replicas, self.devices = keep, list(survivors)
        self._route = {rid: i for i, e in enumerate(keep) for rid in e.requests}
        for r, kv, decoder in orphans:
            k = min(range(len(keep)), key=lambda j: len(keep[j].requests))
            keep[k].import_request(r, None)
            self._route[r.request_id] = k
            event.requests_migrated += 1
        event.new_shape = self.shape
        event.time_to_resume_s = self.clock() - start
        event.done = True
        self.events.append(event)
        return event

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _from_scratch(r):
        """A request restarted as if new: its generated tokens are thrown away."""
        r.output_ids, r.logprobs, r.top_logprobs, r.text, r.first_token_time = [], [], [], "", None
        r.num_computed = 0
        return r

    def _engine(self, params, mesh) -> Engine:
        # the policy shares the engine's cost model, which the engine refits while serving
        cost_model = engine_cost_model(self.cfg, self.engine_config)
        policy = self.make_policy(cost_model) if self.make_policy else None
        return Engine(self.cfg, params, mesh, self.tokenizer, self.engine_config, policy=policy, clock=self.clock,
                      cost_model=cost_model)

    def _page_bytes(self) -> int:
        return pool_bytes_per_page(self.cfg, self.engine_config.page_size)

    def _as_device_tree(self, params, mesh):
        """Host numpy trees are placed once (replicated on the mesh) so that reshard can slice them."""
        if isinstance(jax.tree.leaves(params)[0], jax.Array):
            return params
        rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        return jax.tree.map(lambda x: jax.device_put(np.asarray(x, self.cfg.jnp_dtype), rep), params)


def _device_memory(device) -> float:
    stats = device.memory_stats() if hasattr(device, "memory_stats") else None
    return float((stats or {}).get("bytes_limit") or 16 * 2 ** 30)


class _PeakMemory:
    """The most bytes any of `devices` holds, over the live arrays, at the points it is sampled."""

    def __init__(self, devices):
        self.devices, self.peak = set(devices), 0

    def sample(self) -> int:
        held = live_device_bytes()
        self.peak = max([self.peak] + [held.get(d, 0) for d in self.devices])
        return self.peak
