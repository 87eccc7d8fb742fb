"""Pure train and eval steps.

`train_step` is written once, for one device's share of the batch. With `axis_name` set it is
mapped over devices (shard_map or pmap) and averages with one `lax.pmean`; with `axis_name=None`
it is the global step that `jax.jit` partitions over a mesh, and the single-device reference.

Batches are dicts of arrays laid out [A, b, ...]: A micro-batches (grad_accum_steps) of b rows.
Losses are token-weighted sums, so every grouping of the same tokens (micro-batches, devices,
hosts) gives the same mean.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jaxdp.losses import cross_entropy_sum
from jaxdp.model import GPT
from jaxdp.state import TrainState
from jaxdp.sync import CommConfig, reduce_gradients

Batch = dict[str, jax.Array]


def loss_sum(params, micro_batch: Batch, rng: jax.Array, model: GPT) -> tuple[jax.Array, jax.Array]:
  """(sum of token losses, sum of token weights) of one micro-batch [b, T]."""
  if model.cfg.dropout > 0:
    # Each example's dropout key comes from its global index, not from the device that runs it,
    # so N devices draw the same masks as one.
    def one(tokens, example_id):
      key = jax.random.fold_in(rng, example_id)
      return model.apply({"params": params}, tokens[None], deterministic=False,
                         rngs={"dropout": key})[0]
    logits = jax.vmap(one)(micro_batch["inputs"], micro_batch["ids"])
  else:
    logits = model.apply({"params": params}, micro_batch["inputs"])
  return cross_entropy_sum(logits, micro_batch["targets"], micro_batch["weights"])


def accumulate_gradients(params, batch: Batch, rng: jax.Array, model: GPT):
  """Sums gradients, losses and token counts over the A micro-batches of `batch`, locally."""
  grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

  def micro_step(carry, micro_batch):
    grad_acc, loss_acc, count_acc = carry
    (loss, count), grads = grad_fn(params, micro_batch, rng, model)
    return (jax.tree.map(jnp.add, grad_acc, grads), loss_acc + loss, count_acc + count), None

  zeros = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
  if batch["inputs"].shape[0] == 1:  # No loop for the common case: one less while op to compile.
    carry, _ = micro_step(zeros, jax.tree.map(lambda x: x[0], batch))
  else:
    carry, _ = lax.scan(micro_step, zeros, batch)
  return carry


def train_step(state: TrainState, batch: Batch, *, model: GPT, tx: optax.GradientTransformation,
               axis_name: str | None = None,
               comm_cfg: CommConfig | None = None) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Returns the new state and scalar metrics (identical on every device).

  `comm_cfg` (with `axis_name`) swaps the all-reduce for jaxdp.sync's methods (ring, compression,
  staleness); None or the dense default keeps the single pmean.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  params = state.params
  if axis_name is not None:
    # Differentiate a per-device view of the replicated parameters: otherwise shard_map's
    # transpose of the implicit replicated->varying cast inserts a psum into every micro-batch's
    # backward pass, instead of the single all-reduce below (as on main, commit 14b3056).
    params = lax.pcast(params, axis_name, to="varying")
  grad_sum, loss_total, tokens = accumulate_gradients(params, batch, rng, model)
  state_comm = state.comm
  if axis_name is not None and comm_cfg is not None and not comm_cfg.dense:
    grads, loss_total, tokens, state_comm = reduce_gradients(grad_sum, loss_total, tokens,
                                                             state.comm, rng, comm_cfg, axis_name)
  else:
    if axis_name is not None:
      # One all-reduce for the whole step: gradient sums, loss sum and token count together.
      # The mean of sums divided by the mean of counts is the global token-weighted mean.
      grad_sum, loss_total, tokens = lax.pmean((grad_sum, loss_total, tokens), axis_name)
    grads = jax.tree.map(lambda g: g / tokens, grad_sum)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  new_state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                            opt_state=opt_state, comm=state_comm)
  metrics = {"train_loss": loss_total / tokens, "grad_norm": optax.global_norm(grads)}
  return new_state, metrics


def eval_step(params, batch: Batch, *, model: GPT, axis_name: str | None = None) -> dict[str, jax.Array]:
  """Loss sum and token count over a batch [A, b, T]; the caller divides after summing batches."""
  logits = model.apply({"params": params}, batch["inputs"].reshape(-1, batch["inputs"].shape[-1]))
  loss, count = cross_entropy_sum(logits, batch["targets"].reshape(logits.shape[:-1]),
                                  batch["weights"].reshape(logits.shape[:-1]))
  if axis_name is not None:
    loss, count = lax.psum((loss, count), axis_name)
  return {"loss_sum": loss, "count": count}
