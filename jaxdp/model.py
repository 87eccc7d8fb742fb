"""A decoder-only Transformer (GPT) in Flax Linen: pre-norm, causal, rotary or learned positions,
weight-tied output head.

Shapes: B batch, T sequence, D d_model, H heads, K head size (D / H), F MLP hidden, V vocab.
Attention and MLP kernels keep the head and hidden axes explicit ([D, 3, H, K], [H, K, D],
[D, F], [F, D]) so a mesh can shard them (Megatron-style) without reshaping parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int
  seq_len: int
  n_layer: int
  n_head: int
  d_model: int
  mlp_ratio: int = 4
  dropout: float = 0.0
  positions: str = "rope"
  attention: str = "xla"
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.
  remat: str = "none"  # Activation rematerialisation of each block: "none", "block" or "full".

  @classmethod
  def from_config(cls, config, vocab_size: int, dtype: Any = jnp.float32) -> "ModelConfig":
    m = config.model
    return cls(vocab_size=vocab_size, seq_len=config.seq_len, n_layer=m.n_layer, n_head=m.n_head,
               d_model=m.d_model, mlp_ratio=m.mlp_ratio, dropout=m.dropout,
               positions=m.positions, attention=config.attention, dtype=dtype,
               remat=config.get("remat", "none"))


def rotary(x: jax.Array) -> jax.Array:
  """Rotary position embedding over the last axis of x [B, T, H, K]."""
  _, t, _, k = x.shape
  freq = 1.0 / (10000.0 ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))  # [K/2]
  angle = jnp.arange(t, dtype=jnp.float32)[:, None] * freq[None, :]  # [T, K/2]
  sin, cos = jnp.sin(angle)[None, :, None, :], jnp.cos(angle)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def reference_attention(q, k, v):
  """softmax(q k^T / sqrt(K) + causal mask) v, written out: the fallback and the test oracle."""
  t = q.shape[1]
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
  mask = jnp.tril(jnp.ones((t, t), bool))
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v)


class CausalSelfAttention(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    head = cfg.d_model // cfg.n_head
    qkv = nn.DenseGeneral((3, cfg.n_head, head), kernel_init=init, dtype=cfg.dtype,
                          name="qkv")(x)  # [B, T, 3, H, K]
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, T, H, K] each
    if cfg.positions == "rope":
      q, k = rotary(q), rotary(k)
    if cfg.attention == "reference":
      y = reference_attention(q, k, v)
    else:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=cfg.attention)
    y = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), kernel_init=init, dtype=cfg.dtype,
                        name="proj")(y)  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Linear(nn.Module):
  """y = x W^T + b with the kernel stored [out, in] (PyTorch's layout, not Flax Dense's [in, out]).

  Why: the weight gradient is then dy^T x, which XLA:CPU emits as a plain row-major matmul for
  its fast (YNNPACK) dot path; with [in, out] kernels it came out as x^T dy with a transposed
  left operand, left to a slower dot plus a copy. Measured on the 10.7M model (2 cores): 1 device
  ~2500 -> ~2800 tokens/s, and shard_map on 2 devices no longer trails jit by ~7%.
  """
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", init, (self.features, x.shape[-1]))  # [out, in]
    bias = self.param("bias", nn.initializers.zeros, (self.features,))
    return jnp.einsum("...i,oi->...o", x.astype(self.dtype), kernel.astype(self.dtype)) + bias.astype(self.dtype)


class MLP(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    cfg = self.cfg
    h = Linear(cfg.mlp_ratio * cfg.d_model, dtype=cfg.dtype, name="fc")(x)  # [B, T, F]
    h = nn.gelu(h)
    y = Linear(cfg.d_model, dtype=cfg.dtype, name="proj")(h)  # [B, T, D]
    return nn.Dropout(cfg.dropout)(y, deterministic=deterministic)


class Block(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x, deterministic: bool):
    x = x + CausalSelfAttention(self.cfg, name="attn")(
        nn.LayerNorm(dtype=self.cfg.dtype, name="ln1")(x), deterministic)
    x = x + MLP(self.cfg, name="mlp")(nn.LayerNorm(dtype=self.cfg.dtype, name="ln2")(x), deterministic)
    return x


# What the backward pass keeps of each block's forward. "block" keeps the outputs of the weight
# matmuls (the expensive part) and recomputes the cheap elementwise work (norms, GELU, softmax,
# attention scores); "full" keeps only each block's input and recomputes the whole block.
REMAT_POLICIES = {"block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def remat_blocks(cfg: ModelConfig, params: dict, x: jax.Array, deterministic: bool,
                 dropout_key: jax.Array | None) -> jax.Array:
  """The blocks as one `lax.scan` over their stacked parameters, each step under jax.checkpoint.

  A scan, not a loop of checkpointed blocks: XLA (the CPU scheduler at least) hoists the
  recomputation of unrolled checkpointed blocks back into the forward pass, saving nothing,
  while a scan's backward loop must recompute block i when it reaches it. The parameter tree
  keeps one entry per block; only this function stacks them.
  """
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[f"block_{i}"] for i in range(cfg.n_layer)])

  def block(x, layer):
    p, i = layer
    rngs = {} if deterministic else {"dropout": jax.random.fold_in(dropout_key, i)}
    return Block(cfg, parent=None).apply({"params": p}, x, deterministic, rngs=rngs), None

  body = jax.checkpoint(block, policy=REMAT_POLICIES[cfg.remat])
  x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(cfg.n_layer)))
  return x


class GPT(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
    """tokens [B, T] int32 -> logits [B, T, V] float32."""
    cfg = self.cfg
    wte = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=init, name="wte")
    x = wte(tokens).astype(cfg.dtype)  # [B, T, D]
    if cfg.positions == "learned":
      wpe = self.param("wpe", init, (cfg.seq_len, cfg.d_model))
      x = x + wpe[None, :tokens.shape[1]].astype(cfg.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    if cfg.remat == "none" or self.is_initializing():
      for i in range(cfg.n_layer):
        x = Block(cfg, name=f"block_{i}")(x, deterministic)
    else:
      x = remat_blocks(cfg, self.variables["params"], x, deterministic,
                       None if deterministic else self.make_rng("dropout"))
    x = nn.LayerNorm(dtype=cfg.dtype, name="ln_f")(x)
    return wte.attend(x).astype(jnp.float32)  # [B, T, V], tied to the input embedding


def count_params(params) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
