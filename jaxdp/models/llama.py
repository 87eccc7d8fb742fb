"""A Llama-style decoder (Touvron et al. 2023) in Flax Linen: pre-norm RMSNorm, rotary positions
with a configurable base (`rope_theta`), grouped-query attention (`n_kv_head` key/value heads
shared by `n_head` query heads, Ainslie et al. 2023), a SwiGLU MLP (Shazeer 2020), no biases,
and a tied or separate output head.

Shapes: B batch, T sequence, D d_model, H query heads, G key/value heads, K head size (D / H),
F MLP hidden, V vocab. Parameters carry logical axis names ("heads", "kv_heads", "mlp" go to the
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
  """SwiGLU hidden width: 2/3 of mlp_ratio * d_model (so the three matrices cost what GPT's two
  do), rounded up to a multiple of 8, as Llama does."""
  hidden = int(2 * cfg.mlp_ratio * cfg.d_model / 3)
  return -(-hidden // 8) * 8


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, computed in float32 (Zhang & Sennrich 2019)."""
  eps: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", logical(nn.initializers.ones, ("embed",)), (x.shape[-1],))
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


def _proj(x, kernel, dtype):
  """x [..., in] times a kernel stored [out..., in] -> [..., out...]."""
  return jnp.einsum("...i,oi->...o", x.astype(dtype),
                    kernel.reshape(-1, kernel.shape[-1]).astype(dtype)).reshape(
                        x.shape[:-1] + kernel.shape[:-1])


class Attention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, positions=None):
    cfg = self.cfg
    d, h, g, k = cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.head_dim
    wq = self.param("wq", logical(init, ("heads", "head_dim", "embed")), (h, k, d))
    wk = self.param("wk", logical(init, ("kv_heads", "head_dim", "embed")), (g, k, d))
    wv = self.param("wv", logical(init, ("kv_heads", "head_dim", "embed")), (g, k, d))
    wo = self.param("wo", logical(init, ("embed", "heads", "head_dim")), (d, h, k))
    offset = decode_offset(self)  # None unless decoding from a cache.
    if offset is not None:  # Decoding: the call's tokens sit at offset, offset + 1, ...
      positions = offset + jnp.arange(x.shape[1])[None]  # [1, T]
    q = rotary(_proj(x, wq, cfg.dtype), cfg.rope_theta, positions)  # [B, T, H, K]
    kk = rotary(_proj(x, wk, cfg.dtype), cfg.rope_theta, positions)  # [B, T, G, K]
    v = _proj(x, wv, cfg.dtype)  # [B, T, G, K]
    if offset is None:
      y = attention(q, kk, v, cfg.attention, mask)  # [B, T, H, K]
    else:
      y = cached_attention(self, q, kk, v, offset)  # The cache holds the G key/value heads.
    y = jnp.einsum("bthk,dhk->btd", y, wo.astype(cfg.dtype))  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class SwiGLU(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    d, f = cfg.d_model, mlp_hidden(cfg)
    w_gate = self.param("w_gate", logical(init, ("mlp", "embed")), (f, d))
    w_up = self.param("w_up", logical(init, ("mlp", "embed")), (f, d))
    w_down = self.param("w_down", logical(init, ("embed", "mlp")), (d, f))
    hidden = nn.silu(_proj(x, w_gate, cfg.dtype)) * _proj(x, w_up, cfg.dtype)  # [B, T, F]
    y = _proj(hidden, w_down, cfg.dtype)  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, positions=None):
    cfg = self.cfg
    x = x + Attention(cfg, name="attn")(RMSNorm(cfg.eps, cfg.dtype, name="attn_norm")(x),
                                        deterministic, mask, positions)
    x = x + SwiGLU(cfg, name="mlp")(RMSNorm(cfg.eps, cfg.dtype, name="mlp_norm")(x),
                                    deterministic)
    return x


class Llama(nn.Module):
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
  d, f, v = cfg.d_model, mlp_hidden(cfg), cfg.vocab_size
  attn = d * cfg.head_dim * (cfg.n_head * 2 + cfg.kv_heads * 2)
  block = attn + 3 * d * f + 2 * d
  return v * d * (1 if cfg.tie_embeddings else 2) + cfg.n_layer * block + d
