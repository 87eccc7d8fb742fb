"""Orbax checkpoints of the train state plus a JSON record of the run.

A checkpoint holds the state (params, optimizer state, step, rng) as global arrays, so it can be
restored into any sharding: another device count or strategy only changes the restore target.
The JSON item holds the config, the data position and the early-stopping record.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxdp.errors import JaxdpError


class Checkpointer:
  """Saves and restores (state, meta) pairs under WORKDIR/checkpoints/<step>."""

  def __init__(self, workdir: str, keep: int = 3, *, create: bool = True):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    try:
      self._manager = ocp.CheckpointManager(self.directory, options=options,
                                            item_names=("state", "meta"))
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot create {self.directory!r} ({e.strerror}); "
                       "pick a writable directory") from e

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state, meta: dict[str, Any]) -> None:
    """Starts an asynchronous save; training continues while it is written."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

  def restore_meta(self, step: int) -> dict[str, Any]:
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def restore(self, step: int, abstract_state) -> tuple[Any, dict[str, Any]]:
    """Restores into the shardings carried by `abstract_state` (ShapeDtypeStructs)."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def abstract_with_shardings(abstract_state, shardings):
  """ShapeDtypeStructs that tell orbax where each restored array must live."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state, shardings)
