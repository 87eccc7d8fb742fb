"""The training state: everything a step reads and writes, and everything a checkpoint holds.

The data position is not stored separately: it is derived from `step` (step * global batch
examples into the seeded stream), so restoring `step` restores the input exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdp.core.precision import LossScale, initial_loss_scale

# init_fn(rng) -> params: any pytree of float arrays (Flax Linen variables["params"], an NNX
# parameter State from nnx.split, or a plain dict), created from the PRNG key it is given.
InitFn = Callable[[jax.Array], Any]


@flax.struct.dataclass
class TrainState:
  """Everything one optimizer step reads and writes: a pytree, checkpointed whole.

  Where it lives is the strategy's choice (parallel/shardings.py): dp replicates it, the ZeRO
  stages (Rajbhandari et al. 2020) split `opt_state` (zero1, zero2) and also `params` (zero3)
  over the "data" mesh axis. `comm` holds per-device exchange state (error-feedback residuals,
  PowerSGD's Q, ...). Fields are updated functionally with `state.replace(...)`.
  """
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # Model parameters (float32 master copy).
  opt_state: Any  # Optimizer state (e.g. AdamW moments, schedule count).
  rng: jax.Array  # uint32[2] base key; step and example keys are folded in from it.
  # int32 scalars: updates dropped because the loss or gradients were not finite, in total and
  # in a row (see core.step.update_if_finite).
  skipped_steps: Any = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  consecutive_skips: Any = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  loss_scale: LossScale | None = None  # fp16's dynamic loss scale; a static 1 for fp32 and bf16.
  # Per-device communication state (jaxdp/parallel/exchange.py): leaves [num_devices, ...]
  # sharded over "data"; empty for the dense default.
  comm: Any = flax.struct.field(default_factory=dict)
  # spike_policy="skip" only (None otherwise: no arrays): the running "mean", "var" (float32)
  # and "count" (int32) of the train loss that judge spikes (core.step.loss_spike).
  loss_stats: Any = None

  if TYPE_CHECKING:
    # flax.struct.dataclass attaches dataclasses.replace at run time; declared for the type checker.
    def replace(self, **changes: Any) -> TrainState:
      """A copy with the named fields changed (`dataclasses.replace`)."""


def init_state(init_fn: InitFn, tx: optax.GradientTransformation, seed: int,
               loss_scale: LossScale | None = None) -> TrainState:
  """A fresh state from `init_fn(rng) -> params`; pure, so it can be jitted into any sharding.

  The seed's key is split in two: the first initialises the parameters, the second is the base
  of every step's and example's key. `loss_scale` defaults to a static scale of 1, so every
  precision has the same state structure.
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  params = init_fn(init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_key, loss_scale=initial_loss_scale() if loss_scale is None else loss_scale)
