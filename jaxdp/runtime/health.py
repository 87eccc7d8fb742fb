"""Per-device and per-process health on every train line: stragglers and gradient outliers.

Every train line gains

  host_step_time_s   [processes]: each process's own host seconds per step over the window:
                     its wall time less what it spent waiting for the devices (dispatching a
                     step that waits for an earlier one, fetching the line's metrics), less
                     evaluation and checkpoints, and less writing the train lines (which
                     process 0 alone does). Its data loading, hooks and Python overhead are
                     in it; the devices' time is not (every process waits alike for the slowest
                     device in the collective, so device time cannot name a process from the
                     host). Gathered across processes at train lines only (one small all-gather).
  device_grad_norm   [data devices]: the window's mean norm of each data-parallel device's own
                     mean gradient before the all-reduce (core.step's "device_grad_norms", in the
                     data axis's device order; present where the step forms it: the dense
                     all-reduce, and ZeRO with one micro-batch).

and the loop flags, once per episode (again only after it ended), as a warning line and an event
in metrics.jsonl naming the device, process and host:

  straggler     a process whose mean host_step_time_s over the last `window` lines is above
                `straggler_factor` x the median of the other processes' (and by at least 5% of
                the step's wall time, so microseconds of noise never count). The first train
                line of a run (or of a resume) is reported but never judged: it holds the
                compilation and the collectives' first rendezvous, where process 0 waits on
                the host for the others, so a straggler could make process 0 look as slow;
  grad_outlier  a device whose mean local gradient norm over the last `window` lines is above
                `outlier_factor` x the median of the other devices' or below 1 / outlier_factor
                of it: a candidate bad device or bad data shard.

One process's devices share its host loop, so a per-device straggler inside one process is not
measurable from the host; its devices' gradient norms are.
"""

from __future__ import annotations

import collections
import os
import socket
import statistics
import time
from typing import Any

import jax
import numpy as np

from jaxdp.runtime.hooks import Hook, LogWindow, LoopContext

SLOW_ENV = "JAXDP_TEST_SLOW_PROCESS"


def gather_floats(value: float) -> list[float]:
  """`value` of every process, by process index (an all-gather: every process calls it)."""
  if jax.process_count() == 1:
    return [value]
  from jax.experimental import multihost_utils
  return [float(v) for v in np.asarray(multihost_utils.process_allgather(np.float64(value))).ravel()]


def gather_hostnames() -> list[str]:
  """Every process's host name, by process index (an all-gather of 64 bytes per process)."""
  name = socket.gethostname()
  if jax.process_count() == 1:
    return [name]
  from jax.experimental import multihost_utils
  raw = np.zeros(64, np.uint8)
  encoded = name.encode()[:64]
  raw[:len(encoded)] = np.frombuffer(encoded, np.uint8)
  rows = np.asarray(multihost_utils.process_allgather(raw)).reshape(-1, 64)
  return [bytes(row).rstrip(b"\0").decode(errors="replace") for row in rows]


def data_devices(mesh) -> list[Any]:
  """The first device of each data-parallel index, in the order of the batch's split (replica
  major, then data): index i of device_grad_norm."""
  return list(np.asarray(mesh.devices)[..., 0].reshape(-1))


def _against_others(values: list[float]):
  """(index, value, the others' median) of each finite value that has finite others."""
  for i, v in enumerate(values):
    others = [x for j, x in enumerate(values) if j != i and np.isfinite(x)]
    if others and np.isfinite(v):
      yield i, v, statistics.median(others)


def flagged_above(values: list[float], factor: float, floor: float = 0.0) -> list[tuple[int, float]]:
  """(index, the others' median) of each value above `factor` x the median of the others (and
  above it by more than `floor`)."""
  return [(i, m) for i, v, m in _against_others(values) if v > factor * m and v - m > floor]


def flagged_outside(values: list[float], factor: float) -> list[tuple[int, float]]:
  """(index, the others' median) of each value above `factor` x, or below 1 / factor of, the
  median of the others."""
  return [(i, m) for i, v, m in _against_others(values)
          if m > 0 and (v > factor * m or v < m / factor)]


class DeviceHealth(Hook):
  """host_step_time_s and device_grad_norm on every train line; straggler and grad_outlier
  warnings (see the module docstring). A factor of 0 turns its judgement off."""

  def __init__(self, straggler_factor: float = 1.5, outlier_factor: float = 3.0, window: int = 5):
    self.straggler_factor, self.outlier_factor, self.window = straggler_factor, outlier_factor, window
    self.times: collections.deque = collections.deque(maxlen=window)
    self.norms: collections.deque = collections.deque(maxlen=window)
    self.walls: collections.deque = collections.deque(maxlen=window)
    self.slow: set[int] = set()  # Processes flagged in the episode still going on.
    self.odd: set[int] = set()  # Devices flagged likewise.
    self.hosts: list[str] = []
    self.devices: list[Any] = []
    self.waited = self.logged = 0.0
    self.warm = False  # Set after the run's first train line (compilation, first rendezvous).

  def on_start(self, ctx: LoopContext) -> None:
    """Learns every process's host name (one all-gather) and the data devices."""
    self.hosts = gather_hostnames()
    self.devices = data_devices(ctx.dp.mesh)
    self.waited, self.logged = ctx.device_wait_s, ctx.log_s
    self.warm = False

  def on_rollback(self, ctx: LoopContext, step: int) -> None:
    """The windows before a rollback are not compared with the ones after it."""
    self.times.clear()
    self.norms.clear()
    self.walls.clear()

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Adds host_step_time_s and device_grad_norm; flags new stragglers and outliers."""
    waited, self.waited = ctx.device_wait_s - self.waited, ctx.device_wait_s
    # Writing the previous line (metrics.jsonl, TensorBoard, sinks) is process 0's alone: it
    # would make process 0 look slow in every healthy run.
    logged, self.logged = ctx.log_s - self.logged, ctx.log_s
    own = max(window.seconds - waited - logged, 0.0) / window.steps
    times = gather_floats(own)
    line["host_step_time_s"] = times
    if self.warm:
      self.times.append(times)
      self.walls.append(window.seconds / window.steps)
    self.warm = True
    norms = [np.asarray(m["device_grad_norms"], np.float64) for m in window.metrics
             if "device_grad_norms" in m]
    if norms:
      stacked = np.stack(norms)
      finite = np.isfinite(stacked).all(axis=1)
      if finite.any():
        mean = stacked[finite].mean(axis=0).tolist()
        line["device_grad_norm"] = mean
        self.norms.append(mean)
    if len(self.times) == self.window and self.straggler_factor and len(times) > 1:
      self._stragglers(ctx)
    if len(self.norms) == self.window and self.outlier_factor:
      self._outliers(ctx)

  def _host(self, process: int) -> str:
    return self.hosts[process] if process < len(self.hosts) else "?"

  def _stragglers(self, ctx: LoopContext) -> None:
    mean = np.mean(np.asarray(self.times), axis=0).tolist()
    floor = 0.05 * float(np.mean(self.walls))
    found = dict(flagged_above(mean, self.straggler_factor, floor))
    for process in sorted(set(found) - self.slow):
      devices = [d.id for d in self.devices if d.process_index == process]
      ctx.write({"event": "straggler", "step": ctx.step, "process": process,
                 "host": self._host(process), "devices": devices,
                 "host_step_time_s": mean[process], "others_median_s": found[process],
                 "lines": self.window})
      ctx.say(f"jaxdp: warning: step {ctx.step}: process {process} (host {self._host(process)}, "
              f"devices {devices}) is a straggler: {mean[process] * 1e3:.1f} ms of host time per "
              f"step against the other processes' median {found[process] * 1e3:.1f} ms over the "
              f"last {self.window} train lines (its data loading or host is slow)")
    self.slow = set(found)

  def _outliers(self, ctx: LoopContext) -> None:
    mean = np.mean(np.asarray(self.norms), axis=0).tolist()
    found = dict(flagged_outside(mean, self.outlier_factor))
    for index in sorted(set(found) - self.odd):
      device = self.devices[index] if index < len(self.devices) else None
      process = device.process_index if device is not None else 0
      ctx.write({"event": "grad_outlier", "step": ctx.step, "device": index,
                 "device_id": device.id if device is not None else None, "process": process,
                 "host": self._host(process), "grad_norm": mean[index],
                 "others_median": found[index], "lines": self.window})
      ctx.say(f"jaxdp: warning: step {ctx.step}: data device {index} ({device}, process "
              f"{process}, host {self._host(process)}) has a gradient-norm outlier: "
              f"{mean[index]:.4g} against the other devices' median {found[index]:.4g} over the "
              f"last {self.window} train lines (a bad device, or a bad data shard)")
    self.odd = set(found)


class SlowForTests(Hook):
  """Test-only: this process sleeps `seconds` before every step, a straggler for DeviceHealth."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def before_step(self, ctx: LoopContext, step: int) -> None:
    """Sleeps (this process only)."""
    time.sleep(self.seconds)

  @classmethod
  def from_env(cls) -> SlowForTests | None:
    """JAXDP_TEST_SLOW_PROCESS="PROCESS:SECONDS": the hook for that process."""
    process, _, seconds = os.environ.get(SLOW_ENV, "").partition(":")
    if process.isdigit() and seconds and int(process) == jax.process_index():
      return cls(float(seconds))
    return None
