"""The optimizer of a run as one optax chain: clipping, the update rule, its schedule and
decoupled weight decay, built from a typed `OptimizerConfig` (the ConfigDict stays at the edge:
jaxdp.lm.spec.optimizer_config turns it into this).

Every rule has the same shape: a direction d from the gradients, then decoupled weight decay on
the parameters the decay mask selects, then the learning rate of the schedule:

  p <- p - lr(i) * (d + weight_decay * p)      (decay only where decay_mask(params) is True)

which is AdamW's form as optax and PyTorch implement it (Loshchilov & Hutter 2019, "Decoupled
Weight Decay Regularization", with the decay multiplied by the scheduled rate), applied to every
rule so that `weight_decay` means the same thing whichever optimizer is chosen.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxdp.core.tree import path_names
from jaxdp.errors import JaxdpError

# optax ships Muon in optax.contrib (0.2.5 on); a later release may promote it to optax.muon.
_CONTRIB = getattr(optax, "contrib", None)
# Any: optax's own callables when this version has them, else None (see OPTIMIZERS).
_MUON: Any = getattr(optax, "muon", None) or getattr(_CONTRIB, "muon", None)
_MUON_DIMS: Any = (getattr(optax, "MuonDimensionNumbers", None)
                   or getattr(_CONTRIB, "MuonDimensionNumbers", None))
OPTIMIZERS = ("adamw", "sgd", "lion", "adafactor") + (("muon",) if _MUON is not None else ())
SCHEDULES = ("cosine", "linear", "constant", "wsd")

# The default decay rule, by role (see decay_mask).
NO_DECAY_NAMES = ("bias", "scale")
# Embeddings and output heads are matrices, but Muon's orthogonalised step is meant for hidden
# layers' weights; Jordan's modded-nanogpt and Liu et al. 2025 give them to the Adam branch.
EMBEDDING_NAMES = ("embedding", "wte", "wpe", "lm_head")

# decay_mask(params) -> a pytree of bools shaped like params: True where weight decay applies.
DecayMask = Callable[[Any], Any]


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """What make_optimizer builds. Steps count applied updates (0-based); rates are per update.

  Raises JaxdpError on construction for an unknown name or schedule or a value out of range.
  """
  name: str = "adamw"  # Update rule, one of OPTIMIZERS.
  learning_rate: float = 3e-3  # Peak learning rate, reached at the last warmup update.
  schedule: str = "cosine"  # Shape after warmup, one of SCHEDULES.
  warmup_steps: int = 0  # Updates of linear warmup; update i (0-based) uses peak * (i + 1) / warmup_steps.
  decay_steps: int = 1000  # Update index at which the rate reaches its minimum (then flat).
  decay_fraction: float = 0.2  # wsd: the last fraction of decay_steps decays linearly to the minimum.
  min_lr_ratio: float = 0.1  # Final learning rate as a fraction of the peak.
  weight_decay: float = 0.0  # Decoupled weight decay coefficient (multiplied by the scheduled rate).
  decay_exclude: tuple[str, ...] = ()  # Path-name substrings never decayed, beyond the default rule.
  b1: float = 0.9  # First-moment decay: adamw, lion, and muon's Adam branch.
  b2: float = 0.99  # Second-moment decay: adamw, lion, and muon's Adam branch.
  momentum: float = 0.9  # sgd: heavy-ball momentum; 0 is plain SGD.
  nesterov: bool = False  # sgd: Nesterov momentum.
  grad_clip: float = 0.0  # Global-norm clipping; 0 disables.
  # adamw only: after this many updates the second moment is frozen and the update's input is
  # the (exchanged) first moment itself (frozen_variance_adam); 0 is plain AdamW.
  freeze_variance_after: int = 0

  def __post_init__(self):
    # The ranges jaxdp.lm.config.validate_optimizer checks, for users who build this directly:
    # a negative grad_clip, say, must not silently mean "no clipping".
    muon = "" if _MUON is not None else f" (optax {optax.__version__} has no Muon)"
    for field, ok, need in (
        ("name", self.name in OPTIMIZERS, f"one of {', '.join(OPTIMIZERS)}{muon}"),
        ("schedule", self.schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        ("learning_rate", self.learning_rate > 0, "> 0"),
        ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
        ("decay_steps", self.decay_steps >= 0, ">= 0"),
        ("decay_fraction", 0 < self.decay_fraction <= 1, "in (0, 1]"),
        ("min_lr_ratio", 0 <= self.min_lr_ratio <= 1, "in [0, 1]"),
        ("weight_decay", self.weight_decay >= 0, ">= 0"),
        ("b1", 0 <= self.b1 < 1, "in [0, 1)"),
        ("b2", 0 <= self.b2 < 1, "in [0, 1)"),
        ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
        ("grad_clip", self.grad_clip >= 0, ">= 0 (0 disables clipping)"),
        ("freeze_variance_after", self.freeze_variance_after >= 0 and
         (self.freeze_variance_after == 0 or self.name == "adamw"), ">= 0, and 0 unless name='adamw'")):
      if not ok:
        raise JaxdpError(f"OptimizerConfig.{field}={getattr(self, field)!r} must be {need}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """The learning rate of update index i (0-based count of applied updates), as a jnp function.

  Warmup: update i < warmup_steps uses peak * (i + 1) / warmup_steps, so the first update
  already moves the parameters (optax's warmup schedules start at 0, which wastes it) and the
  peak is reached at update warmup_steps - 1; warmup_steps = 0 means no warmup. Then, with
  min = min_lr_ratio * peak and t the fraction of the decay phase done (clipped to [0, 1]):

    cosine:   min + (peak - min) * (1 + cos(pi * t)) / 2, t = (i - warmup) / (decay_steps - warmup)
              (the same values as optax.warmup_cosine_decay_schedule after its warmup)
    linear:   peak - (peak - min) * t, t as for cosine
    constant: peak (decay_steps and min_lr_ratio unused)
    wsd:      warmup-stable-decay (Hu et al. 2024, "MiniCPM"): peak until the last
              decay_fraction of decay_steps, then linear to min at decay_steps:
              t = (i - start) / (decay_steps - start), start = max(warmup, (1 - decay_fraction) * decay_steps)

  From update decay_steps on the rate stays at min (constant: at peak). A horizon that ends
  inside the warmup (decay_steps <= warmup_steps, e.g. a short run) is allowed: the warmup runs
  as given and the rate is min after it.

  Works on a Python int or a traced int32 (under jit).
  """
  peak = float(cfg.learning_rate)
  alpha = cfg.min_lr_ratio
  warmup = max(int(cfg.warmup_steps), 0)
  horizon = float(cfg.decay_steps)
  start = float(warmup)
  if cfg.schedule == "wsd":
    start = max(start, horizon - cfg.decay_fraction * horizon)
  length = horizon - start

  def schedule(count):
    i = jnp.asarray(count, jnp.float32)
    warm = peak * (i + 1.0) / max(warmup, 1)
    if cfg.schedule == "constant":
      after = jnp.full_like(i, peak)
    else:
      # length <= 0: the horizon ended before the decay could start, so it is over.
      t = jnp.clip((i - start) / length, 0.0, 1.0) if length > 0 else jnp.ones_like(i)
      shape = 0.5 * (1.0 + jnp.cos(math.pi * t)) if cfg.schedule == "cosine" else 1.0 - t
      # optax's cosine_decay_schedule form, so the default's values stay what they were.
      after = peak * ((1.0 - alpha) * shape + alpha)
    return jnp.where(i < warmup, warm, after)

  return schedule


def _path_names(path: tuple) -> list[str]:
  """Lower-case names of a key path, without the trailing "value" of an NNX Variable."""
  names = [name.lower() for name in path_names(path)]
  return names[:-1] if len(names) > 1 and names[-1] == "value" else names


def _is_norm(name: str) -> bool:
  # LayerNorm_0, RMSNorm, attn_norm, norm; GPT-2's ln_1/ln1/ln_f.
  return "norm" in name or name.startswith("ln")


def decay_mask(params: Any, exclude: tuple[str, ...] = ()) -> Any:
  """Which parameters weight decay applies to, by their role as read from their path.

  Not decayed: a leaf named "bias" or "scale" (shifts and gains, whatever their rank: GPT's qkv
  bias is [3, H, K]); anything inside a normalisation module (a path name containing "norm" or
  starting with "ln": LayerNorm_0, attn_norm, ln_f, ...); a path with a name containing one of
  `exclude` (case-insensitive substrings); and, for names that say nothing, scalars and vectors
  (a learned gain or temperature). Decayed: the remaining parameters of rank >= 2, i.e. weight
  matrices and embeddings (kernel, embedding, wte, wpe, wq..wo, w_gate/w_up/w_down, lm_head),
  as in GPT-2/3 and Llama training recipes.

  Args:
    params: a pytree of arrays (Flax Linen params, a plain dict, or an NNX State whose leaf
      paths end in "value"); abstract arrays (jax.ShapeDtypeStruct) work too.
    exclude: extra path-name substrings that are never decayed, e.g. ("wpe",).
  Returns:
    A pytree of Python bools with the structure of `params`.
  """
  exclude = tuple(e.lower() for e in exclude)

  def decayed(path, x) -> bool:
    names = _path_names(path)
    if names and names[-1] in NO_DECAY_NAMES:
      return False
    if any(_is_norm(n) or any(e in n for e in exclude) for n in names):
      return False
    return len(x.shape) >= 2

  return jax.tree_util.tree_map_with_path(decayed, params)


_default_mask = decay_mask  # make_optimizer's `decay_mask` argument shadows the name.


def _muon_dims(params: Any) -> Any:
  """Muon's dimension numbers: optax's default [in, out] for decayed 2-D matrices other than
  embeddings and heads; None (the Adam branch) for everything else.

  Higher-rank kernels (the built-in models' attention kernels [D, 3, H, K], [H, K, D]) would
  need their model's input/output axes, which the core does not know, so they take the Adam
  branch, as under optax's default rule. A kernel stored [out, in] (the built-in models'
  Linear) gets the same orthogonalised direction, but Muon's shape scale
  sqrt(max(1, fan_out / fan_in)) reads its fans swapped.
  """
  mask = decay_mask(params)
  dims = _MUON_DIMS()

  def choose(path, x, decayed):
    names = _path_names(path)
    matrix = len(x.shape) == 2 and decayed and not any(n in EMBEDDING_NAMES for n in names)
    return dims if matrix else None

  return jax.tree_util.tree_map_with_path(choose, params, mask)


def _decay(cfg: OptimizerConfig, mask: DecayMask) -> optax.GradientTransformation:
  return optax.add_decayed_weights(cfg.weight_decay, mask) if cfg.weight_decay > 0 else optax.identity()


def frozen_variance_adam(b1: float, b2: float, freeze_after: int, grad_clip: float = 0.0,
                         eps: float = 1e-8) -> optax.GradientTransformation:
  """Adam whose second moment freezes after `freeze_after` updates, for compressed exchanges
  of the first moment (1-bit Adam, Tang et al. 2021; 0/1 Adam, Lu et al. 2022).

  Updates 0 .. freeze_after - 1 are exactly chain(clip_by_global_norm(grad_clip) if > 0,
  scale_by_adam(b1, b2, eps)) on the (averaged) gradient: the variance is estimated densely.
  From update freeze_after on, the input is not a gradient but the first moment m itself,
  already formed and averaged by the gradient exchange (jaxdp.parallel.exchange, which
  compresses each device's b1 m + (1 - b1) g with error feedback), and the direction is

    m / (1 - b1^t) / (sqrt(nu / (1 - b2^freeze_after)) + eps)      (t: 1-based update count)

  with nu as it was at the freeze (its bias correction frozen too). The update is then linear
  in what was exchanged, which is what lets error feedback compensate the compression.
  Clipping does not apply after the freeze (the input is a momentum; see local_grad_clip).

  State: optax's ScaleByAdamState(count, mu, nu), so `count` is the applied updates as for
  AdamW; mu holds the last received momentum after the freeze.
  """
  adam = optax.scale_by_adam(b1, b2, eps)
  clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else None

  def update(updates, state, params=None):
    def dense():
      g = clip.update(updates, clip.init(updates))[0] if clip is not None else updates
      return adam.update(g, state, params)

    def frozen():
      count = optax.safe_increment(state.count)
      mu_hat = optax.tree.bias_correction(updates, b1, count)
      nu_hat = optax.tree.bias_correction(state.nu, b2, jnp.int32(max(freeze_after, 1)))
      direction = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
      return direction, state._replace(count=count, mu=updates)

    return jax.lax.cond(state.count < freeze_after, dense, frozen)

  return optax.GradientTransformation(adam.init, update)


def make_optimizer(cfg: OptimizerConfig, decay_mask: DecayMask | None = None) -> optax.GradientTransformation:
  """chain(clip_by_global_norm if grad_clip > 0, the rule of cfg.name with its schedule and
  decoupled weight decay), as an optax GradientTransformation.

  The rules (the schedule scales each; optax's defaults where not stated):
    adamw: optax.adamw(b1, b2), Loshchilov & Hutter 2019 -- unchanged from earlier versions,
      so its state (and checkpoints) keep their structure.
    sgd: momentum (optionally Nesterov) SGD; decay added after the momentum, so decoupled.
    lion: optax.lion(b1, b2), Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms";
      its sign update is larger than Adam's, so it wants a 3-10x smaller learning rate.
    adafactor: optax.adafactor, Shazeer & Stern 2018 (factored second moments, update clipping,
      relative step size: the update is scaled by the parameter's RMS); b1, b2 unused.
    muon: optax.contrib.muon (Jordan 2024; momentum 0.95, Nesterov): orthogonalised momentum for
      hidden 2-D matrices, and Adam (b1, b2) at the same rate for every other parameter
      (embeddings, head, vectors, and higher-rank kernels: see _muon_dims). Only where the
      installed optax has it.

  Args:
    cfg: the optimizer's settings.
    decay_mask: params -> pytree of bools, True where weight decay applies; None uses
      `decay_mask(params, cfg.decay_exclude)` of this module.
  An OptimizerConfig with an unknown name or schedule, or a value out of range, cannot be built
  (JaxdpError from its constructor), so this raises nothing of its own.
  """
  schedule = learning_rate_schedule(cfg)
  mask = decay_mask if decay_mask is not None else (lambda p: _default_mask(p, cfg.decay_exclude))
  if cfg.name == "adamw" and cfg.freeze_variance_after > 0:
    # Clipping moves inside: it applies to gradients (before the freeze), never to momenta.
    return optax.chain(frozen_variance_adam(cfg.b1, cfg.b2, cfg.freeze_variance_after,
                                            cfg.grad_clip),
                       _decay(cfg, mask), optax.scale_by_learning_rate(schedule))
  if cfg.name == "adamw":
    rule = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "lion":
    rule = optax.lion(schedule, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, mask=mask)
  elif cfg.name == "sgd":
    momentum = optax.trace(cfg.momentum, cfg.nesterov) if cfg.momentum > 0 else optax.identity()
    rule = optax.chain(momentum, _decay(cfg, mask), optax.scale_by_learning_rate(schedule))
  else:
    # optax's adafactor (learning_rate=None) and muon (learning_rate=1) end by negating the
    # direction; undo that so the decay adds to the direction and the schedule scales both,
    # instead of adafactor's decay that ignores the rate and muon's Adam branch that decays all.
    if cfg.name == "adafactor":
      direction = optax.adafactor(learning_rate=None)
    else:
      direction = _MUON(1.0, adam_b1=cfg.b1, adam_b2=cfg.b2, muon_weight_dimension_numbers=_muon_dims)
    rule = optax.chain(direction, optax.scale(-1.0), _decay(cfg, mask),
                       optax.scale_by_learning_rate(schedule))
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(rule)
  return optax.chain(*parts)

