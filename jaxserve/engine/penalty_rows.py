"""Which request's token counts each row of the runner's counts holds (the repetition, presence
and frequency penalties of SamplingParams).

The counts live on the device and each step adds its drawn tokens to them, so penalties cost
the host nothing per step. A request gets a row when a step first samples for it, set from its
prompt and committed tokens (the only host work), and keeps it until it ends; when a step needs
a row and none is free, the least recently used one that the step does not sample for is taken
back (its request's row is set again from its tokens when it next samples). Those tokens are
all committed then: a request that lost its row was not in the step that took it, so the steps
it sampled in before have been read by the time it samples again.
"""
from __future__ import annotations

import collections
from typing import Collection


class PenaltyRows:
    def __init__(self, runner):
        self.runner = runner
        self._held: "collections.OrderedDict[str, int]" = collections.OrderedDict()  # least recently used first
        self._free = list(range(runner.counts["counts"].shape[0]))[::-1]

    def row_for(self, r, sampled_now: Collection[str]) -> int:
        """r's row (a Request about to sample), set from its tokens if it has none.
        sampled_now: the requests this step samples for, whose rows are not taken back."""
        row = self._held.get(r.request_id)
        if row is not None:
            self._held.move_to_end(r.request_id)
            return row
        if not self._free:
            victim = next(rid for rid in self._held if rid not in sampled_now)
            self._free.append(self._held.pop(victim))
        assert not r.num_pending, "a request gets a row only once its tokens are read (see above)"
        row = self._free.pop()
        self.runner.set_counts(row, r.prompt_ids, r.output_ids)
        self._held[r.request_id] = row
        return row

    def release(self, request_id: str) -> None:
        """Frees the row of a request that ended or left the engine, if it held one."""
        row = self._held.pop(request_id, None)
        if row is not None:
            self._free.append(row)

    def clear(self) -> None:
        """Takes every row back (the counts on the device are no longer the requests')."""
        for rid in list(self._held):
            self.release(rid)

    def __len__(self) -> int:
        return len(self._held)
