"""A Llama-style decoder (Touvron et al. 2023) in Flax Linen: pre-norm RMSNorm, rotary positions
with a configurable base (`rope_theta`), grouped-query attention (`n_kv_head` key/value heads
shared by `n_head` query heads, Ainslie et al. 2023), a SwiGLU MLP (Shazeer 2020), no biases,
and a tied or separate output head. Its variants are fields of the config, not other modules:
q/k/v biases (`qkv_bias`, Qwen2/2.5), per-head q/k RMSNorm (`qk_norm`, Qwen3), a head size of
its own (`head_dim`, Qwen3) and a sliding attention window (`sliding_window`, Mistral).

Shapes: B batch, T sequence, D d_model, H query heads, G key/value heads, K head size
(cfg.head_size: head_dim, or D / H), F MLP hidden, V vocab. Parameters carry logical axis names ("heads", "kv_heads", "mlp" go to the
"model" mesh axis under the default rules), and kernels are stored [out, in] like gpt's.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdp.models.common import (
    ModelConfig,
    advance,
    attention,
    cached_attention,
    decode_offset,
    init,
    logical,
    mask_padded_vocab,
    rotary,
    run_blocks,
    segment_mask,
)


def mlp_hidden(cfg: ModelConfig) -> int:
  """SwiGLU hidden width: cfg.mlp_dim when set (a checkpoint's intermediate_size), else 2/3 of
  mlp_ratio * d_model (so the three matrices cost what GPT's two do), rounded up to a multiple
  of 8, as Llama does."""
  if cfg.mlp_dim:
    return cfg.mlp_dim
  hidden = int(2 * cfg.mlp_ratio * cfg.d_model / 3)
  return -(-hidden // 8) * 8


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32 (Zhang & Sennrich 2019)."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32
  axis_name: str = "embed"  # Logical name of the normalised (last) axis: "head_dim" for q/k norms.

  @nn.compact
  def __call__(self, x):
    """x [..., D] -> [..., D] in `dtype`."""
    scale = self.param("scale", logical(nn.initializers.ones, (self.axis_name,)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def _proj(x, kernel, dtype):
  """x [..., in] times a kernel stored [out..., in] -> [..., out...]."""
  return jnp.einsum("...i,oi->...o", x.astype(dtype),
                    kernel.reshape(-1, kernel.shape[-1]).astype(dtype)).reshape(
                        x.shape[:-1] + kernel.shape[:-1])


class Attention(nn.Module):
  """Causal grouped-query attention with rotary positions; the variants' q/k/v biases (Qwen2),
  per-head q/k RMSNorm before the rotation (Qwen3) and sliding window (Mistral) by cfg."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, positions=None):
    """x [B, T, D] -> [B, T, D]; `mask` bool [B, 1, T, T] or None, `positions` int32 [B, T] or None
    (a decoding cache supplies its own)."""
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_size
    wq = self.param("wq", logical(init, ("heads", "head_dim", "embed")), (h, k, d))
    wk = self.param("wk", logical(init, ("kv_heads", "head_dim", "embed")), (g, k, d))
    wv = self.param("wv", logical(init, ("kv_heads", "head_dim", "embed")), (g, k, d))
    wo = self.param("wo", logical(init, ("embed", "heads", "head_dim")), (d, h, k))
    offset = decode_offset(self)  # None unless decoding from a cache.
    if offset is not None:  # Decoding: the call's tokens sit at offset, offset + 1, ...
      positions = offset + jnp.arange(x.shape[1])[None]  # [1, T]
    q, kk, v = _proj(x, wq, cfg.dtype), _proj(x, wk, cfg.dtype), _proj(x, wv, cfg.dtype)
    if cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + self.param("bq", logical(zeros, ("heads", "head_dim")), (h, k)).astype(cfg.dtype)
      kk = kk + self.param("bk", logical(zeros, ("kv_heads", "head_dim")), (g, k)).astype(cfg.dtype)
      v = v + self.param("bv", logical(zeros, ("kv_heads", "head_dim")), (g, k)).astype(cfg.dtype)
    if cfg.qk_norm:  # One scale [K] shared by the heads, as Qwen3's q_norm and k_norm.
      q = RMSNorm(cfg.eps, cfg.dtype, "head_dim", name="q_norm")(q)
      kk = RMSNorm(cfg.eps, cfg.dtype, "head_dim", name="k_norm")(kk)
    q = rotary(q, cfg.rope_theta, positions)  # [B, T, H, K]
    kk = rotary(kk, cfg.rope_theta, positions)  # [B, T, G, K]
    if offset is None:
      y = attention(q, kk, v, cfg.attention, mask, cfg.sliding_window)  # [B, T, H, K]
    else:  # The cache holds the G key/value heads.
      y = cached_attention(self, q, kk, v, offset, cfg.sliding_window)
    y = jnp.einsum("bthk,dhk->btd", y, wo.astype(cfg.dtype))  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class SwiGLU(nn.Module):
  """silu(x W_gate) * (x W_up), then W_down: D -> F = mlp_hidden(cfg) -> D (Shazeer 2020)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x [B, T, D] -> [B, T, D]."""
    cfg = self.cfg
    d, f = cfg.d_model, mlp_hidden(cfg)
    w_gate = self.param("w_gate", logical(init, ("mlp", "embed")), (f, d))
    w_up = self.param("w_up", logical(init, ("mlp", "embed")), (f, d))
    w_down = self.param("w_down", logical(init, ("embed", "mlp")), (d, f))
    hidden = nn.silu(_proj(x, w_gate, cfg.dtype)) * _proj(x, w_up, cfg.dtype)  # [B, T, F]
    y = _proj(hidden, w_down, cfg.dtype)  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  """One pre-norm residual block: x + attn(RMSNorm(x)), then x + mlp(RMSNorm(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, positions=None):
    """x [B, T, D] -> [B, T, D]; `mask` and `positions` as in Attention."""
    cfg = self.cfg
    x = x + Attention(cfg, name="attn")(RMSNorm(cfg.eps, cfg.dtype, name="attn_norm")(x),
                                        deterministic, mask, positions)
    x = x + SwiGLU(cfg, name="mlp")(RMSNorm(cfg.eps, cfg.dtype, name="mlp_norm")(x),
                                    deterministic)
    return x


class Llama(nn.Module):
  """The Llama-style decoder of `cfg` (family "llama"); see the module docstring."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool = True,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int32 -> logits [B, T, V] float32. With document packing, `segment_ids`
    and `positions` int32 [B, T]: attention stays within a segment, positions restart in each."""
    cfg = self.cfg
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, name="embed",
                     embedding_init=logical(init, ("vocab", "embed")))
    x = embed(tokens).astype(cfg.dtype)  # [B, T, D]
    advance(self, tokens.shape[1])
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    x = run_blocks(self, Block, x, deterministic, mask, positions)
    x = RMSNorm(cfg.eps, cfg.dtype, name="norm")(x)
    if cfg.tie_embeddings:
      return mask_padded_vocab(embed.attend(x).astype(jnp.float32), cfg)  # [B, T, V]
    head = self.param("lm_head", logical(init, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model))
    return mask_padded_vocab(_proj(x, head, cfg.dtype).astype(jnp.float32), cfg)  # [B, T, V]


def param_count(cfg: ModelConfig) -> int:
  """Parameters of Llama(cfg) in closed form (checked against the initialised tree in tests)."""
  d, f, v, k = cfg.d_model, mlp_hidden(cfg), cfg.vocab_size, cfg.head_size
  attn = d * k * (cfg.n_head * 2 + cfg.kv_heads * 2)
  attn += k * (cfg.n_head + 2 * cfg.kv_heads) if cfg.qkv_bias else 0
  attn += 2 * k if cfg.qk_norm else 0
  block = attn + 3 * d * f + 2 * d
  return v * d * (1 if cfg.tie_embeddings else 2) + cfg.n_layer * block + d
