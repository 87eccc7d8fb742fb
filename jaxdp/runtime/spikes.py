"""Loss-spike recovery: `spike_policy="skip"` (the step drops the update: core.step.loss_spike;
`SpikeSkips` logs each) and `spike_policy="rollback"` returns to the last checkpoint before a spike and
skips the batch that caused it, as practitioners do by hand (OPT-175B's logbook, Zhang et al. 2022;
PaLM, Chowdhery et al. 2022, section 5.1: "restart from a checkpoint roughly 100 steps before the
spike, and skip roughly 200-500 data batches").

A spike: a finite train loss above mean + k * std of the recent losses (`LossStats`: an
exponential moving mean and variance over about `window` steps, warm after `window` steps; the
losses judged spikes are not folded in). The loss of update s is measured on the batch of update
s before it is applied, so that batch is the one skipped and the checkpoint returned to is the
latest at or before step s - 1 (the initial state when there is none).

Skipping is a record, not a change of the data: `skipped` (sorted data indices never trained on)
maps the loop's step to the index its batch is drawn from (`data_index`): the batches after a
skipped one move up by one. The record is saved in every later checkpoint's meta
("skipped_batches", with "rollbacks" and the loss statistics "spike_stats"), so a resume from any
checkpoint draws the same batches and detects the same spikes: the run is reproduced bitwise.
Each rollback also writes a "rollback" event to metrics.jsonl.

Detection reads each step's loss on the host: at every train line (the window's losses, already
fetched) and, before every checkpoint save or evaluation, the losses of the steps since the last
line, so no checkpoint holds an update of a spiking batch. Between those points the loop runs
without extra host syncs.
"""

from __future__ import annotations

from collections.abc import Sequence
import math
from typing import Any

import jax

from jaxdp.errors import JaxdpError
from jaxdp.runtime.hooks import Hook, LogWindow, LoopContext


def data_index(step: int, skipped: Sequence[int]) -> int:
  """The data index of the batch the loop trains on at `step` (the state's step before the update):
  the step-th index (from 0) that is not in `skipped`."""
  index = step
  for s in sorted(skipped):
    if s <= index:
      index += 1
    else:
      break
  return index


class LossStats:
  """Exponential moving mean and variance of the train loss over about `window` steps (West 1979's
  weighted update; the first `window` losses are weighted equally), and the spike threshold.

  In float64 on the host: the same losses give the same statistics on every process and resume.
  """

  def __init__(self, window: int, sigmas: float, mean: float = 0.0, var: float = 0.0,
               count: int = 0):
    self.window, self.sigmas = window, sigmas
    self.mean, self.var, self.count = mean, var, count

  @property
  def warm(self) -> bool:
    """Whether `window` losses have been folded in (only then are spikes judged)."""
    return self.count >= self.window

  @property
  def threshold(self) -> float:
    """mean + sigmas * std: a loss above it is a spike (once warm)."""
    return self.mean + self.sigmas * math.sqrt(self.var)

  def is_spike(self, loss: float) -> bool:
    """Whether a finite `loss` is a spike."""
    return self.warm and math.isfinite(loss) and loss > self.threshold

  def update(self, loss: float) -> None:
    """Folds in a loss (non-finite ones are left to nan_policy and ignored)."""
    if not math.isfinite(loss):
      return
    self.count += 1
    alpha = 1.0 / min(self.count, self.window)
    diff = loss - self.mean
    self.mean += alpha * diff
    self.var = (1.0 - alpha) * (self.var + alpha * diff * diff)

  def to_dict(self) -> dict[str, Any]:
    """The statistics for a checkpoint's meta (JSON floats round-trip exactly)."""
    return {"mean": self.mean, "var": self.var, "count": self.count}

  @classmethod
  def from_dict(cls, saved: dict | None, window: int, sigmas: float) -> LossStats:
    """The statistics saved by `to_dict` (fresh ones for None)."""
    saved = saved or {}
    return cls(window, sigmas, float(saved.get("mean", 0.0)), float(saved.get("var", 0.0)),
               int(saved.get("count", 0)))


class SpikeRollback(Hook):
  """spike_policy="rollback" (see the module docstring): judges every step's loss, asks the loop
  to return to the last checkpoint before a spike (`ctx.request_rollback`), and halts (JaxdpError)
  when a spike would be the (max_rollbacks + 1)-th rollback within `rollback_window` steps."""

  def __init__(self, sigmas: float, window: int, max_rollbacks: int, rollback_window: int):
    self.sigmas, self.window = sigmas, window
    self.max_rollbacks, self.rollback_window = max_rollbacks, rollback_window
    self.stats = LossStats(window, sigmas)
    self.checked = 0  # The last step whose loss was judged.

  def on_start(self, ctx: LoopContext) -> None:
    """Reads the statistics of the checkpoint the run starts from; judges before saves."""
    self._load(ctx)
    ctx.guards.append(self.judge_pending)

  def _load(self, ctx: LoopContext) -> None:
    self.stats = LossStats.from_dict(ctx.run.meta.get("spike_stats"), self.window, self.sigmas)
    self.checked = ctx.step

  def on_rollback(self, ctx: LoopContext, step: int) -> None:
    """Back at a checkpoint: its statistics again."""
    self._load(ctx)

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Judges the window's losses (already on the host)."""
    self._judge(ctx, window.first_step, [float(m["train_loss"]) for m in window.metrics])

  def judge_pending(self, ctx: LoopContext) -> None:
    """Before a save or evaluation: judges the steps since the last train line (one fetch)."""
    pending, first = ctx.unlogged()
    if ctx.rollback_to is None and pending and first + len(pending) - 1 > self.checked:
      losses = jax.device_get([m["train_loss"] for m in pending])
      self._judge(ctx, first, [float(x) for x in losses])
    ctx.run.meta["spike_stats"] = self.stats.to_dict()

  def _judge(self, ctx: LoopContext, first: int, losses: list[float]) -> None:
    for offset, loss in enumerate(losses):
      step = first + offset
      if step <= self.checked or ctx.rollback_to is not None:
        continue
      self.checked = step
      if self.stats.is_spike(loss):
        self._spike(ctx, step, loss)
        return
      self.stats.update(loss)

  def _spike(self, ctx: LoopContext, step: int, loss: float) -> None:
    run = ctx.run
    threshold = self.stats.threshold
    rollbacks = [int(s) for s in run.meta.get("rollbacks", [])]
    recent = [s for s in rollbacks if s > step - self.rollback_window]
    if len(recent) >= self.max_rollbacks:
      raise JaxdpError(
          f"the train loss spiked at step {step} ({loss:.4g} > {threshold:.4g}, mean + "
          f"{self.sigmas:g} std of the last {self.window} steps) after {len(recent)} rollbacks "
          f"within {self.rollback_window} steps (at steps {recent}): the run is unstable, not "
          f"unlucky; {self._advice(run.record.advice)}")
    run.checkpoints.wait()
    earlier = [s for s in run.checkpoints.all_steps() if s <= step - 1]
    to_step = max(earlier, default=0)
    skipped = sorted(int(s) for s in run.meta.get("skipped_batches", []))
    index = data_index(step - 1, skipped)
    skipped = sorted(skipped + [index])
    ctx.request_rollback(to_step, {"skipped_batches": skipped, "rollbacks": rollbacks + [step]})
    ctx.write({"event": "rollback", "step": step, "to_step": to_step, "skipped_batch": index,
               "skipped_batches": skipped, "train_loss": loss, "threshold": threshold})
    ctx.say(f"step {step}: loss spike ({loss:.4g} > {threshold:.4g}, mean + {self.sigmas:g} std "
            f"of the last {self.window} steps): back to step {to_step}, skipping batch {index}")

  def _advice(self, flags: Any) -> str:
    """What to change to go on: command-line flags that a resume of the same workdir takes when
    the run has them (`flags`, the run's loop.HaltAdvice: the same 10x lower learning rate as
    every halt), clipping only when it is off; else words for fit's caller."""
    more = self.max_rollbacks + 2
    if flags is None:
      return ("resume with a lower learning rate, gradient clipping if it is off, or a higher "
              f"spike_max_rollbacks (e.g. {more}) to go on rolling back")
    clip = ", --config.grad_clip=1.0 (clipping is off)" if flags.grad_clip == 0 else ""
    return (f"run the same command again with --config.learning_rate={flags.lower_learning_rate()} "
            f"(10x lower){clip}, or --config.spike_max_rollbacks={more} to go on rolling back")


class SpikeSkips(Hook):
  """spike_policy="skip": a "loss_spike_skipped" event in metrics.jsonl for each update the step
  dropped as a spike (read from the window's metrics: no extra host sync)."""

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Writes one event per dropped spike of the window."""
    for offset, m in enumerate(window.metrics):
      if int(m.get("loss_spike", 0)):
        step = window.first_step + offset
        loss = float(m["train_loss"])
        ctx.write({"event": "loss_spike_skipped", "step": step, "train_loss": loss})
        ctx.say(f"step {step}: loss spike ({loss:.4g}): the update was dropped (spike_policy='skip')")
