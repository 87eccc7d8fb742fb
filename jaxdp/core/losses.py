"""Token-weighted cross entropy, returned as a sum and a count so that micro-batches, devices
and hosts combine exactly: the mean is taken once, over every token of the optimizer step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_sum(logits: jax.Array, targets: jax.Array,
                      weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """logits [..., V], targets int [...], weights [...] (0 for padding) -> (sum of loss, sum of weights).

  Both results are float32 scalars; the loss is in nats (natural log), computed in float32
  whatever the logits' dtype. The mean loss is their ratio, taken once over the whole step.
  """
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  return jnp.sum(losses * weights), jnp.sum(weights)
