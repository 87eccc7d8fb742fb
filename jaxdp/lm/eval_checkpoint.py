"""`jaxdp evaluate`'s library side: a run's checkpoint scored on downstream tasks (jaxdp.lm.evaluate)
on every device, the results appended to the run's metrics.

Kept apart from jaxdp.lm.evaluate because it reads checkpoints through jaxdp.lm.run, which
imports jaxdp.lm.evaluate for config.eval_tasks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxdp.errors import JaxdpError
from jaxdp.lm.evaluate import Task, prepare, round_up, score


def evaluate_workdir(workdir: str, tasks: Sequence[Task], *, step: int | None = None,
                     batch_size: int | None = None, devices: Sequence[Any] | None = None,
                     write: bool = True) -> tuple[int, dict[str, float]]:
  """Scores `tasks` with the checkpoint of `workdir` (the latest, or `step`) on `devices` (all by
  default), the rows split over them; appends {"step": step, "NAME/METRIC": ...} to the run's
  metrics.jsonl and TensorBoard events when `write`. Returns (step, metrics).

  batch_size: rows per global batch (default: the run's config.global_batch_size), rounded up to
  a multiple of the devices.

  Raises:
    JaxdpError: no checkpoint (or no such step) in `workdir`, or a task's file is unreadable or
      malformed.
  """
  import jax
  import optax

  from jaxdp.lm.run import load_step_for_inference
  from jaxdp.models.common import lm_loss
  from jaxdp.parallel import DataParallel
  from jaxdp.parallel.scoring import replicate
  from jaxdp.runtime.checkpoint import Checkpointer
  from jaxdp.runtime.checkpoint import exists as checkpoint_exists
  from jaxdp.runtime.checkpoint import location as checkpoint_location

  if not checkpoint_exists(checkpoint_location(workdir)):
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoints; train first with "
                     f"`jaxdp train --workdir {workdir}`")
  checkpoints = Checkpointer(workdir, create=False)
  try:
    steps = checkpoints.all_steps()
    if step is not None and step not in steps:
      raise JaxdpError(f"--step={step}: {workdir!r} has no checkpoint at that step; its "
                       f"checkpoints: {', '.join(map(str, steps)) or 'none'}")
  finally:
    checkpoints.close()
  # The latest step by default, retried if a live run's retention deletes it while it is read.
  step, params, module, tokenizer = load_step_for_inference(workdir, step)
  checkpoints = Checkpointer(workdir, create=False)
  try:
    config = checkpoints.restore_meta(step)["config"]
  except Exception:  # noqa: BLE001 - deleted by a live run since: only the batch size's default.
    config = {}
  finally:
    checkpoints.close()
  prepared = prepare(tasks, tokenizer, module.cfg.seq_len)
  devices = list(jax.devices() if devices is None else devices)
  dp = DataParallel(lm_loss(module), optax.identity(), devices=devices)
  rows = batch_size or int(config.get("global_batch_size") or 8 * len(devices))
  metrics = score(dp, replicate(jax.device_get(params), dp.mesh), prepared,
                  round_up(rows, dp.data_size))
  if write:
    write_metrics(workdir, step, metrics)
  return step, metrics


def write_metrics(workdir: str, step: int, metrics: dict[str, float]) -> None:
  """Appends one record {"step", "NAME/METRIC": ...} to metrics.jsonl and TensorBoard (a scalar
  per metric at `step`); process 0 only."""
  from jaxdp.runtime.metrics import MetricsWriter
  writer = MetricsWriter(workdir)
  try:
    writer.write({"step": step, **metrics})
  finally:
    writer.close()
