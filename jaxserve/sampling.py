"""Token sampling: greedy, temperature, top-k and top-p, with one PRNG key per request.

Each request's key is derived from its own seed and the index of the token being drawn, so a
request samples the same tokens whatever else shares its batch.
"""
from __future__ import annotations

from typing import Optional

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


def sample(logits, temperature, top_k, top_p, keys, mode: Optional[str] = None):
    """Samples one token per row of logits [B,V] (float32).

    temperature [B] (0 = greedy), top_k [B] (0 = off), top_p [B] in (0, 1], keys [B].
    Returns (tokens [B] int32, logprobs [B] of the chosen tokens under the unmodified distribution).
    The vocabulary sort that top-k/top-p need runs only when some sampled row asks for it, and
    nothing but an argmax runs when every row is greedy: `mode` (static, from `mode_for`) says
    which, or, when None, the device decides with lax.cond. The engine picks the mode on the
    host: on GPU a cond whose branch holds the sort ran on the host, reading its predicate back
    and stalling every step (about 0.5 ms a step on an H100).
    """
    if mode is not None and mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    sampled_rows = temperature > 0

    def draw(filtered):
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        if filtered is None:
            needs_filter = jnp.any(sampled_rows & ((top_k > 0) | (top_p < 1)))
            masked = jax.lax.cond(needs_filter, _filter_top_k_top_p, lambda s, k, p: s, scaled, top_k, top_p)
        else:
            masked = _filter_top_k_top_p(scaled, top_k, top_p) if filtered else scaled
        drawn = jax.vmap(jax.random.categorical)(keys, masked).astype(jnp.int32)
        return jnp.where(sampled_rows, drawn, greedy)

    if mode is None:
        tokens = jax.lax.cond(jnp.any(sampled_rows), lambda: draw(None), lambda: greedy)
    else:
        tokens = greedy if mode == "greedy" else draw(mode == "filter")
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
