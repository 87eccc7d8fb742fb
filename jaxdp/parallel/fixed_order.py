"""The fixed-order reduction: the same bits on any device count that divides the virtual shards.

XLA's all-reduce adds the devices' gradients in an order that depends on how many there are, so
a run on 8 devices and one on 1 agree only within rounding. Floating-point addition is
commutative but not associative: fixing the *association* fixes the bits. Here every micro-batch
of the global batch is split into V virtual shards of consecutive rows (V = `virtual_shards`, a
power of two and a run constant) and

  1. every shard's (gradient sum, loss sum, token count) comes from the same program, whatever
     the device count: a `lax.while_loop` over the device's shards, each shard's A micro-batches folded
     in order (core.step.accumulate_gradients on [A, rows / V, ...]);
  2. shards are added in a balanced binary tree over the shard index: a device holding V/N
     consecutive shards adds a complete subtree locally (a binary counter in the loop carry:
     log2(V/N) partial sums, never V gradients at once);
  3. devices are added along the same tree: recursive halving (a reduce-scatter whose step k adds
     the half exchanged with device i ^ 2^k) then recursive doubling (the all-gather back), with
     `lax.ppermute`. Every element of the result is the same tree of additions on any N, and the
     bytes sent are the ring all-reduce's 2 (N - 1) / N of the gradient.

One device computes the same tree alone, so the loss, the gradients and everything the
optimizer does with them are bitwise the same on 1, 2, 4, ... V devices (and any number of
processes). The rest of the step (the division by the global token count, the gradient norm,
clipping, the optimizer) sees replicated, identical gradients; under ZeRO the optimizer state
and (zero3) parameters stay split over the devices and the update is elementwise on each shard.
The gradient noise scale's small batch is the shard: N-independent too.

Sources: Thakur, Rabenseifner & Gropp 2005, "Optimization of Collective Communication
Operations in MPICH" (recursive halving / doubling); Higham 1993, "The accuracy of floating
point summation" (pairwise summation).
"""

from __future__ import annotations

from collections.abc import Callable
import functools
import math
import os
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import optax

from jaxdp.core import noise, precision
from jaxdp.core.state import TrainState
from jaxdp.core.step import LossFn, accumulate_gradients, checked_loss, step_metrics, update_if_finite
from jaxdp.errors import JaxdpError
from jaxdp.parallel.mesh import DATA, batch_sharding, batch_size_of, replicated

# XLA:GPU flags without which the same program may give other bits on a rerun (atomics in
# scatter-add and reductions, autotuned algorithm choices). Set before the backend starts.
GPU_DETERMINISM_FLAGS = ("--xla_gpu_deterministic_ops=true",)

# Compiler options of the fixed-order step and evaluation (per compilation, not process-wide).
# XLA's algebraic simplifier rewrites arithmetic (e.g. reassociating a multiply and a divide of
# broadcasts) differently in a one-device program and in a partitioned one, whose instructions
# carry shardings; measured on the tiny LM's attention backward pass, that alone changed the
# gradients of a shard in the last bits. Without it the shard's program is computed as written.
# While-loop invariant code motion hoisted the transposes of the (cast) weights out of the shard
# loop in the one-device program but not in partitioned ones, so there some of the shard's dots
# read a transposed right operand (rhs_contracting_dims={1}, not {0}); XLA:CPU's dot kernels
# round the same product differently for the two layouts (measured: the tiny LM in bf16, 1
# device vs 2, 5 entries of the embedding gradient at step 10). Without it the loop body keeps
# the whole shard program, and its dots are the same on every device count.
COMPILER_OPTIONS = {"xla_disable_hlo_passes": "algsimp,while-loop-invariant-code-motion"}


def compiler_options(platform: str) -> dict[str, Any]:
  """The fixed-order step's XLA options on `platform` ("cpu", "gpu", "tpu")."""
  options: dict[str, Any] = dict(COMPILER_OPTIONS)
  if platform == "gpu":
    options["xla_gpu_deterministic_ops"] = True
  return options


def set_determinism_flags(environ: dict | None = None) -> list[str]:
  """Adds GPU_DETERMINISM_FLAGS to XLA_FLAGS (those not already there); returns the ones added.

  Call before JAX initialises its backend (before the first `jax.devices()`); XLA reads the
  variable once. CPU and TPU ignore the flags.
  """
  env = os.environ if environ is None else environ
  current = env.get("XLA_FLAGS", "")
  added = [f for f in GPU_DETERMINISM_FLAGS if f.split("=")[0] not in current]
  if added:
    env["XLA_FLAGS"] = " ".join([current] + added).strip()
  return added


def check_rows(rows: int, virtual_shards: int, data_devices: int) -> None:
  """Raises JaxdpError (one line) unless a micro-batch of `rows` rows splits into the shards.

  `rows`: the global rows of one micro-batch; each of the `virtual_shards` shards gets
  rows / virtual_shards, and each of the `data_devices` devices virtual_shards / data_devices.
  """
  if rows % virtual_shards:
    raise JaxdpError(
        f"reduction='fixed_order' splits each micro-batch into virtual_shards={virtual_shards} "
        f"shards but it has {rows} rows; use a batch whose rows per micro-batch are a multiple of "
        f"{virtual_shards}, or fewer virtual_shards")
  if virtual_shards % data_devices:  # DataParallel checked this already; kept for direct callers.
    raise JaxdpError(f"virtual_shards={virtual_shards} is not divisible by {data_devices} devices")


def tree_scan(fn: Callable[[Any], Any], xs: Any, count: int) -> Any:
  """The sum of fn(x) over the `count` leading slices of `xs`, added in a balanced binary tree.

  `count` is a power of two. One `lax.while_loop` evaluates `fn` once per slice (the same program for
  every slice and every `count`) and keeps a binary counter of partial sums, log2(count) of
  them: slice i is added to its left sibling at level l exactly when its bits 0..l are all 1.
  The result is ((x0 + x1) + (x2 + x3)) + ..., bitwise what the same tree over more slices
  held elsewhere gives for this subtree.
  """
  levels = int(math.log2(count))
  example = jax.eval_shape(fn, jax.tree.map(lambda x: x[0], xs))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)

  def merge(stack, x, i, active):
    """Slice i's value `x` pushed onto the counter: (the new stack, the subtree sum x ends in)."""
    done = ~active
    new_stack = []
    for level in range(levels):
      bit = (i >> level) & 1
      store = ~done & (bit == 0)
      add = ~done & (bit == 1)
      new_stack.append(jax.tree.map(lambda s, v, store=store: jnp.where(store, v, s),
                                    stack[level], x))
      x = jax.tree.map(lambda s, v, add=add: jnp.where(add, s + v, v), stack[level], x)
      done = done | store
    return new_stack, x

  def body(carry):
    i, stack, previous = carry
    x_in = jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), xs)
    # Slice i - 1's value is added now, from the loop carry (a buffer), not in the iteration that
    # computes it: in one iteration XLA:CPU fused the tree's additions (their number depends on
    # the device count) with the slice's last multiply, the fp16 unscale, into one loop, where
    # the compiler may contract a multiply and an add into a fused multiply-add (measured: the
    # fp16 MLP's gradient sums differed on 4 and 8 devices, and agree with this delay; the
    # optimization barrier did not help: the optimized HLO has none left before fusion).
    stack, _ = merge(stack, previous, i - 1, i > 0)
    # The barrier still orders the shard's program apart from the additions where XLA keeps
    # barriers through fusion (GPU); the one-iteration delay is what holds on CPU.
    return i + 1, stack, lax.optimization_barrier(fn(x_in))

  # A while loop whose trip count XLA cannot see: it is never unrolled or, with one shard per
  # device, inlined, so the shard's program is compiled alone, the same for every device count
  # (inlined, XLA optimised a bf16 shard differently: measured on 8 devices of 8 shards).
  stop = lax.optimization_barrier(jnp.int32(count))
  init = (jnp.int32(0), [zeros] * levels, zeros)
  _, stack, last = lax.while_loop(lambda carry: carry[0] < stop, body, init)
  # The last slice closes every level of the tree (its index has all bits 1).
  total = last
  for level in range(levels):
    total = jax.tree.map(jnp.add, stack[level], total)
  return total


def butterfly_sum(tree: Any, axis_name: str, n: int) -> Any:
  """The sum of `tree` (float32 leaves) over the `n` devices of `axis_name`, on every device,
  added in the balanced binary tree over the device index: devices differing in bit k are added
  at level k (recursive halving, then recursive doubling back; `n` a power of two).

  Each device sends 2 (n - 1) / n of the tree's bytes, as a ring all-reduce does.
  """
  if n == 1:
    return tree
  leaves, treedef = jax.tree.flatten(tree)
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  size = flat.shape[0]
  padded = -(-size // n) * n
  cur = jnp.pad(flat, (0, padded - size))
  index = lax.axis_index(axis_name)
  steps = int(math.log2(n))
  for k in range(steps):  # Recursive halving: a reduce-scatter.
    half = cur.shape[0] // 2
    low = ((index >> k) & 1) == 0
    keep = jnp.where(low, cur[:half], cur[half:])
    send = jnp.where(low, cur[half:], cur[:half])
    received = lax.ppermute(send, axis_name, [(j, j ^ (1 << k)) for j in range(n)])
    cur = keep + received
  for k in reversed(range(steps)):  # Recursive doubling: the all-gather, in the same pairs.
    low = ((index >> k) & 1) == 0
    received = lax.ppermute(cur, axis_name, [(j, j ^ (1 << k)) for j in range(n)])
    cur = jnp.where(low, jnp.concatenate([cur, received]), jnp.concatenate([received, cur]))
  out, offset = [], 0
  for x in leaves:
    out.append(cur[offset:offset + x.size].reshape(x.shape).astype(x.dtype))
    offset += x.size
  return jax.tree.unflatten(treedef, out)


def _device_sums(params, batch, rng, loss_scale, *, loss_fn: LossFn, compute_dtype: Any,
                 virtual_shards: int, devices: int):
  """One device's (grad_sum, loss_sum, token_count, shard_sq) over its V/N shards, then summed
  over the devices: the whole step's sums, the same bits on every device and every N.

  `batch`: this device's rows [A, b / N, ...]; shard_sq sums |shard mean gradient|^2.
  """
  local = virtual_shards // devices

  def split(x):  # [A, b/N, ...] -> [V/N, A, rows, ...]: shard s holds rows s*rows .. of each micro.
    a, b = x.shape[:2]
    x = x.reshape((a, local, b // local) + x.shape[2:])
    return jnp.swapaxes(x, 0, 1)
  shards = jax.tree.map(split, batch)

  def shard_sums(shard):
    return tuple(accumulate_gradients(loss_fn, params, shard, rng, loss_scale, compute_dtype,
                                      micro_sq=True))
  sums = tree_scan(shard_sums, shards, local)
  return butterfly_sum(sums, DATA, devices)


def train_step(state: TrainState, batch: dict[str, jax.Array], *, loss_fn: LossFn,
               tx: optax.GradientTransformation, mesh, virtual_shards: int,
               max_consecutive_skips: int = 0, compute_dtype: Any = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """core.step.train_step with the fixed-order sums: the global step, for `jax.jit` over `mesh`.

  `batch` [A, b, ...] split over "data". Metrics as core.step.step_metrics; the gradient noise
  scale compares each shard's mean gradient (its rows of one micro-batch) with the step's.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  dynamic_scale = state.loss_scale if state.loss_scale is not None and state.loss_scale.dynamic else None
  scale = dynamic_scale.scale if dynamic_scale is not None else None
  devices = batch_size_of(mesh)
  sums = jax.shard_map(
      functools.partial(_device_sums, loss_fn=loss_fn, compute_dtype=compute_dtype,
                        virtual_shards=virtual_shards, devices=devices),
      mesh=mesh, in_specs=(P(), P(None, DATA), P(), P()), out_specs=P(),
      # The butterfly leaves the same value on every device, which the check cannot see.
      check_vma=False)
  grad_sum, loss_total, tokens, shard_sq = sums(state.params, batch, rng, scale)
  # Pinned whole on every device: the norm below (and clipping's, inside tx) must reduce the
  # whole gradient on each device, never partial sums of ZeRO's shards added in an N-dependent
  # order (XLA would otherwise propagate the optimizer state's sharding back into them).
  grads = lax.with_sharding_constraint(jax.tree.map(lambda g: g / tokens, grad_sum),
                                       NamedSharding(mesh, P()))
  grad_norm = optax.tree.norm(grads)
  parts = virtual_shards * jax.tree.leaves(batch)[0].shape[0]
  noise_terms = (noise.noise_terms(shard_sq / parts, grad_norm ** 2, tokens / parts, tokens)
                 if parts > 1 else None)
  scaling = dynamic_scale is not None
  finite = jnp.isfinite(grad_norm) if scaling else jnp.isfinite(loss_total) & jnp.isfinite(grad_norm)

  def optimizer_update():
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, state.comm

  new_state = update_if_finite(state, finite, optimizer_update, max_consecutive_skips,
                               dynamic_scale, jnp.isfinite(loss_total))
  metrics = step_metrics(new_state, loss_total, tokens, grad_norm, noise_terms)
  if dynamic_scale is not None:
    metrics["loss_scale"] = dynamic_scale.scale
  return new_state, metrics


def compile_train_step(layout, loss_fn: LossFn, tx: optax.GradientTransformation,
                       state_sharding: Any, virtual_shards: int, max_consecutive_skips: int = 0,
                       compute_dtype: Any = None) -> jax.stages.Wrapped:
  """(state, batch [A, b, ...]) -> (state, metrics) with the fixed-order sums, for every strategy:
  the state keeps its strategy's shardings (dp: replicated; ZeRO: split), the state donated."""
  mesh = layout.mesh
  # Offloaded optimizer state is refused by check_reduction; the tx runs as given.
  body = functools.partial(train_step, loss_fn=loss_fn, tx=tx, mesh=mesh,
                           virtual_shards=virtual_shards,
                           max_consecutive_skips=max_consecutive_skips, compute_dtype=compute_dtype)
  return jax.jit(body, in_shardings=(state_sharding, batch_sharding(mesh)),
                 out_shardings=(state_sharding, replicated(mesh)), donate_argnums=0,
                 compiler_options=compiler_options(mesh.devices.flat[0].platform))


def _device_eval(params, batch, *, loss_fn: LossFn, compute_dtype: Any, virtual_shards: int,
                 devices: int):
  """(loss_sum, count) of one device's V/N shards, summed over devices along the tree."""
  local = virtual_shards // devices
  flat = jax.tree.map(lambda x: x.reshape((local, -1) + x.shape[2:]), batch)
  cast = precision.cast_floating(params, compute_dtype)
  sums = tree_scan(lambda shard: checked_loss(loss_fn(cast, shard, None)), flat, local)
  return butterfly_sum(sums, DATA, devices)


def compile_eval_step(layout, loss_fn: LossFn, virtual_shards: int,
                      compute_dtype: Any = None) -> jax.stages.Wrapped:
  """(params, batch [1, b, ...]) -> {"loss_sum", "count"}, summed in the fixed order over
  `virtual_shards` shards of the b rows (b a multiple of it)."""
  mesh = layout.mesh
  devices = batch_size_of(mesh)
  sums = jax.shard_map(
      functools.partial(_device_eval, loss_fn=loss_fn, compute_dtype=compute_dtype,
                        virtual_shards=virtual_shards, devices=devices),
      mesh=mesh, in_specs=(P(), P(None, DATA)), out_specs=P(), check_vma=False)

  def body(params, batch):
    loss, count = sums(params, batch)
    return {"loss_sum": loss, "count": count}
  return jax.jit(body, out_shardings=NamedSharding(mesh, P()),
                 compiler_options=compiler_options(mesh.devices.flat[0].platform))
