"""A step watchdog: a run whose step stops finishing exits instead of hanging.

A dead or stuck peer leaves every other process waiting in a collective forever, and a wait in
native code cannot be interrupted. A thread therefore watches the results of the dispatched steps
(without blocking on them) and, when the step after the last finished one has been pending for
longer than the timeout, prints which step and for how long, then ends the process at once.

The clock for step k starts when step k-1 finishes (or when the watch resumes), so it covers
loading the batch, the dispatch and the computation. The first step of a run is not timed: it
includes compilation. Evaluation and checkpointing pause this step clock (they may take long on
their own); a peer lost during them (or during compilation) is caught by the heartbeats of
runtime/heartbeat.py, which run in every phase. When a step is overdue and a heartbeat monitor
runs, the message names the processes that have not reached the step (from their heartbeats),
every process that can still run writes its stacks to WORKDIR/hang/process-I.txt, and the
message carries the timeline of each process's last step.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
import os
import sys
import threading
import time
from typing import Any

import jax

from jaxdp.runtime import heartbeat

EXIT_STATUS = 3  # Distinguishes a timed-out run from bad input (status 2).


class StepWatchdog:
  """Usage: `with StepWatchdog(timeout_s, start_step) as w:` then `w.dispatched(step, result)`
  after each step, and `w.pause()` / `w.resume()` around work that is not a step."""

  def __init__(self, timeout_s: float, start_step: int, *,
               exit: Callable[[int], Any] = os._exit, clock: Callable[[], float] = time.monotonic):
    self.timeout_s = timeout_s
    self._exit = exit
    self._poll_s = min(1.0, timeout_s / 4)
    self._clock = clock
    self._pending: collections.deque = collections.deque()  # (step, any output array), in order.
    self._finished = start_step  # The last finished step.
    self._since: float | None = None  # When the current step's clock started; None: untimed.
    self._paused = False
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, name="jaxdp-step-watchdog", daemon=True)

  def __enter__(self) -> StepWatchdog:
    if self.timeout_s:
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()

  def dispatched(self, step: int, result: jax.Array) -> None:
    """Records that `step` was dispatched; it finishes when `result` is ready."""
    if self.timeout_s:
      with self._lock:
        self._pending.append((step, result))
    heartbeat.dispatched(step)

  def pause(self) -> None:
    """Stops the clock while the host works outside the step (evaluation, a checkpoint)."""
    with self._lock:
      self._paused = True

  def resume(self) -> None:
    """Restarts the clock after `pause`; the time paused does not count."""
    with self._lock:
      self._paused = False
      if self._since is not None:
        self._since = self._clock()

  def check(self) -> None:
    """Retires finished steps and fires if the next one is overdue (called by the thread)."""
    with self._lock:
      now = self._clock()
      while self._pending and self._pending[0][1].is_ready():
        self._finished = self._pending.popleft()[0]
        self._since = now
        heartbeat.completed(self._finished)
      if self._paused or self._since is None or now - self._since <= self.timeout_s:
        return
      step, elapsed = self._finished + 1, now - self._since
    monitor = heartbeat.current()
    if monitor is not None and monitor.count == jax.process_count():
      monitor.refresh()
      # A peer frozen within the last beat has a heartbeat up to a beat younger than this step's
      # clock: a heartbeat silent for half the timeout (at least 3 beats) is a lost peer here.
      lost = monitor.lost(min(self.timeout_s, max(3 * monitor.beat_s, self.timeout_s / 2)))
      behind = monitor.behind()
      mine = heartbeat.status()
      waits = (f"; lost {monitor.names(lost)}" if lost else
               "; this process has not dispatched it: its main thread is still "
               + ("preparing it" if mine["phase"] == "step" else
                  f"in {heartbeat.describe_phase(mine['phase'], mine['phase_step'])}")
               + " (see its stacks)" if (mine["dispatched"] or 0) < step else
               f"; waiting for {monitor.names(behind)}" if behind else
               "; every process reached it (a collective or a device is stuck)")
      monitor.fire(f"step {step} did not finish within config.step_timeout_s={self.timeout_s:g} s "
                   f"({elapsed:.1f} s since step {step - 1} finished) on process "
                   f"{jax.process_index()} of {jax.process_count()}{waits}", exit=self._exit)
      return
    print(f"jaxdp: error: step {step} did not finish within config.step_timeout_s="
          f"{self.timeout_s:g} s ({elapsed:.1f} s since step {step - 1} finished) on process "
          f"{jax.process_index()} of {jax.process_count()}; a peer process may be stuck or dead. "
          "Exiting.", file=sys.stderr, flush=True)
    if jax.process_count() > 1 and jax.process_index() == 0:
      # Process 0 serves the coordinator, and its exit aborts the others at once: let their own
      # watchdogs (timing the same step, so firing within a poll of this one) report first.
      time.sleep(2 * self._poll_s + 1)
    self._exit(EXIT_STATUS)

  def _watch(self) -> None:
    while not self._stop.wait(self._poll_s):
      self.check()
