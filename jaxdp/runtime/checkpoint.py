"""Orbax checkpoints of the train state plus a JSON record of the run.

A checkpoint holds the state (params, optimizer state, step, rng) as global arrays, so it can be
restored into any sharding: another device count or strategy only changes the restore target.
The JSON item holds the config, the data position, the early-stopping record and a fingerprint
of every array.

Saves are atomic and asynchronous: orbax writes `<step>.orbax-checkpoint-tmp*` and renames it
to `<step>` only when every item is complete, so a run killed mid-save leaves a temporary
directory (removed when the next manager starts), never a half-written step. Orbax does not
detect flipped bits in array files (tensorstore reads them back silently), hence the
fingerprints, which `restore` checks.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxdp.core.tree import path_names
from jaxdp.errors import JaxdpError, os_reason
from jaxdp.parallel import exchange

INVALID_DIR = "checkpoints.invalid"  # Checkpoints that failed validation are moved here, not deleted.


def step_directory(restore_from: str) -> tuple[str, int] | None:
  """(checkpoint directory, step) of a `--restore_from` checkpoint step directory
  (".../checkpoints/<step>", a trailing slash allowed), or None when its name is not a step."""
  path = os.path.abspath(restore_from.rstrip("/"))
  name = os.path.basename(path)
  return (os.path.dirname(path), int(name)) if name.isdigit() else None


class CorruptCheckpoint(Exception):
  """A checkpoint that cannot be read back exactly (truncated, unreadable or fingerprint mismatch)."""


def _as_uint32(x: jax.Array) -> jax.Array:
  """The bits of `x` as uint32 words (narrow types widened, 64-bit types split)."""
  if x.dtype == jnp.bool_:
    return x.astype(jnp.uint32)
  unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
  return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _fingerprints(tree) -> Any:
  """Per array: sum_i bits[i] * (2i + 1) mod 2**32.

  Integer sums wrap exactly whatever the reduction order, so the value does not depend on the
  sharding or device count; any single flipped bit changes it (the weight is odd).
  """
  def one(x):
    bits = _as_uint32(x).ravel()
    weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)
  return jax.tree.map(one, tree)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path as names: shape} of the arrays of a state, of its abstract twin or of orbax metadata."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
  # An NNX Variable is a leaf here (it has .shape) but orbax's metadata names its array
  # ".../value": the same array, so the trailing "value" is dropped from both.
  return {path_names(path, drop_value=True): tuple(leaf.shape) for path, leaf in leaves
          if hasattr(leaf, "shape")}


def fingerprints(state) -> dict[str, int]:
  """{array path: fingerprint} of a state, computed on its devices (only scalars are fetched)."""
  prints = jax.device_get(_fingerprints(state))
  return {jax.tree_util.keystr(path): int(value)
          for path, value in jax.tree_util.tree_leaves_with_path(prints)}


class _Pinned:
  """Preserves the steps in a set the Checkpointer adds to (`Checkpointer.pin`)."""

  def __init__(self, steps: set[int]):
    self.steps = steps

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [checkpoint.step in self.steps for checkpoint in checkpoints]


def _preservation_policy(keep_last: int, keep_every: int, pinned: set[int]):
  """Keep the last `keep_last`, every `keep_every`-th step, the best by validation loss, and
  the `pinned` steps."""
  kept = [policies.LatestN(n=keep_last),
          policies.BestN(get_metric_fn=lambda m: m["eval_loss"], reverse=True, n=1,
                         keep_checkpoints_without_metrics=False), _Pinned(pinned)]
  if keep_every:
    kept.append(policies.EveryNSteps(interval_steps=keep_every))
  return policies.AnyPreservationPolicy(kept)


class Checkpointer:
  """Saves and restores (state, meta) pairs under WORKDIR/checkpoints/<step>."""

  def __init__(self, workdir: str, keep_last: int = 3, keep_every: int = 0, *, create: bool = True,
               directory: str | None = None):
    self.directory = os.path.abspath(directory or os.path.join(workdir, "checkpoints"))
    self._pinned: set[int] = set()
    options = ocp.CheckpointManagerOptions(
        create=create, cleanup_tmp_directories=create,
        best_fn=lambda m: m["eval_loss"], best_mode="min",  # Makes orbax record eval_loss per step.
        preservation_policy=_preservation_policy(keep_last, keep_every, self._pinned))
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options,
          item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot create {self.directory!r} ({e.strerror}); "
                       "pick a writable directory") from e

  def all_steps(self) -> list[int]:
    """The steps of the finished checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The newest finished checkpoint's step, or None when there is none."""
    return self._manager.latest_step()

  def pin(self, steps) -> None:
    """Keeps exactly these steps (besides keep_last, keep_every and the best) through later
    saves of this manager, e.g. the last checkpoint known to be good; replaces earlier pins."""
    self._pinned.clear()
    self._pinned.update(steps)

  def save(self, step: int, state, meta: dict[str, Any], eval_loss: float | None = None) -> None:
    """Starts an asynchronous save; training continues while it is written.

    `eval_loss` (when this step was evaluated) ranks the checkpoint for keeping the best one.
    """
    self.check()  # The previous save's error, if any, before starting another.
    meta = dict(meta, fingerprints=fingerprints(state))
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
          metrics=None if eval_loss is None else {"eval_loss": eval_loss})
    except OSError as e:
      raise self._save_error(e) from e

  def check(self) -> None:
    """Raises JaxdpError now if a background save has failed (cheap: no waiting)."""
    try:
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except  # Orbax re-raises the thread's error.
      raise self._save_error(e) from e

  def _save_error(self, e: Exception) -> JaxdpError:
    reason = os_reason(e, self.directory)
    kept = self.all_steps()
    return JaxdpError(
        f"saving a checkpoint to {self.directory!r} failed ({reason}); free disk space or pick a "
        f"writable --workdir, then resume (earlier checkpoints are intact: steps {kept or 'none'})")

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The JSON record saved with `step` (config, data position, fingerprints, ...); no array is read."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs).

    Per-device communication state (`state.comm`, [N, ...] per device) saved on another device
    count is read with its saved shapes and mapped to this one (exchange.resize_comm_state,
    with a warning saying what changes). Raises JaxdpError if the checkpoint holds arrays of
    other shapes (another model, or a checkpoint from a jaxdp with another parameter layout),
    or communication state of another method: that is not damage, and falling back to an
    older checkpoint would silently restart the run. Raises CorruptCheckpoint if the files
    cannot be read or an array's fingerprint differs from the one saved with it.
    """
    try:
      stored = _shapes(self.item_metadata(step).tree)
    except Exception:  # pylint: disable=broad-except  # Unreadable metadata: corruption, below.
      stored = None
    resized: dict[tuple[str, ...], tuple[int, ...]] = {}
    target = abstract_state
    if stored is not None:
      wanted = _shapes(abstract_state)
      resized = self._portable_comm(step, stored, wanted)
      other = [f"{'/'.join(path)} {stored[path]} (model: {wanted[path]})" for path in sorted(wanted)
               if path in stored and stored[path] != wanted[path] and path not in resized]
      if other:
        raise JaxdpError(f"checkpoint step {step} in {self.directory!r} holds arrays of other "
                         f"shapes than this model: {'; '.join(other[:3])}{' ...' if len(other) > 3 else ''};"
                         f" it was written for another model or parameter layout; use another --workdir")
      if resized:
        target = _with_saved_shapes(abstract_state, resized)
      # Another set of arrays (another optimizer, model or state layout) is a different run,
      # not damage: falling back to an older checkpoint would silently restart from scratch.
      missing = sorted(set(wanted) - set(stored))
      extra = sorted(set(stored) - set(wanted))
      if missing or extra:
        parts = ([f"lacks {', '.join('/'.join(p) for p in missing[:3])}"] if missing else []) + \
                ([f"has {', '.join('/'.join(p) for p in extra[:3])} that this run does not"]
                 if extra else [])
        raise JaxdpError(f"checkpoint step {step} in {self.directory!r} {' and '.join(parts)}: it "
                         "was written with another optimizer, model or state layout; resume "
                         "with the config it was trained with, or use another --workdir")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except  # Tensorstore raises plain Exception.
      raise CorruptCheckpoint(f"step {step} is unreadable ({str(e).splitlines()[0][:200]})") from e
    state, meta = restored["state"], restored["meta"]
    saved = meta.get("fingerprints")
    if saved is not None:
      bad = [path for path, value in fingerprints(state).items() if saved.get(path) != value]
      if bad:
        raise CorruptCheckpoint(f"step {step} has corrupted arrays (fingerprint mismatch): "
                                f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    if resized:
      state = _resize_comm(state, abstract_state)
    return state, meta

  def _portable_comm(self, step: int, stored: dict, wanted: dict) -> dict:
    """{path: saved shape} of the per-device comm leaves to map from another device count;
    JaxdpError for comm state that cannot be carried over (another method's, or other sizes)."""
    def kinds(shapes):
      return {path[1] for path in shapes if len(path) > 1 and path[0] == "comm"}
    where = f"checkpoint step {step} in {self.directory!r}"
    saved_kinds, wanted_kinds = kinds(stored), kinds(wanted)
    if saved_kinds != wanted_kinds:
      def names(k):
        return ", ".join(f"{n} ({exchange.COMM_STATE_SOURCES.get(n, 'unknown')})"
                         for n in sorted(k)) or "none"
      raise JaxdpError(
          f"{where} keeps per-device communication state {names(saved_kinds)}, but this run "
          f"keeps {names(wanted_kinds)}: the communication settings changed, and one method's "
          "per-device state cannot be carried to another's; resume with the settings the "
          "checkpoint was saved with (`jaxdp inspect` shows its config), or use another --workdir")
    comm = {path: shape for path, shape in stored.items() if path[0] == "comm"}
    if not comm or all(wanted.get(path) == shape for path, shape in comm.items()):
      return {}
    if any(path not in wanted for path in comm):
      return {}  # Another tree layout: the other-shapes check or the restore reports it.
    saved_n = {shape[0] for shape in comm.values()}
    new_n = {wanted[path][0] for path in comm}
    other = [f"{'/'.join(path)} {shape} (this run: {wanted[path]})" for path, shape in comm.items()
             if shape[1:] != wanted[path][1:]]
    if other or len(saved_n) != 1 or len(new_n) != 1:
      causes = sorted({exchange.COMM_STATE_SOURCES.get(path[1], path[1]) for path in comm})
      raise JaxdpError(
          f"{where} holds per-device communication state of other sizes than this run's, beyond "
          f"the device count: {'; '.join(other[:3]) or sorted(comm.items())[:3]}; its settings "
          f"({'; '.join(causes)}) or the model changed, and the state cannot be mapped; resume "
          "with the settings the checkpoint was saved with, or use another --workdir")
    for note in exchange.resize_notes(saved_kinds, saved_n.pop(), new_n.pop()):
      _warn(f"checkpoint step {step}: {note}")
    return comm

  def set_aside(self, step: int) -> str:
    """Moves an invalid checkpoint out of the way (kept for inspection); returns its new path."""
    target = os.path.join(os.path.dirname(self.directory), INVALID_DIR, str(step))
    if jax.process_index() == 0:
      if os.path.exists(target):
        shutil.rmtree(target)
      os.makedirs(os.path.dirname(target), exist_ok=True)
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"jaxdp_set_aside_{step}")
    self._manager.reload()
    return target

  def eval_loss(self, step: int) -> float | None:
    """The validation loss recorded with `step` (None if it was not evaluated)."""
    return (self._manager.metrics(step) or {}).get("eval_loss")

  def item_metadata(self, step: int):
    """Orbax's metadata of the state (shapes, dtypes) without reading any array."""
    return self._manager.item_metadata(step)["state"]

  def wait(self) -> None:
    """Blocks until the pending save is written; raises JaxdpError if it (or an earlier one) failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(e) from e
    self.check()

  def close(self) -> None:
    """Releases orbax's manager (call `wait` first to be sure the last save landed)."""
    self._manager.close()


def describe(path: str) -> list[dict[str, Any]]:
  """Each checkpoint under `path` (a workdir or its checkpoints/ folder), read from metadata only.

  [{step, meta (config, examples_seen, ...), eval_loss, disk_bytes,
    arrays: [(path, shape, dtype, bytes)]}], oldest first; no array is loaded.
  """
  directory = os.path.join(path, "checkpoints")
  directory = directory if os.path.isdir(directory) else path
  if not os.path.isdir(directory):
    raise JaxdpError(f"{path!r} is not a directory; give a --workdir or its checkpoints/ folder")
  checkpoints = Checkpointer("", create=False, directory=directory)
  try:
    steps = []
    for step in checkpoints.all_steps():
      tree = checkpoints.item_metadata(step).tree
      leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
      arrays = [(jax.tree_util.keystr(p), tuple(a.shape), str(np.dtype(a.dtype)),
                 int(np.prod(a.shape, dtype=np.int64)) * np.dtype(a.dtype).itemsize)
                for p, a in leaves]
      step_dir = os.path.join(directory, str(step))
      disk = sum(os.path.getsize(os.path.join(root, f))
                 for root, _, files in os.walk(step_dir) for f in files)
      steps.append({"step": step, "meta": checkpoints.restore_meta(step), "arrays": arrays,
                    "eval_loss": checkpoints.eval_loss(step), "disk_bytes": disk})
    return steps
  finally:
    checkpoints.close()


def _warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"jaxdp: warning: {message}", file=sys.stderr, flush=True)


def _replicated_like(sharding):
  """Every device of `sharding`'s mesh holds the whole array (saved shapes need not divide it)."""
  if isinstance(sharding, jax.sharding.NamedSharding):
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
  return sharding


def _with_saved_shapes(abstract_state, saved: dict):
  """`abstract_state` whose leaves at the paths of `saved` take the saved shape, replicated."""
  def leaf(path, x):
    shape = saved.get(path_names(path))
    if shape is None:
      return x
    return jax.ShapeDtypeStruct(shape, x.dtype, sharding=_replicated_like(x.sharding))
  return jax.tree_util.tree_map_with_path(leaf, abstract_state)


def _resize_comm(state, abstract_state):
  """`state` whose comm leaves (read with their saved device count) are mapped to the device
  count and shardings of `abstract_state` (exchange.resize_comm_state)."""
  out = jax.tree.map(lambda a: a.sharding, abstract_state.comm)
  num_devices = jax.tree.leaves(abstract_state.comm)[0].shape[0]
  resize = jax.jit(lambda c, p: exchange.resize_comm_state(c, p, num_devices), out_shardings=out)
  return state.replace(comm=resize(state.comm, state.params))
