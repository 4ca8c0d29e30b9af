"""Discrete-event simulation of serving on spot instances: SpotServe recovery vs restart vs reroute.

Nodes (groups of devices) come and go by an availability trace, each removal noticed `grace_s`
before it happens. The controller is the engine's own: `planner.choose` picks the parallel
configuration for the devices at hand and `matching.match` maps it onto them, keeping resident
parameter slices and KV in place; the simulator only prices the moves and the compute. Replicas
serve batch by batch, as FasterTransformer does in SpotServe's artifact: a free replica takes
up to `max_batch` waiting requests and runs their prefill and every decode step together.

Methods (what happens when the devices change) are `elastic.recovery` definitions, the ones the
serving cluster follows:
  * spotserve: re-plan at the notice; keep serving until the migration must start to finish by
    the deadline; pause for the migration (parameter slices and KV over the network); every
    in-flight batch resumes from its last committed token on the replica that inherits it.
  * restart: when the devices go, re-plan and re-deploy everything from the checkpoint (unless
    the plan and its devices are unchanged); in-flight requests start over.
  * reroute: replicas keep one shape, planned at the start for the most devices the trace ever
    has (as the artifact's rerouting baseline plans it); one that loses a device is dropped when
    the device goes and its requests start over on the others; free devices form new replicas
    of that shape (from the checkpoint).
  * the artifact's ablation levels (recovery.ABLATIONS): spotserve without, in turn, the
    controller (the initial shape kept), the migration planner (a re-deploy after the whole
    migration), the interruption arranger (in-flight requests start over) and the device
    mapper (devices in rank order).
"""
from __future__ import annotations

import dataclasses
import heapq
import itertools
import math
from typing import Dict, List, Optional, Sequence

from jaxserve.elastic import matching, planner
from jaxserve.elastic.availability import AvailabilityEvent
from jaxserve.elastic.recovery import Recovery, recovery
from jaxserve.sim.workload import Job


@dataclasses.dataclass(frozen=True)
class LayerProfile:
    """Measured per-layer step times (ms) by tensor-parallel degree and batch size.

    `init[tp][batch]` is a layer's prefill of the prompt, `incr[tp][batch]` one decode step;
    pipeline stages add `pp_init_comm` / `pp_incr_comm` ms per stage boundary, and every estimate
    is multiplied by `fix_factor` (measured overheads outside the layers).

    micro_batches: price pipelined replicas as the artifact's planner does
    (elastic-switch/scheduler/parallel/solver.py, get_approx_latency): a batch split into M
    micro-batches fills the pipeline in (pipe + M - 1) stage times, the prefill's divided by M,
    plus `embed` (ms by log2 of the batch) twice a batch; M is the best power of two for each.
    Without it a batch passes the stages one after another.
    """
    num_layers: int
    init: Dict[int, Dict[int, float]]
    incr: Dict[int, Dict[int, float]]
    pp_init_comm: float = 0.0
    pp_incr_comm: float = 0.0
    fix_factor: float = 1.0
    prompt_len: int = 512          # the prompt length `init` was measured at (prefill scales linearly)
    micro_batches: bool = False
    embed: tuple = ()

    def _at(self, table, model: int, batch: int) -> float:
        row = table[model]
        b = min((k for k in row if k >= batch), default=max(row))
        return row[b]

    def _micro(self, batch: int) -> List[int]:
        if not self.micro_batches:
            return [1]
        return [m for m in (1, 2, 4, 8, 16, 32) if m <= batch and batch % m == 0]

    def prefill_s(self, model: int, pipe: int, batch: int, prompt_len: Optional[int] = None) -> float:
        per_stage = math.ceil(self.num_layers / pipe)
        scale = (prompt_len or self.prompt_len) / self.prompt_len
        if not self.micro_batches:
            ms = self._at(self.init, model, batch) * per_stage * pipe * scale + self.pp_init_comm * (pipe - 1)
        else:
            ms = min(self._at(self.init, model, batch // m) * per_stage * (pipe + m - 1) / m * scale
                     + self.pp_init_comm / m * (pipe - 1) for m in self._micro(batch))
            ms += 2 * self.embed[min(len(self.embed) - 1, max(0, batch.bit_length() - 1))] if self.embed else 0.0
        return ms * self.fix_factor / 1e3

    def decode_s(self, model: int, pipe: int, batch: int) -> float:
        per_stage = math.ceil(self.num_layers / pipe)
        ms = min(self._at(self.incr, model, batch // m) * per_stage * (pipe + m - 1) + self.pp_incr_comm / m * (pipe - 1)
                 for m in self._micro(batch))
        return ms * self.fix_factor / 1e3


@dataclasses.dataclass(frozen=True)
class SpotSetting:
    profile: LayerProfile
    param_bytes: float
    kv_bytes_per_token: float
    num_kv_heads: int
    devices_per_node: int = 4
    device_bytes: float = 16e9
    link_bytes_s: float = 50e9 / 8        # between nodes, each node's own link
    checkpoint_bytes_s: float = 1e9       # per node, reading the checkpoint
    restart_s: float = 10.0               # re-deploy overhead besides reading weights
    max_batch: int = 4
    max_model: int = 8
    max_pipe: int = 8
    min_replica_devices: int = 1
    required_rps: float = 0.0             # throughput the configuration must cover


@dataclasses.dataclass
class _Batch:
    jobs: List[Job]
    output_len: int
    prompt_len: int
    prefilled: bool = False
    done: int = 0                  # decode steps committed
    first_token: Optional[float] = None


@dataclasses.dataclass
class _Replica:
    devices: List[object]
    model: int
    pipe: int
    batch: Optional[_Batch] = None
    started: float = 0.0           # when the running phase began (prefill or decode)
    epoch: int = 0                 # bumps when the batch is interrupted (stale completions)
    ready_at: float = 0.0          # not serving before (loading weights, migrating)
    wake_pushed: bool = False


def setting_from_config(c) -> SpotSetting:
    """A SpotSetting from a config file's fields (see configs/spotserve_gpt20b.py)."""
    p = c.profile
    table = lambda t: {int(k): {int(b): float(v) for b, v in row.items()} for k, row in t.items()}
    profile = LayerProfile(int(p.num_layers), table(p.init), table(p.incr), float(p.pp_init_comm),
                           float(p.pp_incr_comm), float(p.fix_factor), micro_batches=bool(p.get("micro_batches", False)),
                           embed=tuple(p.get("embed", ())))
    fields = {f.name for f in dataclasses.fields(SpotSetting)} - {"profile"}
    return SpotSetting(profile=profile, **{k: c[k] for k in fields if k in c})


def gamma_arrivals(n: int, rate: float, cv: float, prompt_len: int, output_len: int, seed: int = 0) -> List[Job]:
    """n jobs with Gamma-distributed gaps (mean 1/rate, coefficient of variation cv): bursty for cv > 1."""
    import numpy as np
    shape = 1.0 / cv ** 2
    gaps = np.random.default_rng(seed).gamma(shape, 1.0 / (rate * shape), size=n)
    return [Job(f"job{i}", float(t), prompt_len, output_len) for i, t in enumerate(np.cumsum(gaps) - gaps[0])]


class SpotSimulator:
    def __init__(self, setting: SpotSetting, method="spotserve", grace_s: float = 30.0):
        """method: a name in recovery.METHODS or a Recovery."""
        self.r: Recovery = recovery(method)
        self.s, self.method, self.grace_s = setting, self.r.name, grace_s
        self.events: List[dict] = []

    # -- costs ---------------------------------------------------------------------------------
    def batch_time(self, model: int, pipe: int, batch: int, output_len: int, prompt_len: Optional[int] = None) -> float:
        p = self.s.profile
        return p.prefill_s(model, pipe, batch, prompt_len) + output_len * p.decode_s(model, pipe, batch)

    def plan(self, num_devices: int, kv_bytes: float = 0.0, fixed=None) -> planner.ParallelConfig:
        s = self.s
        return planner.choose(num_devices, s.num_kv_heads, s.param_bytes, kv_bytes, s.device_bytes,
                              lambda model, batch, pipe=1: self.batch_time(model, pipe, batch, self._output_len,
                                                                           self._prompt_len),
                              s.max_batch, s.required_rps, fixed=fixed, max_pipe=s.max_pipe,
                              max_model=s.max_model, min_replica_devices=s.min_replica_devices)

    def _plan_shape(self, num_devices: int, kv_bytes: float = 0.0) -> planner.ParallelConfig:
        """The plan for `num_devices`: as many replicas of the kept shape as fit, if one is kept."""
        if self._fixed is None:
            return self.plan(num_devices, kv_bytes)
        model, pipe = self._fixed
        data = num_devices // (model * pipe)
        if data < 1:
            raise ValueError("fewer devices than one replica of the fixed shape")
        return self.plan(num_devices, kv_bytes, fixed=(data, model, pipe))

    # -- the replay ----------------------------------------------------------------------------
    def run(self, jobs: Sequence[Job], availability: Sequence[AvailabilityEvent]) -> List[Job]:
        # the planner prices a typical batch: mean lengths of the workload
        self._output_len = round(sum(j.output_len for j in jobs) / len(jobs))
        self._prompt_len = round(sum(j.prompt_len for j in jobs) / len(jobs))
        self._seq = itertools.count()
        self.restarted = 0
        self._queue: List[Job] = []
        self._resume: List[_Batch] = []   # batches that kept their state but lost their replica
        self._heap: list = []
        self.replicas: List[_Replica] = []
        self.alive: List[object] = []
        self.doomed: set = set()        # nodes noticed for removal: no plan may use them
        self.device_seconds, self._last = 0.0, 0.0
        first = [e for e in availability if e.time_s == availability[0].time_s]
        for e in first:
            self.alive += [(n, g) for n in e.nodes for g in range(self.s.devices_per_node)]
        self._fixed = None
        if self.r.shape != "adaptive":
            # one replica shape, planned for the most devices the trace ever has (as the
            # artifact's rerouting baseline does) or for those at the start; replicas of it come
            # and go with the devices
            nodes = max(self._alive_counts(availability)) if self.r.shape == "largest" else len({n for n, _ in self.alive})
            try:
                plan = self.plan(nodes * self.s.devices_per_node)
                self._fixed = (plan.model, plan.pipe)
            except ValueError:
                pass
        self._deploy(0.0, ready_at=0.0)
        for e in availability[len(first):]:
            if e.kind == "remove":
                self._push(max(0.0, e.time_s - self.grace_s), "notice", e)
                self._push(e.time_s, "remove", e)
            else:
                self._push(e.time_s, "add", e)
        for j in jobs:
            self._push(j.arrival, "arrive", j)
        self._pending = len(jobs)
        while self._heap and self._pending:
            t, _, kind, payload = heapq.heappop(self._heap)
            self.device_seconds += (t - self._last) * len(self.alive)
            self._last = t
            getattr(self, f"_on_{kind}")(t, payload)
            self._dispatch(t)
        return list(jobs)

    @staticmethod
    def _alive_counts(availability: Sequence[AvailabilityEvent]) -> List[int]:
        alive, counts = set(), []
        for e in availability:
            alive = alive | set(e.nodes) if e.kind != "remove" else alive - set(e.nodes)
            counts.append(len(alive))
        return counts

    def _push(self, t: float, kind: str, payload) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), kind, payload))

    # -- serving -------------------------------------------------------------------------------
    def _on_arrive(self, t: float, job: Job) -> None:
        self._queue.append(job)

    def _dispatch(self, t: float) -> None:
        for r in self.replicas:
            if r.batch is not None or not (self._queue or self._resume):
                continue
            if r.ready_at > t:
                if not r.wake_pushed:
                    r.wake_pushed = True
                    self._push(r.ready_at, "ready", None)
                continue
            if self._resume:
                r.batch = self._resume.pop(0)
            else:
                jobs, self._queue = self._queue[:self.s.max_batch], self._queue[self.s.max_batch:]
                r.batch = _Batch(jobs, max(j.output_len for j in jobs), max(j.prompt_len for j in jobs))
            self._start(r, t)

    def _start(self, r: _Replica, t: float) -> None:
        """(Re)starts r's batch at t from its committed progress."""
        b, p = r.batch, self.s.profile
        t0 = max(t, r.ready_at)
        prefill = 0.0 if b.prefilled else p.prefill_s(r.model, r.pipe, len(b.jobs), b.prompt_len)
        if b.first_token is None:
            b.first_token = t0 + prefill
        rest = prefill + (b.output_len - b.done) * p.decode_s(r.model, r.pipe, len(b.jobs))
        r.started = t0
        r.epoch += 1
        self._push(t0 + rest, "finish", (r, r.epoch))

    def _on_ready(self, t: float, _) -> None:
        pass  # _dispatch runs after every event

    def _on_finish(self, t: float, payload) -> None:
        r, epoch = payload
        if r not in self.replicas or epoch != r.epoch or r.batch is None:
            return  # interrupted: a newer completion is scheduled
        for j in r.batch.jobs:
            j.first_token = r.batch.first_token
            j.finish = t
            self._pending -= 1
        r.batch = None

    def _progress(self, r: _Replica, t: float) -> None:
        """Commits r's batch progress up to t (whole decode steps) and stops it."""
        b, p = r.batch, self.s.profile
        if b is None:
            return
        elapsed = max(0.0, t - r.started)
        if not b.prefilled:
            pre = p.prefill_s(r.model, r.pipe, len(b.jobs), b.prompt_len)
            if elapsed < pre:
                r.epoch += 1
                return
            b.prefilled, elapsed = True, elapsed - pre
        step = p.decode_s(r.model, r.pipe, len(b.jobs))
        b.done = min(b.output_len, b.done + int(elapsed / step))
        r.epoch += 1

    def _requeue(self, batches: Sequence[_Batch]) -> None:
        """Requests that lost their state start over, ahead of later arrivals."""
        jobs = sorted((j for b in batches for j in b.jobs), key=lambda j: j.arrival)
        self.restarted += len(jobs)
        self._queue = jobs + self._queue

    # -- deploying and re-parallelizing ----------------------------------------------------------
    def _deploy(self, t: float, ready_at: float, keep: Sequence[_Batch] = ()) -> planner.ParallelConfig:
        """A fresh deployment on all alive devices (weights from the checkpoint)."""
        try:
            new = self._plan_shape(len(self.alive))
        except ValueError:  # too few devices: serve nothing until more arrive
            self.replicas = []
            return None
        if self.r.shape != "adaptive" and self._fixed is None:
            self._fixed = (new.model, new.pipe)  # the first shape deployed is kept for good
        devices = self.alive[: new.num_devices]
        k = new.replica_devices
        self.replicas = [_Replica(devices[i * k:(i + 1) * k], new.model, new.pipe, ready_at=ready_at)
                         for i in range(new.data)]
        return new

    def _checkpoint_time(self, replica_devices: int) -> float:
        per_node = self.s.param_bytes * min(replica_devices, self.s.devices_per_node) / replica_devices
        return self.s.restart_s + per_node / self.s.checkpoint_bytes_s

    def _on_notice(self, t: float, e: AvailabilityEvent) -> None:
        if not self.r.at_notice:
            return
        self.doomed |= set(e.nodes)
        survivors = [d for d in self.alive if d[0] not in self.doomed]
        self._reparallelize(t, survivors, deadline=e.time_s, kind="preemption")

    def _on_remove(self, t: float, e: AvailabilityEvent) -> None:
        gone = set(e.nodes)
        self.doomed -= gone
        lost = [d for d in self.alive if d[0] in gone]
        self.alive = [d for d in self.alive if d[0] not in gone]
        if not lost:
            return
        if not self.r.at_notice and self.r.keep == "all":
            self._restart(t, "preemption")
            return
        hit = [r for r in self.replicas if any(d[0] in gone for d in r.devices)]
        self._requeue([r.batch for r in hit if r.batch is not None])
        self.replicas = [r for r in self.replicas if r not in hit]
        if not self.r.at_notice:  # rerouting: survivors serve on; free devices may form a new replica
            added = self._fill_free_devices(t)
            self.events.append(dict(t=t, kind="preemption", replicas_lost=len(hit), replicas_added=added,
                                    replicas=len(self.replicas)))
        # (re-planned at the notice, a replica is still on lost devices only when its migration
        # could not finish within the grace period)

    def _on_add(self, t: float, e: AvailabilityEvent) -> None:
        self.alive += [(n, g) for n in e.nodes for g in range(self.s.devices_per_node)]
        if not self.r.at_notice and self.r.keep == "all":
            self._restart(t, "acquisition")
        elif not self.r.at_notice:
            added = self._fill_free_devices(t)
            self.events.append(dict(t=t, kind="acquisition", replicas_added=added, replicas=len(self.replicas)))
        else:
            survivors = [d for d in self.alive if d[0] not in self.doomed]
            self._reparallelize(t, survivors, deadline=t, kind="acquisition")

    def _fill_free_devices(self, t: float) -> int:
        """Reroute: new replicas of the fixed shape on devices no replica uses (from the checkpoint)."""
        if self._fixed is None:  # never deployed yet: the first deployment picks the shape
            new = self._deploy(t, ready_at=0.0)
            for r in self.replicas:
                r.ready_at = t + self._checkpoint_time(r.model * r.pipe)
            return len(self.replicas) if new is not None else 0
        model, pipe = self._fixed
        used = {d for r in self.replicas for d in r.devices}
        free = [d for d in self.alive if d not in used]
        k, added = model * pipe, 0
        while len(free) >= k:
            group, free = free[:k], free[k:]
            self.replicas.append(_Replica(group, model, pipe, ready_at=t + self._checkpoint_time(k)))
            added += 1
        return added

    def _restart(self, t: float, kind: str) -> None:
        if self.r.skip_noop and self.replicas:  # the artifact re-deploys only when the plan changes
            old = self.replicas[0]
            try:
                new = self.plan(len(self.alive))
            except ValueError:
                new = None
            used = [d for r in self.replicas for d in r.devices]
            if (new is not None and (new.data, new.model, new.pipe) == (len(self.replicas), old.model, old.pipe)
                    and used == self.alive[:new.num_devices]):
                self.events.append(dict(t=t, kind=kind, new_shape=(new.data, new.model, new.pipe), unchanged=True))
                return
        interrupted = []
        for r in self.replicas:
            if r.batch is not None:
                r.epoch += 1
                interrupted.append(r.batch)
        self._requeue(interrupted + self._resume)
        self._resume = []
        new = self._deploy(t, ready_at=0.0)
        if new is None:
            self.events.append(dict(t=t, kind=kind, new_shape=None))
            return
        ready = t + self._checkpoint_time(new.replica_devices)
        for r in self.replicas:
            r.ready_at = ready
        self.events.append(dict(t=t, kind=kind, new_shape=(new.data, new.model, new.pipe),
                                downtime_s=ready - t, requests_restarted=sum(len(b.jobs) for b in interrupted),
                                checkpoint_bytes=self.s.param_bytes * new.data))

    def _reparallelize(self, t: float, survivors: List[object], deadline: float, kind: str) -> None:
        """SpotServe: plan, match, price the migration, pause and resume every batch in place."""
        s = self.s
        kv = {i: self._kv_bytes(r) if self.r.resume else 0.0 for i, r in enumerate(self.replicas)}
        try:
            new = self._plan_shape(len(survivors), kv_bytes=sum(kv.values()))
        except ValueError:  # too few devices for any replica: state is lost, serving waits
            for r in self.replicas:
                self._progress(r, t)
            self._requeue([r.batch for r in self.replicas if r.batch is not None] + self._resume)
            self.replicas, self._resume = [], []
            self.events.append(dict(t=t, kind=kind, new_shape=None))
            return
        placement = {}
        for i, r in enumerate(self.replicas):
            for pos, d in enumerate(r.devices):
                placement[d] = (i, divmod(pos, r.model), (r.pipe, r.model))
        if self.r.mapper == "kuhn_munkres":
            groups, heir_of = matching.match(placement, survivors, new.data, new.model, s.param_bytes, kv, pipe=new.pipe)
        else:
            groups, heir_of = matching.in_rank_order(len(self.replicas), survivors, new.data, new.replica_devices)
        # bytes each node must receive: parameter slices it lacks, and the KV of the batch its
        # replica inherits where the devices differ
        slots = [(st, m) for st in range(new.pipe) for m in range(new.model)]
        incoming: Dict[object, float] = {}
        share = s.param_bytes / new.replica_devices
        moved_params = moved_kv = 0.0
        for group, old in zip(groups, heir_of):
            for slot, d in zip(slots, group):
                have = 0.0
                if d in placement:
                    _, idx, size = placement[d]
                    have = matching.position_overlap(idx, size, slot, (new.pipe, new.model))
                need = share * (1.0 - have)
                kv_need = 0.0
                if old is not None and d not in self.replicas[old].devices:
                    kv_need = kv[old] / new.replica_devices
                incoming[d[0]] = incoming.get(d[0], 0.0) + need + kv_need
                moved_params, moved_kv = moved_params + need, moved_kv + kv_need
        migrate_s = max(incoming.values(), default=0.0) / s.link_bytes_s
        if not self.replicas or self.r.params == "checkpoint":  # the weights come from the checkpoint
            migrate_s = self._checkpoint_time(new.replica_devices)
        elif not self.r.overlap:  # the new replicas start once everything is there, re-deployed
            migrate_s += s.restart_s
        start = max(t, deadline - migrate_s)
        # the old replicas keep serving until the migration must start
        old_of = {g: self.replicas[i] for g, i in enumerate(heir_of) if i is not None}
        self._push(start, "switch", (groups, new, start + migrate_s, old_of, list(self.replicas)))
        self.events.append(dict(t=t, kind=kind, new_shape=(new.data, new.model, new.pipe),
                                pause_s=migrate_s, migrate_s=migrate_s, param_bytes_moved=moved_params,
                                kv_bytes_moved=moved_kv, late=migrate_s > deadline - t if kind == "preemption" else False))

    def _on_switch(self, t: float, payload) -> None:
        """Pauses every replica for the migration, then resumes each batch where it stood."""
        groups, new, resume, old_of, old_replicas = payload
        if old_replicas != self.replicas:
            return  # superseded by a later re-plan
        for r in self.replicas:
            self._progress(r, t)
        replicas = [_Replica(group, new.model, new.pipe, ready_at=resume) for group in groups]
        if not self.r.resume:  # the in-flight batches lost their state with the switch
            self._requeue([r.batch for r in self.replicas if r.batch is not None] + self._resume)
            self._resume = []
            for r in self.replicas:
                r.batch = None
        carried = set()
        for g, r in enumerate(replicas):
            old = old_of.get(g)
            if old is not None and old.batch is not None:
                r.batch = old.batch
                carried.add(id(old))
        # more old batches than new replicas: they wait, state kept, ahead of new requests
        left = [r.batch for r in self.replicas if r.batch is not None and id(r) not in carried]
        self._resume = sorted(left, key=lambda b: b.jobs[0].arrival) + self._resume
        self.replicas = replicas
        for r in replicas:
            if r.batch is not None:
                self._start(r, resume)

    def _kv_bytes(self, r: _Replica) -> float:
        if r.batch is None:
            return 0.0
        tokens = sum(j.prompt_len for j in r.batch.jobs) + len(r.batch.jobs) * r.batch.done
        return tokens * self.s.kv_bytes_per_token
