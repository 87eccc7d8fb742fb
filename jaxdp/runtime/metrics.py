"""Metrics at the edge: JSON lines in WORKDIR/metrics.jsonl, TensorBoard events beside them, and a
progress bar.

Only process 0 writes; every line is flushed, so a killed run loses no logged step. Each numeric
field of a step's line (train_loss, lr, grad_norm, tokens_per_sec, eval_loss, and any a strategy
adds, e.g. comm_bytes_per_step; the hardware's mfu, step_time_s, peak_memory_bytes and
data_wait_fraction, see runtime/observe.py) becomes a TensorBoard scalar of the same name at that
step; event lines (start, resume, early_stopping) become text under the tag "events". Extra
sinks (e.g. Weights & Biases, runtime/wandb_sink.py) receive every record as well.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
import sys
from typing import Any

import jax
import numpy as np

from jaxdp.errors import JaxdpError, os_reason


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
    value = np.asarray(value).item()
  return value


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX's writer module imports torch when it can, only to accept torch tensors as
  images; jaxdp writes scalars. Where torch is installed but not yet imported (the test extra,
  many ML images) that import costs about 2.6 s of every `jaxdp train` startup, so it is hidden
  for the duration of this import. A process that has already imported torch keeps it.
  """
  import sys
  if "tensorboardX.writer" in sys.modules or "torch" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles.
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class MetricsWriter:
  """metrics.jsonl and TensorBoard events in `workdir`, plus `sinks`: objects with
  `write(record)` and `close()` (process 0 only)."""

  def __init__(self, workdir: str, sinks: Sequence[Any] = ()):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._active = jax.process_index() == 0
    self._sinks = list(sinks) if self._active else []
    self._events = None
    if self._active:
      os.makedirs(workdir, exist_ok=True)
      try:
        self._events = _summary_writer()(logdir=workdir)
      except OSError as e:
        raise JaxdpError(f"--workdir: cannot write metrics to {workdir!r} ({e.strerror}); free "
                         "disk space or pick a writable --workdir") from e

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` to metrics.jsonl and TensorBoard (numbers as scalars at its step, events
    as text) and to every sink; process 0 only. Raises JaxdpError when the workdir is not writable.
    """
    if not self._active:
      return
    record = {k: _plain(v) for k, v in record.items()}
    try:
      with open(self.path, "a") as f:
        f.write(json.dumps(record) + "\n")
      step = record.get("step")
      events = self._events  # None only after close(): the JSON line is still written.
      if events is not None and "event" in record:
        events.add_text("events", json.dumps(record), global_step=step)
      elif events is not None and _is_number(step):
        for name, value in record.items():
          if name != "step" and _is_number(value):
            events.add_scalar(name, value, global_step=step)
      if events is not None:
        events.flush()
      for sink in self._sinks:
        sink.write(record)
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot write metrics to {os.path.dirname(self.path)!r} "
                       f"({os_reason(e, self.path)}); free disk space or pick a writable --workdir") from e

  def close(self) -> None:
    """Closes the sinks and the TensorBoard writer; a second call does nothing."""
    sinks, self._sinks = self._sinks, []
    for sink in sinks:
      sink.close()
    if self._events is not None:
      events, self._events = self._events, None
      try:
        events.close()
      except Exception:  # noqa: BLE001 - a failed disk already raised in write(); don't mask it.
        # tensorboardX's atexit hook would retry the failed flush and print a traceback when the
        # interpreter exits; mark its event writers closed (what did not fit is lost either way).
        # Its logger thread is stopped too, or it fails on the closed queue at exit.
        for writer in getattr(events, "all_writers", {}).values():
          event_writer = getattr(writer, "event_writer", None)
          if event_writer is not None:
            event_writer._closed = True  # noqa: SLF001
            try:
              event_writer._worker.stop()  # noqa: SLF001
            except Exception:  # noqa: BLE001 - already stopped, or the thread died.
              pass


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """All records of a run's metrics.jsonl, in order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _short(value: float | str) -> str:
  """4 decimals for losses, whole numbers for rates; strings as they are."""
  if isinstance(value, str):
    return value
  return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"


class Progress:
  """A tqdm bar over optimizer steps showing loss and throughput; when disabled (batch jobs,
  where a bar's carriage returns make unreadable logs), one plain line per log step instead."""

  def __init__(self, start: int, total: int, enabled: bool):
    self._bar = None
    self._step, self._total = start, total
    # A bar only on a terminal: piped or batch logs (SLURM) get plain lines, not \r redraws.
    enabled = enabled and sys.stderr.isatty()
    self._plain = not enabled and jax.process_index() == 0
    if enabled and jax.process_index() == 0:
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

  def update(self, steps: int, **postfix) -> None:
    """Advances by `steps` steps, showing `postfix` (name -> value) beside the count."""
    self._step += steps
    if self._bar is not None:
      if postfix:  # Before update(), which redraws: the bar shows this step's values.
        self._bar.set_postfix({k: _short(v) for k, v in postfix.items()}, refresh=False)
      self._bar.update(steps)
    elif self._plain:
      values = ", ".join(f"{k} {_short(v)}" for k, v in postfix.items())
      print(f"step {self._step}/{self._total}" + (f": {values}" if values else ""), flush=True)

  def write(self, line: str) -> None:
    """Prints `line` above the bar (or plainly without one), on process 0 only."""
    if self._bar is not None:
      self._bar.write(line)
    elif jax.process_index() == 0:
      print(line, flush=True)

  def close(self) -> None:
    """Closes the bar, if one is shown."""
    if self._bar is not None:
      self._bar.close()
