"""Token sampling: greedy, temperature, top-k and top-p, with one PRNG key per request.

Each request's key is derived from its own seed and the index of the token being drawn, so a
request samples the same tokens whatever else shares its batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def request_keys(seeds, steps):
    """PRNG keys [B] from per-request seeds [B] and per-request token indices [B]."""
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)


def sample(logits, temperature, top_k, top_p, keys):
    """Samples one token per row of logits [B,V] (float32).

    temperature [B] (0 = greedy), top_k [B] (0 = off), top_p [B] in (0, 1], keys [B].
    Returns (tokens [B] int32, logprobs [B] of the chosen tokens under the unmodified distribution).
    """
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    sorted_desc = -jnp.sort(-scaled, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, V), V)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)
    # top-p on the top-k survivors: keep the smallest prefix whose probability reaches p.
    ranks = jnp.arange(V)[None, :]
    sorted_masked = jnp.where(ranks < k[:, None], sorted_desc, -jnp.inf)
    probs = jax.nn.softmax(sorted_masked, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    keep = (before < top_p[:, None]) & (ranks < k[:, None])
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    threshold = jnp.maximum(kth, cutoff)
    masked = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    drawn = jax.vmap(jax.random.categorical)(keys, masked)
    tokens = jnp.where(temperature > 0, drawn, greedy).astype(jnp.int32)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
