"""Serving one model over several hosts with JAX's multi-controller runtime, process 0 leading.

Every process holds the same parameters and KV pool, sharded over one global mesh, and must
run each jitted step with the same inputs (SPMD). Process 0 runs the engine: scheduling, page
tables, sampling bookkeeping, the HTTP front. Before each device step its `ModelRunner` sends
the step's packed host arrays to the others (`StepMirror.lead`, a broadcast over the devices'
own collectives: gloo on CPU, the interconnect on TPU/GPU), and every other process runs the
same step on them in `follow`. Only `_paged_step` is mirrored: host-memory swapping and KV
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
    """Process 0's side: announces each step's shapes, then sends its arrays."""

    def lead(self, arrays: Sequence[np.ndarray]) -> tuple:
        tokens, _, page_table = arrays[:3]
        _broadcast(np.array([_STEP, *tokens.shape, page_table.shape[1]], np.int32))
        return tuple(_broadcast(tuple(np.asarray(a) for a in arrays)))

    def stop(self) -> None:
        _broadcast(np.array([_STOP, 0, 0, 0], np.int32))


def follow(runner, max_steps: Optional[int] = None) -> int:
    """A non-leading process: runs every step process 0 announces, until it says stop.

    Returns the number of steps run.
    """
    from jaxserve.engine.model_runner import _paged_step, padding_arrays
    n = 0
    while max_steps is None or n < max_steps:
        op, B, T, P = (int(v) for v in _broadcast(np.zeros(4, np.int32)))
        if op == _STOP:
            break
        arrays = _broadcast(padding_arrays(B, T, P))  # receive buffers of the leader's shapes
        _, _, runner.cache = _paged_step(runner.params, runner.cache, *arrays, **runner.step_kwargs())
        n += 1
    return n
