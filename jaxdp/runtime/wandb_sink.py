"""An optional Weights & Biases sink: the run's config, and every numeric field of its metrics
lines (the same scalars as metrics.jsonl and TensorBoard) at their step. Process 0 only.

`wandb` is imported here, lazily: without `pip install 'jaxdp[wandb]'` asking for it is one
error line. The W&B run id is kept in WORKDIR/wandb_run_id, so a resumed jaxdp run continues
the same W&B run. In "offline" mode (the default) nothing leaves the machine: the run's files are
written under WORKDIR/wandb (or $WANDB_DIR/wandb) and `wandb sync DIR` uploads them later.
"""

from __future__ import annotations

import os
import secrets
from typing import Any, TypeGuard, cast

from jaxdp.errors import JaxdpError, atomic_write

ID_FILE = "wandb_run_id"


def _is_number(value: Any) -> TypeGuard[int | float]:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class WandbSink:
  """Logs metrics records to a W&B run in `project` (mode "offline", "online" or "disabled")."""

  def __init__(self, project: str, mode: str, workdir: str, config: dict[str, Any]):
    try:
      import wandb
    except ImportError:
      raise JaxdpError(f"config.wandb.project={project!r} needs the wandb package: pip install "
                       "'jaxdp[wandb]' (or set config.wandb.project='' to log without W&B)") from None
    os.makedirs(workdir, exist_ok=True)
    id_path = os.path.join(workdir, ID_FILE)
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else secrets.token_hex(4)
    try:
      # A mode wandb does not know makes init raise, reported below as one JaxdpError line.
      self.run = wandb.init(project=project, mode=cast(Any, mode), id=run_id, resume="allow",
                            config=config, dir=os.environ.get("WANDB_DIR") or workdir,
                            name=os.path.basename(os.path.abspath(workdir)),
                            settings=wandb.Settings(console="off", silent=True))
    except Exception as e:  # noqa: BLE001 - wandb raises its own error types (auth, network).
      raise JaxdpError(f"config.wandb.project={project!r}: W&B could not start ({type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}); use "
                       "--config.wandb.mode=offline, or --config.wandb.project='' to go without") from None
    atomic_write(id_path, run_id, "writing the W&B run id to")

  def write(self, record: dict[str, Any]) -> None:
    """A train or eval line -> its numeric fields at its step; events -> the run's summary."""
    step = record.get("step")
    if "event" in record:
      self.run.summary[f"event/{record['event']}"] = step
      return
    scalars = {k: v for k, v in record.items() if k != "step" and _is_number(v)}
    if scalars and _is_number(step):
      self.run.log(scalars, step=int(step))

  def close(self) -> None:
    """Finishes the W&B run (uploads what is left, unless offline)."""
    self.run.finish()
