"""The training state: everything a step reads and writes, and everything a checkpoint holds.

The data position is not stored separately: it is derived from `step` (step * global batch
examples into the seeded stream), so restoring `step` restores the input exactly.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdp.model import GPT
from jaxdp.precision import LossScale, initial_loss_scale


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: optimizer steps taken.
  params: Any  # Model parameters (float32 master copy).
  opt_state: Any  # Optimizer state (AdamW moments, schedule count).
  rng: jax.Array  # uint32[2] base key; step and example keys are folded in from it.
  # int32 scalars: updates dropped because the loss or gradients were not finite, in total and
  # in a row (see steps.update_if_finite). Defaults keep existing constructors working.
  skipped_steps: Any = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  consecutive_skips: Any = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.int32))
  loss_scale: LossScale | None = None  # fp16's dynamic loss scale; a static 1 for fp32 and bf16.
  # Per-device communication state (jaxdp/sync.py): leaves [num_devices, ...] sharded over
  # "data"; empty for the dense default.
  comm: Any = flax.struct.field(default_factory=dict)


def init_state(model: GPT, tx: optax.GradientTransformation, seed: int,
               loss_scale: LossScale | None = None) -> TrainState:
  """A fresh state; pure, so it can be jitted straight into any sharding.

  `loss_scale` defaults to a static scale of 1, so every precision has the same state structure.
  """
  init_key, train_key = jax.random.split(jax.random.PRNGKey(seed))
  tokens = jnp.zeros((1, model.cfg.seq_len), jnp.int32)
  params = model.init(init_key, tokens)["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=train_key, loss_scale=initial_loss_scale() if loss_scale is None else loss_scale)
