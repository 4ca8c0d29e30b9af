"""Token sampling: greedy, temperature, top-k and top-p, repetition, presence and frequency
penalties, with one PRNG key per request, and the top log-probabilities of each draw.

Each request's key is derived from its own seed and the index of the token being drawn, so a
request samples the same tokens whatever else shares its batch.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.sampling_params import MAX_LOGPROBS


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


class Penalties(NamedTuple):
    """Each row's penalty inputs (OpenAI's and vLLM's definitions): counts [B,V] of each token
    in the row's output so far, in_prompt [B,V] whether it is in the prompt, and the row's
    repetition (1 = off), presence and frequency (0 = off) penalties [B]."""
    counts: jax.Array
    in_prompt: jax.Array
    repetition: jax.Array
    presence: jax.Array
    frequency: jax.Array


def penalize(logits, p: Penalties):
    """logits [B,V] with the penalties applied, in vLLM's order: a token seen in the prompt or
    the output has its logit divided by the repetition penalty (multiplied, when negative),
    then each output token's logit loses frequency x its count and presence once. A row with
    neutral penalties keeps its logits bit for bit (x / 1, x * 1 and x - 0 are exact)."""
    used = p.counts > 0
    rep = p.repetition[:, None]
    logits = jnp.where(used | p.in_prompt, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - p.frequency[:, None] * p.counts - p.presence[:, None] * used


# Every sampling mode: what the draw does ('greedy' runs an argmax, 'sample' draws without the
# vocabulary sort that only 'filter' (top-k/top-p) needs), with '+penalties' when some row has
# penalties.
BASE_MODES = ("greedy", "sample", "filter")
MODES = BASE_MODES + tuple(f"{base}+penalties" for base in BASE_MODES)


def mode_for(temperature, top_k, top_p, penalties: bool = False) -> str:
    """The least work that serves these rows (host arrays): 'greedy' (every row greedy), 'sample'
    (some rows sample, none filters) or 'filter' (some sampled row asks for top-k or top-p),
    with '+penalties' when some row has penalties."""
    sampled = np.asarray(temperature) > 0
    if not sampled.any():
        base = "greedy"
    elif (sampled & ((np.asarray(top_k) > 0) | (np.asarray(top_p) < 1))).any():
        base = "filter"
    else:
        base = "sample"
    return base + "+penalties" * bool(penalties)


def split_mode(mode: str) -> tuple:
    """(base mode, whether it applies penalties) of a mode, or ValueError naming it."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: expected one of {MODES}")
    base, _, extra = mode.partition("+")
    return base, extra == "penalties"


# The widths top_logprobs is compiled for: a step asks for the smallest that covers its requests.
# On an H200 a top-8 of [64, 128256] takes about 0.17 ms and a plain top-20 1.0 ms (a sort), the
# two-stage top-20 below 0.42 ms (docs/benchmarks.md).
TOP_K_BUCKETS = (8, MAX_LOGPROBS)
_TOP_K_BLOCK = 256


def top_k_bucket(k: int) -> int:
    """The compiled top_logprobs width that serves a request for k (1 <= k <= MAX_LOGPROBS)."""
    return next(b for b in TOP_K_BUCKETS if b >= k)


def _top_k(x, k: int):
    """lax.top_k of x [B,V]; above k = 8 in two stages, the k largest of each block of
    _TOP_K_BLOCK, then of those (exact, ties to the lower index as lax.top_k's)."""
    if k <= 8:
        return jax.lax.top_k(x, k)
    B, V = x.shape
    blocks = -(-V // _TOP_K_BLOCK)
    x = jnp.pad(x, ((0, 0), (0, blocks * _TOP_K_BLOCK - V)), constant_values=-jnp.inf)
    values, ids = jax.lax.top_k(x.reshape(B, blocks, _TOP_K_BLOCK), min(k, _TOP_K_BLOCK))
    ids = (ids + (jnp.arange(blocks) * _TOP_K_BLOCK)[None, :, None]).reshape(B, -1)
    values, at = jax.lax.top_k(values.reshape(B, -1), k)
    return values, jnp.take_along_axis(ids, at, axis=-1)


def top_logprobs(logits, tokens, k: int = MAX_LOGPROBS):
    """(ids [B,k], logprobs [B,k]) of each row's k most likely tokens and the rank [B] (1 = most
    likely) of its chosen token, under the unmodified distribution (as `sample`'s logprobs)."""
    logp = jax.nn.log_softmax(logits, axis=-1)
    values, ids = _top_k(logp, k)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)
    rank = 1 + jnp.sum(logp > chosen, axis=-1, dtype=jnp.int32)
    return ids.astype(jnp.int32), values, rank


def ban(logits, banned):
    """logits [B,V] with each row's `banned` token ids [B,M] (-1 = none) at -inf. A mask, not
    a scatter: it fuses into the argmax that reads the logits, where a scatter into them (an
    input of the step, not donated) would copy all [B,V] of them first."""
    vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)[None, :]
    hit = vocab == banned[:, :1]
    for j in range(1, banned.shape[1]):  # elementwise ors (no reduction): one fusion with the argmax
        hit = hit | (vocab == banned[:, j:j + 1])
    return jnp.where(hit, -jnp.inf, logits)


def sample(logits, temperature, top_k, top_p, keys, mode: str, banned=None, penalties=None):
    """Samples one token per row of logits [B,V] (float32).

    temperature [B] (0 = greedy), top_k [B] (0 = off), top_p [B] in (0, 1], keys [B]; banned
    [B,M]: token ids a row may not draw (-1 = none; `SamplingParams.min_tokens`); penalties: a
    `Penalties`, in the modes with '+penalties' only.
    Returns (tokens [B] int32, logprobs [B] of the chosen tokens under the unmodified distribution).
    mode (static, from `mode_for` on the host). The host picks it because the device cannot do so cheaply: on GPU a lax.cond whose branch
    holds the sort ran on the host, reading its predicate back and stalling every step (about
    0.5 ms on an H100).
    """
    base, penalized = split_mode(mode)
    if penalized != (penalties is not None):
        raise ValueError(f"mode={mode!r}: penalties must be given exactly in the modes with '+penalties'")
    allowed = logits if penalties is None else penalize(logits, penalties)
    allowed = allowed if banned is None else ban(allowed, banned)
    greedy = jnp.argmax(allowed, axis=-1).astype(jnp.int32)
    if base == "greedy":
        tokens = greedy
    else:
        scaled = allowed / jnp.maximum(temperature, 1e-6)[:, None]
        if base == "filter":
            scaled = _filter_top_k_top_p(scaled, top_k, top_p)
        drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
        tokens = jnp.where(temperature > 0, drawn, greedy)
    logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), tokens[:, None], axis=-1)[:, 0]
    return tokens, logprobs
