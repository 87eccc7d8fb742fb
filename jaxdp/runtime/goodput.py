"""Goodput: where a run's wall time went (MaxText's goodput idea, kept by the loop itself).

One clock per `fit` call (`LoopContext.clock`) splits the seconds since `fit` began into
categories, each second in exactly one of them:

  productive   training steps (dispatch, computation, the train line), after the first step began
  compile      lowering and compiling the train step
  restore      reading the checkpoint a run resumes from (or rolls back to)
  checkpoint   checkpoint saves (the part the loop waits for; the write itself is asynchronous)
  data_wait    waiting for the next batch
  eval         evaluation (the validation loss and downstream tasks)
  lost         steps trained and then thrown away: after the last checkpoint before a crash or
               kill (counted by the next run of the workdir) or before a rollback
  other        start-up (building the run, the banner) and the rest of the step boundary

A span (`with clock.span("eval"): ...`) charges its seconds to its category; time outside every
span goes to "other" before the loop's first step and to "productive" from then on. Spans nest:
the innermost one is charged.

Across restarts: process 0 keeps each run's seconds in WORKDIR/goodput.json (rewritten at every
train line and at the end), with the productive seconds reached at each checkpoint. The next run
of the workdir moves the productive seconds trained after the checkpoint it resumes from into
"lost" (the time between the last train line and the kill is not known, so not counted), and the
summary sums every run of the workdir.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import contextlib
import json
import os
import time
from typing import Any

from jaxdp.errors import atomic_write

CATEGORIES = ("productive", "compile", "restore", "checkpoint", "data_wait", "eval", "lost", "other")
FILE = "goodput.json"


class GoodputClock:
  """Seconds per category (see the module docstring); `now` is the clock (seconds, monotonic)."""

  def __init__(self, now: Callable[[], float] = time.perf_counter):
    self.now = now
    self.began = now()
    self._mark = self.began
    self._stack = ["other"]  # The category charged now: the innermost span, else the default.
    self.totals = dict.fromkeys(CATEGORIES, 0.0)
    self.productive_at: dict[int, float] = {}  # Step -> productive seconds up to it (checkpoints).

  def _charge(self) -> None:
    now = self.now()
    self.totals[self._stack[-1]] += now - self._mark
    self._mark = now

  def start_steps(self) -> None:
    """The loop's first step begins: time outside spans counts as productive from now on."""
    self._charge()
    self._stack[0] = "productive"

  @contextlib.contextmanager
  def span(self, category: str) -> Iterator[None]:
    """Charges the seconds inside to `category` (one of CATEGORIES)."""
    if category not in self.totals:
      raise ValueError(f"unknown goodput category {category!r}; one of {CATEGORIES}")
    self._charge()
    self._stack.append(category)
    try:
      yield
    finally:
      self._charge()
      self._stack.pop()

  def timed(self, items: Iterator, category: str = "data_wait") -> Iterator:
    """`items`, the wait for each one charged to `category`."""
    iterator = iter(items)
    while True:
      with self.span(category):
        try:
          item = next(iterator)
        except StopIteration:
          return
      yield item

  def seconds(self) -> dict[str, float]:
    """Seconds per category since `fit` began (up to now)."""
    self._charge()
    return dict(self.totals)

  @property
  def productive(self) -> float:
    """Productive seconds so far (TargetLosses' productive_s)."""
    return self.seconds()["productive"]

  @property
  def elapsed(self) -> float:
    """Wall seconds since `fit` began."""
    return self.now() - self.began

  def mark_step(self, step: int) -> None:
    """Remembers the productive seconds reached at `step` (a checkpoint), for later losses."""
    self.productive_at[step] = self.productive

  def lose_since(self, step: int) -> float:
    """Moves the productive seconds trained after `step` (a checkpoint returned to) into "lost";
    returns them. A step this run never reached (before its start) loses all of its steps."""
    self._charge()
    lost = max(self.totals["productive"] - self.productive_at.get(step, 0.0), 0.0)
    self.totals["productive"] -= lost
    self.totals["lost"] += lost
    self.productive_at = {s: v for s, v in self.productive_at.items() if s <= step}
    return lost


def shares(seconds: dict[str, float]) -> dict[str, float]:
  """Each category's share of the total (fractions summing to 1; all 0 for no time)."""
  total = sum(seconds.values())
  return {k: (v / total if total > 0 else 0.0) for k, v in seconds.items()}


class GoodputLedger:
  """WORKDIR/goodput.json: every run of a workdir (process 0 writes; see the module docstring).

  `begin(start_step)` opens this run's entry and, when it resumes from `start_step`, moves the
  productive seconds the earlier runs trained after it into their "lost"; returns those seconds.
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, FILE)
    self.enabled = enabled
    self.runs: list[dict[str, Any]] = []
    if os.path.exists(self.path):
      try:
        with open(self.path) as f:
          self.runs = list(json.load(f).get("runs", []))
      except (OSError, ValueError, AttributeError):
        self.runs = []  # A torn file (killed while writing): the history restarts.

  def begin(self, start_step: int) -> float:
    """Opens this run's entry (see the class docstring); the lost seconds of earlier runs."""
    lost = 0.0
    for run in self.runs:
      last = int(run.get("last_step", 0))
      if last <= start_step:
        continue
      at = {int(k): float(v) for k, v in run.get("productive_at", {}).items()}
      first = int(run.get("start_step", 0))
      keep = at.get(start_step, 0.0) if start_step >= first else 0.0
      seconds = run["seconds"]
      moved = max(float(seconds.get("productive", 0.0)) - keep, 0.0)
      seconds["productive"] = float(seconds.get("productive", 0.0)) - moved
      seconds["lost"] = float(seconds.get("lost", 0.0)) + moved
      run["last_step"] = start_step
      run["productive_at"] = {str(s): v for s, v in at.items() if s <= start_step}
      lost += moved
    self.runs.append({"start_step": start_step, "last_step": start_step,
                      "seconds": dict.fromkeys(CATEGORIES, 0.0), "productive_at": {}})
    return lost

  def update(self, clock: GoodputClock, step: int) -> None:
    """Records this run's seconds and step so far (and rewrites the file, process 0)."""
    if not self.runs:
      self.begin(step)
    run = self.runs[-1]
    run["seconds"], run["last_step"] = clock.seconds(), step
    run["productive_at"] = {str(s): v for s, v in clock.productive_at.items()}
    if not self.enabled:
      return
    # Whole or not at all: a kill or a full disk never leaves half a file.
    atomic_write(self.path, json.dumps({"runs": self.runs}), "writing")

  def total(self) -> dict[str, float]:
    """Seconds per category summed over every run of the workdir."""
    summed = dict.fromkeys(CATEGORIES, 0.0)
    for run in self.runs:
      for k, v in run.get("seconds", {}).items():
        summed[k] = summed.get(k, 0.0) + float(v)
    return summed


def summary_line(run: dict[str, float], total: dict[str, float], runs: int) -> str:
  """One line: this run's goodput and badput shares, and the workdir's over `runs` runs."""
  def parts(seconds):
    share = shares(seconds)
    return ", ".join(f"{k} {share[k]:.1%}" for k in CATEGORIES if share[k] >= 0.0005)
  line = f"goodput: {shares(run)['productive']:.1%} of {sum(run.values()):.1f} s ({parts(run)})"
  if runs > 1:
    line += (f"; all {runs} runs of this workdir: {shares(total)['productive']:.1%} of "
             f"{sum(total.values()):.1f} s ({parts(total)})")
  return line
