"""Fault injection for reliability tests: a failure inside the device step, after donation.

    with DeviceFault() as fault:   # every step from here on runs through the faulty copy
        fault.armed = True         # the next steps fail while they execute
        ...

The step becomes the real `model_runner.forward_step` followed by a host callback that raises
while `armed` is set: the KV pool has been donated to the step when it fails, and the error
comes from the runtime, as a device fault's would (not from Python before the call).
"""
from __future__ import annotations

import functools

import jax

from jaxserve.engine import model_runner


class DeviceFault:
    def __init__(self):
        self.armed = False
        self.fired = 0
        self._real = None

    def _boom(self, x):
        if self.armed:
            self.fired += 1
            raise RuntimeError("injected device fault")
        return x

    def __enter__(self) -> "DeviceFault":
        real = self._real = model_runner.forward_step

        @functools.partial(jax.jit, static_argnames=("cfg", "attention_impl", "mesh", "unroll_layers", "gemm_rows"),
                           donate_argnames=("cache",))
        def faulty(params, cache, prev_tokens, inputs, cfg, attention_impl="reference", mesh=None,
                   unroll_layers=False, gemm_rows=()):
            logits, cache = real(params, cache, prev_tokens, inputs, cfg=cfg, attention_impl=attention_impl,
                                 mesh=mesh, unroll_layers=unroll_layers, gemm_rows=gemm_rows)
            logits = jax.pure_callback(self._boom, jax.ShapeDtypeStruct(logits.shape, logits.dtype), logits)
            return logits, cache
        model_runner.forward_step = faulty
        return self

    def __exit__(self, *exc) -> None:
        model_runner.forward_step = self._real
