"""How devices synchronise: gradient reduction with compression, staleness and local SGD.

`CommConfig` (from the config's allreduce, compression, sync... fields) picks the method, and
`make_exchange` turns it into the step's gradient exchange. The dense default (`pmean`, no
compression, every step) has none: `core.step.train_step` keeps its single `lax.pmean`.

Per-device state lives in `TrainState.comm`, a dict whose every leaf has a leading device axis
[N, ...] sharded P("data") (each device holds and checkpoints its own row):
  - "residual" [N, d]: error feedback, what compression dropped so far (d = number of params);
  - "momentum" [N, d]: momentum correction's local velocity (sparsifiers only);
  - "count" [N]: exchanges applied so far (int32; equal on every device), kept when a warm-up
    (`compression_warmup_steps`) needs to know where it is;
  - "powersgd_q" [N, q]: PowerSGD's warm-started Q factors, all matrices' flattened (identical
    rows: they are averaged);
  - "adam_momentum" [N, d]: `compression_optimizer="frozen_variance"`, Adam's first moment as
    last averaged (identical rows), from which each device forms its own momentum to compress;
  - "stale" [N, tau, d]: `sync="stale"`, FIFO of the last tau averaged gradients (the same on
    every device: asynchronous workers simulated deterministically);
  - "params", "opt_state" [N, ...]: `sync="local_sgd"`, each device's own parameters and inner
    optimizer state. Then `state.params` is the anchor, the parameters after the last averaging
    (what evaluation and checkpoints' consumers see), and `state.opt_state` is the outer
    optimizer's state (DiLoCo's Nesterov momentum, or empty for plain averaging).
A checkpoint restored on another device count maps these rows with `resize_comm_state`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import optax

from jaxdp.parallel import collectives, powersgd
from jaxdp.parallel.choices import check_comm, is_dense
from jaxdp.parallel.hlo import collective_bytes

RANDOMK_KEY = 0x7FFFFFFF  # Folded into the step key for random-k indices: no example id reaches it.


@dataclasses.dataclass(frozen=True)
class CommConfig:
  """How devices exchange gradients (or parameters) each step; the default is dense `pmean`.

  - `allreduce`: "pmean" (XLA's all-reduce), "ring" or "ps" (parameter server), written with
    `ppermute` in parallel/collectives.py so their traffic shows in the HLO.
  - `compression`: "none", "topk" / "randomk" (keep `compression_ratio` of the entries; Stich et
    al. 2018, Lin et al. 2018 "Deep Gradient Compression"), "int8" / "bf16" (quantised
    all-reduce), "powersgd" (rank `compression_rank`, Vogels et al. 2019). With `error_feedback`
    each device keeps what compression dropped and adds it to the next step's gradient;
    `momentum_correction` > 0 is DGC's local momentum with factor masking; `local_grad_clip`
    DGC's per-device clipping.
  - `sync`: "every_step", "local_sgd" (average parameters every `sync_every` steps, Stich 2019;
    with `diloco` an outer Nesterov step of `outer_lr`/`outer_momentum` on the averaged delta,
    Douillard et al. 2023) or "stale" (apply the mean gradient of `staleness` steps ago).
  - `compression_optimizer="frozen_variance"`: 1-bit Adam (Tang et al. 2021), which exchanges
    compressed Adam momentum after `compression_warmup_steps` dense steps.

  Raises JaxdpError (at construction) for a choice not in its list of jaxdp.parallel.choices, a
  value out of range or a combination that cannot work (`choices.check_comm`, the same rules
  the built-in app's config validation applies to its fields).
  """
  allreduce: str = "pmean"
  compression: str = "none"
  compression_ratio: float = 0.01
  error_feedback: bool = True
  momentum_correction: float = 0.0
  sync: str = "every_step"
  sync_every: int = 1
  staleness: int = 0
  diloco: bool = False
  outer_lr: float = 0.7
  outer_momentum: float = 0.9
  compression_rank: int = 4  # powersgd: rank r of each matrix's approximation.
  # topk/randomk: DGC's warm-up (density 1/4, 1/16, ... down to compression_ratio over these
  # steps); frozen_variance: the dense Adam steps before the variance freezes.
  compression_warmup_steps: int = 0
  local_grad_clip: float = 0.0  # Global-norm threshold C; each device clips its share to C sqrt(N).
  compression_optimizer: str = "none"  # "none" or "frozen_variance" (1-bit Adam).
  # frozen_variance only: the optimizer's b1 and grad_clip, for the exchange's copy of the
  # first moment during the dense warm-up (config.b1 and config.grad_clip).
  b1: float = 0.9
  grad_clip: float = 0.0

  def __post_init__(self):
    check_comm(dataclasses.asdict(self))

  @property
  def dense(self) -> bool:
    """True for the default path: one XLA all-reduce of the gradients every step."""
    return is_dense(self.allreduce, self.compression, self.sync)

  @property
  def keeps_residual(self) -> bool:
    """Whether devices keep an error-feedback residual (any compression with error_feedback)."""
    return self.compression != "none" and self.error_feedback

  @property
  def frozen_variance(self) -> bool:
    """Whether the exchange runs 1-bit Adam's compressed momentum (needs a compression)."""
    return self.compression != "none" and self.compression_optimizer == "frozen_variance"

  @property
  def stages(self) -> tuple[float, ...]:
    """Densities of the warm-up's stages, then the target: DGC's ramp for topk/randomk."""
    if self.compression in ("topk", "randomk") and not self.frozen_variance:
      return dgc_densities(self.compression_ratio, self.compression_warmup_steps)
    return ()

  @property
  def counts_steps(self) -> bool:
    """Whether the comm state keeps a step "count" (a warm-up that must know where it is)."""
    return self.compression_warmup_steps > 0 and (self.frozen_variance or len(self.stages) > 1)


DGC_FACTOR = 4  # Each warm-up stage keeps 1/4 of the previous density (DGC: 75%, 93.75%, ... sparse).


def dgc_densities(ratio: float, warmup_steps: int) -> tuple[float, ...]:
  """(stage densities..., ratio): Deep Gradient Compression's exponential warm-up (Lin et al.
  2018, section 3.3: sparsity 75%, 93.75%, 98.4375%, ... over the first epochs).

  The stages are 1/4, 1/16, ... while still denser than `ratio`; without warm-up steps (or a
  ratio >= 1/4) there is only the target.
  """
  stages = []
  density = 1.0 / DGC_FACTOR
  while warmup_steps > 0 and density > ratio:
    stages.append(density)
    density /= DGC_FACTOR
  return tuple(stages) + (ratio,)


def dgc_stage(count, warmup_steps: int, num_stages: int):
  """Stage index at applied step `count` (int or traced int32): the warm-up's steps split evenly
  over the num_stages - 1 warm-up stages, then the last stage (the target) for good."""
  warm = num_stages - 1
  if warm <= 0:
    return count * 0 + warm
  stage = (count * warm) // max(warmup_steps, 1)
  return jnp.minimum(stage, warm) if isinstance(stage, jax.Array) else min(stage, warm)


def density_at(cfg: CommConfig, step: int) -> float:
  """The fraction of entries top-k/random-k sends at applied step `step` (Python, for tools)."""
  stages = cfg.stages or (1.0,)
  return stages[dgc_stage(step, cfg.compression_warmup_steps, len(stages))]


def outer_optimizer(cfg: CommConfig) -> optax.GradientTransformation | None:
  """DiLoCo's outer step on the averaged delta: SGD with Nesterov momentum; None = plain averaging."""
  if not cfg.diloco:
    return None
  return optax.sgd(cfg.outer_lr, momentum=cfg.outer_momentum or None,
                   nesterov=cfg.outer_momentum > 0)


def with_comm_state(state, cfg: CommConfig, tx: optax.GradientTransformation, num_devices: int):
  """A fresh TrainState rearranged for `cfg`: adds the per-device `comm` leaves (see module doc)."""
  per_device = lambda tree: jax.tree.map(
      lambda x: jnp.broadcast_to(x, (num_devices,) + x.shape), tree)
  d = ravel_pytree(state.params)[0].size
  rows = lambda x: jnp.broadcast_to(x, (num_devices,) + x.shape)
  state_comm = {}
  if cfg.keeps_residual:
    state_comm["residual"] = jnp.zeros((num_devices, d), jnp.float32)
  if cfg.counts_steps:
    state_comm["count"] = jnp.zeros((num_devices,), jnp.int32)
  if cfg.compression == "powersgd":
    blocks = powersgd.plan_blocks([x.shape for x in jax.tree.leaves(state.params)],
                                  cfg.compression_rank)
    state_comm["powersgd_q"] = rows(powersgd.initial_q(blocks, cfg.compression_rank))
  if cfg.frozen_variance:
    state_comm["adam_momentum"] = jnp.zeros((num_devices, d), jnp.float32)
  if cfg.momentum_correction > 0:
    state_comm["momentum"] = jnp.zeros((num_devices, d), jnp.float32)
  if cfg.sync == "stale" and cfg.staleness > 0:
    state_comm["stale"] = jnp.zeros((num_devices, cfg.staleness, d), jnp.float32)
  if cfg.sync == "local_sgd":
    state_comm["params"] = per_device(state.params)
    state_comm["opt_state"] = per_device(state.opt_state)
    outer = outer_optimizer(cfg)
    state = state.replace(opt_state=outer.init(state.params) if outer else optax.EmptyState())
  return state.replace(comm=state_comm)


# What keeps each per-device leaf, for messages about checkpoints that hold it.
COMM_STATE_SOURCES = {
    "residual": "error feedback (config.compression with config.error_feedback)",
    "momentum": "momentum correction (config.momentum_correction)",
    "stale": "stale gradients (config.sync='stale', config.staleness)",
    "params": "local SGD replicas (config.sync='local_sgd')",
    "opt_state": "local SGD inner optimizer states (config.sync='local_sgd', config.optimizer)",
    "count": "the compression warm-up's step count (config.compression_warmup_steps)",
    "powersgd_q": "PowerSGD's warm-started factors (config.compression='powersgd', "
                  "config.compression_rank)",
    "adam_momentum": "the exchanged Adam momentum (config.compression_optimizer='frozen_variance')",
}


def resize_comm_state(state_comm: dict, anchor_params, num_devices: int) -> dict:
  """Per-device state saved on N devices, mapped to `num_devices` rows (a checkpoint restored
  on another device count; see `resize_notes` for what each leaf loses).

  - "residual" and "momentum": device i transmits compress(u_i + r_i), where u_i is its share
    of the mean gradient, so the global quantity still owed to the update is the mean over
    devices of r_i (likewise the velocities' contribution, mean_i m_i). Every new row is the
    old mean row: the mean over the new devices equals the old mean, so nothing owed is lost
    or counted twice (a sum-preserving split would scale it by N'/N). Which device owes which
    coordinate is not preserved, and cannot be: the new devices see other rows of the batch.
  - "stale", "count", "powersgd_q", "adam_momentum": identical on every device (a FIFO of
    averaged gradients, the warm-up's step count, PowerSGD's averaged Q, the averaged Adam
    momentum); row 0 is copied.
  - "params": every local SGD replica restarts from the anchor (the last average, or DiLoCo's
    outer parameters), which is what replicas hold right after a synchronisation.
  - "opt_state": the inner optimizer state of each replica becomes the mean over the saved
    replicas for floating leaves (moments), row 0 for the others (step counts, equal on every
    device: all replicas skip or apply each step together).
  Pure: jit it with the target shardings as out_shardings.
  """
  def rows(x):
    return jnp.broadcast_to(x, (num_devices,) + x.shape)

  def mean_row(x):
    return rows(jnp.mean(x, axis=0, dtype=jnp.float32).astype(x.dtype)
                if jnp.issubdtype(x.dtype, jnp.floating) else x[0])

  out = {}
  for name, value in state_comm.items():
    if name in ("residual", "momentum"):
      out[name] = mean_row(value)
    elif name in ("stale", "count", "powersgd_q", "adam_momentum"):  # Identical rows.
      out[name] = rows(value[0])
    elif name == "params":
      out[name] = jax.tree.map(lambda anchor, saved: rows(anchor.astype(saved.dtype)),
                               anchor_params, value)
    elif name == "opt_state":
      out[name] = jax.tree.map(mean_row, value)
    else:
      raise ValueError(f"no device-count mapping for comm state {name!r}")
  return out


def resize_notes(names, saved_devices: int, num_devices: int) -> list[str]:
  """What `resize_comm_state` changes, one line per kind of state (for a warning)."""
  notes = []
  if "residual" in names or "momentum" in names:
    kept = " and ".join(n for n in ("residual", "momentum") if n in names)
    notes.append(f"the per-device {kept} of {saved_devices} devices is spread over "
                 f"{num_devices}: every device starts from the saved mean (the total still owed "
                 "to the update is kept, its split between devices is not)")
  if "params" in names:
    notes.append(f"config.sync='local_sgd': the {saved_devices} saved replicas restart on "
                 f"{num_devices} devices from the last average (state.params), so local steps "
                 "since that average are dropped; each replica's inner optimizer state is the "
                 "mean of the saved ones")
  return notes


def mine(tree):
  """This device's row of per-device leaves: [1, ...] -> [...] (inside shard_map each device sees
  its own row)."""
  return jax.tree.map(lambda x: x[0], tree)


def as_rows(tree):
  """The inverse of `mine`: [...] -> [1, ...], this device's row of a per-device leaf."""
  return jax.tree.map(lambda x: x[None], tree)


def compressed_mean(v: jax.Array, cfg: CommConfig, key: jax.Array, axis_name: str | tuple[str, ...],
                    density: float | None = None) -> tuple[jax.Array, jax.Array]:
  """(mean over devices of the compressed vectors, this device's transmitted vector), for the
  elementwise compressors (topk, randomk at `density`, default cfg.compression_ratio; int8, bf16)."""
  d = v.size
  if cfg.compression in ("int8", "bf16"):
    return collectives.quantized_mean(v, cfg.compression, axis_name)
  k = collectives.num_kept(cfg.compression_ratio if density is None else density, d)
  if cfg.compression == "topk":
    values, indices = collectives.topk_select(v, k)
    return collectives.sparse_mean(values, indices, d, axis_name), collectives.densify(values, indices, d)
  indices = collectives.randomk_indices(jax.random.fold_in(key, RANDOMK_KEY), d, k)
  values = v[indices]
  return (collectives.shared_index_mean(values, indices, d, axis_name, cfg.allreduce),
          collectives.densify(values, indices, d))


def _compress(v: jax.Array, cfg: CommConfig, key: jax.Array, axis_name: str | tuple[str, ...],
              state_comm: dict, shapes) -> tuple[jax.Array, jax.Array, dict]:
  """(mean, sent, new state entries) of flat `v` by cfg.compression, warm-up stages included.

  PowerSGD's "sent" is the applied low-rank matrix P Q^T on compressed matrices (the error is
  this device's v minus it, as in Vogels et al. 2019, Algorithm 2) and v itself on the rest.
  DGC's stages are branches of a `lax.switch` on the step count, each with its static k, so a
  step moves only its stage's bytes.
  """
  if cfg.compression == "powersgd":
    blocks = powersgd.plan_blocks(shapes, cfg.compression_rank)
    mean, sent, q = powersgd.compress_mean(v, state_comm["powersgd_q"][0], blocks,
                                           cfg.compression_rank, axis_name)
    return mean, sent, {"powersgd_q": q[None]}
  stages = cfg.stages
  if len(stages) <= 1 or not cfg.counts_steps:
    return (*compressed_mean(v, cfg, key, axis_name), {})
  count = state_comm["count"][0]
  index = dgc_stage(count, cfg.compression_warmup_steps, len(stages))
  branches = [functools.partial(compressed_mean, cfg=cfg, key=key, axis_name=axis_name,
                                density=density) for density in stages]
  return (*lax.switch(index, branches, v), {})


def _clip_share(v: jax.Array, cfg: CommConfig, axis_name: str | tuple[str, ...]) -> jax.Array:
  """DGC's local gradient clipping: this device's share v (whose mean over the N devices is the
  gradient) scaled to norm <= C sqrt(N), C = cfg.local_grad_clip: N independent shares of that
  norm average to about C, the threshold a global clip would apply (Lin et al. 2018, sec. 3.2)."""
  if cfg.local_grad_clip <= 0:
    return v
  limit = cfg.local_grad_clip * jnp.sqrt(jnp.float32(lax.axis_size(axis_name)))
  norm = jnp.linalg.norm(v)
  return v * jnp.minimum(1.0, limit / jnp.maximum(norm, 1e-30))


def _frozen_variance(grad_sum, loss_total, tokens, state_comm: dict, rng, cfg: CommConfig,
                     axis_name: str | tuple[str, ...]):
  """1-bit Adam's exchange (Tang et al. 2021, Algorithm 1) for core.optimizer.frozen_variance_adam.

  Warm-up (count < compression_warmup_steps): the dense step's own pmean of (gradient sums,
  loss, tokens), so the run is the dense AdamW run; the exchange keeps a copy of Adam's first
  moment m (from the averaged gradient clipped as the optimizer clips it). After: each device
  forms its momentum m_i = b1 m + (1 - b1) g_i from its own gradient share g_i, adds its
  residual, compresses, and the averaged compressed momentum is both the new m and what the
  optimizer receives (it divides it by the frozen variance).
  """
  count = state_comm["count"][0]
  m = state_comm["adam_momentum"][0]
  flat_sum, unravel = ravel_pytree(grad_sum)

  def dense():
    g_sum, loss, tok = lax.pmean((grad_sum, loss_total, tokens), axis_name)
    grads = jax.tree.map(lambda g: g / tok, g_sum)
    flat = ravel_pytree(grads)[0]
    if cfg.grad_clip > 0:  # optax.clip_by_global_norm's arithmetic, as the optimizer clips.
      norm = optax.tree.norm(grads)
      flat = flat * jnp.where(norm < cfg.grad_clip, 1.0, cfg.grad_clip / norm)
    momentum = (1 - cfg.b1) * flat + cfg.b1 * m
    residual = state_comm["residual"][0] if cfg.keeps_residual else None
    return grads, loss, tok, momentum, residual

  def compressed():
    loss, tok = lax.pmean((loss_total, tokens), axis_name)
    share = _clip_share(flat_sum / tok, cfg, axis_name)
    v = (1 - cfg.b1) * share
    if cfg.keeps_residual:
      v = v + state_comm["residual"][0]
    mean, sent = compressed_mean(v, cfg, rng, axis_name)
    momentum = cfg.b1 * m + mean
    return unravel(momentum), loss, tok, momentum, (v - sent) if cfg.keeps_residual else None

  grads, loss_total, tokens, momentum, residual = lax.cond(
      count < cfg.compression_warmup_steps, dense, compressed)
  state_comm = dict(state_comm, adam_momentum=momentum[None], count=(count + 1)[None])
  if cfg.keeps_residual:
    state_comm["residual"] = residual[None]
  return grads, loss_total, tokens, state_comm


def reduce_gradients(grad_sum, loss_total: jax.Array, tokens: jax.Array, state_comm: dict,
                     rng: jax.Array, cfg: CommConfig, axis_name: str | tuple[str, ...]):
  """Per-device sums -> (gradients to apply, mean loss sum, mean token count, new comm state).

  Without compression the whole (grad_sum, loss, tokens) tuple is averaged by `cfg.allreduce`.
  With it, the scalars take a pmean and each device compresses u = grad_sum / mean tokens (its
  share of the global mean gradient; optionally clipped, `local_grad_clip`) plus its residual;
  the residual keeps what was not sent. Under `compression_optimizer="frozen_variance"` the
  "gradients" returned after the warm-up are Adam's averaged first moment (see _frozen_variance).
  """
  state_comm = dict(state_comm)
  if cfg.frozen_variance:
    grads, loss_total, tokens, state_comm = _frozen_variance(grad_sum, loss_total, tokens,
                                                             state_comm, rng, cfg, axis_name)
  elif cfg.compression == "none":
    grad_sum, loss_total, tokens = collectives.allreduce_mean((grad_sum, loss_total, tokens), axis_name,
                                                       cfg.allreduce)
    grads = jax.tree.map(lambda g: g / tokens, grad_sum)
  else:
    loss_total, tokens = lax.pmean((loss_total, tokens), axis_name)
    flat, unravel = ravel_pytree(grad_sum)
    v = _clip_share(flat / tokens, cfg, axis_name)
    if cfg.momentum_correction > 0:  # Local velocity, so momentum survives sparsification.
      v = cfg.momentum_correction * state_comm["momentum"][0] + v
      momentum = v
    if cfg.keeps_residual:
      v = v + state_comm["residual"][0]
    shapes = [g.shape for g in jax.tree.leaves(grad_sum)]
    mean, sent, updates = _compress(v, cfg, rng, axis_name, state_comm, shapes)
    state_comm.update(updates)
    if cfg.keeps_residual:
      state_comm["residual"] = (v - sent)[None]
    if cfg.momentum_correction > 0:  # Momentum factor masking: sent coordinates restart.
      state_comm["momentum"] = jnp.where(sent != 0, 0.0, momentum)[None]
    if cfg.counts_steps:
      state_comm["count"] = state_comm["count"] + 1
    grads = unravel(mean)
  if cfg.sync == "stale" and cfg.staleness > 0:
    flat, unravel = ravel_pytree(grads)
    fifo = state_comm["stale"][0]
    state_comm["stale"] = jnp.concatenate([fifo[1:], flat[None]])[None]
    grads = unravel(fifo[0])  # The mean gradient of `staleness` steps ago (zeros at first).
  return grads, loss_total, tokens, state_comm


def make_exchange(cfg: CommConfig | None, axis_name: str | tuple[str, ...]):
  """The gradient exchange of `cfg` for core.step.train_step, or None for the single pmean."""
  if cfg is None or cfg.dense:
    return None
  return functools.partial(reduce_gradients, cfg=cfg, axis_name=axis_name)


def _steady_branch(cfg: CommConfig) -> int:
  """The branch of the warm-up's conditional that runs once the warm-up is over."""
  return 0 if cfg.frozen_variance else len(cfg.stages) - 1  # cond's branch 0 is its false one.


def stage_bytes(cfg: CommConfig, hlo_text: str) -> list[float]:
  """Bytes per step in each stage of the warm-up, the last entry the steady state, from the HLO:
  the collectives outside the warm-up's conditional plus those of the stage's branch.

  frozen_variance: [dense warm-up, compressed]; DGC: [density 1/4, 1/16, ..., target]; a
  method without warm-up: [its bytes].
  """
  counted = collective_bytes(hlo_text)
  if not cfg.counts_steps:
    return [counted["bytes"]]
  warm = max(counted["conditionals"], key=sum)  # The exchange's: the one that moves most.
  outside = counted["bytes"] - sum(warm)
  steady = _steady_branch(cfg)
  order = [i for i in range(len(warm)) if i != steady] + [steady]
  return [outside + warm[i] for i in order]


def mean_bytes_per_step(cfg: CommConfig, hlo_text: str, num_steps: int) -> float:
  """Bytes per step averaged over a run of `num_steps` applied steps, warm-up included."""
  stages = stage_bytes(cfg, hlo_text)
  if len(stages) == 1:
    return bytes_per_step(cfg, hlo_text)
  if cfg.frozen_variance:
    warm = min(cfg.compression_warmup_steps, num_steps)
    return (warm * stages[0] + (num_steps - warm) * stages[1]) / max(num_steps, 1)
  index = [dgc_stage(t, cfg.compression_warmup_steps, len(stages)) for t in range(num_steps)]
  return sum(stages[i] for i in index) / max(num_steps, 1)


def bytes_per_step(cfg: CommConfig, hlo_text: str) -> float:
  """Mean bytes a device sends per optimizer step, from the compiled train step's HLO.

  Under local_sgd the averaging sits in a conditional branch that runs every `sync_every` steps.
  With a compression warm-up, the steady state's (after the warm-up; `stage_bytes` has each
  stage, `mean_bytes_per_step` the run's mean).
  """
  counted = collective_bytes(hlo_text)
  if cfg.counts_steps:
    return stage_bytes(cfg, hlo_text)[-1]
  if cfg.sync != "local_sgd":
    return counted["bytes"]
  always = counted["bytes"] - counted["conditional_bytes"]
  return always + counted["conditional_bytes"] / cfg.sync_every
