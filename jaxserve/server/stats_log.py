"""A log line every few seconds while the server is busy, as vLLM prints one: throughput since
the last line, requests by state, KV cache use, preemptions and swaps."""
from __future__ import annotations

from typing import Optional, Sequence

from jaxserve.engine.outputs import RequestOutput
from jaxserve.server.metrics import request_states

DEFAULT_INTERVAL_S = 5.0


class StatsLog:
    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S):
        self.interval_s = interval_s
        self._generated = 0  # tokens the engine's outputs carried
        self._last: Optional[tuple] = None  # (time, prompt tokens computed, tokens generated) at the last line

    def count(self, outputs: Sequence[RequestOutput]) -> None:
        self._generated += sum(len(o.new_token_ids) for o in outputs)

    def line(self, engine, now: float) -> Optional[str]:
        """The line to log at `now`: None until `interval_s` after the last one, and while nothing ran."""
        prompt = engine.stats.get("prompt_tokens_computed", 0)
        if self._last is None:
            self._last = (now, prompt, self._generated)
            return None
        t0, prompt0, generated0 = self._last
        if now - t0 < self.interval_s:
            return None
        self._last = (now, prompt, self._generated)
        if prompt == prompt0 and self._generated == generated0:
            return None  # idle since the last line
        states = request_states(engine)
        dt = now - t0
        used, total = engine.allocator.num_used, engine.allocator.num_pages
        stats = engine.stats
        return (f"prompt {(prompt - prompt0) / dt:.1f} tok/s, generation {(self._generated - generated0) / dt:.1f} "
                f"tok/s; running {states['running']}, waiting {states['waiting']}, swapped {states['swapped']}; "
                f"KV cache {100 * used / max(1, total):.1f}% of {total} pages; preemptions {stats.get('preemptions', 0)}, "
                f"swapped out {stats.get('swap_out_bytes', 0) / 2 ** 20:.1f} MiB")
