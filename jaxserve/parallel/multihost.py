"""Serving one model over several hosts with JAX's multi-controller runtime, process 0 leading.

Every process holds the same parameters and KV pool, sharded over one global mesh, and must
run each jitted step with the same inputs (SPMD). Process 0 runs the engine: scheduling, page
tables, sampling bookkeeping, the HTTP front. Before each device step its `ModelRunner` sends
the step's packed host arrays to the others (`StepMirror.lead`, a broadcast over the devices'
own collectives: gloo on CPU, the interconnect on TPU/GPU), and every other process runs the
same step on them in `ModelRunner.follow`. Only the model step is mirrored: host-memory swapping and KV
migration stay single-process features (`check_supported`).
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np

_STEP, _STOP = 1, 2


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
    """jax.distributed.initialize, from arguments or (on Cloud TPU and SLURM) the environment.

    Must run before JAX touches a device. On CPU the processes talk through gloo.
    """
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if coordinator:
        kwargs = dict(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    jax.distributed.initialize(**kwargs)


def check_supported(engine_config) -> None:
    if jax.process_count() > 1 and engine_config.host_pages:
        raise ValueError("engine.host_pages: swapping to host memory is not supported across processes yet; "
                         "set it to 0 when serving over several hosts")


def _broadcast(x):
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(x)


class StepMirror:
    """Process 0's side: announces each step's shape and sampling mode, then sends its arrays."""

    def lead(self, shape, mode_index: int, arrays):
        _broadcast(np.array([_STEP, shape.tokens, shape.seqs, shape.pages, int(shape.prefill), mode_index], np.int32))
        return receive(arrays)

    def stop(self) -> None:
        _broadcast(np.array([_STOP, 0, 0, 0, 0, 0], np.int32))


def receive_header():
    """A follower's side of `lead`'s announcement: (StepShape, mode index), or None at stop."""
    from jaxserve.scheduling.cost_model import StepShape
    op, N, S, P, prefill, mode = (int(v) for v in _broadcast(np.zeros(6, np.int32)))
    return None if op == _STOP else (StepShape(N, S, P, bool(prefill)), mode)


def receive(arrays):
    """Process 0's arrays (a pytree of numpy arrays) on every process; others pass buffers of
    the same shapes."""
    leaves, tree = jax.tree.flatten(arrays)
    return jax.tree.unflatten(tree, list(_broadcast(tuple(np.asarray(a) for a in leaves))))
