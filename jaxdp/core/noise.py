"""The gradient noise scale from gradients the step already has (McCandlish, Kaplan, Amodei et
al. 2018, "An Empirical Model of Large-Batch Training", appendix A).

A gradient averaged over a batch of B (examples, or tokens: whatever the loss's weights count)
has E|G_B|^2 = |G|^2 + tr(Sigma) / B, Sigma the covariance of one unit's gradient. Two batch
sizes b < B give unbiased estimates of both terms:

  |G|^2   ~ (B |G_B|^2 - b |G_b|^2) / (B - b)
  tr(S)   ~ (|G_b|^2 - |G_B|^2) / (1/b - 1/B)

and the "simple" noise scale B_simple = tr(Sigma) / |G|^2 estimates the critical batch size.
Under data parallelism the small batch is each device's share (|G_b|^2 the mean over devices of
their squared norms: one more scalar in the step's all-reduce) and the big one the global batch;
on one device, the micro-batches of gradient accumulation and their sum. Each step's estimates
are noisy (|G|^2 can be negative); the paper smooths numerator and denominator separately with
exponential moving averages before dividing, which `NoiseScaleEMA` does on the host.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def noise_terms(small_sq, big_sq, b_small, b_big):
  """(|G|^2 estimate, tr(Sigma) estimate) from the mean squared norm of gradients of batch
  `b_small` and the squared norm of their average over batch `b_big` (b_big > b_small; any
  units, the same for both). jnp scalars in, jnp scalars out (NaN when b_big <= b_small)."""
  ok = b_big > b_small
  safe = jnp.where(ok, b_big - b_small, 1.0)
  g2 = (b_big * big_sq - b_small * small_sq) / safe
  trace = (small_sq - big_sq) * b_small * b_big / safe
  return jnp.where(ok, g2, jnp.nan), jnp.where(ok, trace, jnp.nan)


class NoiseScaleEMA:
  """Bias-corrected exponential moving averages of |G|^2 and tr(Sigma); their ratio is B_simple.

  `decay` 0.95 averages over about 20 steps. NaN estimates (no second batch size) are ignored.
  """

  def __init__(self, decay: float = 0.95):
    self.decay, self.g2, self.trace, self.weight = decay, 0.0, 0.0, 0.0

  def update(self, g2: float, trace: float) -> None:
    """Folds in one step's estimates (host floats, from `noise_terms`); skips non-finite ones."""
    if not (math.isfinite(g2) and math.isfinite(trace)):
      return
    self.g2 = self.decay * self.g2 + (1 - self.decay) * g2
    self.trace = self.decay * self.trace + (1 - self.decay) * trace
    self.weight = self.decay * self.weight + (1 - self.decay)

  @property
  def available(self) -> bool:
    """Whether at least one finite estimate has been folded in."""
    return self.weight > 0

  @property
  def b_simple(self) -> float:
    """tr(Sigma) / |G|^2 in the units of the batch sizes given; NaN before any estimate or while
    the smoothed |G|^2 is not positive (the noise swamps the signal: the scale is unbounded)."""
    if not self.available or self.g2 <= 0:
      return math.nan
    return self.trace / self.g2
