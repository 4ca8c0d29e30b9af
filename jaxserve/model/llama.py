"""The Llama-family decoder as pure functions of (params, inputs, cache) -> (outputs, cache).

Covers Llama 2/3 (RoPE with Llama-3 scaling, grouped-query attention, SwiGLU, optional tied
embeddings) and Qwen2 (qkv bias). Layers are stacked and run under `lax.scan`.

How keys and values are stored and attended is not decided here: `forward` takes an `attend`
function (dense cache below; paged cache in jaxserve.cache) so one model serves every cache.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from jaxserve.model.config import ModelConfig

# attend(q [B,T,H,D], k [B,T,K,D], v [B,T,K,D], cache, layer, positions [B,T]) -> (out [B,T,H,D], cache)
AttendFn = Callable


def rms_norm(x, weight, eps):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight.astype(x.dtype) * xf.astype(x.dtype)


def rope_frequencies(cfg: ModelConfig):
    """Inverse frequencies [head_dim // 2], with Llama-3 scaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    sc = cfg.rope_scaling
    if sc is None:
        return inv_freq
    # Llama 3.1: keep high frequencies, divide low ones by `factor`, interpolate in between.
    low_wavelen = sc.original_max_position / sc.low_freq_factor
    high_wavelen = sc.original_max_position / sc.high_freq_factor
    wavelen = 2 * jnp.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / sc.factor, inv_freq)
    smooth = (sc.original_max_position / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    smoothed = (1 - smooth) * scaled / sc.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def rope_angles(positions, inv_freq):
    """(cos, sin) [B,T,1,D/2] of positions [B,T], computed once for every layer.

    The barrier keeps them one kernel: otherwise XLA recomputes them in each layer, a kernel a
    layer (docs/benchmarks.md, issue 14)."""
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
    return jax.lax.optimization_barrier((jnp.cos(freqs)[:, :, None, :], jnp.sin(freqs)[:, :, None, :]))


def apply_rope(x, angles):
    """Rotates x [B,T,N,D] by its positions' `rope_angles` (the rotate-half convention of HF checkpoints)."""
    cos, sin = angles
    xf = x.astype(jnp.float32)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def attention_scores_softmax(q, k, v, mask, scale=None):
    """Grouped-query softmax attention in float32.

    q [B,T,H,D]; k, v [B,S,K,D]; mask [B,T,S] (True = may attend); scale: of the scores
    (default 1/sqrt(D)). Returns [B,T,H,D].
    """
    B, T, H, D = q.shape
    K = k.shape[2]
    qg = q.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores * (D ** -0.5 if scale is None else scale)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, D).astype(q.dtype)


def init_dense_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.jnp_dtype
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def dense_attend(q, k, v, cache, layer, positions):
    """Writes k, v at their positions of a dense [L,B,S,K,D] cache and attends causally.

    Padding tokens carry position -1: they write nothing and their outputs are garbage.
    """
    S = cache["k"].shape[2]
    B = q.shape[0]
    slot = jnp.where(positions >= 0, positions, S)  # out of range -> dropped
    b = jnp.arange(B)[:, None]
    cache = {
        "k": cache["k"].at[layer, b, slot].set(k.astype(cache["k"].dtype), mode="drop"),
        "v": cache["v"].at[layer, b, slot].set(v.astype(cache["v"].dtype), mode="drop"),
    }
    kv_pos = jnp.arange(S)
    mask = kv_pos[None, None, :] <= positions[:, :, None]
    out = attention_scores_softmax(q, cache["k"][layer], cache["v"][layer], mask)
    return out, cache


def _product(spec, x, w, rows: int = 0):
    """einsum(spec, x, w) over x [B,T,...], run with `rows` >= T rows (zeros appended, then
    sliced off) when given: see jaxserve.model.gemm_rows. The barrier keeps XLA from moving the
    slice into the product, which would undo the padding."""
    T = x.shape[1]
    if rows <= T:
        return jnp.einsum(spec, x, w)
    x = jnp.pad(x, [(0, 0), (0, rows - T)] + [(0, 0)] * (x.ndim - 2))
    return jax.lax.optimization_barrier(jnp.einsum(spec, x, w))[:, :T]


def _layer(x, lp, cache, layer, positions, angles, cfg: ModelConfig, attend: AttendFn, gemm_rows=()):
    B, T = x.shape[:2]
    G = cfg.num_heads // cfg.num_kv_heads
    pad = dict(gemm_rows)
    h = rms_norm(x, lp["attn_norm"], cfg.rms_eps)
    qkv = _product("bte,ekgd->btkgd", h, lp["wqkv"], pad.get("wqkv", 0))  # per kv head: its G query heads, k, v
    if cfg.qkv_bias:
        qkv = qkv + lp["bqkv"]
    q = qkv[:, :, :, :G].reshape(B, T, cfg.num_heads, cfg.head_dim)  # head k*G + g reads kv head k
    k, v = qkv[:, :, :, G], qkv[:, :, :, G + 1]
    q = apply_rope(q, angles)
    k = apply_rope(k, angles)
    attn, cache = attend(q, k, v, cache, layer, positions)
    x = x + _product("bthd,hde->bte", attn, lp["wo"], pad.get("wo", 0))
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_eps)
    gate_up = _product("bte,ecf->btcf", h, lp["w_gate_up"], pad.get("w_gate_up", 0))
    x = x + _product("btf,fe->bte", jax.nn.silu(gate_up[:, :, 0]) * gate_up[:, :, 1], lp["w_down"],
                     pad.get("w_down", 0))
    return x, cache


LOGIT_MIN_ROWS = 8  # see forward


def logits_from_hidden(params, h, cfg: ModelConfig):
    h = rms_norm(h, params["final_norm"], cfg.rms_eps)
    if cfg.tie_embeddings:
        return jnp.einsum("...e,ve->...v", h, params["embed"], preferred_element_type=jnp.float32)
    return jnp.einsum("...e,ev->...v", h, params["lm_head"], preferred_element_type=jnp.float32)


def forward(params, tokens, positions, cache, cfg: ModelConfig, attend: AttendFn = dense_attend,
            logit_index: Optional[jax.Array] = None, unroll_layers: bool = False, gemm_rows=()):
    """Runs the decoder over tokens [B,T] at positions [B,T] (-1 = padding).

    Returns (logits, cache): logits are float32 [B,T,V], or [B,V] at `logit_index` [B] when given
    (prefill only needs each sequence's last token), or [B,M,V] at `logit_index` [B,M] (a
    flattened step's sampled rows). unroll_layers: a Python loop over the layers
    (static layer indices) instead of `lax.scan`: compiles several times longer, runs without the
    loop's per-layer control and index kernels (see model_runner.UNROLL_LAYERS_GPU). gemm_rows:
    ((weight name, rows), ...), layer products to run with more rows (jaxserve.model.gemm_rows).
    """
    x = params["embed"][tokens].astype(cfg.jnp_dtype)
    angles = rope_angles(positions, rope_frequencies(cfg))

    def body(carry, xs):
        # the layer index rides in the carry and both norm weights in one slice: each per-layer
        # slice of a small array is a copy kernel of its own on GPU (docs/benchmarks.md)
        x, cache, layer = carry
        lp, norms = xs
        lp = dict(lp, attn_norm=norms[0], mlp_norm=norms[1])
        x, cache = _layer(x, lp, cache, layer, positions, angles, cfg, attend, gemm_rows)
        return (x, cache, layer + 1), None

    if unroll_layers:
        for i in range(cfg.num_layers):
            lp = jax.tree.map(lambda a: a[i], params["layers"])
            x, cache = _layer(x, lp, cache, i, positions, angles, cfg, attend, gemm_rows)
    else:
        big = {k: v for k, v in params["layers"].items() if k not in ("attn_norm", "mlp_norm")}
        norms = jnp.stack([params["layers"]["attn_norm"], params["layers"]["mlp_norm"]], axis=1)
        (x, cache, _), _ = jax.lax.scan(body, (x, cache, jnp.int32(0)), (big, norms))
    if logit_index is not None and logit_index.ndim == 2:
        x = jnp.take_along_axis(x, logit_index[:, :, None], axis=1)
    elif logit_index is not None:
        x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)[:, 0]
    # With fewer than 8 rows XLA makes the LM head a matrix-vector product, which cuBLAS has no
    # bf16-in, f32-out form of: it would convert the whole head to f32 first. 8 rows stay a GEMM.
    rows = x.shape[-2] if x.ndim == 3 else None
    if rows is not None and rows < LOGIT_MIN_ROWS:
        x = jnp.pad(x, ((0, 0), (0, LOGIT_MIN_ROWS - rows), (0, 0)))
        return logits_from_hidden(params, x, cfg)[:, :rows], cache
    return logits_from_hidden(params, x, cfg), cache
