"""Replaying a workload on the real engine in real time, recording the same outcomes as the simulator."""
from __future__ import annotations

import time
from typing import List, Sequence

import numpy as np

from jaxserve.sampling_params import SamplingParams
from jaxserve.sim.workload import Job


def prompt_ids(job: Job, vocab: int) -> list:
    """A reproducible synthetic prompt of the job's length (content does not matter for timing)."""
    rng = np.random.default_rng(abs(hash(job.request_id)) % 2 ** 32)
    return rng.integers(3, min(vocab, 32000), size=job.prompt_len).tolist()


def replay(engine, jobs: Sequence[Job], time_scale: float = 1.0) -> List[Job]:
    """Adds each job at its arrival time (seconds x time_scale) and steps until all finish.

    Generation ignores EOS so that each job produces exactly its trace's output length.
    Times recorded on the jobs are relative to the replay's start.
    """
    order = sorted(jobs, key=lambda j: j.arrival)
    start = engine.clock()
    by_id = {j.request_id: j for j in order}
    i = 0
    while i < len(order) or engine.has_unfinished():
        now = engine.clock() - start
        while i < len(order) and order[i].arrival * time_scale <= now:
            j = order[i]
            engine.add_request(j.request_id, prompt_ids(j, engine.cfg.vocab_size),
                               SamplingParams(max_tokens=j.output_len, temperature=0.0, ignore_eos=True),
                               arrival_time=start + j.arrival * time_scale, priority=j.priority)
            i += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, order[i].arrival * time_scale - (engine.clock() - start)))
            continue
        for out in engine.step():
            j = by_id[out.request_id]
            if out.first_token_time is not None and j.first_token is None:
                j.first_token = out.first_token_time - start
            if out.finished:
                j.finish = out.finish_time - start
    return list(jobs)
