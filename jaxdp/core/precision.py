"""Mixed precision: the compute dtype of each `config.precision`, and fp16's dynamic loss scale.

Parameters and optimizer state are always float32 (the master copy); only the model's
activations and matmuls run in the compute dtype. float16's narrow exponent makes small
gradients underflow, so fp16 multiplies the loss by a scale before differentiating and divides
the gradients by it after: the scale doubles after `period` overflow-free steps, and a step whose
gradients are not finite is skipped (parameters and optimizer state unchanged) and halves it.
The scale never falls below MIN_LOSS_SCALE (1): an overflow there, or a non-finite loss (the
forward pass, which no scale can help), is a non-finite step like in fp32 and bf16 and falls
under the run's nan_policy (see core.step.update_if_finite).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.struct
import jax
import jax.numpy as jnp

from jaxdp.core.choices import PRECISIONS  # noqa: F401  (precision's public list)

MIN_LOSS_SCALE = 1.0  # The floor of the dynamic scale: an overflow there cannot be halved away.
COMPUTE_DTYPES = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16}


def compute_dtype(precision: str) -> Any:
  """The activation/matmul dtype of `precision` ("fp32", "bf16" or "fp16"): a jnp dtype.

  Raises KeyError for any other name (config validation refuses those first).
  """
  return COMPUTE_DTYPES[precision]


@flax.struct.dataclass
class LossScale:
  """The loss scale and its bookkeeping; part of the train state, so checkpoints keep it."""
  scale: jax.Array  # float32 scalar the loss is multiplied by before differentiation.
  good_steps: jax.Array  # int32: finite steps since the scale last changed.
  period: int = flax.struct.field(pytree_node=False, default=0)  # 0: static scale, never skips.

  if TYPE_CHECKING:
    # flax.struct.dataclass attaches dataclasses.replace at run time; declared for the type checker.
    def replace(self, **changes: Any) -> LossScale:
      """A copy with the named fields changed (`dataclasses.replace`)."""

  @property
  def dynamic(self) -> bool:
    """Whether the scale adapts (fp16 with period > 0) rather than staying a static 1."""
    return self.period > 0


def initial_loss_scale(precision: str = "fp32", init: float = 2.0 ** 15, period: int = 0) -> LossScale:
  """fp16: a dynamic scale starting at `init`; fp32 and bf16: a static scale of 1 (a no-op)."""
  dynamic = precision == "fp16"
  return LossScale(scale=jnp.asarray(init if dynamic else 1.0, jnp.float32),
                   good_steps=jnp.zeros((), jnp.int32),
                   period=period if dynamic else 0)


def at_floor(loss_scale: LossScale) -> jax.Array:
  """True when the scale is at MIN_LOSS_SCALE, where halving it can no longer cure an overflow."""
  return loss_scale.scale <= MIN_LOSS_SCALE


def next_loss_scale(loss_scale: LossScale, finite: jax.Array) -> LossScale:
  """Halves the scale on overflow (never below MIN_LOSS_SCALE); doubles it after `period` good
  steps."""
  grow = finite & (loss_scale.good_steps + 1 >= loss_scale.period)
  scale = jnp.where(finite, jnp.where(grow, loss_scale.scale * 2, loss_scale.scale),
                    jnp.maximum(loss_scale.scale / 2, MIN_LOSS_SCALE))
  good = jnp.where(finite & ~grow, loss_scale.good_steps + 1, 0)
  return loss_scale.replace(scale=scale.astype(jnp.float32), good_steps=good.astype(jnp.int32))


def cast_floating(tree, dtype):
  """`tree` with its floating-point arrays cast to `dtype` (None: unchanged).

  The mixed-precision cast of the float32 master parameters to the compute dtype before the
  loss; integer and boolean leaves are left alone, and gradients flow back through the cast.
  """
  if dtype is None:
    return tree
  return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)
