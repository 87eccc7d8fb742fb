"""The pure train and eval steps, for any model.

A model enters the step only through its loss function, the contract of the whole library:

  loss_fn(params, batch, rng) -> (loss_sum, weight_sum)

both float32 scalars, *sums* over the examples (or tokens) of `batch`, a dict of arrays with a
leading batch dimension [b, ...]. `rng` is a PRNG key for the step (dropout and other noise) or
None for evaluation (no randomness). Sums, not means: every split of the same examples over
micro-batches, devices and hosts then gives the same mean, taken once after the single
all-reduce. Randomness must be keyed by the example, not the device: `example_keys(rng, batch)`
gives one key per row from the row's global index `batch["ids"]`.

`train_step` is written once, for one device's share of the batch. With `axis_name` set it is
mapped over devices (shard_map or pmap) and averages with one `lax.pmean`; with `axis_name=None`
it is the global step that `jax.jit` partitions over a mesh, and the single-device reference.
Batches are dicts of arrays laid out [A, b, ...]: A micro-batches (grad_accum_steps) of b rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import jax
from jax import lax
import jax.numpy as jnp
import optax

from jaxdp.core import noise, precision
from jaxdp.core.state import TrainState
from jaxdp.errors import JaxdpError

Batch = dict[str, jax.Array]


class LossContractError(JaxdpError):
  """A loss_fn that does not return (loss_sum, weight_sum) scalars (raised while tracing)."""


class LossFn(Protocol):
  """(params, micro-batch [b, ...], rng or None) -> (loss_sum, weight_sum), float32 scalars."""

  def __call__(self, params: Any, batch: Batch, rng: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """Sums (not means) over the rows of `batch`; `rng` is None during evaluation."""
    ...


# Exchanges the per-device (grad_sum, loss_sum, weight_sum) for the gradients to apply:
# (grad_sum, loss_sum, weight_sum, comm_state, rng) -> (grads, loss_sum, weight_sum, comm_state),
# loss and weight now global means. jaxdp.parallel provides one per communication method.
GradientExchange = Callable[..., tuple[Any, jax.Array, jax.Array, Any]]


def example_keys(rng: jax.Array, batch: Batch) -> jax.Array:
  """One PRNG key per row of `batch` [b, ...], folded from the row's global index `batch["ids"]`.

  The key of an example depends on the step and on which example it is, never on the device or
  micro-batch that computes it, so N devices draw the same dropout masks as one.
  """
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(batch["ids"])


def checked_loss(out) -> tuple[jax.Array, jax.Array]:
  """loss_fn's output as two float32 scalars, or a LossContractError naming what it returned."""
  if not isinstance(out, (tuple, list)) or len(out) != 2:
    raise LossContractError(
        f"loss_fn must return (loss_sum, weight_sum), two scalars; it returned "
        f"{type(out).__name__}{'' if not hasattr(out, 'shape') else ' of shape ' + str(out.shape)}")
  loss, count = (jnp.asarray(x, jnp.float32) for x in out)
  if loss.shape or count.shape:
    raise LossContractError(
        f"loss_fn must return (loss_sum, weight_sum) as scalars summed over the batch's rows; "
        f"got shapes {loss.shape} and {count.shape}")
  return loss, count


def accumulate_gradients(loss_fn: LossFn, params, batch: Batch, rng: jax.Array | None,
                         loss_scale: jax.Array | None = None, compute_dtype: Any = None,
                         micro_sq: bool = False, groups: int = 1,
                         sum_groups: Callable[[Any], Any] | None = None, group_sq: bool = False):
  """(grad_sum, loss_sum, weight_sum) over the A micro-batches of `batch` [A, b, ...], locally.

  With `compute_dtype` the floating parameters are cast to it before the loss (mixed precision:
  float32 master weights, low-precision compute; the gradient flows back to float32 through
  the cast). With `loss_scale` (fp16) the backward pass differentiates the micro-batch's mean
  loss times the scale, so float16 sees the usual gradient magnitudes whatever the batch size;
  the float32 gradients are then turned back into the unscaled gradient of the sum.
  With `micro_sq` a fourth value is returned: the sum over micro-batches of the squared norm of
  each one's mean gradient (for the gradient noise scale, jaxdp.core.noise).

  With `groups` > 1 (and A = 1) the b rows are split into `groups` equal groups of consecutive
  rows, differentiated side by side under `jax.vmap` and summed, and the fourth value sums each
  group's squared mean-gradient norm. Under jit over a mesh whose data axis has `groups` devices
  each group is one device's rows, so each device's gradient (which the SPMD program computes
  anyway before its reduce-scatter or all-reduce) becomes a value the step can measure.
  `sum_groups` maps the groups' gradients [groups, ...] to their sum (default: a sum over the
  leading axis; jaxdp.parallel passes a hierarchical one on a hybrid mesh). With `group_sq` (and
  `micro_sq`, `groups` > 1) a fifth value: each group's squared mean-gradient norm [groups],
  unsummed (per-device gradient norms, runtime/health.py). Raises ValueError if b is not a
  multiple of `groups` or A > 1.
  """
  def scaled_loss(params, micro_batch):
    loss, count = checked_loss(loss_fn(precision.cast_floating(params, compute_dtype), micro_batch,
                                       rng))
    if loss_scale is None:
      return loss, (loss, count)
    return loss * (loss_scale / jnp.maximum(count, 1.0)), (loss, count)
  grad_fn = jax.grad(scaled_loss, has_aux=True)

  def micro_grads(micro_batch):
    grads, (loss, count) = grad_fn(params, micro_batch)
    if loss_scale is not None:
      grads = jax.tree.map(lambda g: g * (jnp.maximum(count, 1.0) / loss_scale), grads)
    if micro_sq:
      return grads, loss, count, optax.tree.norm(grads, squared=True) / jnp.maximum(count, 1.0) ** 2
    return grads, loss, count

  def micro_step(carry, micro_batch):
    out = micro_grads(micro_batch)
    return (jax.tree.map(jnp.add, carry[0], out[0]),) + tuple(
        a + b for a, b in zip(carry[1:], out[1:])), None

  if groups > 1:
    micro, rows = jax.tree.leaves(batch)[0].shape[:2]
    if micro != 1 or rows % groups:
      raise ValueError(f"groups={groups} needs one micro-batch whose rows ({rows}) it divides; "
                       f"got {micro} micro-batches")
    # Each group gets the step's rng, as each device does under dp, so the two programs agree.
    split = jax.tree.map(lambda x: x[0].reshape((groups, rows // groups) + x.shape[2:]), batch)
    per_group = jax.vmap(micro_grads)(split)
    sum_groups = sum_groups or (lambda tree: jax.tree.map(lambda g: jnp.sum(g, axis=0), tree))
    summed = (sum_groups(per_group[0]),) + tuple(jnp.sum(x) for x in per_group[1:])
    return summed + (per_group[3],) if group_sq and micro_sq else summed

  # The first micro-batch seeds the carry (rather than zeros), so the carry already has the
  # per-device type that shard_map requires of a scan over device-varying values.
  carry = micro_grads(jax.tree.map(lambda x: x[0], batch))
  if jax.tree.leaves(batch)[0].shape[0] > 1:
    carry, _ = lax.scan(micro_step, carry, jax.tree.map(lambda x: x[1:], batch))
  return carry


def update_if_finite(state: TrainState, finite: jax.Array, update: Callable[[], tuple],
                     max_consecutive_skips: int = 0,
                     loss_scale: precision.LossScale | None = None,
                     loss_finite: jax.Array | None = None,
                     spiked: jax.Array | None = None) -> TrainState:
  """`state` advanced by `update()` if `finite`; else the update is dropped and the skip counted.

  `update()` returns (params, opt_state, comm) and runs under `lax.cond`, so a kept update is
  written once and a dropped one costs nothing, instead of a select over every array of the state.
  A dropped update still advances `step`, so the next step reads the next batch, unless it is
  more than `max_consecutive_skips` in a row: then nothing changes but `consecutive_skips`
  (now above the limit), and every later step leaves the state alone, so the loop can notice
  at its next sync, halt and save the last good state (no state is lost to buffer donation).

  With fp16's dynamic `loss_scale`, an overflow is expected while the scale can still fall: the
  scale halves, the step advances, and the skip is not counted in `consecutive_skips`. An
  overflow while the scale is already at its floor (precision.MIN_LOSS_SCALE: halving cannot
  help any more), or a non-finite loss (`loss_finite` False: the forward pass, which the scale
  does not touch), is counted exactly like a non-finite step of fp32 or bf16.

  `spiked` (spike_policy="skip", `loss_spike`): a finite step whose loss is a spike is dropped
  too and counted in `skipped_steps`, but not in `consecutive_skips` (which counts non-finite
  steps for nan_policy).
  """
  if loss_scale is None:
    counted = ~finite
  else:
    hopeless = precision.at_floor(loss_scale)
    if loss_finite is not None:
      hopeless = hopeless | ~loss_finite
    counted = ~finite & hopeless
  halted = state.consecutive_skips > max_consecutive_skips
  consecutive = jnp.where(finite, 0, state.consecutive_skips + counted.astype(jnp.int32))
  over = consecutive > max_consecutive_skips  # Only ever by a counted skip of this step.
  kept = finite if spiked is None else finite & ~spiked
  apply = kept & ~halted
  frozen = halted | over
  step = jnp.where(frozen, state.step, state.step + 1)
  skipped = jnp.where(frozen | kept, state.skipped_steps, state.skipped_steps + 1)
  consecutive = jnp.where(halted, state.consecutive_skips, consecutive)
  params, opt_state, comm = lax.cond(apply, update, lambda: (state.params, state.opt_state, state.comm))
  new_state = state.replace(step=step, params=params, opt_state=opt_state, comm=comm,
                            skipped_steps=skipped, consecutive_skips=consecutive)
  if loss_scale is not None:
    # A frozen state keeps its scale too: it is the last good state, to be saved as it was.
    scaled = precision.next_loss_scale(loss_scale, finite)
    new_state = new_state.replace(loss_scale=jax.tree.map(
        lambda old, new: jnp.where(frozen, old, new), loss_scale, scaled))
  return new_state


def initial_loss_stats() -> dict[str, jax.Array]:
  """The loss statistics of a fresh spike_policy="skip" state (TrainState.loss_stats)."""
  return {"mean": jnp.zeros((), jnp.float32), "var": jnp.zeros((), jnp.float32),
          "count": jnp.zeros((), jnp.int32)}


def loss_spike(stats: dict[str, jax.Array], loss: jax.Array, sigmas: float,
               window: int) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(whether the finite `loss` is a spike, the statistics with it folded in unless it is one).

  A spike: once `window` losses were seen, a loss above mean + `sigmas` x std. The mean and
  variance are exponentially weighted over about `window` steps (West 1979; the first `window`
  losses weigh equally), the same rule as runtime.spikes.LossStats on the host, in float32
  here. Non-finite losses are left to nan_policy and not folded in.
  """
  count, mean, var = stats["count"], stats["mean"], stats["var"]
  finite = jnp.isfinite(loss)
  spiked = finite & (count >= window) & (loss > mean + sigmas * jnp.sqrt(var))
  alpha = 1.0 / jnp.minimum(count + 1, window).astype(jnp.float32)
  diff = loss - mean
  folded = {"mean": mean + alpha * diff, "var": (1.0 - alpha) * (var + alpha * diff * diff),
            "count": count + 1}
  keep = finite & ~spiked
  return spiked, jax.tree.map(lambda new, old: jnp.where(keep, new, old), folded, stats)


def applied_updates(state: TrainState) -> jax.Array:
  """How many updates the optimizer has applied: the `count` of the optax state (what an optax
  schedule reads), which advances only when `tx.update` runs, never on a dropped step.

  Without a count (an optimizer with none, or local SGD, whose inner optimizers live in
  `state.comm` and all take the same updates) it is the steps taken minus the steps skipped,
  which `update_if_finite` keeps equal to it.
  """
  if isinstance(state.comm, dict) and "opt_state" in state.comm:
    return state.step - state.skipped_steps
  found = optax.tree_utils.tree_get_all_with_path(state.opt_state, "count")
  if not found:
    return state.step - state.skipped_steps
  # Every count of a chain advances together; prefer the schedule's own.
  counts = [(jax.tree_util.keystr(path), value) for path, value in found]
  return next((v for p, v in counts if "ScaleBySchedule" in p), counts[-1][1])


def step_metrics(state: TrainState, loss_sum: jax.Array, weight_sum: jax.Array,
                 grad_norm: jax.Array, noise_terms: tuple | None = None,
                 device_sq: jax.Array | None = None) -> dict[str, jax.Array]:
  """The scalars every train step reports (the same keys for every strategy and method).

  "gns_g2", "gns_trace": this step's estimates of |G|^2 and tr(Sigma) in the loss's weight units
  (jaxdp.core.noise); NaN where the step has no second batch size to compare.
  "device_grad_norms" (only where the step forms each device's gradient before summing them:
  the dense all-reduce, and jit's per-device groups): float32 [data devices], the norm of each
  device's mean gradient before the all-reduce, in the data axis's device order.
  """
  g2, trace = noise_terms if noise_terms is not None else (jnp.float32(jnp.nan),) * 2
  metrics = {"train_loss": loss_sum / weight_sum, "grad_norm": grad_norm,
             "skipped_steps": state.skipped_steps, "consecutive_skips": state.consecutive_skips,
             "gns_g2": g2, "gns_trace": trace}
  if state.loss_scale is not None and state.loss_scale.dynamic:
    metrics["loss_scale"] = state.loss_scale.scale
  if device_sq is not None:
    metrics["device_grad_norms"] = jnp.sqrt(device_sq)
  return metrics


def train_step(state: TrainState, batch: Batch, *, loss_fn: LossFn,
               tx: optax.GradientTransformation, axis_name: str | tuple[str, ...] | None = None,
               exchange: GradientExchange | None = None, max_consecutive_skips: int = 0,
               compute_dtype: Any = None, noise_groups: int = 1,
               sum_groups: Callable[[Any], Any] | None = None,
               spike: tuple[float, int] | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. Returns the new state and scalar metrics (identical on every device).

  `noise_groups`: for the global step under jit (`axis_name` None) over a mesh with that many
  data-parallel devices: with a single micro-batch, the gradient is computed per device's rows
  (`accumulate_gradients`'s groups) so the gradient noise scale compares each device's batch
  with the global one, as under dp's all-reduce; `sum_groups` sums their gradients
  (`accumulate_gradients`). Ignored with accumulation (the micro-batches serve) or under
  `axis_name`.

  `exchange` (with `axis_name`) replaces the single pmean by another gradient exchange (ring,
  compression, staleness: jaxdp.parallel.exchange); None keeps the single pmean. A non-finite
  loss or gradient drops the update (see `update_if_finite`); under fp16 the loss scale handles
  overflows. `spike` (sigmas, window), with a state that has `loss_stats`: a loss spike
  (`loss_spike`, on the global mean loss, so every device agrees) drops the update too
  (spike_policy="skip"); metrics gain "loss_spike" (1 for a dropped spike, else 0).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  dynamic_scale = state.loss_scale if state.loss_scale is not None and state.loss_scale.dynamic else None
  scaling = dynamic_scale is not None  # fp16 only.
  scale = dynamic_scale.scale if dynamic_scale is not None else None
  params = state.params
  if axis_name is not None:
    # Differentiate a per-device view of the replicated parameters: otherwise shard_map's
    # transpose of the implicit replicated->varying cast inserts a psum into every micro-batch's
    # backward pass, instead of the single all-reduce below.
    params = lax.pcast(params, axis_name, to="varying")
  # The gradient noise scale's small batch: each device's share under the dense all-reduce,
  # else the accumulation's micro-batches, else each device's rows of jit's global step (none:
  # no estimate).
  by_device = axis_name is not None and exchange is None and lax.axis_size(axis_name) > 1
  micro = jax.tree.leaves(batch)[0].shape[0]
  groups = noise_groups if axis_name is None and micro == 1 else 1
  by_micro = not by_device and (micro > 1 or groups > 1)
  grad_sum, loss_total, tokens, *micro_sq = accumulate_gradients(
      loss_fn, params, batch, rng, scale, compute_dtype, micro_sq=by_micro, groups=groups,
      sum_groups=sum_groups, group_sq=groups > 1)
  # Each device's squared mean-gradient norm [devices] (per-device health): jit's groups have it.
  device_sq = micro_sq.pop() if groups > 1 and by_micro else None
  state_comm = state.comm
  noise_terms = None
  if by_micro:  # Micro-batch (or device group) mean gradients against their (local) sum.
    parts = micro * groups
    big_sq = optax.tree.norm(grad_sum, squared=True) / jnp.maximum(tokens, 1.0) ** 2
    noise_terms = noise.noise_terms(micro_sq[0] / parts, big_sq, tokens / parts, tokens)
    if axis_name is not None:
      noise_terms = lax.pmean(noise_terms, axis_name)
  if exchange is not None:
    grads, loss_total, tokens, state_comm = exchange(grad_sum, loss_total, tokens, state.comm, rng)
  else:
    if axis_name is not None:
      # One all-reduce for the whole step: gradient sums, loss sum and token count together
      # (and each device's squared gradient norm, 4 bytes, for the noise scale). The mean of
      # sums divided by the mean of counts is the global token-weighted mean.
      local_sq = (optax.tree.norm(grad_sum, squared=True) / jnp.maximum(tokens, 1.0) ** 2
                  if by_device else jnp.float32(0))
      # Every device's local_sq in the same all-reduce (one float each, zero but at its own
      # index): the per-device gradient norms of the health report, without another collective.
      spread = ((jnp.zeros((lax.axis_size(axis_name),), jnp.float32)
                 .at[lax.axis_index(axis_name)].set(local_sq),) if by_device else ())
      grad_sum, loss_total, tokens, local_sq, *spread = lax.pmean(
          (grad_sum, loss_total, tokens, local_sq, *spread), axis_name)
      if spread:
        device_sq = spread[0] * lax.axis_size(axis_name)
    grads = jax.tree.map(lambda g: g / tokens, grad_sum)
  grad_norm = optax.tree.norm(grads)
  if by_device:  # Mean token count per device: b; the global batch: N b.
    noise_terms = noise.noise_terms(local_sq, grad_norm ** 2, tokens,
                                    tokens * lax.axis_size(axis_name))
  # The norm is finite exactly when every gradient is (or it overflows float32, which clipping
  # could not use either): one reduction instead of a pass over every leaf. fp16 overflows of the
  # gradients are expected and handled by the loss scale (see update_if_finite).
  finite = jnp.isfinite(grad_norm) if scaling else jnp.isfinite(loss_total) & jnp.isfinite(grad_norm)

  def optimizer_update():
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), opt_state, state_comm

  spiked, loss_stats = (loss_spike(state.loss_stats, loss_total / tokens, *spike)
                        if spike is not None and state.loss_stats is not None else (None, None))
  new_state = update_if_finite(state, finite, optimizer_update, max_consecutive_skips,
                               dynamic_scale, jnp.isfinite(loss_total), spiked)
  if spiked is not None:  # A frozen state (nan_policy's halt) keeps its statistics too.
    new_state = new_state.replace(loss_stats=jax.tree.map(
        lambda new, old: jnp.where(new_state.step == state.step, old, new), loss_stats,
        state.loss_stats))
  metrics = step_metrics(new_state, loss_total, tokens, grad_norm, noise_terms, device_sq)
  if spiked is not None:
    metrics["loss_spike"] = spiked.astype(jnp.int32)
  if dynamic_scale is not None:
    metrics["loss_scale"] = dynamic_scale.scale  # The scale this step ran with.
  return new_state, metrics


def eval_step(params, batch: Batch, *, loss_fn: LossFn, axis_name: str | tuple[str, ...] | None = None,
              compute_dtype: Any = None) -> dict[str, jax.Array]:
  """{"loss_sum", "count"} over a batch [A, b, ...] (no randomness); the caller divides after
  summing batches."""
  params = precision.cast_floating(params, compute_dtype)
  flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), batch)
  loss, count = checked_loss(loss_fn(params, flat, None))
  if axis_name is not None:
    loss, count = lax.psum((loss, count), axis_name)
  return {"loss_sum": loss, "count": count}
