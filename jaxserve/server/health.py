"""Waiting for a server process to come up: poll its /health until it answers, it exits, or time runs out."""
from __future__ import annotations

import time

import httpx


def wait_healthy(url: str, proc=None, timeout: float = 180, poll_s: float = 0.1) -> float:
    """Seconds until `url`/health answered 200; RuntimeError if `proc` (a Popen) exits first."""
    start = time.perf_counter()
    deadline = start + timeout
    while time.perf_counter() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.perf_counter() - start
        except httpx.HTTPError:
            pass
        time.sleep(poll_s)
    raise TimeoutError(f"{url} did not answer /health within {timeout:.0f} s")
