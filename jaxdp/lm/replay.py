"""Replay one training step of a built-in model's run from its checkpoints: `replay_step`.

Step numbering is metrics.jsonl's: the train line at step N reports the update that takes the
state after N-1 steps (checkpoint N-1 holds it) to step N, computed on global batch N-1 of the
data pipeline (a pure function of the seed and the batch index: data/pipeline.py). A replay of
step N restores the latest checkpoint k <= N-1 (or the run's initial state, k = 0, when the run
started from config.seed in this workdir), runs steps k+1 .. N-1 on their batches as the run did,
then runs step N and reports its loss, gradient norm and the loss of every row of its global
batch. Any device count the config's batch divides will do, one included: the batch of a step
does not depend on the devices, only the order in which sums are added does, so the loss equals
the logged one bitwise under config.reduction="fixed_order" and within float32 rounding
otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import math
from typing import Any

from jaxdp.errors import JaxdpError


@dataclasses.dataclass(frozen=True)
class RowLoss:
  """One row (example) of a step's global batch.

  Attributes:
    row: its index in the global batch [0, global_batch_size): micro-batch a's row r is
      a * global_batch_size / grad_accum_steps + r, the order of the run's data pipeline.
    loss: its mean cross entropy in nats over its weighted tokens (0.0 for a row of no tokens).
    tokens: its token weight (the sum of its target weights; padding weighs 0).
    preview: the start of its input text, decoded (for reading, not exact).
  """
  row: int
  loss: float
  tokens: float
  preview: str = ""


@dataclasses.dataclass(frozen=True)
class ReplayResult:
  """What `replay_step` found.

  Attributes:
    step: the replayed step (metrics.jsonl's numbering).
    train_loss: its token-weighted mean loss (nats), as the train step computed it (float32).
    grad_norm: the global L2 norm of its mean gradient (before clipping), as the step computed it.
    rows: every row of the step's global batch, in row order; sum(loss * tokens) / sum(tokens)
      equals train_loss up to float32 rounding of the sums.
    from_step: the checkpoint the replay started from (0: the run's initial state).
    replayed_steps: steps run before `step` to reach it (step - 1 - from_step).
    num_devices: devices the replay ran on.
    logged_train_loss: the train_loss metrics.jsonl logged for this step alone (a train line
      whose window is this one step), or None when the run logged none.
    logged_grad_norm: that line's grad_norm, or None.
    applied: whether the step's update was applied (False: a non-finite loss or gradient or an
      fp16 overflow dropped it under config.nan_policy, or a loss spike under
      config.spike_policy="skip").
    data_index: the index of the step's batch in the data order: step - 1, unless a spike's
      rollback skipped batches before it (config.spike_policy="rollback").
  """
  step: int
  train_loss: float
  grad_norm: float
  rows: tuple[RowLoss, ...]
  from_step: int
  replayed_steps: int
  num_devices: int
  logged_train_loss: float | None = None
  applied: bool = True
  data_index: int | None = None
  logged_grad_norm: float | None = None

  def worst_first(self) -> list[RowLoss]:
    """The rows by loss, highest first; non-finite losses before every finite one."""
    return sorted(self.rows, key=lambda r: (math.isfinite(r.loss), -r.loss if math.isfinite(r.loss) else 0,
                                            r.row))

  def to_json(self) -> dict[str, Any]:
    """{"step", "train_loss", "grad_norm", "rows": [{"row", "loss", "tokens"}, ...] (row order),
    "from_step", "replayed_steps", "num_devices", "logged_train_loss", "logged_grad_norm",
    "applied", "data_index"}."""
    return {"step": self.step, "train_loss": self.train_loss, "grad_norm": self.grad_norm,
            "rows": [{"row": r.row, "loss": r.loss, "tokens": r.tokens} for r in self.rows],
            "from_step": self.from_step, "replayed_steps": self.replayed_steps,
            "num_devices": self.num_devices, "logged_train_loss": self.logged_train_loss,
            "logged_grad_norm": self.logged_grad_norm, "applied": self.applied, "data_index": self.data_index}


def logged_steps(records: Sequence[dict]) -> tuple[dict[int, dict], int, bool]:
  """(step -> the train line covering that step alone, the highest step logged, whether the run
  started from its seed in this workdir) from metrics.jsonl's records.

  A train line's window runs from the previous train line, or start/resume event, or the step a
  spike's rollback went back to, to its step; a step logged more than once (steps repeated after
  a resume or a rollback) keeps its latest line.
  """
  single: dict[int, dict] = {}
  mark, highest, fresh = None, 0, False
  for record in records:
    step = record.get("step")
    if not isinstance(step, int):
      continue
    if record.get("event") == "nonfinite_halt":  # The step that halted the run: no train line.
      highest = max(highest, step)
    elif record.get("event") == "rollback":  # A spike rolled the run back: it goes on from there.
      highest = max(highest, step)
      mark = record.get("to_step", mark)
    elif record.get("event") in ("start", "resume"):
      fresh = fresh or (record["event"] == "start" and step == 0)
      mark = step
    elif "train_loss" in record and "event" not in record:  # Events (a skipped spike) repeat it.
      if mark == step - 1:
        single[step] = record
      else:
        single.pop(step, None)  # A later line of several steps replaces an earlier single one.
      mark, highest = step, max(highest, step)
  return single, highest, fresh


def replay_step(workdir: str, step: int, devices: Sequence[Any] | None = None, *,
                progress: Callable[[int, int], None] | None = None) -> ReplayResult:
  """Re-runs step `step` of the built-in model's run in `workdir` and reports its losses.

  Args:
    workdir: a run directory written by `jaxdp train` / `train_and_evaluate`.
    step: the step, numbered as in metrics.jsonl (>= 1): the update from the state after
      step - 1 steps, on global batch step - 1.
    devices: the JAX devices to run on (default: all); any count that the run's global batch
      (per micro-batch) divides, one included.
    progress: called as progress(done, total) after each step replayed before `step`.

  Returns:
    A ReplayResult: the step's train_loss and grad_norm as its train step computes them (bitwise
    the logged ones under config.reduction="fixed_order", on any device count; within float32
    rounding otherwise) and every row's loss and token weight.

  Raises:
    JaxdpError: `step` < 1, beyond the run, or with no checkpoint at or before step - 1 to start
      from (and no fresh start of the run in this workdir); no checkpoints; the run's data
      missing or changed; a device count the run's config cannot use.
  """
  import jax
  import ml_collections

  from jaxdp.core.step import applied_updates
  from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint
  from jaxdp.runtime.checkpoint import exists as checkpoint_exists
  from jaxdp.runtime.checkpoint import location as checkpoint_location
  from jaxdp.runtime.metrics import read_metrics
  from jaxdp.runtime.spikes import data_index

  if not isinstance(step, int) or isinstance(step, bool) or step < 1:
    raise JaxdpError(f"--step={step!r}: steps are numbered from 1, as metrics.jsonl numbers them (step N "
                     "is the update from the state after N-1 steps); give --step >= 1")
  if not checkpoint_exists(checkpoint_location(workdir)):
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoints; give the directory a run was "
                     f"trained in (`jaxdp train --workdir {workdir}`)")
  try:
    records = read_metrics(workdir)
  except (OSError, ValueError):  # No metrics (copied checkpoints only), or a half-written line.
    records = []
  logged, highest, fresh = logged_steps(records)
  checkpoints = Checkpointer(workdir, create=False)
  try:
    saved = checkpoints.all_steps()
    if not saved:
      raise JaxdpError(f"--workdir={workdir!r} has no checkpoints; give the directory a run was "
                       f"trained in (`jaxdp train --workdir {workdir}`)")
    reached = max(highest, saved[-1])
    if step > reached:
      raise JaxdpError(f"--step={step} is beyond the run in {workdir!r}, which reached step {reached}; "
                       f"give --step between 1 and {reached}")
    before = [s for s in saved if s <= step - 1]
    if before:
      start = before[-1]
    elif fresh:
      start = 0  # The run's initial state from config.seed, as fit made it.
    else:
      fix = (f"give --step between {saved[0] + 1} and {reached}" if saved[0] < reached else
             "put the run's metrics.jsonl back beside its checkpoints, or replay a run that saves "
             "checkpoints more often (config.checkpoint_every)")
      raise JaxdpError(
          f"--step={step}: {workdir!r} has no checkpoint at or before step {step - 1} to replay from "
          f"(its checkpoints: {', '.join(map(str, saved))}) and did not start from config.seed here "
          f"(no start event at step 0 in its metrics.jsonl); {fix}")
    # The config that trained step N: the one saved by the process that trained it, with the first
    # checkpoint after it (a resume may change fields that do not define the run, e.g. precision),
    # else the one it resumed from.
    meta = checkpoints.restore_meta(next((s for s in saved if s >= step), start))
    # Batches a spike's rollback skipped (runtime/spikes.py): the latest checkpoint's meta holds
    # every one before it, the rollback events of metrics.jsonl any after it.
    skipped = {int(i) for r in records if r.get("event") == "rollback"
               for i in r.get("skipped_batches", ())}
    skipped.update(int(i) for i in checkpoints.restore_meta(saved[-1]).get("skipped_batches", ()))
    config = ml_collections.ConfigDict(meta["config"])
    # Whatever mesh the run had, the replay splits the batch over its own devices.
    config.mesh = ml_collections.ConfigDict({"data": 0, "model": 1, "replica": 1})
    config.offload_optimizer = False
    devices = list(jax.devices() if devices is None else devices)
    built = _built(config, devices, read_init_from=start == 0)
    # The batch sizes and data positions the run took (a batch_ramp, or a batch changed on a
    # resume): the latest checkpoint's schedule covers every step (data/schedule.py).
    # Set on every call: _built may hand back the LMRun of an earlier replay.
    from jaxdp.data.schedule import DataSchedule, parse_ramp
    latest = checkpoints.restore_meta(saved[-1]).get("data_schedule")
    built.schedule = (DataSchedule.from_meta(latest) if latest else
                      parse_ramp(config.get("batch_ramp", ""), built.spec.data.global_batch_size))
    digest = meta.get("data_digest")
    if digest is not None and built.dataset.digest is not None and digest != built.dataset.digest:
      raise JaxdpError(f"the data the run in {workdir!r} was trained on changed (sha256 {digest[:12]}... "
                       f"-> {built.dataset.digest[:12]}...); restore it to replay the run's batches")
    if start:
      try:
        state, _ = checkpoints.restore(start, built.abstract_state())
      except CorruptCheckpoint as e:
        raise JaxdpError(f"--workdir={workdir!r}: checkpoint {e}; replay a step after another "
                         "checkpoint (`jaxdp inspect` lists them)") from None
    else:
      state = built.init_state()
  finally:
    checkpoints.close()

  dp = built.dp
  total = step - 1 - start
  for done, s in enumerate(range(start, step - 1), 1):
    state, _ = dp.step(state, built.train_batch(data_index(s, sorted(skipped))))
    if progress is not None:
      jax.block_until_ready(state.step)
      progress(done, total)
  index = data_index(step - 1, sorted(skipped))
  batch = built.train_batch(index)
  rows = row_losses(built, state, batch)
  updates_before = int(jax.device_get(applied_updates(state)))
  state, metrics = dp.step(state, batch)
  metrics = jax.device_get(metrics)
  applied = int(jax.device_get(applied_updates(state))) > updates_before
  return ReplayResult(step=step, train_loss=float(metrics["train_loss"]),
                      grad_norm=float(metrics["grad_norm"]), rows=rows, from_step=start,
                      replayed_steps=total, num_devices=len(devices),
                      logged_train_loss=_number(logged.get(step, {}).get("train_loss")),
                      logged_grad_norm=_number(logged.get(step, {}).get("grad_norm")),
                      applied=applied, data_index=index)


def _number(value: Any) -> float | None:
  return None if value is None else float(value)


# The last run built by replay_step, (key, LMRun): a replay of another step of the same run on the
# same devices (a notebook's loop over steps, a test's) reuses its dataset and compiled steps.
_LAST_BUILT: list[tuple[tuple, Any]] = []


def _built(config: Any, devices: Sequence[Any], read_init_from: bool) -> Any:
  """build(config, devices) (jaxdp.lm.builder), or the previous call's LMRun of the same config,
  devices and initial parameters."""
  import json

  from jaxdp.lm.builder import build
  key = (json.dumps(config.to_dict(), sort_keys=True, default=str), tuple(d.id for d in devices),
         read_init_from and bool(config.get("init_from")))
  if _LAST_BUILT and _LAST_BUILT[0][0] == key:
    return _LAST_BUILT[0][1]
  _LAST_BUILT.clear()  # Its compiled steps and dataset go before the next are made.
  built = build(config, devices, read_init_from=read_init_from)
  _LAST_BUILT.append((key, built))
  return built


def row_losses(built: Any, state: Any, batch: dict[str, Any], preview_tokens: int = 24
               ) -> tuple[RowLoss, ...]:
  """Every row's (loss sum, token weight) of the placed global batch [A, b, ...], computed by the
  run's loss_fn on that row alone with the step's parameters (cast to the compute dtype) and
  randomness (the step's key; per-example keys come from the row's global index, so dropout
  masks are the train step's).
  """
  import jax
  import numpy as np

  from jaxdp.core import precision
  from jaxdp.core.step import checked_loss

  dp = built.dp
  per_row: Any = getattr(built, "_replay_rows", None)  # Compiled once per LMRun (see _built).
  if per_row is None:
    loss_fn, dtype = dp.loss_fn, dp.compute_dtype

    def rows_of(params, micro, rng):
      params = precision.cast_floating(params, dtype)
      one = lambda row: checked_loss(loss_fn(params, jax.tree.map(lambda x: x[None], row), rng))  # noqa: E731
      return jax.vmap(one)(micro)
    per_row = built._replay_rows = jax.jit(rows_of)

  rng = jax.random.fold_in(state.rng, state.step)
  sums, weights = [], []
  for a in range(jax.tree.leaves(batch)[0].shape[0]):
    loss, count = jax.device_get(per_row(state.params, {k: v[a] for k, v in batch.items()}, rng))
    sums.append(loss)
    weights.append(count)
  loss_sum, tokens = np.concatenate(sums), np.concatenate(weights)
  inputs = np.asarray(jax.device_get(batch["inputs"])).reshape(len(tokens), -1)
  tokenizer = built.dataset.tokenizer
  out = []
  for row, (s, w) in enumerate(zip(loss_sum.tolist(), tokens.tolist())):
    try:
      preview = tokenizer.decode([int(t) for t in inputs[row, :preview_tokens]])
    except Exception:  # noqa: BLE001 - a preview only: an undecodable id must not end the replay.
      preview = ""
    out.append(RowLoss(row=row, loss=s / w if w else 0.0, tokens=w, preview=preview))
  return tuple(out)
