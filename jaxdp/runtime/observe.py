"""How well a run uses its hardware, for every train line: MFU, step time, peak device memory and
the share of time spent waiting for input; and a `jax.profiler` trace of chosen steps.

Everything here is host bookkeeping (clocks, counters) plus facts read once from the compiled
step (`cost_analysis()`, `memory_analysis()`); the only device query per log step is the
allocator's `memory_stats()`, which reads counters without synchronising the devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import math
import os
import time
from typing import Any

import jax

from jaxdp.errors import writing
from jaxdp.runtime.peaks import Peak, step_peak
from jaxdp.runtime.profiling import parse_profile_steps  # noqa: F401  (observe's public name)


def compiled_flops(compiled) -> float:
  """FLOPs of one device's program of a compiled step (XLA's `cost_analysis()`).

  XLA counts the body of a while loop (`lax.scan`: gradient accumulation, scanned remat blocks)
  once, whatever its trip count: such steps need their FLOPs from a loop-free lowering (see
  model_flops_per_device below).
  """
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def compiled_peak_bytes(compiled) -> int:
  """One device's peak bytes of a compiled step from `memory_analysis()`: arguments + outputs -
  donated (aliased) + temporaries (XLA's own estimate where it gives one)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return 0
  estimate = (stats.argument_size_in_bytes + stats.output_size_in_bytes
              - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
  return int(max(estimate, getattr(stats, "peak_memory_in_bytes", 0) or 0))


def allocator_peak_bytes(devices: Sequence[jax.Device]) -> int | None:
  """The largest `peak_bytes_in_use` of `devices`' allocators, or None where the backend keeps
  no statistics (XLA:CPU)."""
  peaks = []
  for device in devices:
    try:
      stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics may raise instead of None.
      stats = None
    if not stats or "peak_bytes_in_use" not in stats:
      return None
    peaks.append(int(stats["peak_bytes_in_use"]))
  return max(peaks) if peaks else None


class StepWatch:
  """The hardware numbers of a run's train lines.

  `flops_per_device`: FLOPs of one optimizer step on one device (`compiled_flops`, or a
  loop-free count); `compiled_bytes`: the compiled step's peak bytes per device, used where the
  allocator keeps no statistics. Wrap the batch iterator with `timed` and call `fields` at each
  log step with the steps and seconds since the last one.
  """

  def __init__(self, devices: Sequence[jax.Device], compute_dtype, flops_per_device: float,
               compiled_bytes: int):
    self.devices = list(devices)
    self.flops_per_device = flops_per_device
    self.peak: Peak = step_peak(self.devices, compute_dtype)
    self.compiled_bytes = compiled_bytes
    self.memory_source = ("memory_stats" if allocator_peak_bytes(self.devices) is not None
                          else "memory_analysis")
    self.waited = 0.0  # Seconds spent waiting for the next batch since the last log step.

  def timed(self, batches) -> Iterator:
    """`batches`, counting the seconds each `next()` blocks (the loop waiting for input)."""
    iterator = iter(batches)
    while True:
      start = time.perf_counter()
      try:
        batch = next(iterator)
      except StopIteration:
        return
      self.waited += time.perf_counter() - start
      yield batch

  def restart(self) -> None:
    """Starts a new interval (after a log step, or after the first step's compilation)."""
    self.waited = 0.0

  def peak_memory_bytes(self) -> int:
    """Peak device memory in bytes: the allocator's peak when memory_stats has it, else the
    compiled step's memory analysis.
    """
    if self.memory_source == "memory_stats":
      found = allocator_peak_bytes(self.devices)
      if found is not None:
        return found
    return self.compiled_bytes

  def fields(self, steps: int, seconds: float) -> dict[str, Any]:
    """mfu, step_time_s, data_wait_fraction and peak_memory_bytes of `steps` steps that took
    `seconds` of wall time (evaluation and checkpoints excluded)."""
    seconds = max(seconds, 1e-9)
    achieved = self.flops_per_device * len(self.devices) * steps / seconds
    fields = {"step_time_s": seconds / steps,
              "mfu": achieved / self.peak.flops_per_sec if self.peak.flops_per_sec else math.nan,
              "data_wait_fraction": min(1.0, self.waited / seconds),
              "peak_memory_bytes": self.peak_memory_bytes()}
    self.restart()
    return fields

  def describe(self) -> str:
    """The banner line: what MFU divides by, and where peak memory comes from."""
    memory = ("the allocators' memory_stats()" if self.memory_source == "memory_stats" else
              "the compiled step's memory_analysis() (this backend keeps no allocator statistics)")
    return (f"  mfu: {self.flops_per_device:.3g} FLOPs per device per step against "
            f"{self.peak.detail}; peak_memory_bytes from {memory}")

  def start_record(self) -> dict[str, Any]:
    """Fields of the run's start event in metrics.jsonl."""
    return {"flops_per_device_step": self.flops_per_device,
            "peak_flops_per_sec": self.peak.flops_per_sec, "peak_flops_source": self.peak.source,
            "peak_flops_detail": self.peak.detail, "peak_memory_source": self.memory_source}


class StepProfiler:
  """A `jax.profiler` trace of steps START+1 .. STOP into `directory` (TensorBoard's profile
  plugin and Perfetto read it). A run resumed past START traces from where it resumes, up to
  STOP; one resumed past STOP traces nothing."""

  def __init__(self, window: tuple[int, int] | None, directory: str):
    self.window, self.directory = window, directory
    self.active = False

  def before_step(self, step: int) -> None:
    """Called with the state's step before running the next one."""
    if self.window and not self.active and self.window[0] <= step < self.window[1]:
      with writing(self.directory, "writing the profiler trace to"):
        os.makedirs(self.directory, exist_ok=True)
        jax.profiler.start_trace(self.directory)
      self.active = True

  def after_step(self, step: int, outputs: Any) -> None:
    """Called with the state's step after a step; ends the trace at STOP (waiting for the
    step's `outputs`, so the trace holds its device work)."""
    if self.active and self.window is not None and step >= self.window[1]:  # Active: a window.
      self.stop(outputs)

  def __enter__(self) -> StepProfiler:
    return self

  def __exit__(self, *exc) -> None:
    self.stop()  # A run that ends (or fails) inside the window still closes its trace.

  def stop(self, outputs: Any = None) -> None:
    """Ends the trace (if one is running) once `outputs` are ready, so the last step is in it."""
    if self.active:
      jax.block_until_ready(outputs)
      self.active = False
      with writing(self.directory, "writing the profiler trace to"):
        jax.profiler.stop_trace()


def lowered_flops(lowered) -> float:
  """FLOPs of a lowered (not compiled) computation, from XLA's cost analysis of its HLO."""
  cost = lowered.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))
