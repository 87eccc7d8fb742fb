"""Time to target loss, measured inside the run: `TargetLosses((2.0, 1.8, 1.6))`.

When an evaluation first reaches (is at or below) each target eval loss, one line goes into
metrics.jsonl:

  {"event": "target_reached", "target": 1.8, "step": 400, "tokens": 1638400, "wall_s": 95.2,
   "productive_s": 81.7, "eval_loss": 1.7932}

  step, tokens     the step of that evaluation and the tokens trained up to it (step x tokens per
                   step; rows per step when the run gives no tokens_per_step);
  wall_s           seconds since this `fit` call started (compilation, evaluation and checkpoint
                   saves included);
  productive_s     the seconds of training steps only: the run's goodput clock's "productive"
                   seconds (runtime/goodput.py: wall_s less start-up, restore, compilation,
                   data waits, evaluation, checkpoint saves and steps lost to rollbacks).

Each target is reported once per workdir: a resumed run reads the events already in
metrics.jsonl and reports only the targets not reached yet (its seconds count from its own start,
and its line carries "resumed": true). The end-of-run result gains "targets_reached" (the lines
of this call). This module imports no JAX, so config validation can use `parse_targets`. The idea is the time-to-accuracy metric of DAWNBench and MLPerf (Coleman et al.
2017; Mattson et al. 2020), kept by the trainer itself so every run reports it.
"""

from __future__ import annotations

from collections.abc import Iterable
import math
import time
from typing import Any

from jaxdp.errors import JaxdpError
from jaxdp.runtime.hooks import Hook, LoopContext


def parse_targets(text: str | Iterable[float], field: str = "target_losses") -> tuple[float, ...]:
  """Target losses from "2.0,1.8,1.6" (or an iterable of numbers), sorted high to low.

  Raises:
    JaxdpError: an entry that is not a finite number > 0 (naming `field`).
  """
  items = [t for t in text.split(",") if t.strip()] if isinstance(text, str) else list(text)
  targets = []
  for item in items:
    try:
      value = float(item)
    except (TypeError, ValueError):
      raise JaxdpError(f"{field}={text!r}: {item!r} is not a number; give eval losses separated "
                       "by commas, e.g. '2.0,1.8,1.6'") from None
    if not math.isfinite(value) or value <= 0:
      raise JaxdpError(f"{field}={text!r}: {item!r} must be a finite eval loss > 0")
    targets.append(value)
  return tuple(sorted(set(targets), reverse=True))


class TargetLosses(Hook):
  """Logs the first evaluation reaching each target eval loss (see the module docstring).

  Args:
    targets: eval losses (any order; "2.0,1.8" also accepted).
  Raises:
    JaxdpError: a target that is not a finite number > 0.
  """

  def __init__(self, targets: str | Iterable[float]):
    self.targets = parse_targets(targets)
    self.reached: list[dict[str, Any]] = []
    self._done: set[float] = set()

  def on_start(self, ctx: LoopContext) -> None:
    """Reads the targets already reached (a resumed run logs each once)."""
    from jaxdp.runtime.metrics import read_metrics  # Imports JAX: config validation does not.
    try:
      logged = read_metrics(ctx.workdir)
    except (OSError, ValueError):
      logged = []
    self._done = {float(r["target"]) for r in logged if r.get("event") == "target_reached"}

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """After an evaluation: writes a `target_reached` event for each target its eval loss reached
    first (step, tokens, wall_s and productive_s in seconds).
    """
    loss = ctx.eval_loss
    if loss is None or not math.isfinite(loss):
      return
    now = time.perf_counter()
    productive = ctx.clock.productive  # The run's one productive clock (runtime/goodput.py).
    per_step = ctx.options.tokens_per_step or ctx.rows_per_step
    for target in self.targets:
      if target in self._done or loss > target:
        continue
      self._done.add(target)
      line = {"event": "target_reached", "target": target, "step": step, "tokens": step * per_step,
              "wall_s": now - ctx.started, "productive_s": productive, "eval_loss": loss}
      if ctx.restored:
        line["resumed"] = True
      self.reached.append(line)
      ctx.write(line)
      ctx.say(f"step {step}: eval_loss {loss:.4f} reached the target {target:g} after "
              f"{line['tokens']:,} tokens, {productive:.1f} s of training ({line['wall_s']:.1f} s wall)")

  def on_end(self, ctx: LoopContext, result: dict[str, Any]) -> None:
    """Adds the targets reached in this run to fit's result."""
    result["targets_reached"] = list(self.reached)
