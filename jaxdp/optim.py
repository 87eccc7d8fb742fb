"""AdamW with linear warmup, cosine decay and global-norm clipping, as one optax chain."""

from __future__ import annotations

import jax
import optax

from jaxdp.config import lr_decay_steps


def learning_rate_schedule(config) -> optax.Schedule:
  """Warmup from 0 to the peak, then cosine to min_lr_ratio * peak at lr_decay_steps, then flat."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.learning_rate, warmup_steps=config.warmup_steps,
      decay_steps=lr_decay_steps(config), end_value=config.learning_rate * config.min_lr_ratio)


def _decay_mask(params):
  # Decay matrices (embeddings, kernels) only: decaying norms and biases hurts and helps nothing.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(config.grad_clip)] if config.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(config), b1=config.b1, b2=config.b2,
                           weight_decay=config.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
