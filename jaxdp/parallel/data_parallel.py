"""`DataParallel`: any JAX model's loss, trained data-parallel with every jaxdp technique.

  dp = jaxdp.DataParallel(loss_fn, optax.adamw(1e-3), strategy="zero2", grad_accum_steps=4)
  state = dp.init_state(init_fn, seed=0)
  for step in range(num_steps):
    state, metrics = dp.step(state, batch_of(step))   # the global batch, NumPy arrays [B, ...]
  eval_loss = dp.evaluate(state.params, eval_batches)

The model enters only through `loss_fn(params, batch, rng) -> (loss_sum, weight_sum)` and
`init_fn(rng) -> params` (see jaxdp.core.step): a Flax Linen module, an NNX module split into a
parameter State, or plain functions over a pytree. Strategy, mesh, accumulation, precision,
communication method and NaN policy are this object's choices, never the model's.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax

from jaxdp.core.precision import COMPUTE_DTYPES, initial_loss_scale
from jaxdp.core.state import InitFn, TrainState, init_state
from jaxdp.core.step import LossFn, initial_loss_stats
from jaxdp.errors import JaxdpError
from jaxdp.parallel import fixed_order, shardings, steps
from jaxdp.parallel.choices import check_step
from jaxdp.parallel.exchange import CommConfig, with_comm_state
from jaxdp.parallel.mesh import (
  DATA,
  MODEL,
  REPLICA,
  batch_sharding,
  batch_size_of,
  make_mesh,
  process_rows,
  put_batch,
)


class DataParallel:
  """A loss function and an optax optimizer, compiled data-parallel over a device mesh.

  Args:
    loss_fn: (params, batch, rng) -> (loss_sum, weight_sum), float32 scalars summed over the
      rows of `batch` (a dict of arrays [b, ...]); rng is None in evaluation.
    tx: the optax optimizer (its schedule counts applied updates).
    strategy: "dp" (replicated state, one all-reduce per step under shard_map), or ZeRO under
      jit: "zero1" (optimizer state split over "data"), "zero2" (also gradients), "zero3"
      (also parameters).
    devices: devices of a ("data", "model") mesh with model=1 (default: all); or give `mesh`.
    mesh: a Mesh with axes ("data", "model"); "model" > 1 splits annotated dimensions.
    grad_accum_steps: micro-batches per step, token-weighted, one all-reduce per step.
    precision: "fp32", "bf16" (float32 master weights cast to bfloat16 for the loss) or "fp16"
      (float16 compute with a dynamic loss scale).
    comm: a CommConfig (ring, parameter server, compression, staleness, local SGD); dp only.
    nan_policy: "halt" (the step is dropped and the state frozen, for the loop to halt and
      save the last good state) or "skip" (drop up to `max_consecutive_skips` updates in a row).
    param_dims: logical axis names per parameter (a pytree like the params of tuples, or a
      function (path, shape) -> names), for models without Flax annotations.
    logical_axis_rules: logical name -> mesh axis pairs (default: heads, kv_heads, mlp -> model).
    offload_optimizer: ZeRO-Offload: the optimizer state in pinned host memory (GPU/TPU).
    reduction: "allreduce" (XLA's all-reduce, whose order of addition depends on the device
      count) or "fixed_order" (jaxdp.parallel.fixed_order: losses, gradients, optimizer states
      and parameters bitwise the same on every power-of-two device count dividing
      `virtual_shards`; dense exchange, model=1 and replica=1 meshes only; docs/determinism.md).
    virtual_shards: "fixed_order": shards per micro-batch, a power of two dividing its rows.
    spike_policy: "off", or "skip": the step drops an update whose (global mean) loss is above
      the mean + spike_sigmas std of about the last spike_window steps' losses, counted in
      skipped_steps (core.step.loss_spike; the statistics live in the state).

  Raises:
    JaxdpError: a choice that is not valid, or a mesh the model cannot be split over.
  """

  def __init__(self, loss_fn: LossFn, tx: optax.GradientTransformation, *, strategy: str = "dp",
               devices: Sequence[jax.Device] | None = None, mesh: Mesh | None = None,
               grad_accum_steps: int = 1, precision: str = "fp32", comm: CommConfig | None = None,
               nan_policy: str = "halt", param_dims: shardings.ParamDims = None,
               logical_axis_rules: Sequence[tuple[str, str | None]] = shardings.DEFAULT_RULES,
               max_consecutive_skips: int = 10, loss_scale_init: float = 2.0 ** 15,
               loss_scale_period: int = 200, offload_optimizer: bool = False,
               reduction: str = "allreduce", virtual_shards: int = 8,
               spike_policy: str = "off", spike_sigmas: float = 6.0, spike_window: int = 100):
    if grad_accum_steps < 1:
      raise JaxdpError(f"grad_accum_steps={grad_accum_steps} must be >= 1")
    if mesh is not None and devices is not None:
      raise JaxdpError("give devices or mesh, not both")
    if devices is not None and (isinstance(devices, (int, str)) or
                                not all(isinstance(d, jax.Device) for d in devices)):
      raise JaxdpError(f"devices={devices!r} must be a list of JAX devices, e.g. "
                       "jax.devices()[:2]")
    self.mesh = mesh if mesh is not None else make_mesh(devices)
    if tuple(self.mesh.axis_names) not in ((DATA, MODEL), (REPLICA, DATA, MODEL)):
      raise JaxdpError(f"mesh axes {tuple(self.mesh.axis_names)} must be ('data', 'model') or "
                       "('replica', 'data', 'model'); build it with "
                       "jaxdp.make_mesh(devices, data, model, replica)")
    self.comm = comm or CommConfig()
    check_step(strategy=strategy, precision=precision, nan_policy=nan_policy,
               comm=dataclasses.asdict(self.comm), mesh_model=self.mesh.shape[MODEL],
               mesh_replica=self.mesh.shape.get(REPLICA, 1), offload_optimizer=offload_optimizer,
               reduction=reduction, virtual_shards=virtual_shards,
               data_devices=batch_size_of(self.mesh))
    self.reduction, self.virtual_shards = reduction, virtual_shards
    if spike_policy not in ("off", "skip"):
      raise JaxdpError(f"spike_policy={spike_policy!r} must be 'off' or 'skip' (a rollback is the "
                       "loop's: jaxdp.fit(..., spike_policy='rollback'))")
    if spike_policy == "skip" and (reduction != "allreduce" or self.comm.sync == "local_sgd"):
      raise JaxdpError("spike_policy='skip' needs reduction='allreduce' and sync other than "
                       "'local_sgd' (their steps do not judge spikes yet); use "
                       "spike_policy='rollback' in fit instead")
    if spike_policy == "skip" and not (spike_sigmas > 0 and spike_window >= 1):
      raise JaxdpError(f"spike_sigmas={spike_sigmas!r} must be > 0 and spike_window="
                       f"{spike_window!r} >= 1")
    self.spike_policy, self.spike_sigmas, self.spike_window = spike_policy, spike_sigmas, spike_window
    self.loss_fn, self.tx, self.strategy = loss_fn, tx, strategy
    self.grad_accum_steps, self.precision, self.nan_policy = grad_accum_steps, precision, nan_policy
    self.param_dims, self.rules = param_dims, tuple(logical_axis_rules)
    self.max_consecutive_skips = max_consecutive_skips if nan_policy == "skip" else 0
    self.loss_scale_init, self.loss_scale_period = loss_scale_init, loss_scale_period
    self.offload_optimizer = offload_optimizer
    self.compute_dtype = None if precision == "fp32" else COMPUTE_DTYPES[precision]
    self._prepared: tuple | None = None  # (init_fn, seed) the layout and steps were built for.
    self.layout: shardings.Layout | None = None
    self.state_sharding = None
    self.train_step: jax.stages.Wrapped | None = None
    self.eval_step: jax.stages.Wrapped | None = None
    # XLA:CPU's emulated devices abort (a collective's rendezvous times out) when hundreds of
    # steps are queued without waiting; on CPU the step waits for the one two steps back,
    # which keeps the next step's dispatch overlapped with the current one.
    self._in_flight: collections.deque = collections.deque()
    self._max_in_flight = 2 if self.mesh.devices.flat[0].platform == "cpu" else 0
    self._memory_checked: set = set()  # Batch signatures whose compiled step fits in memory.

  @property
  def data_size(self) -> int:
    """Devices the batch is split over: the "data" axis (times "replica" on a hybrid mesh)."""
    return batch_size_of(self.mesh)

  def _fresh_state(self, init_fn: InitFn, seed: int) -> TrainState:
    loss_scale = initial_loss_scale(self.precision, self.loss_scale_init, self.loss_scale_period)
    state = init_state(lambda rng: shardings.split_annotations(init_fn(rng))[0], self.tx, seed,
                       loss_scale)
    if self.spike_policy == "skip":
      state = state.replace(loss_stats=initial_loss_stats())
    return with_comm_state(state, self.comm, self.tx, self.data_size)

  def _prepare(self, init_fn: InitFn, seed: int) -> Any:
    """Builds the layout, state shardings and compiled steps (once per init_fn and seed)."""
    if self._prepared is not None and self._prepared[:2] == (init_fn, seed):
      return self._prepared[2]
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    abstract_params, annotations = shardings.split_annotations(boxed)
    low = [(jax.tree_util.keystr(path), x.dtype) for path, x in
           jax.tree_util.tree_leaves_with_path(abstract_params)
           if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != jnp.float32]
    if low:
      raise JaxdpError(
          f"init_fn returned {low[0][1]} parameters (e.g. {low[0][0]}); keep the master "
          f"parameters in float32 and pass precision='bf16' (or 'fp16') for low-precision compute")
    # Gradients exist only for floating leaves: an integer or boolean leaf would fail deep in
    # jax.grad with no name attached.
    discrete = [(jax.tree_util.keystr(path), x.dtype) for path, x in
                jax.tree_util.tree_leaves_with_path(abstract_params)
                if not jnp.issubdtype(x.dtype, jnp.inexact)]
    if discrete:
      raise JaxdpError(
          f"init_fn returned a {discrete[0][1]} parameter leaf {discrete[0][0]}"
          f"{f' (and {len(discrete) - 1} more)' if len(discrete) > 1 else ''}; every parameter "
          "is trained by gradients, so it must be float32: cast it (.astype(jnp.float32)), or "
          "keep integer data (step counts, token tables) out of the parameters, e.g. in the "
          "batch or closed over by loss_fn")
    if self.param_dims is not None:
      annotations = shardings.explicit_annotations(abstract_params, self.param_dims)
    shapes = {shardings._param_key(path): tuple(x.shape)
              for path, x in jax.tree_util.tree_leaves_with_path(abstract_params)}
    self.layout = shardings.Layout(self.mesh, annotations, shapes, self.rules)
    abstract = jax.eval_shape(lambda: self._fresh_state(init_fn, seed))
    self.state_sharding = shardings.state_shardings(self.strategy, self.layout, abstract,
                                                    self.offload_optimizer)
    if self.reduction == "fixed_order":
      self.train_step = fixed_order.compile_train_step(
          self.layout, self.loss_fn, self.tx, self.state_sharding, self.virtual_shards,
          self.max_consecutive_skips, self.compute_dtype)
      self.eval_step = fixed_order.compile_eval_step(self.layout, self.loss_fn,
                                                     self.virtual_shards, self.compute_dtype)
    else:
      self.train_step = steps.compile_train_step(
          self.strategy, self.layout, self.loss_fn, self.tx, self.state_sharding, self.comm,
          self.max_consecutive_skips, self.compute_dtype,
          (self.spike_sigmas, self.spike_window) if self.spike_policy == "skip" else None)
      self.eval_step = steps.compile_eval_step(self.strategy, self.layout, self.loss_fn,
                                                  self.compute_dtype)
    self._prepared = (init_fn, seed, abstract)
    return abstract

  def init_state(self, init_fn: InitFn, seed: int = 0) -> TrainState:
    """A fresh train state, created directly in its shardings (never whole on one device).

    `init_fn(rng) -> params`; `.params`, `.opt_state` and `.step` of the result are the
    parameters, the optimizer state and the number of optimizer steps taken.
    """
    self._prepare(init_fn, seed)
    try:
      return jax.jit(lambda: self._fresh_state(init_fn, seed), out_shardings=self.state_sharding)()
    except Exception as e:  # noqa: BLE001 - only the allocator's error is translated.
      if is_out_of_memory(e):
        raise out_of_memory(e, "creating the train state") from None
      raise

  def abstract_state(self, init_fn: InitFn, seed: int = 0) -> TrainState:
    """The state's shapes, dtypes and shardings without allocating it (a checkpoint's target)."""
    abstract = self._prepare(init_fn, seed)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        abstract, self.state_sharding)

  def process_rows(self, global_batch_size: int, micro_batches: int | None = None) -> np.ndarray:
    """Rows of a global batch [B, ...] this process must supply (all of them on one process)."""
    a = self.grad_accum_steps if micro_batches is None else micro_batches
    b = global_batch_size // a
    rows = process_rows(self.mesh, b)
    return (np.arange(a)[:, None] * b + rows[None, :]).ravel()

  def put_batch(self, batch: dict[str, Any], global_batch_size: int | None = None, *,
                micro_batches: int | None = None) -> dict[str, jax.Array]:
    """Host batch -> device arrays [A, b, ...], this process's rows only.

    `batch`: dict of arrays [B, ...] (values may be nested dicts of them) holding the whole global
    batch (B = global batch size), or, with `global_batch_size`, only this process's rows
    (`process_rows`), in that order.
    An "ids" entry (global example index, keying per-example randomness) is added when absent.
    """
    if not isinstance(batch, dict):
      raise JaxdpError(f"the batch is a {type(batch).__name__}; give a dict of arrays with a "
                       "leading batch dimension, e.g. {'x': x, 'y': y}")
    if not batch:
      raise JaxdpError("the batch is empty; give a dict of arrays with a leading batch dimension")
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    sizes = {jax.tree_util.keystr(path): np.shape(v)[0] if np.ndim(v) else None for path, v in leaves}
    if len(set(sizes.values())) != 1 or None in sizes.values():
      raise JaxdpError(f"every array of the batch needs the same leading batch dimension; got "
                       f"{sizes}")
    rows = next(size for size in sizes.values() if size is not None)
    total = rows if global_batch_size is None else global_batch_size
    a = self.grad_accum_steps if micro_batches is None else micro_batches
    if total % (self.data_size * a):
      fix = (f"use a multiple of {self.data_size * a}" if micro_batches is None else
             f"pad it to a multiple of {self.data_size * a} rows with zero weights on the padding "
             "(jaxdp.example_weights), so the padding counts for nothing")
      raise JaxdpError(f"the global batch of {total} rows is not divisible by data devices x "
                       f"micro-batches = {self.data_size} x {a}; {fix}")
    if self.reduction == "fixed_order":
      fixed_order.check_rows(total // a, self.virtual_shards, self.data_size)
    mine = self.process_rows(total, a)
    batch = dict(jax.tree.map(np.asarray, batch))
    if "ids" not in batch:  # Aligned with the rows given: the global batch's, or this process's.
      batch["ids"] = (np.arange(total) if global_batch_size is None else mine).astype(np.int32)
    if global_batch_size is None and len(mine) != total:
      batch = jax.tree.map(lambda v: v[mine], batch)
    local = jax.tree.map(lambda v: v.reshape((a, v.shape[0] // a) + v.shape[1:]), batch)
    return put_batch(local, batch_sharding(self.mesh), total // a)

  def _placed(self, batch) -> bool:
    """True for the output of put_batch (already on the devices, laid out [A, b, ...])."""
    sharding = batch_sharding(self.mesh)
    return isinstance(batch, dict) and all(isinstance(v, jax.Array) and v.sharding == sharding
                                           for v in jax.tree.leaves(batch))

  def device_batch(self, batch: dict[str, Any]) -> dict[str, jax.Array]:
    """`batch` on the devices: put_batch of a host global batch, or a placed batch as it is."""
    return batch if self._placed(batch) else self.put_batch(batch)

  def step(self, state: TrainState, batch: dict[str, Any]) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer step on a global batch; returns the new state and metrics.

    `batch`: dict of NumPy arrays [B, ...] (the global batch) or the output of `put_batch`.
    metrics (device scalars, fetch when needed): "train_loss" (weighted mean loss),
    "grad_norm" (global gradient norm), "skipped_steps", "consecutive_skips", and under fp16
    "loss_scale". `state` is donated: use the returned one.
    """
    if self.train_step is None:
      raise JaxdpError("DataParallel.step: call init_state(init_fn, seed) (or abstract_state, "
                       "to restore a checkpoint) first")
    if isinstance(state.step, jax.Array) and state.step.is_deleted():
      raise JaxdpError("DataParallel.step: this state was consumed by an earlier step (its "
                       "buffers are donated); pass the state that step returned")
    batch = self.device_batch(batch)
    try:
      self._check_memory(state, batch)
      state, metrics = self.train_step(state, batch)
    except Exception as e:  # noqa: BLE001 - only the allocator's error is translated.
      if is_out_of_memory(e):
        raise out_of_memory(e, "the train step") from None
      raise
    if self._max_in_flight:
      self._in_flight.append(metrics["train_loss"])
      if len(self._in_flight) > self._max_in_flight:
        jax.block_until_ready(self._in_flight.popleft())
    return state, metrics

  def _check_memory(self, state: TrainState, batch: dict[str, jax.Array]) -> None:
    """Refuses a step whose compiled program cannot fit, before it runs (JaxdpError, one line).

    The step is compiled ahead of time (jit reuses that executable for the call), and XLA's
    `memory_analysis()` of it (arguments + outputs - donated aliases + temporaries, per device) is
    compared with what the device can hold: `memory_stats()["bytes_limit"]` on GPU/TPU, the host's
    available memory shared by its CPU devices on CPU. Allocating instead would fail deep in the
    runtime (a long allocator trace) or, on CPU, push the host into swap or the OOM killer.
    """
    signature = tuple(sorted((jax.tree_util.keystr(k), v.shape, str(v.dtype))
                             for k, v in jax.tree_util.tree_leaves_with_path(batch)))
    train_step = self.train_step
    if train_step is None or signature in self._memory_checked:  # None: step() refuses first.
      return
    analysis = train_step.lower(state, batch).compile().memory_analysis()
    self._memory_checked.add(signature)
    need = step_memory_bytes(analysis)
    limit, where = device_memory_limit(self.mesh)
    if need is None or limit is None or need <= limit:
      return
    raise JaxdpError(
        f"the train step needs {need / 2**30:.1f} GiB per device but {where} holds "
        f"{limit / 2**30:.1f} GiB (XLA's memory analysis of the compiled step, before running it); "
        "use fewer rows per device (a smaller global batch, or more grad_accum_steps), a shorter "
        "sequence, activation rematerialisation (config.remat=block), or shard the state "
        "(strategy zero1..zero3); `jaxdp plan` shows the memory each strategy needs")

  def evaluate(self, params: Any, batches: Iterable[dict[str, Any]]) -> float:
    """The weighted mean loss over `batches` (each a global batch, host or placed), no randomness.

    Each batch's loss_sum and weight_sum are summed before one division, so a partial last
    batch (padded rows with zero weight) counts its real rows only.
    """
    if self.eval_step is None:  # Evaluation only (params from elsewhere): no state needed.
      if self.mesh.shape[MODEL] > 1:
        raise JaxdpError("DataParallel.evaluate on a mesh with model > 1: call "
                         "init_state(init_fn, seed) or abstract_state first (the layout of the "
                         "parameters comes from init_fn's annotations)")
      shapes = {shardings._param_key(p): tuple(x.shape)
                for p, x in jax.tree_util.tree_leaves_with_path(params)}
      layout = shardings.Layout(self.mesh, {}, shapes, self.rules)
      self.eval_step = (
          fixed_order.compile_eval_step(layout, self.loss_fn, self.virtual_shards,
                                        self.compute_dtype)
          if self.reduction == "fixed_order" else
          steps.compile_eval_step(self.strategy, layout, self.loss_fn, self.compute_dtype))
    totals = [self.eval_step(params, b if self._placed(b) else self.put_batch(b, micro_batches=1))
              for b in batches]
    if not totals:
      raise JaxdpError("DataParallel.evaluate: no evaluation batches")
    totals = jax.device_get(totals)
    weight = sum(float(t["count"]) for t in totals)
    return float(sum(float(t["loss_sum"]) for t in totals) / max(weight, 1e-30))


def step_memory_bytes(analysis: Any) -> int | None:
  """Bytes one device needs to run a compiled program (from its `memory_analysis()`), or None.

  Arguments and outputs are live together except where the output reuses a donated argument's
  buffer (alias); temporaries come on top. Host-memory (offloaded) bytes are not device bytes.
  """
  if analysis is None:
    return None
  return int(analysis.argument_size_in_bytes + analysis.output_size_in_bytes
             - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)


def device_memory_limit(mesh: Mesh) -> tuple[int | None, str]:
  """(bytes one device of `mesh` can hold, a phrase naming it), or (None, ...) when unknown.

  GPU/TPU: the allocator's `bytes_limit`. CPU: the host's available memory (/proc/meminfo
  MemAvailable) divided by this process's CPU devices, which all allocate from it.
  """
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  device = local[0]  # Another process's device has no memory stats here.
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"]), f"{device.device_kind} ({device.platform})"
  if device.platform != "cpu":
    return None, device.platform
  try:
    with open("/proc/meminfo") as f:
      fields = dict(line.split(":", 1) for line in f)
    available = int(fields["MemAvailable"].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None, "host"
  return available // len(local), f"the host's available memory over {len(local)} CPU devices"


def is_out_of_memory(error: BaseException) -> bool:
  """True for XLA's allocation failure (RESOURCE_EXHAUSTED / out of memory) on any backend."""
  text = str(error)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def out_of_memory(error: BaseException, where: str) -> JaxdpError:
  """The allocator's many-line error as one line: the number it reports, and the fixes."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  detail = next((line for line in lines if "bytes" in line or "memory" in line.lower()), lines[0])
  return JaxdpError(
      f"out of device memory in {where} ({detail[:200]}); use fewer rows per device "
      "(a smaller global batch, or more grad_accum_steps), a shorter sequence, activation "
      "rematerialisation (config.remat=block), or shard the state (strategy zero1..zero3); "
      "`jaxdp plan` shows the memory each strategy needs")


def example_weights(batch_size: int, real_rows: int) -> np.ndarray:
  """float32 [batch_size]: 1 for the first `real_rows` rows, 0 for padding (a partial batch)."""
  return (np.arange(batch_size) < real_rows).astype(np.float32)


