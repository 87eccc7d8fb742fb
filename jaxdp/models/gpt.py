"""A decoder-only Transformer (GPT-2 style) in Flax Linen: pre-norm LayerNorm, causal
attention, GELU MLP, rotary or learned positions, a weight-tied output head (or, with
`tie_embeddings` False, one of its own, as a GPT-2 checkpoint with tie_word_embeddings false).

Shapes: B batch, T sequence, D d_model, H heads, K head size (D / H), F MLP hidden, V vocab.
Attention and MLP kernels keep the head and hidden axes explicit ([D, 3, H, K], [H, K, D],
[F, D], [D, F]) and every parameter carries logical axis names ("embed", "heads", "mlp", ...),
so a mesh's "model" axis splits them (Megatron-style) through the rules in
jaxdp/parallel/shardings.py, without reshaping parameters or a table of parameter paths.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdp.models.common import (
    Linear,
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


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with a fused [D, 3, H, K] qkv kernel and biases."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, positions=None):
    """x [B, T, D] -> [B, T, D]; `mask` bool [B, 1, T, T] or None, `positions` int32 [B, T] or None
    (rotary positions; a decoding cache supplies its own)."""
    cfg = self.cfg
    head = cfg.d_model // cfg.n_head
    qkv = nn.DenseGeneral((3, cfg.n_head, head), dtype=cfg.dtype, name="qkv",
                          kernel_init=logical(init, ("embed", "qkv", "heads", "head_dim")),
                          bias_init=logical(nn.initializers.zeros, ("qkv", "heads", "head_dim")),
                          )(x)  # [B, T, 3, H, K]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, K] each
    offset = decode_offset(self)  # None unless decoding from a cache.
    if offset is not None:  # Decoding: the call's tokens sit at offset, offset + 1, ...
      positions = offset + jnp.arange(x.shape[1])[None]  # [1, T]
    if cfg.positions == "rope":
      q, k = rotary(q, cfg.rope_theta, positions), rotary(k, cfg.rope_theta, positions)
    if offset is None:
      y = attention(q, k, v, cfg.attention, mask)  # [B, T, H, K]
    else:
      y = cached_attention(self, q, k, v, offset)
    y = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=cfg.dtype, name="proj",
                        kernel_init=logical(init, ("heads", "head_dim", "embed")),
                        bias_init=logical(nn.initializers.zeros, ("embed",)))(y)  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


def mlp_width(cfg: ModelConfig) -> int:
  """The MLP hidden width F: cfg.mlp_dim when set, else int(mlp_ratio * d_model)."""
  return cfg.mlp_dim or int(cfg.mlp_ratio * cfg.d_model)


class MLP(nn.Module):
  """Two-layer GELU MLP, D -> F = mlp_width(cfg) -> D, with dropout on its output."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    """x [B, T, D] -> [B, T, D]."""
    cfg = self.cfg
    h = Linear(mlp_width(cfg), ("mlp", "embed"), dtype=cfg.dtype, name="fc")(x)  # [B, T, F]
    h = nn.gelu(h)
    y = Linear(cfg.d_model, ("embed", "mlp"), dtype=cfg.dtype, name="proj")(h)  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  """One pre-norm residual block: x + attn(LN(x)), then x + mlp(LN(x))."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool, mask=None, positions=None):
    """x [B, T, D] -> [B, T, D]; `mask` and `positions` as in CausalSelfAttention."""
    x = x + CausalSelfAttention(self.cfg, name="attn")(layer_norm(self.cfg, "ln1")(x), deterministic,
                                                       mask, positions)
    x = x + MLP(self.cfg, name="mlp")(layer_norm(self.cfg, "ln2")(x), deterministic)
    return x


def layer_norm(cfg: ModelConfig, name: str) -> nn.LayerNorm:
  """A LayerNorm over D with epsilon `cfg.eps`, in the compute dtype, its parameters named "embed"."""
  return nn.LayerNorm(epsilon=cfg.eps, dtype=cfg.dtype, name=name,
                      scale_init=logical(nn.initializers.ones, ("embed",)),
                      bias_init=logical(nn.initializers.zeros, ("embed",)))


class GPT(nn.Module):
  """The GPT-2 style decoder of `cfg` (family "gpt"); see the module docstring."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool = True,
               segment_ids: jax.Array | None = None, positions: jax.Array | None = None) -> jax.Array:
    """tokens [B, T] int32 -> logits [B, T, V] float32. With document packing, `segment_ids`
    and `positions` int32 [B, T]: attention stays within a segment, positions restart in each."""
    cfg = self.cfg
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, name="wte",
                   embedding_init=logical(init, ("vocab", "embed")))
    x = wte(tokens).astype(cfg.dtype)  # [B, T, D]
    offset = decode_offset(self)  # None unless decoding from a cache.
    if offset is not None:
      positions = offset + jnp.arange(tokens.shape[1])[None]  # [1, T]
    if cfg.positions == "learned":
      wpe = self.param("wpe", logical(init, (None, "embed")), (cfg.seq_len, cfg.d_model))
      x = x + (wpe[None, :tokens.shape[1]] if positions is None else wpe[positions]).astype(cfg.dtype)
    advance(self, tokens.shape[1])
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = None if segment_ids is None else segment_mask(segment_ids)
    x = run_blocks(self, Block, x, deterministic, mask, positions)
    x = layer_norm(cfg, "ln_f")(x)
    if cfg.tie_embeddings:
      logits = wte.attend(x).astype(jnp.float32)  # [B, T, V], tied to the input embedding
    else:  # A head of its own [V, D] (a GPT-2 checkpoint with tie_word_embeddings false).
      head = self.param("lm_head", logical(init, ("vocab", "embed")), (cfg.vocab_size, cfg.d_model))
      logits = jnp.einsum("btd,vd->btv", x, head.astype(cfg.dtype)).astype(jnp.float32)
    return mask_padded_vocab(logits, cfg)


def param_count(cfg: ModelConfig) -> int:
  """Parameters of GPT(cfg) in closed form (checked against the initialised tree in tests)."""
  d, f, v, layers = cfg.d_model, mlp_width(cfg), cfg.vocab_size, cfg.n_layer
  block = (d * 3 * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 2 * (2 * d)
  positions = cfg.seq_len * d if cfg.positions == "learned" else 0
  return v * d * (1 if cfg.tie_embeddings else 2) + positions + layers * block + 2 * d
