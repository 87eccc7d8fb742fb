"""The optimizer of a run as one optax chain: clipping, the update rule, its schedule and
decoupled weight decay, built from a typed `OptimizerConfig` (the ConfigDict stays at the edge:
jaxdp.config.optimizer_config turns it into this)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  learning_rate: float = 3e-3  # Peak learning rate after warmup.
  warmup_steps: int = 0  # Linear warmup steps to the peak.
  decay_steps: int = 1000  # Cosine horizon: the step at which the rate reaches its minimum.
  min_lr_ratio: float = 0.1  # Final learning rate as a fraction of the peak.
  weight_decay: float = 0.0  # Decoupled weight decay (AdamW), on matrices only.
  b1: float = 0.9
  b2: float = 0.99
  grad_clip: float = 0.0  # Global-norm clipping; 0 disables.


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Warmup from 0 to the peak, then cosine to min_lr_ratio * peak at decay_steps, then flat."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.learning_rate, warmup_steps=cfg.warmup_steps,
      decay_steps=cfg.decay_steps, end_value=cfg.learning_rate * cfg.min_lr_ratio)


def _decay_mask(params):
  # Decay matrices (embeddings, kernels) only: decaying norms and biases hurts and helps nothing.
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2,
                           weight_decay=cfg.weight_decay, mask=_decay_mask))
  return optax.chain(*parts)
