"""The pure step compiled onto devices, once per strategy.

`dp`: the per-device step under `jax.shard_map` over the batch axes ("data", or "replica" and
"data" on a hybrid mesh), replicated state, one `lax.pmean` per step (or another gradient exchange, or local SGD). `zero1`/`zero2`/`zero3`: the
global step (`axis_name=None`) under `jax.jit` with the state shardings of
jaxdp.parallel.shardings; XLA derives the collectives (reduce-scatter / all-gather) from them.
`pmap_train_step` maps the dp body with `jax.pmap` for users of the classic API.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from jaxdp.core import step
from jaxdp.core.step import LossFn
from jaxdp.parallel import local_sgd
from jaxdp.parallel.exchange import CommConfig, make_exchange
from jaxdp.parallel.mesh import (
  DATA,
  REPLICA,
  batch_axes,
  batch_sharding,
  batch_size_of,
  batch_spec,
  replicated,
)
from jaxdp.parallel.shardings import ZERO_PARTS, Layout, gradient_shardings


def _zero_optimizer(tx: optax.GradientTransformation, strategy: str, layout: Layout,
                    offload_optimizer: bool) -> optax.GradientTransformation:
  """`tx` whose update pins the gradients to the stage's shards and, when the optimizer state is
  offloaded, brings it to device memory for the update (the step's outputs send it back).

  Only shardings change: the update's arithmetic is `tx`'s own.
  """
  def update(grads, opt_state, params=None):
    grads = jax.lax.with_sharding_constraint(grads, gradient_shardings(strategy, layout, grads))
    if offload_optimizer:
      opt_state = jax.device_put(opt_state, layout.tree(opt_state, True, "device"))
    return tx.update(grads, opt_state, params)
  return optax.GradientTransformation(tx.init, update)


def _sum_device_groups(strategy: str, layout: Layout) -> Callable | None:
  """How the jit step sums its per-device gradients [replica x data, ...] (see
  core.step.accumulate_gradients's groups): None (one sum) except on a hybrid mesh when ZeRO
  splits the gradients. There each data group is summed first, into ZeRO's shards over "data",
  and only those shards are then summed over "replica": the hierarchical reduction that keeps
  the slow link between replica groups to 1/data of the gradient. A single sum over all groups
  lets XLA all-reduce whole gradients across "replica" instead.
  """
  mesh = layout.mesh
  if REPLICA not in mesh.axis_names or "grads" not in ZERO_PARTS[strategy]:
    return None
  replicas = mesh.shape[REPLICA]

  def sum_groups(stacked):
    within = jax.tree.map(lambda g: g.reshape((replicas, -1) + g.shape[1:]).sum(axis=1), stacked)
    shards = gradient_shardings(strategy, layout, jax.tree.map(lambda g: g[0], within))
    within = jax.lax.with_sharding_constraint(
        within, jax.tree.map(lambda s: NamedSharding(mesh, P(REPLICA, *s.spec)), shards))
    return jax.tree.map(lambda g: g.sum(axis=0), within)
  return sum_groups


def compile_train_step(strategy: str, layout: Layout, loss_fn: LossFn,
                       tx: optax.GradientTransformation, state_sharding: Any,
                       comm_cfg: CommConfig | None = None, max_consecutive_skips: int = 0,
                       compute_dtype: Any = None,
                       spike: tuple[float, int] | None = None) -> jax.stages.Wrapped:
  """(state, batch [A, b, ...]) -> (state, metrics), jitted with the state donated. `spike`:
  (sigmas, window) of spike_policy="skip" (core.step.train_step; not with local SGD)."""
  comm_cfg = comm_cfg or CommConfig()
  mesh = layout.mesh
  if strategy == "dp":
    axes = batch_axes(mesh)
    state_spec = jax.tree.map(lambda s: s.spec, state_sharding)
    if comm_cfg.sync == "local_sgd":
      body = functools.partial(local_sgd.local_sgd_step, loss_fn=loss_fn, tx=tx, axis_name=axes,
                               cfg=comm_cfg, max_consecutive_skips=max_consecutive_skips,
                               compute_dtype=compute_dtype)
    else:
      body = functools.partial(step.train_step, loss_fn=loss_fn, tx=tx, axis_name=axes,
                               exchange=make_exchange(comm_cfg, axes),
                               max_consecutive_skips=max_consecutive_skips,
                               compute_dtype=compute_dtype, spike=spike)
    # core.step.train_step casts the replicated params to per-device values before
    # differentiating, so the dense step holds one all-reduce (gradients, loss and token count
    # together). Ring, ps and all-gather results are the same on every device by construction
    # (each sum is computed once and copied), which shard_map's replication check cannot see:
    # it runs only for the dense default, and tests compare the devices' results for the others.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(state_spec, batch_spec(mesh)),
                           out_specs=(state_spec, P()), check_vma=comm_cfg.dense)
    return jax.jit(mapped, donate_argnums=0)
  offload = any(s.memory_kind == "pinned_host" for s in jax.tree.leaves(state_sharding.opt_state))
  body = functools.partial(step.train_step, loss_fn=loss_fn,
                           tx=_zero_optimizer(tx, strategy, layout, offload), axis_name=None,
                           max_consecutive_skips=max_consecutive_skips, compute_dtype=compute_dtype,
                           noise_groups=batch_size_of(mesh),
                           sum_groups=_sum_device_groups(strategy, layout), spike=spike)
  return jax.jit(body, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def compile_eval_step(strategy: str, layout: Layout, loss_fn: LossFn,
                      compute_dtype: Any = None) -> jax.stages.Wrapped:
  """(params, batch [A, b, ...]) -> {"loss_sum", "count"} summed over the global batch."""
  mesh = layout.mesh
  if strategy == "dp":
    body = functools.partial(step.eval_step, loss_fn=loss_fn, axis_name=batch_axes(mesh),
                             compute_dtype=compute_dtype)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), batch_spec(mesh)),
                                 out_specs=P()))
  # The parameters keep the shardings they arrive with (zero3: split; jit gathers them on use).
  body = functools.partial(step.eval_step, loss_fn=loss_fn, axis_name=None,
                           compute_dtype=compute_dtype)
  return jax.jit(body, out_shardings=replicated(mesh))


# The classic API: the same per-device body under jax.pmap. Arrays carry a leading device axis.

def pmap_train_step(loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
  """core.step.train_step under jax.pmap over "data": (state, batch) -> (state, metrics) with
  state leaves [N, ...] (`replicate`) and batch [N, A, b / N, ...] (`split_for_pmap`); the state
  is donated."""
  body = functools.partial(step.train_step, loss_fn=loss_fn, tx=tx, axis_name=DATA)
  return jax.pmap(body, axis_name=DATA, donate_argnums=0)


def replicate(tree, num_devices: int):
  """Stacks `num_devices` copies of every leaf on a new leading axis (pmap's replicated layout)."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + np.shape(x)), tree)


def unreplicate(tree):
  """The first device's copy of every leaf: [N, ...] -> [...] (the inverse of `replicate`)."""
  return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
  """[A, b, ...] -> [num_devices, A, b / num_devices, ...]: device d gets the rows shard_map gives it."""
  def split(x):
    a, b = x.shape[:2]
    x = x.reshape((a, num_devices, b // num_devices) + x.shape[2:])
    return np.moveaxis(x, 1, 0)
  return jax.tree.map(lambda v: split(np.asarray(v)), batch)
