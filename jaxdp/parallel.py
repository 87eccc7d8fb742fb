"""Meshes, shardings and the wiring of the pure steps onto devices.

A strategy decides only where arrays live and which collectives run; the model, loss, optimizer,
data and step bodies are shared. `dp`: the per-device step under `jax.shard_map` over a 1-D
"data" mesh, replicated state, one `lax.pmean` per step. `pmap_train_step` maps the same body
with `jax.pmap` for users of the classic API.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdp import local_sgd, steps
from jaxdp.model import GPT
from jaxdp.sync import CommConfig

DATA = "data"
BATCH_SPEC = P(None, DATA)  # Batches are [A, b, ...]: split rows, keep micro-batches whole.


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def state_shardings(strategy: str, mesh: Mesh, abstract_state) -> Any:
  """The sharding of every array of the train state under `strategy`."""
  del strategy  # dp replicates everything but the per-device comm rows.
  shardings = jax.tree.map(lambda _: replicated(mesh), abstract_state)
  return shardings.replace(comm=jax.tree.map(lambda _: NamedSharding(mesh, P(DATA)),
                                             abstract_state.comm))


def put_batch(batch: dict[str, np.ndarray], sharding: NamedSharding, global_rows: int | None = None):
  """Places this process's rows of a global batch [A, b, ...] on the devices of `sharding`.

  On one process the rows are the whole batch; on several each passes only its own rows and
  `global_rows` (the global b), and JAX assembles one global array without moving data.
  """
  def put(x):
    shape = x.shape if global_rows is None else (x.shape[0], global_rows) + x.shape[2:]
    return jax.make_array_from_process_local_data(sharding, x, shape)
  return {k: put(v) for k, v in batch.items()}


def compile_train_step(strategy: str, mesh: Mesh, model: GPT, tx: optax.GradientTransformation,
                       state_sharding, comm_cfg: CommConfig | None = None) -> Callable:
  """(state, batch) -> (state, metrics), jitted with the state donated."""
  del strategy
  comm_cfg = comm_cfg or CommConfig()
  state_spec = jax.tree.map(lambda s: s.spec, state_sharding)
  if comm_cfg.sync == "local_sgd":
    body = functools.partial(local_sgd.local_sgd_step, model=model, tx=tx, axis_name=DATA,
                             cfg=comm_cfg)
  else:
    body = functools.partial(steps.train_step, model=model, tx=tx, axis_name=DATA,
                             comm_cfg=comm_cfg)
  # Ring, ps and all-gather results are the same on every device by construction (each sum is
  # computed once and copied), which shard_map's replication check cannot see: it runs only for
  # the dense default, and tests compare the devices' results for the other methods.
  mapped = jax.shard_map(body, mesh=mesh, in_specs=(state_spec, BATCH_SPEC),
                         out_specs=(state_spec, P()), check_vma=comm_cfg.dense)
  return jax.jit(mapped, donate_argnums=0)


def compile_eval_step(strategy: str, mesh: Mesh, model: GPT) -> Callable:
  """(params, batch) -> {"loss_sum", "count"} summed over the global batch."""
  del strategy
  body = functools.partial(steps.eval_step, model=model, axis_name=DATA)
  return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), BATCH_SPEC), out_specs=P()))


# The classic API: the same per-device body under jax.pmap. Arrays carry a leading device axis.

def pmap_train_step(model: GPT, tx: optax.GradientTransformation) -> Callable:
  body = functools.partial(steps.train_step, model=model, tx=tx, axis_name=DATA)
  return jax.pmap(body, axis_name=DATA, donate_argnums=0)


def replicate(tree, num_devices: int):
  """Stacks `num_devices` copies of every leaf on a new leading axis (pmap's replicated layout)."""
  return jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (num_devices,) + np.shape(x)), tree)


def unreplicate(tree):
  return jax.tree.map(lambda x: x[0], tree)


def split_for_pmap(batch: dict[str, np.ndarray], num_devices: int) -> dict[str, np.ndarray]:
  """[A, b, ...] -> [num_devices, A, b / num_devices, ...]: device d gets the rows shard_map gives it."""
  def split(x):
    a, b = x.shape[:2]
    x = x.reshape((a, num_devices, b // num_devices) + x.shape[2:])
    return np.moveaxis(x, 1, 0)
  return {k: split(np.asarray(v)) for k, v in batch.items()}
