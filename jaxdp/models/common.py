"""Pieces shared by the built-in language models: their config, logical-axis initialisers,
rotary positions, attention, rematerialised blocks, and the loss and init that make a Flax
module a jaxdp model (the `loss_fn(params, batch, rng)` and `init_fn(rng)` of jaxdp.core).

Shapes: B batch, T sequence, D d_model, H query heads, G key/value heads, K head size, V vocab.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
from typing import Any, Literal, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdp.core.losses import cross_entropy_sum
from jaxdp.core.step import example_keys

init = nn.initializers.normal(stddev=0.02)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The shape and numerics of a built-in language model (both families)."""
  vocab_size: int  # Rows of the embedding (and logits), padding included.
  seq_len: int
  n_layer: int
  n_head: int
  d_model: int
  family: str = "gpt"  # "gpt" or "llama".
  mlp_ratio: float = 4  # MLP hidden width as a multiple of d_model (llama: rounded, see llama.py).
  mlp_dim: int = 0  # MLP hidden width itself (a checkpoint's intermediate_size); 0: from mlp_ratio.
  n_kv_head: int = 0  # llama: key/value heads (grouped-query attention); 0 means n_head.
  dropout: float = 0.0
  positions: str = "rope"  # gpt: "rope" or "learned"; llama: always "rope".
  rope_theta: float = 10000.0  # Base of the rotary frequencies.
  tie_embeddings: bool = True  # Output head shares the input embedding; False: a head of its own.
  norm_eps: float = 0.0  # Epsilon of every norm; 0 means the family's default (see `eps`).
  attention: str = "xla"
  dtype: Any = jnp.float32  # Compute dtype; parameters stay float32.
  remat: str = "none"  # Activation rematerialisation of each block: "none", "block" or "full".
  valid_vocab_size: int = 0  # Ids the tokenizer uses; the rest of vocab_size is padding. 0: all.
  # Variants of the llama family (Qwen2/2.5, Qwen3, Mistral); gpt needs their defaults.
  head_dim: int = 0  # Head size K independent of d_model / n_head (Qwen3); 0 means d_model // n_head.
  qkv_bias: bool = False  # Biases on the q, k, v projections (Qwen2), not on the output one.
  qk_norm: bool = False  # RMSNorm over each head's q and k before rotary positions (Qwen3).
  sliding_window: int = 0  # Each query sees its last `sliding_window` positions, itself included; 0: all.
  variant: str = ""  # The Hugging Face class export writes: "" is the family's own (models.hf).

  @property
  def kv_heads(self) -> int:
    """Key/value heads G: n_kv_head, or n_head (plain multi-head attention) when it is 0."""
    return self.n_kv_head or self.n_head

  @property
  def eps(self) -> float:
    """The norm epsilon used: norm_eps, or by default gpt's 1e-6 (flax LayerNorm's default, what
    gpt has always used) and llama's 1e-5."""
    return self.norm_eps or (1e-6 if self.family == "gpt" else 1e-5)

  @property
  def head_size(self) -> int:
    """Head size K: head_dim, or d_model // n_head when it is 0 (config validation then requires
    n_head to divide d_model)."""
    return self.head_dim or self.d_model // self.n_head


def logical(initializer: Callable, names: tuple[str | None, ...]) -> Callable:
  """`initializer` whose parameter carries logical axis names (one per dimension)."""
  return nn.with_logical_partitioning(initializer, names)


class Linear(nn.Module):
  """y = x W^T + b with the kernel stored [out, in] (PyTorch's layout, not Flax Dense's [in, out]).

  Why: the weight gradient is then dy^T x, which XLA:CPU emits as a plain row-major matmul for
  its fast (YNNPACK) dot path; with [in, out] kernels it came out as x^T dy with a transposed
  left operand, left to a slower dot plus a copy. Measured on the 10.7M model (2 cores): 1 device
  ~2500 -> ~2800 tokens/s, and shard_map on 2 devices no longer trails jit by ~7%.
  """
  features: int
  names: tuple[str | None, str | None]  # Logical names of the kernel's [out, in] dimensions.
  dtype: Any = jnp.float32
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., in] -> [..., features] in `dtype`."""
    kernel = self.param("kernel", logical(init, self.names), (self.features, x.shape[-1]))  # [out, in]
    y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      y = y + self.param("bias", logical(nn.initializers.zeros, self.names[:1]),
                         (self.features,)).astype(self.dtype)
    return y


def rotary(x: jax.Array, theta: float = 10000.0, positions: jax.Array | None = None) -> jax.Array:
  """Rotary position embedding (Su et al. 2021) over the last axis of x [B, T, H, K], at
  `positions` int32 [B, T] (default 0..T-1; document packing restarts them per document)."""
  _, t, _, k = x.shape
  freq = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))  # [K/2]
  if positions is None:
    positions = jnp.arange(t)[None]  # [1, T]
  angle = positions.astype(jnp.float32)[..., None] * freq  # [B or 1, T, K/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def segment_mask(segment_ids: jax.Array) -> jax.Array:
  """bool [B, 1, T, T]: query i may attend key j iff both are in the same segment (document
  packing, jaxdp/data/packing.py); the causal part is added by `attention`."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def causal_mask(queries: jax.Array, keys: jax.Array, window: int = 0) -> jax.Array:
  """bool [Q, S]: query at position queries[i] may see the key at keys[j] (int32 [Q], [S]): an
  earlier or the same position, and with `window` > 0 one of the query's last `window` positions
  (itself included; Mistral's sliding window, transformers' `kv_idx > q_idx - sliding_window`)."""
  visible = keys[None, :] <= queries[:, None]
  if window > 0:
    visible &= queries[:, None] - keys[None, :] < window
  return visible


def reference_attention(q, k, v, mask: jax.Array | None = None, window: int = 0):
  """softmax(q k^T / sqrt(K) + causal mask) v, written out: the fallback and the test oracle.

  q [B, T, H, K]; k, v [B, T, G, K] with G dividing H (grouped-query attention: query head h
  reads key/value head h // (H / G)); `mask` bool [B, 1, T, T] (e.g. `segment_mask`), or None,
  is combined with the causal mask, restricted to the last `window` positions when > 0.
  """
  t, h, g = q.shape[1], q.shape[2], k.shape[2]
  k, v = jnp.repeat(k, h // g, axis=2), jnp.repeat(v, h // g, axis=2)  # [B, T, H, K]
  scores = jnp.einsum("bqhk,bshk->bhqs", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
  causal = causal_mask(jnp.arange(t), jnp.arange(t), window)
  mask = causal if mask is None else causal & mask
  scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def attention(q, k, v, implementation: str, mask: jax.Array | None = None,
              window: int = 0) -> jax.Array:
  """Causal attention [B, T, H, K] by `implementation`: "reference" (einsum) or a
  jax.nn.dot_product_attention kernel ("xla", "cudnn"), which handles G < H itself. `mask` bool
  [B, 1, T, T] or None further restricts which keys a query sees (document packing); `window` > 0
  to the query's last `window` positions (see `causal_mask`)."""
  if implementation == "reference":
    return reference_attention(q, k, v, mask, window)
  # The config admits only "xla" and "cudnn" past this point (lm/config.py); JAX refuses others.
  kernel = cast(Literal["xla", "cudnn"], implementation)
  # JAX's (left, right) window admits keys i - left .. i + right: left = window - 1 keeps
  # `window` positions with the query's own, on both kernels (cuDNN takes it as left + 1).
  local = (window - 1, 0) if window > 0 else None
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=kernel,
                                      local_window_size=local)


# ---- Decoding from a key/value cache ---------------------------------------------------------
# A model applied with a "cache" collection (made by `init_cache`, passed mutable) decodes: each
# attention writes the keys and values of the call's T tokens into its fixed-size cache at the
# cache's index and attends to every cached position up to its own, and positions (rotary or
# learned) start at that index. Without the collection (training, init) nothing changes.
CACHE = "cache"


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """An empty cache of `length` positions for a model of `cfg` (both families): per block,
  keys and values [batch, length, G, K] in the compute dtype and the next position "index"
  (int32), and the model's own "index" (for learned positions)."""
  shape = (batch, length, cfg.kv_heads, cfg.head_size)

  def layer():  # Distinct arrays per block: the decode step donates (reuses) each buffer.
    return {"attn": {"index": jnp.zeros((), jnp.int32), "k": jnp.zeros(shape, cfg.dtype),
                     "v": jnp.zeros(shape, cfg.dtype)}}
  return {"index": jnp.zeros((), jnp.int32), **{f"block_{i}": layer() for i in range(cfg.n_layer)}}


def decode_offset(module: nn.Module) -> jax.Array | None:
  """Position of the call's first token when `module` decodes from a cache (its "index"
  variable, int32 scalar), else None."""
  if not module.has_variable(CACHE, "index"):
    return None
  return module.get_variable(CACHE, "index")


def advance(module: nn.Module, tokens: int) -> None:
  """Moves `module`'s cache index on by `tokens` positions (a no-op when not decoding)."""
  if module.has_variable(CACHE, "index"):
    module.put_variable(CACHE, "index", module.get_variable(CACHE, "index") + tokens)


def cached_attention(module: nn.Module, q: jax.Array, k: jax.Array, v: jax.Array,
                     offset: jax.Array, window: int = 0) -> jax.Array:
  """Causal attention of q [B, T, H, K] (positions offset..offset+T-1) over the cache of
  `module` after writing k, v [B, T, G, K] into it at `offset` (lax.dynamic_update_slice, so
  one compiled step serves every position); masked positions are the empty cache slots and,
  with `window` > 0, those before each query's last `window` positions."""
  cache_k = jax.lax.dynamic_update_slice(module.get_variable(CACHE, "k"),
                                         k.astype(module.get_variable(CACHE, "k").dtype),
                                         (0, offset, 0, 0))
  cache_v = jax.lax.dynamic_update_slice(module.get_variable(CACHE, "v"),
                                         v.astype(module.get_variable(CACHE, "v").dtype),
                                         (0, offset, 0, 0))
  module.put_variable(CACHE, "k", cache_k)
  module.put_variable(CACHE, "v", cache_v)
  advance(module, q.shape[1])
  length = cache_k.shape[1]
  visible = causal_mask(offset + jnp.arange(q.shape[1]), jnp.arange(length), window)  # [T, S]
  return jax.nn.dot_product_attention(q, cache_k.astype(q.dtype), cache_v.astype(q.dtype),
                                      mask=visible[None, None])


# What the backward pass keeps of each block's forward. "block" keeps the outputs of the weight
# matmuls (the expensive part) and recomputes the cheap elementwise work (norms, activations,
# softmax, attention scores); "full" keeps only each block's input and recomputes the whole block.
REMAT_POLICIES = {"block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                  "full": jax.checkpoint_policies.nothing_saveable}


def remat_scan(block: type[nn.Module], cfg: ModelConfig, params: Mapping[str, Any], x: jax.Array,
               deterministic: bool, dropout_key: jax.Array | None, *extra) -> jax.Array:
  """The blocks as one `lax.scan` over their stacked parameters, each step under jax.checkpoint.

  A scan, not a loop of checkpointed blocks: XLA (the CPU scheduler at least) hoists the
  recomputation of unrolled checkpointed blocks back into the forward pass, saving nothing,
  while a scan's backward loop must recompute block i when it reaches it. The parameter tree
  keeps one entry per block; only this function stacks them.
  """
  stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[f"block_{i}"] for i in range(cfg.n_layer)])

  def one(x, layer):
    p, i = layer
    rngs = {} if deterministic else {"dropout": jax.random.fold_in(dropout_key, i)}
    return block(cfg, parent=None).apply({"params": p}, x, deterministic, *extra, rngs=rngs), None

  body = jax.checkpoint(one, policy=REMAT_POLICIES[cfg.remat])
  x, _ = jax.lax.scan(body, x, (stacked, jnp.arange(cfg.n_layer)))
  return x


def run_blocks(module: nn.Module, block: type[nn.Module], x: jax.Array,
               deterministic: bool, *extra) -> jax.Array:
  """x [B, T, D] through `module`'s cfg.n_layer blocks named block_i, from its compact
  __call__: a plain loop, or `remat_scan` when cfg.remat asks for rematerialisation (the
  parameters are created by the loop at init either way, so the tree has one entry per block).
  `extra` (the attention mask and positions of document packing) goes to every block."""
  cfg = module.cfg
  if cfg.remat == "none" or module.is_initializing():
    for i in range(cfg.n_layer):
      x = block(cfg, name=f"block_{i}")(x, deterministic, *extra)
    return x
  return remat_scan(block, cfg, module.variables["params"], x, deterministic,
                    None if deterministic else module.make_rng("dropout"), *extra)


def lm_init(module: nn.Module, seq_len: int) -> Callable[[jax.Array], Any]:
  """init_fn(rng) -> params (with logical-axis boxes) of a token model [B, T] -> logits."""
  return lambda rng: module.init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def lm_loss(module: nn.Module) -> Callable:
  """loss_fn(params, batch, rng) -> (sum of token losses, sum of token weights).

  `batch`: "inputs", "targets" int32 [b, T], "weights" float32 [b, T] (0 for padding), "ids"
  int32 [b] (global example index), and with document packing "segment_ids", "positions" int32
  [b, T] (jaxdp/data/packing.py). With dropout and an rng, each example's dropout key comes
  from its global index, not from the device that runs it, so N devices draw the masks of one.
  """
  def loss_fn(params, batch, rng):
    documents = {k: batch[k] for k in ("segment_ids", "positions") if k in batch}
    if rng is None or module.cfg.dropout == 0:
      logits = module.apply({"params": params}, batch["inputs"], **documents)
    else:
      def one(tokens, key, documents):
        return module.apply({"params": params}, tokens[None], deterministic=False,
                            rngs={"dropout": key},
                            **{k: v[None] for k, v in documents.items()})[0]
      logits = jax.vmap(one)(batch["inputs"], example_keys(rng, batch), documents)
    return cross_entropy_sum(logits, batch["targets"], batch["weights"])
  return loss_fn


def mask_padded_vocab(logits: jax.Array, cfg: ModelConfig) -> jax.Array:
  """logits [..., V] with the padding ids (>= cfg.valid_vocab_size) at the dtype's lowest value:
  the padding, there only for faster matmuls, never takes probability (loss or sampling)."""
  if not cfg.valid_vocab_size or cfg.valid_vocab_size >= cfg.vocab_size:
    return logits
  valid = jnp.arange(cfg.vocab_size) < cfg.valid_vocab_size
  return jnp.where(valid, logits, jnp.finfo(logits.dtype).min)
