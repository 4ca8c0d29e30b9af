"""The server's periodic log line reports what the engine did since the last one."""
import re

from jaxserve import Engine, EngineConfig, SamplingParams
from jaxserve.server.stats_log import StatsLog


def test_the_log_line_gives_throughput_states_and_kv_use_since_the_last_and_stays_quiet_when_idle(tiny):
    cfg, params, mesh, tokenizer = tiny
    engine = Engine(cfg, params, mesh, tokenizer, EngineConfig(num_pages=64, max_batch=2, token_budget=32, max_chunk=32))
    log = StatsLog(interval_s=1.0)
    assert log.line(engine, 0.0) is None  # the first call only starts the clock
    prompts = [[5] * 20, [6] * 9, [7] * 40]  # the third waits: two slots
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(max_tokens=6, ignore_eos=True))
    generated = 0
    for _ in range(4):
        outputs = engine.step()
        log.count(outputs)
        generated += sum(len(o.new_token_ids) for o in outputs)
    assert log.line(engine, 0.5) is None  # too soon
    line = log.line(engine, 2.0)
    prefilled = engine.stats["prompt_tokens_computed"]
    assert 29 <= prefilled <= 69 and generated > 0
    prompt_rate, gen_rate = map(float, re.search(r"prompt ([\d.]+) tok/s, generation ([\d.]+) tok/s", line).groups())
    assert prompt_rate == round(prefilled / 2.0, 1) and gen_rate == round(generated / 2.0, 1)
    states = {s: sum(r.status.value == s for r in engine.requests.values()) for s in ("running", "waiting")}
    assert f"running {states['running']}, waiting {states['waiting']}" in line and states["waiting"] >= 1
    used = engine.allocator.num_used
    assert f"KV cache {100 * used / engine.allocator.num_pages:.1f}% of {engine.allocator.num_pages} pages" in line
    assert log.line(engine, 10.0) is None  # nothing ran since the last line
    while engine.has_unfinished():
        log.count(engine.step())
    assert "prompt" in log.line(engine, 12.0)
    assert engine.stats["prompt_tokens_computed"] == sum(map(len, prompts))  # each prompt token once
