"""Local SGD and DiLoCo: devices train apart for `sync_every` steps, then average parameters.

Layout (see jaxdp/sync.py): each device's parameters and inner optimizer state are rows of
`state.comm` ([N, ...], sharded over "data"); `state.params` is the anchor, the last average.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxdp import comm, sync
from jaxdp.steps import accumulate_gradients


def local_sgd_step(state, batch, *, model, tx: optax.GradientTransformation, axis_name: str,
                   cfg: sync.CommConfig):
  """One local optimizer step per device; every `sync_every` steps, parameters are averaged.

  The average runs inside a `lax.cond`, so its collectives execute only on sync steps. With
  DiLoCo the anchor moves by the outer optimizer applied to (anchor - average).
  """
  local = sync.mine(state.comm)
  rng = jax.random.fold_in(state.rng, state.step)
  grad_sum, loss_total, tokens = accumulate_gradients(local["params"], batch, rng, model)
  grads = jax.tree.map(lambda g: g / tokens, grad_sum)
  updates, opt_state = tx.update(grads, local["opt_state"], local["params"])
  params = optax.apply_updates(local["params"], updates)
  # Metrics only: 12 bytes per step. grad_norm is the mean of the devices' local norms.
  loss_total, tokens, grad_norm = lax.pmean((loss_total, tokens, optax.global_norm(grads)),
                                            axis_name)
  step = state.step + 1
  outer = sync.outer_optimizer(cfg)

  def synchronise(operand):
    anchor, outer_state, params = operand
    average = comm.allreduce_mean(params, axis_name, cfg.allreduce)
    if outer is None:
      return average, outer_state, average
    delta = jax.tree.map(jnp.subtract, anchor, average)  # The outer "gradient".
    outer_updates, outer_state = outer.update(delta, outer_state, anchor)
    anchor = optax.apply_updates(anchor, outer_updates)
    return anchor, outer_state, anchor

  anchor, outer_state, params = lax.cond(step % cfg.sync_every == 0, synchronise, lambda o: o,
                                         (state.params, state.opt_state, params))
  new_state = state.replace(step=step, params=anchor, opt_state=outer_state,
                            comm=sync.as_rows({"params": params, "opt_state": opt_state}))
  return new_state, {"train_loss": loss_total / tokens, "grad_norm": grad_norm}
