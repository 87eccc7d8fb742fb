"""How devices synchronise: gradient reduction with compression, staleness and local SGD.

`CommConfig` (from the config's allreduce, compression, sync... fields) picks the method, and
`make_exchange` turns it into the step's gradient exchange. The dense default (`pmean`, no
compression, every step) has none: `core.step.train_step` keeps its single `lax.pmean`.

Per-device state lives in `TrainState.comm`, a dict whose every leaf has a leading device axis
[N, ...] sharded P("data") (each device holds and checkpoints its own row):
  - "residual" [N, d]: error feedback, what compression dropped so far (d = number of params);
  - "momentum" [N, d]: momentum correction's local velocity (sparsifiers only);
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

from jaxdp.analysis.hlo import collective_bytes
from jaxdp.parallel import collectives as comm

RANDOMK_KEY = 0x7FFFFFFF  # Folded into the step key for random-k indices: no example id reaches it.


@dataclasses.dataclass(frozen=True)
class CommConfig:
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

  @property
  def dense(self) -> bool:
    """True for the default path: one XLA all-reduce of the gradients every step."""
    return self.allreduce == "pmean" and self.compression == "none" and self.sync == "every_step"

  @property
  def keeps_residual(self) -> bool:
    return self.compression != "none" and self.error_feedback


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
  state_comm = {}
  if cfg.keeps_residual:
    state_comm["residual"] = jnp.zeros((num_devices, d), jnp.float32)
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
  - "stale": the FIFO of averaged gradients, identical on every device; row 0 is copied.
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
    elif name == "stale":
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
  return jax.tree.map(lambda x: x[0], tree)  # Inside shard_map each device sees its row [1, ...].


def as_rows(tree):
  return jax.tree.map(lambda x: x[None], tree)


def compressed_mean(v: jax.Array, cfg: CommConfig, key: jax.Array,
                    axis_name: str) -> tuple[jax.Array, jax.Array]:
  """(mean over devices of the compressed vectors, this device's transmitted vector)."""
  d = v.size
  if cfg.compression in ("int8", "bf16"):
    return comm.quantized_mean(v, cfg.compression, axis_name)
  k = comm.num_kept(cfg.compression_ratio, d)
  if cfg.compression == "topk":
    values, indices = comm.topk_select(v, k)
    return comm.sparse_mean(values, indices, d, axis_name), comm.densify(values, indices, d)
  indices = comm.randomk_indices(jax.random.fold_in(key, RANDOMK_KEY), d, k)
  values = v[indices]
  return (comm.shared_index_mean(values, indices, d, axis_name, cfg.allreduce),
          comm.densify(values, indices, d))


def reduce_gradients(grad_sum, loss_total: jax.Array, tokens: jax.Array, state_comm: dict,
                     rng: jax.Array, cfg: CommConfig, axis_name: str):
  """Per-device sums -> (gradients to apply, mean loss sum, mean token count, new comm state).

  Without compression the whole (grad_sum, loss, tokens) tuple is averaged by `cfg.allreduce`.
  With it, the scalars take a pmean and each device compresses u = grad_sum / mean tokens (its
  share of the global mean gradient) plus its residual; the residual keeps what was not sent.
  """
  state_comm = dict(state_comm)
  if cfg.compression == "none":
    grad_sum, loss_total, tokens = comm.allreduce_mean((grad_sum, loss_total, tokens), axis_name,
                                                       cfg.allreduce)
    grads = jax.tree.map(lambda g: g / tokens, grad_sum)
  else:
    loss_total, tokens = lax.pmean((loss_total, tokens), axis_name)
    flat, unravel = ravel_pytree(grad_sum)
    v = flat / tokens
    if cfg.momentum_correction > 0:  # Local velocity, so momentum survives sparsification.
      v = cfg.momentum_correction * state_comm["momentum"][0] + v
      momentum = v
    if cfg.keeps_residual:
      v = v + state_comm["residual"][0]
    mean, sent = compressed_mean(v, cfg, rng, axis_name)
    if cfg.keeps_residual:
      state_comm["residual"] = (v - sent)[None]
    if cfg.momentum_correction > 0:  # Momentum factor masking: sent coordinates restart.
      state_comm["momentum"] = jnp.where(sent != 0, 0.0, momentum)[None]
    grads = unravel(mean)
  if cfg.sync == "stale" and cfg.staleness > 0:
    flat, unravel = ravel_pytree(grads)
    fifo = state_comm["stale"][0]
    state_comm["stale"] = jnp.concatenate([fifo[1:], flat[None]])[None]
    grads = unravel(fifo[0])  # The mean gradient of `staleness` steps ago (zeros at first).
  return grads, loss_total, tokens, state_comm


def make_exchange(cfg: CommConfig | None, axis_name: str):
  """The gradient exchange of `cfg` for core.step.train_step, or None for the single pmean."""
  if cfg is None or cfg.dense:
    return None
  return functools.partial(reduce_gradients, cfg=cfg, axis_name=axis_name)


def bytes_per_step(cfg: CommConfig, hlo_text: str) -> float:
  """Mean bytes a device sends per optimizer step, from the compiled train step's HLO.

  Under local_sgd the averaging sits in a conditional branch that runs every `sync_every` steps.
  """
  counted = collective_bytes(hlo_text)
  if cfg.sync != "local_sgd":
    return counted["bytes"]
  always = counted["bytes"] - counted["conditional_bytes"]
  return always + counted["conditional_bytes"] / cfg.sync_every
