"""Multi-turn conversations with prefix caching off and on: time to first token, throughput, same tokens.

    python launch/bench_prefix_cache.py --config=configs/tiny.py
    python launch/bench_prefix_cache.py --config=configs/llama3_8b.py --conversations=64 --output=/tmp/pc.json

The workload (seeded, documented by its flags): every conversation starts with one system prompt
shared by all (--system_len tokens); it has 2..--max_turns turns (uniform); turn k's prompt is
turn k-1's prompt, its answer and a new user message (lognormal length, median --user_len,
sigma 0.5); each answer is exactly --output_len tokens (greedy, ignore_eos). Turn k of every
conversation that has one is submitted together once turn k-1 has finished. The same workload
runs on an engine with `engine.prefix_cache` off and then on (one LLM, its engine rebuilt with
the same weights), and every answer of the second run is checked against the first's;
`--host_pages=N,M` adds runs with the cache on and a host tier of N and M pages (make the device
pool smaller than the printed working set, so that pages are evicted), `--control_max_chunk` a
cache-off run in other step shapes. Printed per run: mean and p90 TTFT, output tok/s, the
cached share of prompt tokens and the share that came back from the host.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from jaxserve.cli import run  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Model/serving config file.")
_CONVERSATIONS = flags.DEFINE_integer("conversations", 16, "Conversations.", lower_bound=1)
_MAX_TURNS = flags.DEFINE_integer("max_turns", 5, "Most turns of a conversation (at least 2).", lower_bound=2)
_SYSTEM = flags.DEFINE_integer("system_len", 96, "Tokens of the system prompt all conversations share.", lower_bound=0)
_USER = flags.DEFINE_integer("user_len", 24, "Median tokens of a user message.", lower_bound=1)
_OUTPUT_LEN = flags.DEFINE_integer("output_len", 16, "Tokens of every answer.", lower_bound=1)
_SEED = flags.DEFINE_integer("seed", 0, "Workload seed.")
_OUTPUT = flags.DEFINE_string("output", "", "Also write the figures to this JSON file.")
_CONTROL_CHUNK = flags.DEFINE_integer(
    "control_max_chunk", 0, "Also run the cache off with this engine.max_chunk (and token_budget at most "
    "it): the same answers computed in other step shapes, the engine's own numerical spread, against which "
    "the cache's differences (if any) are judged. 0: no such run.", lower_bound=0)
_HOST_PAGES = flags.DEFINE_list(
    "host_pages", [], "Also run the cache on with a host tier of each of these many pages (engine.host_pages): "
    "pages the device evicts wait there. Make engine.num_pages smaller than the working set (printed) for "
    "the tier to matter.")
_HOST_PROFILE = flags.DEFINE_integer("host_profile", 0, "Serve the host-tier runs under cProfile and print their "
                                     "this many costliest functions (the profiler slows the host: shares, not times).")
_PRECOMPILE = flags.DEFINE_bool("precompile", True, "Compile every step shape before timing (off: the "
                                "timings include compiling; for quick correctness runs).")


def conversations(rng, n, max_turns, system_len, user_len, vocab):
    """[turns, [user message token ids per turn]] per conversation, and the system prompt."""
    system = rng.integers(3, vocab, size=system_len).tolist()
    convs = []
    for _ in range(n):
        turns = int(rng.integers(2, max_turns + 1))
        lens = np.maximum(1, rng.lognormal(np.log(user_len), 0.5, size=turns).astype(int))
        convs.append([rng.integers(3, vocab, size=int(k)).tolist() for k in lens])
    return system, convs


def working_set_pages(system, convs, output_len, vocab, page_size) -> int:
    """Distinct full pages over every turn's prompt, with stand-in answers of output_len tokens
    (the real answers differ, not their lengths)."""
    from jaxserve.cache.prefix_cache import page_hashes
    names, stand_in = set(), np.random.default_rng(1)
    for msgs in convs:
        history = list(system)
        for m in msgs:
            history += m
            names.update(page_hashes(history, page_size))
            history += stand_in.integers(3, vocab, size=output_len).tolist()
    return len(names)


def first_difference(a, b) -> int:
    """Index of the first token where two answers differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def serve_turns(engine, system, convs, output_len, max_context):
    """Runs every conversation turn by turn; returns (answers, ttfts, wall seconds, prompt tokens)."""
    from jaxserve import SamplingParams
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    history = [list(system) for _ in convs]
    answers, ttfts, prompt_tokens = {}, [], 0
    start = time.perf_counter()
    for k in range(max(map(len, convs))):
        ids = []
        for c, msgs in enumerate(convs):
            if k < len(msgs) and len(history[c]) + len(msgs[k]) + output_len <= max_context:
                history[c] += msgs[k]
                ids.append((c, f"c{c}.t{k}"))
                engine.add_request(ids[-1][1], list(history[c]), params)
                prompt_tokens += len(history[c])
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        for c, rid in ids:
            answers[rid] = done[rid].token_ids
            ttfts.append(done[rid].ttft)
            history[c] += done[rid].token_ids
    return answers, ttfts, time.perf_counter() - start, prompt_tokens


def main(argv):
    del argv
    import jaxserve
    from jaxserve import Engine
    config = _CONFIG.value
    config.engine.prefix_cache = False
    engine = jaxserve.LLM(config).engine  # the "off" run's; the "on" run's shares its weights
    cfg, params, mesh, tokenizer = engine.cfg, engine.runner.params, engine.runner.mesh, engine.tokenizer
    system, convs = conversations(np.random.default_rng(_SEED.value), _CONVERSATIONS.value, _MAX_TURNS.value,
                                  _SYSTEM.value, _USER.value, cfg.vocab_size)
    runs = {"off": {}, "on": {"prefix_cache": True}}
    for n in map(int, _HOST_PAGES.value):
        runs[f"on_host{n}"] = {"prefix_cache": True, "host_pages": n, "prefix_host_tier": True}
    if _CONTROL_CHUNK.value:
        c = _CONTROL_CHUNK.value
        runs["off_rechunked"] = {"max_chunk": c, "token_budget": min(c, engine.config.token_budget)}
    base_config = engine.config
    print(f"working set: {working_set_pages(system, convs, _OUTPUT_LEN.value, cfg.vocab_size, base_config.page_size)} "
          f"distinct full pages of prompts (upper bound, answers as random tokens), device pool "
          f"{base_config.num_pages} pages", flush=True)
    results, reference = {}, None
    for name, changes in runs.items():
        if changes:  # one KV pool at a time: an 8B pool sized to fill the GPU leaves no room for two
            engine.runner.cache = None
            del engine
            engine = Engine(cfg, params, mesh, tokenizer, dataclasses.replace(base_config, **changes))
        if _PRECOMPILE.value:
            engine.precompile()
        profile = None
        if _HOST_PROFILE.value and name.startswith("on_host"):
            import cProfile
            profile = cProfile.Profile()
            profile.enable()
        answers, ttfts, wall, prompt_tokens = serve_turns(engine, system, convs, _OUTPUT_LEN.value, engine.max_context)
        if profile is not None:
            import pstats
            profile.disable()
            print(f"[prefix cache {name}] under cProfile:", flush=True)
            pstats.Stats(profile, stream=sys.stdout).sort_stats("tottime").print_stats(_HOST_PROFILE.value)
        if reference is None:
            reference = answers
        same = answers == reference
        identical = sum(answers[rid] == reference[rid] for rid in reference)
        diverged = [first_difference(answers[rid], reference[rid]) for rid in reference
                    if answers[rid] != reference[rid]]
        out_tokens = sum(map(len, answers.values()))
        results[name] = {"requests": len(answers), "prompt_tokens": prompt_tokens, "output_tokens": out_tokens,
                         "wall_s": wall, "output_tok_s": out_tokens / wall,
                         "ttft_mean_s": float(np.mean(ttfts)), "ttft_p90_s": float(np.percentile(ttfts, 90)),
                         "cached_prompt_share": engine.stats["prefix_hit_tokens"] / prompt_tokens,
                         "host_tier_share": engine.stats["prefix_host_hit_tokens"] / prompt_tokens,
                         "host_pages": engine.config.host_pages,
                         "same_tokens_as_off": same, "answers_identical_to_off": identical,
                         "first_differing_token_mean": float(np.mean(diverged)) if diverged else None}
        r = results[name]
        print(f"[prefix cache {name:3s}] {r['requests']} requests, {prompt_tokens} prompt tokens "
              f"({100 * r['cached_prompt_share']:.1f}% cached, {100 * r['host_tier_share']:.1f}% from the host), "
              f"wall {wall:.2f} s, {r['output_tok_s']:.1f} output tok/s, TTFT mean {r['ttft_mean_s'] * 1e3:.1f} ms "
              f"p90 {r['ttft_p90_s'] * 1e3:.1f} ms, answers as with the cache off: {identical}/{len(reference)}"
              + (f" (the others differ from token {r['first_differing_token_mean']:.1f} on, mean)" if diverged else ""),
              flush=True)
    off, on = results["off"], results["on"]
    tiers = {name: {"ttft_speedup": off["ttft_mean_s"] / r["ttft_mean_s"],
                    "throughput_speedup": r["output_tok_s"] / off["output_tok_s"]}
             for name, r in results.items() if name.startswith("on_host")}
    summary = {"device": str(mesh.devices.flat[0].device_kind), "config": config.to_dict(),
               "workload": {"conversations": _CONVERSATIONS.value, "max_turns": _MAX_TURNS.value,
                            "system_len": _SYSTEM.value, "user_len": _USER.value, "output_len": _OUTPUT_LEN.value,
                            "seed": _SEED.value},
               "runs": results, "ttft_speedup": off["ttft_mean_s"] / on["ttft_mean_s"],
               "throughput_speedup": on["output_tok_s"] / off["output_tok_s"], "host_tiers": tiers}
    print(f"mean TTFT {summary['ttft_speedup']:.2f}x lower, throughput {summary['throughput_speedup']:.2f}x higher "
          f"with the cache on" + "".join(f"; {k}: {v['ttft_speedup']:.2f}x, {v['throughput_speedup']:.2f}x"
                                          for k, v in tiers.items()))
    print(json.dumps(summary, default=str))
    if _OUTPUT.value:
        with open(_OUTPUT.value, "w") as f:
            json.dump(summary, f, indent=1, default=str)
    if not all(r["same_tokens_as_off"] for name, r in results.items() if name.startswith("on")):
        raise SystemExit("prefix caching changed the answers")


if __name__ == "__main__":
    run(main)
