"""A simple dense-KV-cache generation loop: one batch of prompts, prefill then decode.

The paged, continuously batched engine supersedes this for serving; this loop stays as the
plainest reference for correctness tests and for the single-prompt launcher.
"""
from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve import sampling
from jaxserve.model import llama
from jaxserve.model.config import ModelConfig
from jaxserve.model.sharding import logical_sharding
from jaxserve.scheduling.cost_model import bucket


@functools.partial(jax.jit, static_argnames=("cfg", "mode"), donate_argnames=("cache",))
def _step(params, tokens, positions, cache, logit_index, temperature, top_k, top_p, seeds, steps, cfg, mode):
    logits, cache = llama.forward(params, tokens, positions, cache, cfg, logit_index=logit_index)
    keys = sampling.request_keys(seeds, steps)
    next_tokens, _ = sampling.sample(logits, temperature, top_k, top_p, keys, mode=mode)
    return next_tokens, cache


def generate_stream(params, cfg: ModelConfig, mesh, prompts: Sequence[Sequence[int]], max_tokens: int,
                    temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    stop_token_ids: Sequence[int] = ()) -> Iterator[np.ndarray]:
    """Yields one array [B] of new token ids per step until every prompt stopped or hit max_tokens.

    Finished rows keep yielding their stop token; callers cut at the first stop token.
    """
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts])
    if lengths.min() < 1:
        raise ValueError("prompt must not be empty")
    total = int(lengths.max()) + max_tokens
    if total > cfg.max_seq_len:
        raise ValueError(f"prompt length + max_tokens = {total} exceeds model.max_seq_len={cfg.max_seq_len}")
    T = bucket(int(lengths.max()), 16)  # powers of two bound the number of compiled shapes
    S = min(bucket(total, 16), bucket(cfg.max_seq_len, 16))
    cache = llama.init_dense_cache(cfg, B, S)
    cache_sharding = logical_sharding(("layers", "batch", "seq", "kv_heads", "head_dim"), cache["k"].shape, mesh)
    cache = jax.device_put(cache, cache_sharding)
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
        positions[i, : len(p)] = np.arange(len(p))
    rows = lambda v, dt: jnp.full((B,), v, dt)
    temp, tk, tp, seeds = rows(temperature, jnp.float32), rows(top_k, jnp.int32), rows(top_p, jnp.float32), rows(seed, jnp.uint32)
    mode = sampling.mode_for([temperature], [top_k], [top_p])
    stop = np.asarray(list(stop_token_ids), np.int64)
    done = np.zeros(B, bool)
    next_tokens, cache = _step(params, tokens, positions, cache, jnp.asarray(lengths - 1), temp, tk, tp,
                               seeds, jnp.zeros(B, jnp.int32), cfg=cfg, mode=mode)
    pos = lengths.copy()
    for step in range(max_tokens):
        out = np.asarray(next_tokens)
        out = np.where(done, -1, out)
        yield out
        done |= np.isin(out, stop)
        if done.all() or step == max_tokens - 1:
            return
        next_tokens, cache = _step(params, out.clip(0)[:, None].astype(np.int32), pos[:, None].astype(np.int32),
                                   cache, jnp.zeros(B, jnp.int32), temp, tk, tp, seeds,
                                   jnp.full(B, step + 1, jnp.int32), cfg=cfg, mode=mode)
        pos += 1


def generate(params, cfg, mesh, prompts, max_tokens, **kw) -> list:
    """Token ids generated for each prompt (stop token included, nothing after it)."""
    outs = [[] for _ in prompts]
    for step_tokens in generate_stream(params, cfg, mesh, prompts, max_tokens, **kw):
        for i, t in enumerate(step_tokens):
            if t >= 0:
                outs[i].append(int(t))
    return outs
