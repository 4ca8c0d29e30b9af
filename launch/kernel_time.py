"""Summed GPU kernel time of a jitted call, from a jax.profiler trace (the launchers' one timer
of device work: unlike wall time it does not move with the host, so small differences are real)."""
from __future__ import annotations

import glob
import tempfile


def kernel_seconds(run, steps: int) -> float:
    """Summed GPU kernel time of one call of `run` (mean over `steps` profiled calls)."""
    import jax
    jax.block_until_ready(run())
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            for _ in range(steps):
                out = run()
            jax.block_until_ready(out)
        total = 0
        for plane in jax.profiler.ProfileData.from_file(glob.glob(f"{d}/**/*.xplane.pb", recursive=True)[0]).planes:
            if plane.name.startswith("/device:GPU"):
                total += sum(ev.duration_ns for line in plane.lines if "Stream" in line.name for ev in line.events)
    return total / steps / 1e9
