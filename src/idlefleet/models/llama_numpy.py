"""A plain numpy forward pass of a llama model: the reference the ONNX graph is tested against.

One sequence, no cache, float64 where it matters, written for reading rather than speed: the
embedding, per layer RMSNorm → attention (grouped-query, causal, interleaved RoPE on the GGUF's
permuted Q/K rows) → residual → RMSNorm → SwiGLU feed-forward → residual, then the final norm
and the (tied) output projection.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from idlefleet.models.gguf_llama import LlamaConfig

__all__ = ["llama_logits", "rope_interleaved"]


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope_interleaved(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of ``x`` [S, heads, head_dim] by
    position × base^(-2i/head_dim)."""
    half = x.shape[-1] // 2
    inv_freq = base ** (-np.arange(half, dtype=np.float64) * 2 / x.shape[-1])
    angles = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [S, half]
    cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def llama_logits(
    cfg: LlamaConfig, weights: Mapping[str, np.ndarray], ids: Sequence[int]
) -> np.ndarray:
    """Logits [len(ids), vocab] of the sequence ``ids`` at positions 0, 1, …"""
    w = weights
    n = len(ids)
    positions = np.arange(n)
    x = w["token_embd.weight"][np.asarray(ids)].astype(np.float64)
    causal = np.triu(np.full((n, n), -np.inf), k=1)
    for i in range(cfg.layers):
        p = f"blk.{i}."
        h = _rms_norm(x, w[p + "attn_norm.weight"], cfg.rms_eps)
        q = (h @ w[p + "attn_q.weight"].T).reshape(n, cfg.heads, cfg.head_dim)
        k = (h @ w[p + "attn_k.weight"].T).reshape(n, cfg.kv_heads, cfg.head_dim)
        v = (h @ w[p + "attn_v.weight"].T).reshape(n, cfg.kv_heads, cfg.head_dim)
        q = rope_interleaved(q, positions, cfg.rope_base)
        k = rope_interleaved(k, positions, cfg.rope_base)
        k = np.repeat(k, cfg.group, axis=1)  # kv head j serves query heads j*group … +group-1
        v = np.repeat(v, cfg.group, axis=1)
        scores = np.einsum("shd,thd->hst", q, k) / np.sqrt(cfg.head_dim) + causal
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attn = scores / scores.sum(axis=-1, keepdims=True)
        out = np.einsum("hst,thd->shd", attn, v).reshape(n, cfg.dim)
        x = x + out @ w[p + "attn_output.weight"].T
        h = _rms_norm(x, w[p + "ffn_norm.weight"], cfg.rms_eps)
        gate = h @ w[p + "ffn_gate.weight"].T
        up = h @ w[p + "ffn_up.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w[p + "ffn_down.weight"].T
    x = _rms_norm(x, w["output_norm.weight"], cfg.rms_eps)
    output = w["token_embd.weight"] if cfg.tied_embeddings else w["output.weight"]
    logits: np.ndarray = x @ output.T
    return logits
