"""Autoregressive sampling with temperature, top-k and top-p, reproducible from a seed.

With `cache=True` (the default) the prompt is run once (prefill) and each further token costs
one position: a jit-compiled decode step reads and writes a fixed-size key/value cache of
seq_len positions (jaxdp.models.common.init_cache), so it compiles once. Without the cache the
model runs on a fixed [1, seq_len] window per token (compiled once too). Both draw token i with
the key fold_in(seed, i) from the same logits, so they give the same tokens (token for token at
temperature 0). Once the context outgrows seq_len, the window slides: every position moves, so
each further token is computed on the window, uncached, exactly as without the cache.
Tokens are yielded as they are drawn, for streaming output.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import functools
from typing import cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.models.common import CACHE, init_cache


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


def _pick(logits, key, temperature: float, top_k: int, top_p: float) -> jax.Array:
  """The next token from logits [V]: argmax at temperature 0, else a draw with `key`."""
  if temperature == 0:
    return jnp.argmax(logits)
  return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p))


_SAMPLING = ("temperature", "top_k", "top_p")


@functools.partial(jax.jit, static_argnames=("model",) + _SAMPLING)
def _next_token(params, window, length, key, *, model: nn.Module, temperature: float, top_k: int,
                top_p: float):
  # Without `mutable`, apply returns the model's output alone (flax types it as a union).
  logits = cast(jax.Array, model.apply({"params": params}, window))[0, length - 1]  # [V]
  return _pick(logits, key, temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnames=("model",) + _SAMPLING, donate_argnames=("cache",))
def _prefill(params, cache, tokens, key, *, model: nn.Module, temperature: float, top_k: int,
             top_p: float):
  """(next token, cache) after running the prompt tokens [1, P] at positions 0..P-1."""
  logits, variables = model.apply({"params": params, CACHE: cache}, tokens, mutable=[CACHE])
  return _pick(logits[0, -1], key, temperature, top_k, top_p), variables[CACHE]


@functools.partial(jax.jit, static_argnames=("model",) + _SAMPLING, donate_argnames=("cache",))
def _decode_step(params, cache, token, key, *, model: nn.Module, temperature: float, top_k: int,
                 top_p: float):
  """(next token, cache) after one token (int32 scalar) at the cache's index."""
  logits, variables = model.apply({"params": params, CACHE: cache}, token.reshape(1, 1),
                                  mutable=[CACHE])
  return _pick(logits[0, -1], key, temperature, top_k, top_p), variables[CACHE]


def decoding_model(model: nn.Module) -> nn.Module:
  """`model` as it runs for sampling: the same parameters, blocks in a plain loop (no
  rematerialisation, which only matters for the backward pass), deterministic."""
  if model.cfg.remat == "none":
    return model
  return type(model)(dataclasses.replace(model.cfg, remat="none"))


def generate(params, model: nn.Module, prompt: np.ndarray, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             seed: int = 0, cache: bool = True) -> Iterator[int]:
  """Yields `max_new_tokens` token ids (Python ints) continuing `prompt` (temperature 0 is greedy).

  `params` are the model's parameters (the float32 tree `init_fn` makes; no batch or device axis);
  `model` a built-in module (GPT, Llama) whose `cfg.seq_len` bounds the attended window; `prompt`
  token ids [P] (an empty prompt starts from id 0). `top_k` 0 and `top_p` 1.0 disable those
  filters; token i is drawn with the key fold_in(PRNGKey(seed), i).
  `cache`: decode from a key/value cache (prefill once, then one position per token); False
  recomputes the whole window for every token. Same tokens either way (see the module doc).
  """
  model = decoding_model(model)
  seq_len = model.cfg.seq_len
  context = [int(t) for t in prompt] or [0]
  key = jax.random.PRNGKey(seed)
  sampling = dict(model=model, temperature=float(temperature), top_k=int(top_k),
                  top_p=float(top_p))
  state = None  # The cache, while the context fits in it.
  for i in range(max_new_tokens):
    step_key = jax.random.fold_in(key, i)
    if cache and i == 0:
      window = np.asarray(context[-seq_len:], np.int32)[None]
      token, state = _prefill(params, init_cache(model.cfg, 1, seq_len), window, step_key,
                              **sampling)
    elif state is not None and len(context) <= seq_len:
      # The last token goes in at position len(context) - 1 < seq_len.
      token, state = _decode_step(params, state, jnp.asarray(context[-1], jnp.int32), step_key,
                                  **sampling)
    else:
      state = None  # The window slides from here on: positions move, the cache cannot serve.
      recent = context[-seq_len:]
      padded = np.zeros((1, seq_len), np.int32)
      padded[0, :len(recent)] = recent
      token = _next_token(params, padded, len(recent), step_key, **sampling)
    token = int(token)
    context.append(token)
    yield token
