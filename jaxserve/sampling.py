"""Token sampling: greedy, temperature, top-k and top-p, with one PRNG key per request.

Each request's key is derived from its own seed and the index of the token being drawn, so a
request samples the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def request_keys(seeds, steps):
    """PRNG keys [B] from per-request seeds [B] and per-request token indices [B]."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def _filter_top_k_top_p(scaled, top_k, top_p):
    """Masks each row of scaled logits to its top-k, then to the smallest prefix reaching top-p."""
    V = scaled.shape[-1]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    ranks = jnp.arange(V)[None, :]
    probs = jax.nn.softmax(jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p[:, None]) & (ranks < k[:, None])
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    # rows without filters stay untouched, so they sample exactly as on the unfiltered path
    unfiltered = ((top_k <= 0) & (top_p >= 1))[:, None]
    threshold = jnp.where(unfiltered, -jnp.inf, jnp.maximum(kth, cutoff))
    return jnp.where(scaled >= threshold, scaled, -jnp.inf)


MODES = ("greedy", "sample", "filter")


def mode_for(temperature, top_k, top_p) -> str:
    """The least work that serves these rows (host arrays): 'greedy' (every row greedy), 'sample'
    (some rows sample, none filters) or 'filter' (some sampled row asks for top-k or top-p)."""
    sampled = np.asarray(temperature) > 0
    if not sampled.any():
        return "greedy"
    if (sampled & ((np.asarray(top_k) > 0) | (np.asarray(top_p) < 1))).any():
        return "filter"
    return "sample"


def ban(logits, banned):
    """logits [B,V] with each row's `banned` token ids [B,M] (-1 = none) at -inf. A mask, not
    a scatter: it fuses into the argmax that reads the logits, where a scatter into them (an
    input of the step, not donated) would copy all [B,V] of them first."""
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
    hit = vocab == banned[:, :1]
    for j in range(1, banned.shape[1]):  # elementwise ors (no reduction): one fusion with the argmax
        hit = hit | (vocab == banned[:, j:j + 1])
    return jnp.where(hit, -jnp.inf, logits)


def sample(logits, temperature, top_k, top_p, keys, mode: str, banned=None):
    """Samples one token per row of logits [B,V] (float32).

    temperature [B] (0 = greedy), top_k [B] (0 = off), top_p [B] in (0, 1], keys [B]; banned
    [B,M]: token ids a row may not draw (-1 = none; `SamplingParams.min_tokens`).
    Returns (tokens [B] int32, logprobs [B] of the chosen tokens under the unmodified distribution).
    mode (static, from `mode_for` on the host): 'greedy' runs nothing but an argmax, 'sample'
    draws without the vocabulary sort that only 'filter' (top-k/top-p) needs. The host picks it
    because the device cannot do so cheaply: on GPU a lax.cond whose branch holds the sort ran on
    the host, reading its predicate back and stalling every step (about 0.5 ms on an H100).
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    allowed = logits if banned is None else ban(logits, banned)
    greedy = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    if mode == "greedy":
        tokens = greedy
    else:
        scaled = allowed / jnp.maximum(temperature, 1e-6)[:, None]
        if mode == "filter":
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        tokens = jnp.where(temperature > 0, drawn, greedy)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
