"""Meshes, shardings and the wiring of the pure steps onto devices.

A strategy decides only where arrays live and which collectives run; the model, loss, optimizer,
data and step bodies are shared. `dp`: the per-device step under `jax.shard_map` over the
"data" axis, replicated state, one `lax.pmean` per step. `zero1`/`zero2`/`zero3`: the global
step (`axis_name=None`) under `jax.jit` over a ("data", "model") mesh, with the optimizer state
(zero1), also the gradients (zero2) and also the parameters (zero3) split over "data" as ZeRO
splits them; XLA derives the collectives (reduce-scatter / all-gather) from those shardings.
On a 2-D mesh, attention heads and the MLP hidden dimension are also split over "model"
(Megatron-style). `pmap_train_step` maps the dp body with `jax.pmap` for users of the classic API.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxdp import local_sgd, steps
from jaxdp.errors import JaxdpError
from jaxdp.model import GPT
from jaxdp.sync import CommConfig

DATA = "data"
MODEL = "model"
BATCH_SPEC = P(None, DATA)  # Batches are [A, b, ...]: split rows over "data", keep micro-batches whole.

# The parts of the train state each strategy splits over "data" (ZeRO stages 1, 2, 3).
ZERO_PARTS = {"dp": (), "zero1": ("opt_state",), "zero2": ("opt_state", "grads"),
              "zero3": ("opt_state", "grads", "params")}

# Megatron-style model-parallel dimension of a kernel, keyed by the last names of its path (the
# same for a parameter, its gradient and its Adam moments): heads of attention, hidden of the MLP.
# Splitting the qkv output and proj input over heads (fc output and proj input over hidden) keeps
# each block's math local to a device until the one reduction after proj.
MEGATRON_DIMS = {("attn", "qkv", "kernel"): 2, ("attn", "qkv", "bias"): 1,
                 ("attn", "proj", "kernel"): 0, ("mlp", "fc", "kernel"): 0,
                 ("mlp", "fc", "bias"): 0, ("mlp", "proj", "kernel"): 1}


def make_mesh(devices: Sequence[jax.Device] | None = None, data: int = 0, model: int = 1) -> Mesh:
  """A ("data", "model") mesh; data <= 0 takes all devices left after `model` (validated in config)."""
  devices = list(jax.devices() if devices is None else devices)
  data = len(devices) // model if data <= 0 else data
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, BATCH_SPEC)


def path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def array_spec(path, shape: tuple[int, ...], mesh: Mesh, split_data: bool) -> tuple[P, str | None]:
  """(PartitionSpec, why it stays whole over "data" or None) of one state array.

  "model" takes the Megatron dimension (if the mesh has one); with `split_data`, "data" takes the
  largest remaining dimension it divides, so shards are even and no padding is needed.
  """
  spec: list[str | None] = [None] * len(shape)
  if mesh.shape[MODEL] > 1:
    dim = MEGATRON_DIMS.get(path_names(path)[-3:])
    if dim is not None:
      spec[dim] = MODEL
  if not split_data or mesh.shape[DATA] == 1:
    return P(*spec), None
  free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % mesh.shape[DATA] == 0]
  if not free:
    why = ("a scalar" if not shape else
           f"no free dimension of shape {tuple(shape)} is divisible by data={mesh.shape[DATA]}")
    return P(*spec), why
  spec[max(free, key=lambda d: shape[d])] = DATA
  return P(*spec), None


def tree_shardings(tree, mesh: Mesh, split_data: bool, memory_kind: str | None = None):
  """NamedShardings for a tree of arrays (params, gradients or optimizer state), by path."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, array_spec(path, x.shape, mesh, split_data)[0],
                                    memory_kind=memory_kind), tree)


def replicated_report(strategy: str, mesh: Mesh, abstract_state) -> list[dict[str, Any]]:
  """The arrays that `strategy` would split over "data" but keeps whole, and why."""
  report = []
  for part in ZERO_PARTS[strategy]:
    tree = abstract_state.params if part == "grads" else getattr(abstract_state, part)
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      _, why = array_spec(path, x.shape, mesh, split_data=True)
      if why is not None:
        report.append({"array": part + jax.tree_util.keystr(path), "shape": tuple(x.shape),
                       "bytes": int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize, "why": why})
  return report


def check_offload(mesh: Mesh) -> None:
  """Raises unless the devices have host memory distinct from their own (GPU, TPU)."""
  device = mesh.devices.flat[0]
  kinds = {m.kind for m in device.addressable_memories()}
  if device.platform == "cpu" or "pinned_host" not in kinds:
    raise JaxdpError(
        f"config.offload_optimizer=True: {device.platform} devices have no host memory apart from "
        f"their own (memory kinds {sorted(kinds)}), so there is nothing to offload to; set "
        "config.offload_optimizer=False, or run on GPU/TPU")


def state_shardings(strategy: str, mesh: Mesh, abstract_state, offload_optimizer: bool = False) -> Any:
  """The sharding of every array of the train state under `strategy`.

  dp replicates everything. The ZeRO stages split their parts over "data" (see ZERO_PARTS);
  with `offload_optimizer` the optimizer state lives in pinned host memory (ZeRO-Offload).
  """
  # Scalars (step, rng, counters, loss scale) are replicated; per-device comm rows (sync.py) are
  # split over "data", one row per device.
  everywhere = jax.tree.map(lambda _: replicated(mesh), abstract_state).replace(
      comm=jax.tree.map(lambda _: NamedSharding(mesh, P(DATA)), abstract_state.comm))
  if strategy == "dp":
    return everywhere
  if offload_optimizer:
    check_offload(mesh)
  parts = ZERO_PARTS[strategy]
  return everywhere.replace(
      params=tree_shardings(abstract_state.params, mesh, "params" in parts),
      opt_state=tree_shardings(abstract_state.opt_state, mesh, True,
                               "pinned_host" if offload_optimizer else None))


def gradient_shardings(strategy: str, mesh: Mesh, abstract_params) -> Any:
  """Where the summed gradients live: split over "data" from zero2 on (reduce-scatter)."""
  if strategy == "dp":
    return jax.tree.map(lambda _: replicated(mesh), abstract_params)
  return tree_shardings(abstract_params, mesh, "grads" in ZERO_PARTS[strategy])


def _zero_optimizer(tx: optax.GradientTransformation, strategy: str, mesh: Mesh,
                    offload_optimizer: bool) -> optax.GradientTransformation:
  """`tx` whose update pins the gradients to the stage's shards and, when the optimizer state is
  offloaded, brings it to device memory for the update (the step's outputs send it back).

  Only shardings change: the update's arithmetic is `tx`'s own.
  """
  def update(grads, opt_state, params=None):
    grads = jax.lax.with_sharding_constraint(grads, gradient_shardings(strategy, mesh, grads))
    if offload_optimizer:
      opt_state = jax.device_put(opt_state, tree_shardings(opt_state, mesh, True, "device"))
    return tx.update(grads, opt_state, params)
  return optax.GradientTransformation(tx.init, update)


def process_rows(mesh: Mesh, global_rows: int) -> np.ndarray:
  """Rows of a global batch [A, global_rows, ...] held by this process's devices, ascending.

  Read from the sharding rather than assumed from jax.process_index(), so any device order in
  the mesh gets the rows its devices compute; on one process this is every row.
  """
  index_map = batch_sharding(mesh).addressable_devices_indices_map((1, global_rows))
  rows = {r for index in index_map.values() for r in range(*index[1].indices(global_rows))}
  return np.array(sorted(rows), dtype=np.int64)


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
                       state_sharding, comm_cfg: CommConfig | None = None,
                       max_consecutive_skips: int = 0) -> Callable:
  """(state, batch) -> (state, metrics), jitted with the state donated."""
  comm_cfg = comm_cfg or CommConfig()
  if strategy == "dp":
    state_spec = jax.tree.map(lambda s: s.spec, state_sharding)
    if comm_cfg.sync == "local_sgd":
      body = functools.partial(local_sgd.local_sgd_step, model=model, tx=tx, axis_name=DATA,
                               cfg=comm_cfg)
    else:
      body = functools.partial(steps.train_step, model=model, tx=tx, axis_name=DATA,
                               comm_cfg=comm_cfg, max_consecutive_skips=max_consecutive_skips)
    # steps.train_step casts the replicated params to per-device values before differentiating,
    # so the dense step holds one all-reduce (gradients, loss and token count together). Ring,
    # ps and all-gather results are the same on every device by construction (each sum is
    # computed once and copied), which shard_map's replication check cannot see: it runs only for
    # the dense default, and tests compare the devices' results for the other methods.
    mapped = jax.shard_map(body, mesh=mesh, in_specs=(state_spec, BATCH_SPEC),
                           out_specs=(state_spec, P()), check_vma=comm_cfg.dense)
    return jax.jit(mapped, donate_argnums=0)
  offload = any(s.memory_kind == "pinned_host" for s in jax.tree.leaves(state_sharding.opt_state))
  body = functools.partial(steps.train_step, model=model,
                           tx=_zero_optimizer(tx, strategy, mesh, offload), axis_name=None,
                           max_consecutive_skips=max_consecutive_skips)
  return jax.jit(body, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0)


def compile_eval_step(strategy: str, mesh: Mesh, model: GPT) -> Callable:
  """(params, batch) -> {"loss_sum", "count"} summed over the global batch."""
  if strategy == "dp":
    body = functools.partial(steps.eval_step, model=model, axis_name=DATA)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), BATCH_SPEC), out_specs=P()))
  # The parameters keep the shardings they arrive with (zero3: split; jit gathers them on use).
  body = functools.partial(steps.eval_step, model=model, axis_name=None)
  return jax.jit(body, out_shardings=replicated(mesh))


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
