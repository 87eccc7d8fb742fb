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
import math
import os
import sys
from typing import Any

import jax
import numpy as np

from jaxdp.errors import JaxdpError, disk_error, os_reason, writing
from jaxdp.runtime import logs


def _plain(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
    value = np.asarray(value).item()
  return value


def json_line(record: dict[str, Any]) -> str:
  """`record` as one line of strict JSON: a non-finite float (a NaN noise scale, an inf loss)
  is null, since NaN and Infinity are not JSON and other readers (jq, JavaScript) refuse them."""
  def finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, (list, tuple)):
      return [finite(v) for v in value]
    if isinstance(value, dict):
      return {k: finite(v) for k, v in value.items()}
    return value
  return json.dumps(finite(record), allow_nan=False)


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
    # The events file is created by the first record, not here: a run refused after this (a
    # resume whose config changed) must leave the workdir as it found it.
    self._events_pending = self._active
    self._events_failure: tuple[str, BaseException] | None = None  # TensorBoard's thread's.

  def _open_events(self) -> None:
    self._events_pending = False
    workdir = os.path.dirname(self.path)
    os.makedirs(workdir, exist_ok=True)
    try:
      self._events = _summary_writer()(logdir=workdir)
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot write metrics to {workdir!r} ({e.strerror}); free "
                       "disk space or pick a writable --workdir") from e
    self._watch_events(self._events)

  def _watch_events(self, events: Any) -> None:
    """tensorboardX writes events on a thread of its own, where a full disk would kill the thread
    (its traceback in the log, the events silently lost): its writes are wrapped to keep the
    disk's refusal (with the events file's path) for the next `write` to raise as one line."""
    for writer in getattr(events, "all_writers", {}).values():
      records = getattr(getattr(writer, "event_writer", None), "_ev_writer", None)
      if records is None:
        continue
      path = getattr(records, "_file_name", os.path.dirname(self.path))

      def guarded(write, path=path):
        def call(*args, **kwargs):
          try:
            return write(*args, **kwargs)
          except Exception as e:  # noqa: BLE001 - only disk refusals are kept; others re-raised.
            if not disk_error(e):
              raise
            self._events_failure = self._events_failure or (path, e)
            return None
        return call
      records.write_event = guarded(records.write_event)
      records.flush = guarded(records.flush)

  def write(self, record: dict[str, Any]) -> None:
    """Appends `record` to metrics.jsonl and TensorBoard (numbers as scalars at its step, events
    as text) and to every sink; process 0 only. Raises JaxdpError when the workdir is not writable.
    """
    if not self._active:
      return
    record = {k: _plain(v) for k, v in record.items()}
    if self._events_pending:
      self._open_events()
    self._raise_background_failure()
    try:
      with writing(self.path, "writing metrics to"), open(self.path, "a") as f:
        f.write(json_line(record) + "\n")
      step = record.get("step")
      events = self._events  # None only after close(): the JSON line is still written.
      if events is not None and "event" in record:
        events.add_text("events", json_line(record), global_step=step)
      elif events is not None and _is_number(step):
        for name, value in record.items():
          if name != "step" and _is_number(value):
            events.add_scalar(name, value, global_step=step)
          elif isinstance(value, list) and value and all(_is_number(v) for v in value):
            for i, v in enumerate(value):  # Per device or process (runtime/health.py): NAME/I.
              events.add_scalar(f"{name}/{i}", v, global_step=step)
      if events is not None:
        events.flush()
      self._raise_background_failure()
      for sink in self._sinks:
        sink.write(record)
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot write metrics to {os.path.dirname(self.path)!r} "
                       f"({os_reason(e, self.path)}); free disk space or pick a writable --workdir") from e

  def _raise_background_failure(self) -> None:
    """Raises, as one WriteFailed line, a write the disk refused since the last record where no
    exception could reach the run: TensorBoard's writer thread, the log file (runtime/logs.py).
    """
    failure, what = self._events_failure, "writing TensorBoard events to"
    if failure is None:
      failure, what = logs.take_failure(), "writing the log"
    if failure is None:
      return
    self._events_failure = None
    path, error = failure
    with writing(path or os.path.dirname(self.path), what):
      raise error

  def truncate_after(self, step: int) -> int:
    """Drops the records of steps after `step` from metrics.jsonl (process 0; returns how many).

    A run resumed from the checkpoint of `step` logs the later steps again; a run killed after
    logging them (kill -9 between a train line and the next save) would otherwise leave each
    such step logged twice, once per attempt. The file is replaced whole (written beside it,
    then renamed), so a crash here leaves either the old or the new file. TensorBoard keeps
    both attempts' points (it shows the later one at a step).
    """
    if not self._active or not os.path.exists(self.path):
      return 0
    try:
      records = read_metrics(os.path.dirname(self.path))
    except JaxdpError:
      return 0  # A damaged line in the middle: left for the user to see, not rewritten.
    kept = [r for r in records if not (_is_number(r.get("step")) and r["step"] > step)]
    if len(kept) == len(records):
      return 0
    partial = self.path + ".partial"
    try:
      with writing(self.path, "rewriting"), open(partial, "w") as f:
        f.write("".join(json_line(r) + "\n" for r in kept))
        f.flush()
        os.fsync(f.fileno())
      os.replace(partial, self.path)
    finally:
      if os.path.exists(partial):
        os.remove(partial)
    return len(records) - len(kept)

  def close(self) -> None:
    """Closes the sinks and the TensorBoard writer; a second call does nothing."""
    sinks, self._sinks = self._sinks, []
    self._events_pending = False  # Never opened: nothing to create now.
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
  """All records of a run's metrics.jsonl, in order. A last line cut short (a crash while it
  was written) is left out; null values are as written (non-finite numbers, see json_line).

  Raises:
    JaxdpError: a line before the last that is not a JSON object (naming the line).
  """
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path, "rb") as f:
    lines = [line for line in f.read().split(b"\n") if line.strip()]
  records = []
  for number, line in enumerate(lines, start=1):
    try:
      record = json.loads(line.decode("utf-8"))
      if not isinstance(record, dict):
        raise ValueError("not an object")
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors.
      if number == len(lines):  # Cut short by a crash mid-write: the lines before it stand.
        break
      raise JaxdpError(f"{path!r} line {number} is not a JSON record ({e}); fix or delete that "
                       "line") from None
    records.append(record)
  return records


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
