"""Local SGD (Stich 2019) and DiLoCo (Douillard et al. 2023): devices train apart for
`sync_every` steps, then average parameters.

Layout (see jaxdp/parallel/exchange.py): each device's parameters and inner optimizer state are
rows of `state.comm` ([N, ...], sharded over "data"); `state.params` is the anchor, the last
average. The step shares `update_if_finite` and the metrics of the synchronous step, so the
NaN policy and the log are the same.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxdp.core.step import LossFn, accumulate_gradients, step_metrics, update_if_finite
from jaxdp.parallel import collectives, exchange


def local_sgd_step(state, batch, *, loss_fn: LossFn, tx: optax.GradientTransformation,
                   axis_name: str | tuple[str, ...], cfg: exchange.CommConfig, max_consecutive_skips: int = 0,
                   compute_dtype: Any = None):
  """One local optimizer step per device; every `sync_every` steps, parameters are averaged.

  The average runs inside a `lax.cond`, so its collectives execute only on sync steps. With
  DiLoCo the anchor moves by the outer optimizer applied to (anchor - average). A step whose
  loss or gradients are not finite on any device is dropped on every device (one scalar
  all-reduce decides), under the same NaN policy as the synchronous step.
  """
  local = exchange.mine(state.comm)
  rng = jax.random.fold_in(state.rng, state.step)
  grad_sum, loss_total, tokens = accumulate_gradients(loss_fn, local["params"], batch, rng,
                                                      compute_dtype=compute_dtype)
  grads = jax.tree.map(lambda g: g / tokens, grad_sum)
  local_norm = optax.tree.norm(grads)
  local_finite = jnp.isfinite(loss_total) & jnp.isfinite(local_norm)
  # Metrics and the finiteness vote: 16 bytes per step. grad_norm is the mean of the devices'
  # local norms.
  loss_total, tokens, grad_norm, finite_share = lax.pmean(
      (loss_total, tokens, local_norm, local_finite.astype(jnp.float32)), axis_name)
  finite = finite_share == 1.0
  outer = exchange.outer_optimizer(cfg)

  def local_update():
    updates, opt_state = tx.update(grads, local["opt_state"], local["params"])
    params = optax.apply_updates(local["params"], updates)

    def synchronise(operand):
      anchor, outer_state, params = operand
      average = collectives.allreduce_mean(params, axis_name, cfg.allreduce)
      if outer is None:
        return average, outer_state, average
      delta = jax.tree.map(jnp.subtract, anchor, average)  # The outer "gradient".
      outer_updates, outer_state = outer.update(delta, outer_state, anchor)
      anchor = optax.apply_updates(anchor, outer_updates)
      return anchor, outer_state, anchor

    anchor, outer_state, params = lax.cond((state.step + 1) % cfg.sync_every == 0, synchronise,
                                           lambda o: o, (state.params, state.opt_state, params))
    return anchor, outer_state, exchange.as_rows({"params": params, "opt_state": opt_state})

  new_state = update_if_finite(state, finite, local_update, max_consecutive_skips)
  return new_state, step_metrics(new_state, loss_total, tokens, grad_norm)
