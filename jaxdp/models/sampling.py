"""Autoregressive sampling with temperature, top-k and top-p, reproducible from a seed.

The model runs on a fixed [1, seq_len] window so the next-token function compiles once; tokens
are yielded as they are drawn, for streaming output.
"""

from __future__ import annotations

import functools
from typing import Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def filter_logits(logits: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """Scales by 1/temperature, then keeps the top_k largest and the smallest set with mass >= top_p."""
  logits = logits / temperature
  if top_k > 0:
    kth = jnp.sort(logits)[-min(top_k, logits.shape[-1])]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    order = jnp.argsort(-logits)
    probs = jax.nn.softmax(logits[order])
    # Keep a token if the mass strictly before it is < top_p: the top token always stays.
    keep_sorted = (jnp.cumsum(probs) - probs) < top_p
    keep = jnp.zeros_like(keep_sorted).at[order].set(keep_sorted)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


@functools.partial(jax.jit, static_argnames=("model", "temperature", "top_k", "top_p"))
def _next_token(params, window, length, key, *, model: nn.Module, temperature: float, top_k: int,
                top_p: float):
  logits = model.apply({"params": params}, window)[0, length - 1]  # [V]
  if temperature == 0:
    return jnp.argmax(logits)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))


def generate(params, model: nn.Module, prompt: np.ndarray, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0) -> Iterator[int]:
  """Yields `max_new_tokens` token ids continuing `prompt` (temperature 0 is greedy)."""
  seq_len = model.cfg.seq_len
  context = [int(t) for t in prompt] or [0]
  key = jax.random.PRNGKey(seed)
  for i in range(max_new_tokens):
    window = context[-seq_len:]
    padded = np.zeros((1, seq_len), np.int32)
    padded[0, :len(window)] = window
    token = int(_next_token(params, padded, len(window), jax.random.fold_in(key, i), model=model,
                            temperature=float(temperature), top_k=int(top_k), top_p=float(top_p)))
    context.append(token)
    yield token
