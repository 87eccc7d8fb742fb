"""The training loop for any model: `fit(dp, init_fn, train_batches, workdir=..., num_steps=...)`.

Given a `DataParallel`, an `init_fn(rng) -> params` and a data source whose batch for step `s`
is a function of `(seed, s)` only (so resuming at step `s` needs nothing but `s`), `fit` restores
or initialises the state, compiles the step and runs a small loop; everything else a run does
(the train line, evaluation and early stopping, checkpoints, preemption, the step watchdog, the
progress bar, hardware numbers, the gradient noise scale, the profiler) is a hook
(runtime/hooks.py for the interface, runtime/loop_hooks.py for these). `Run` holds the run's
checkpoints and metrics: restore, save, and the halt on a non-finite state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
import contextlib
import dataclasses
import math
import os
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxdp.core.state import InitFn, TrainState
from jaxdp.core.tree import count_params
from jaxdp.data.pipeline import prefetch
from jaxdp.errors import JaxdpError
from jaxdp.parallel.data_parallel import DataParallel
from jaxdp.parallel.exchange import bytes_per_step
from jaxdp.runtime import agreement, heartbeat, logs, paths, report
from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint, is_url, record_location, step_directory
from jaxdp.runtime.checkpoint import exists as checkpoint_exists
from jaxdp.runtime.fieldpath import dotted_get
from jaxdp.runtime.goodput import GoodputClock, GoodputLedger, shares, summary_line
from jaxdp.runtime.hooks import Hook, LoopContext, overriding
from jaxdp.runtime.lock import WorkdirLock
from jaxdp.runtime.loop_hooks import Cadence as Cadence
from jaxdp.runtime.loop_hooks import HardwareStats, TrainLog, builtin_hooks
from jaxdp.runtime.loop_hooks import StopRequests as StopRequests
from jaxdp.runtime.loop_hooks import applied_lr as applied_lr
from jaxdp.runtime.loop_hooks import noise_scale_unavailable as noise_scale_unavailable
from jaxdp.runtime.loop_hooks import record_evaluation as record_evaluation
from jaxdp.runtime.loop_hooks import train_line as train_line
from jaxdp.runtime.metrics import MetricsWriter, read_metrics
from jaxdp.runtime.options import FitOptions, fit_options
from jaxdp.runtime.spikes import data_index


def state_bytes_per_device(state) -> int:
  """Bytes of the state held by the first local device, read from the arrays' shards."""
  device = jax.local_devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


def warn(message: str) -> None:
  """Prints `jaxdp: warning: MESSAGE` to stderr, on process 0 only."""
  if jax.process_index() == 0:
    print(f"jaxdp: warning: {message}", file=sys.stderr, flush=True)


def changed_fields(saved: dict, current: dict, fields: Sequence[str],
                   defaults: dict | None = None) -> list[str]:
  """Dotted `fields` whose value differs between a checkpoint's config and `current`.

  A field the checkpoint's config lacks (written before the field existed) had the behaviour of
  its default then: `defaults[name]` stands in for it.
  """
  return [f"{name} ({old!r} -> {new!r})" for name, old, new in _changes(saved, current, fields,
                                                                        defaults)]


def _changes(saved: dict, current: dict, fields: Sequence[str],
             defaults: dict | None = None) -> list[tuple[str, Any, Any]]:
  """(field, saved value, current value) of each of `fields` that differs (see changed_fields)."""
  absent = object()

  def get(tree, dotted):
    return dotted_get(tree, dotted, absent)

  def old(name):
    value = get(saved, name)
    return (defaults or {}).get(name) if value is absent else value
  return [(name, old(name), get(current, name)) for name in fields
          if old(name) != get(current, name)]


def _flag_value(value: Any) -> str:
  """`value` as written after --config.FIELD= on a command line."""
  if isinstance(value, bool):
    return str(value).lower()
  return shlex.quote(value) if isinstance(value, str) else repr(value)


@dataclasses.dataclass(frozen=True)
class HaltAdvice:
  """The command-line settings a halt's advice names (the built-in app's `--config.` flags):
  a run that gives them is told to go on at a 10x lower `learning_rate`, and, when its
  `grad_clip` is 0 (off), to turn clipping on. Without one the advice is phrased for `fit`'s
  caller, in words."""
  learning_rate: float  # The run's (peak) learning rate.
  grad_clip: float | None = None  # The run's clipping norm; 0 means off.

  def lower_learning_rate(self) -> str:
    """The 10x lower learning rate every halt advises, as its flag value (e.g. '0.0003')."""
    return f"{self.learning_rate / 10:.3g}"


@dataclasses.dataclass
class RunRecord:
  """What a checkpoint records besides the state, and what a resume must match."""
  config: dict = dataclasses.field(default_factory=dict)  # The run's config (shown by inspect).
  run_defining: Sequence[str] = ()  # Dotted config fields a resume may not change.
  data_digest: str | None = None  # Content hash of the data; a resume must see the same.
  data_name: str = "the data"  # How errors name the data (e.g. "config.data.path='x'").
  description: str = ""  # The model and data in a few words, for the start banner.
  notes: tuple[str, ...] = ()  # Lines shown after the banner, once the run has started or resumed.
  examples_per_step: int = 0  # Global batch size, for examples_seen.
  # Examples consumed before a step (a batch that changes size: data.schedule); None: step x
  # examples_per_step.
  examples_at: Callable[[int], int] | None = None
  meta: dict = dataclasses.field(default_factory=dict)  # Stored in every checkpoint's meta.
  defaults: dict = dataclasses.field(default_factory=dict)  # Run-defining field -> its default.
  advice: HaltAdvice | None = None  # What a halt advises to change, as command-line flags.
  # (saved config, this config) -> [(field, saved value, the arrays it sets)] for the changed
  # fields that change the train state's arrays: no resume can take those, whatever
  # allow_config_change says (the built-in app: jaxdp.lm.schema.layout_changes). None: none known.
  layout_changes: Callable[[dict, dict], list[tuple[str, Any, str]]] | None = None


def check_record(saved: dict, record: RunRecord, where: str, allow_config_change: bool,
                 restore_from: str | None = None) -> None:
  """Refuses a checkpoint whose config or data differ from this run's: always when a changed
  field sets the train state's arrays (record.layout_changes), else unless
  `allow_config_change`. Its advice works as given: the checkpoint's own values (a shape can
  never change on resume), a new workdir (without `restore_from`, the checkpoint it came from),
  and --allow_config_change only where every change can be resumed.

  Raises:
    JaxdpError: one line naming each changed field (old -> new), or the data, and the fix.
  """
  old = saved.get("config", {})
  fixed = record.layout_changes(old, record.config) if record.layout_changes else []
  names = list(record.run_defining) + [n for n, _, _ in fixed if n not in record.run_defining]
  changes = _changes(old, record.config, names, record.defaults)
  changed = [f"{name} ({was!r} -> {now!r})" for name, was, now in changes]
  digest = saved.get("data_digest")
  if digest is not None and record.data_digest is not None and digest != record.data_digest:
    changed.append(f"{record.data_name} changed (sha256 {digest[:12]}... -> "
                   f"{record.data_digest[:12]}...); restore the data it was trained on")
  if not changed or (allow_config_change and not fixed):
    return
  said = f"the checkpoint in {where!r} was trained with a different config: {'; '.join(changed)}"
  afresh = "start afresh in a new --workdir" + (" without --restore_from" if restore_from else "")
  if not fixed:
    raise JaxdpError(f"{said}; {afresh}, or add --allow_config_change to resume with the change")
  by_arrays: dict[str, list[str]] = {}
  for name, _, arrays in fixed:
    by_arrays.setdefault(arrays, []).append(name)
  sets = "; ".join(f"{' and '.join(n)} set{'s' if len(n) == 1 else ''} {arrays}"
                   for arrays, n in by_arrays.items())
  back = " ".join(f"--config.{name}={_flag_value(was)}" for name, was, _ in changes)
  raise JaxdpError(f"{said}; {sets}, so it holds arrays of other shapes than this config's (it "
                   "was written with another optimizer, model or state layout), which no resume "
                   "can change, --allow_config_change included: resume with the settings it was "
                   f"trained with ({back}), or {afresh}")


def restore(checkpoints: Checkpointer, abstract, record: RunRecord, *,
            restore_from: str | None = None, allow_config_change: bool = False,
            workdir: str | None = None) -> tuple[TrainState, dict] | None:
  """(state, meta) to resume from: `restore_from` (a step directory), or the latest valid
  checkpoint. A latest checkpoint that cannot be read back exactly is reported, moved aside and
  replaced by the one before it. A mismatching config is refused, never skipped. None means
  start afresh. `workdir`: the run's folder, named in the advice of a refusal.

  Raises:
    JaxdpError: a mismatching config; a `restore_from` that is no step, or whose workdir
      already holds later checkpoints (paths.later_checkpoints_error); a storage that refused
      this job or could not be reached (the step is left in place, nothing falls back:
      Checkpointer.restore_meta and restore).
  """
  if restore_from:
    found = step_directory(restore_from)
    path = restore_from.rstrip("/") if is_url(restore_from) else os.path.abspath(restore_from.rstrip("/"))
    if found is None or not (checkpoint_exists(path) if is_url(path) else os.path.isdir(path)):
      raise JaxdpError(f"--restore_from={restore_from!r} is not a checkpoint step directory; "
                       f"give e.g. WORKDIR/checkpoints/<step> (see `jaxdp inspect WORKDIR`)")
    directory, step = found
    same_dir = directory == checkpoints.directory
    later = [s for s in checkpoints.all_steps() if s > step or not same_dir]
    if later:
      raise paths.later_checkpoints_error(restore_from, step, later, workdir=workdir,
                                          latest=max(later))
    source = Checkpointer("", create=False, directory=directory)
    try:
      check_record(source.restore_meta(step), record, path, allow_config_change, restore_from)
      return source.restore(step, abstract)
    except CorruptCheckpoint as e:
      raise JaxdpError(f"--restore_from={restore_from!r}: {e}; pick another step") from None
    finally:
      source.close()
  for step in reversed(checkpoints.all_steps()):
    try:
      try:
        saved = checkpoints.restore_meta(step)
      except JaxdpError:
        raise  # Access (credentials, network), not damage: the step stays, no fallback.
      except Exception as e:  # noqa: BLE001  # Unreadable JSON or missing item.
        raise CorruptCheckpoint(f"step {step} has an unreadable meta item ({type(e).__name__})") from e
      check_record(saved, record, checkpoints.directory, allow_config_change)
      return checkpoints.restore(step, abstract)
    except CorruptCheckpoint as e:
      moved = checkpoints.set_aside(step)
      warn(f"checkpoint {e}; moved it to {moved!r} and falling back to the previous checkpoint")
  return None


# A train loss more than SPIKE times the lowest one before it (for losses near or below 0: more
# than (SPIKE - 1) * |lowest| above it) is a diverging run, not noise.
SPIKE = 2.0


def sane_loss(loss: float, lowest: float | None) -> bool:
  """Whether a train loss is finite and not a spike over the `lowest` finite one before it."""
  if not math.isfinite(loss):
    return False
  return lowest is None or loss <= lowest + (SPIKE - 1.0) * abs(lowest)


@jax.jit
def _all_finite(tree) -> jax.Array:
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.bool_(True)


def params_finite(state: TrainState) -> bool:
  """Whether every parameter of `state` is finite (one reduction on the devices)."""
  return bool(jax.device_get(_all_finite(state.params)))


class Run:
  """The run's checkpoints and metrics: restore, save, halt on non-finite state.

  It also judges each checkpoint by the train loss right after it (the loss of its parameters
  on the next batch): sane when finite and not a spike over the lowest loss before it. A halt
  names the last sane checkpoint, keeps it on disk and says how to go on from it.
  """

  def __init__(self, workdir: str, dp: DataParallel, record: RunRecord, *, keep_last: int = 3,
               keep_every: int = 0, sinks: Sequence[Any] = (), checkpoint_dir: str | None = None):
    self.workdir, self.dp, self.record = workdir, dp, record
    # One run per workdir (process 0 holds the lock; a crashed run cannot leave it stuck).
    self.lock = WorkdirLock(workdir, enabled=jax.process_index() == 0).__enter__()
    # A checkpoint_dir elsewhere (a bucket) is recorded in the workdir for every later reader.
    self.checkpoints = Checkpointer(workdir, keep_last, keep_every, directory=checkpoint_dir or None)
    if checkpoint_dir:
      record_location(workdir, self.checkpoints.directory)
    self.writer = MetricsWriter(workdir, sinks)
    self.meta = {"best_eval_loss": None, "evals_without_improvement": 0}
    self.saved_step: int | None = None
    self.lowest_loss: float | None = None  # The lowest finite train loss so far.
    # Checkpoint step -> (the train loss right after it, the lowest train loss up to it).
    self.health: dict[int, tuple[float, float | None]] = {}
    self._unjudged: list[int] = []  # Checkpoint steps whose next train loss is not known yet.
    # Meta key -> what to save under it with every checkpoint, for hooks whose running values a
    # resume must continue (the unlogged train-line window, the noise-scale averages); a hook
    # reads its key back from `meta` when the run resumes.
    self.carried: dict[str, Callable[[], Any]] = {}

  def restore(self, abstract, *, restore_from: str | None = None,
              allow_config_change: bool = False) -> TrainState | None:
    """The state to resume from (see `restore`), or None to start afresh."""
    restored = restore(self.checkpoints, abstract, self.record, restore_from=restore_from,
                       allow_config_change=allow_config_change, workdir=self.workdir)
    if restored is None:
      self.writer.truncate_after(0)  # An attempt killed before its first checkpoint.
      return None
    state, self.meta = restored
    self.saved_step = int(state.step)
    self._judge_logged(self.saved_step)
    # Lines a killed attempt logged after this checkpoint are logged again from here on.
    self.writer.truncate_after(self.saved_step)
    return state

  def _judge_logged(self, restored_step: int) -> None:
    """Judges the checkpoints up to `restored_step` from the train lines of metrics.jsonl (each
    the mean loss of the steps since the line before), as logged before this resume."""
    try:
      records = read_metrics(self.workdir)
    except (OSError, ValueError):  # No metrics (another process's disk), or a line half written.
      records = []
    logged = {r["step"]: r["train_loss"] for r in records  # A step logged twice: the latest.
              if "train_loss" in r and isinstance(r.get("step"), int) and r["step"] <= restored_step}
    self._unjudged = [s for s in self.checkpoints.all_steps() if s <= restored_step]
    for step in sorted(logged):
      self._take(step, float(logged[step]))
    if restored_step not in self._unjudged:
      self._unjudged.append(restored_step)  # Restored from --restore_from: judged from here on.
    self._pin()

  def note_losses(self, first_step: int, metrics: Sequence[dict], state: TrainState | None = None) -> None:
    """Takes the host metrics of steps first_step, first_step + 1, ... into the judgement of
    checkpoints; with `state` frozen by a halt, only up to its bad step (later losses are of
    the frozen parameters)."""
    last = first_step + len(metrics) - 1 if state is None else int(state.step) + 1
    for offset, m in enumerate(metrics[:max(last - first_step + 1, 0)]):
      self._take(first_step + offset, float(m["train_loss"]))
    self._pin()

  def _take(self, step: int, loss: float) -> None:
    """The train loss of `step` (or a logged mean ending there), in step order."""
    for saved in [s for s in self._unjudged if s < step]:
      self.health[saved] = (loss, self.lowest_loss)
      self._unjudged.remove(saved)
    if math.isfinite(loss):
      self.lowest_loss = loss if self.lowest_loss is None else min(self.lowest_loss, loss)

  def _pin(self) -> None:
    """Keeps on disk, whatever keep_last says, the last checkpoint judged sane and the oldest
    not judged yet: a run that diverges for longer than keep_last checkpoints still has one."""
    sane = [s for s, judged in self.health.items() if sane_loss(*judged)]
    self.checkpoints.pin(sorted(self._unjudged)[:1] + ([max(sane)] if sane else []))

  def last_sane_checkpoint(self, before: int) -> int | None:
    """The latest checkpoint on disk before step `before` whose next train loss was sane."""
    sane = [s for s in self.checkpoints.all_steps()
            if s < before and s in self.health and sane_loss(*self.health[s])]
    return max(sane, default=None)

  def save(self, state: TrainState, eval_loss: float | None = None) -> None:
    """Saves `state` (asynchronously); a state with non-finite parameters is never written:
    the run halts instead."""
    step = int(state.step)
    if self.saved_step == step:
      return
    if not params_finite(state):
      self.halt(step, None, "non-finite parameters after ")
    self._write(state, eval_loss)

  def _write(self, state: TrainState, eval_loss: float | None = None, pin: bool = True) -> None:
    step = int(state.step)
    if self.saved_step == step:
      return
    heartbeat.set_phase("checkpoint save", step)
    self.saved_step = step
    if step not in self._unjudged and step not in self.health:
      self._unjudged.append(step)
      if pin:
        self._pin()
    carried = {key: value() for key, value in self.carried.items()}
    self.checkpoints.save(step, state, dict(
        self.meta, **carried, **self.record.meta, step=step,
        examples_seen=(self.record.examples_at(step) if self.record.examples_at is not None
                       else step * self.record.examples_per_step),
        config=self.record.config, data_digest=self.record.data_digest,
        strategy=self.dp.strategy, num_devices=self.dp.mesh.size), eval_loss=eval_loss)

  def halt_if_not_finite(self, state: TrainState, unnoted: Sequence[dict] = (),
                         first_step: int = 0) -> None:
    """Ends the run if the step froze the state after too many non-finite updates in a row.

    `unnoted`: the metrics (device or host) of steps first_step, ... that `note_losses` has not
    seen yet; they are fetched only when halting, to judge the latest checkpoints.
    """
    limit = self.dp.max_consecutive_skips
    if int(state.consecutive_skips) <= limit:
      return
    if unnoted:
      self.note_losses(first_step, jax.device_get(list(unnoted)), state)
    # The frozen state is the one before the bad step; only its "in a row" count is past the limit.
    good = state.replace(consecutive_skips=jax.numpy.minimum(state.consecutive_skips, limit))
    in_a_row = f"{limit + 1} steps in a row up to " if limit else ""
    self.halt(int(good.step) + 1, good, f"non-finite loss or gradients at {in_a_row}")

  def halt(self, bad_step: int, good: TrainState | None, cause: str) -> None:
    """Saves `good` (the state before `bad_step`, if given and finite), keeps the last sane
    checkpoint, and raises JaxdpError saying how to go on: from that checkpoint, with a 10x
    lower learning rate."""
    policy = self.dp.nan_policy
    resume = self.last_sane_checkpoint(before=bad_step if good is None else int(good.step))
    if resume is not None:
      self.checkpoints.pin([resume])  # The halt's own save must not push it out of keep_last.
    if good is None:
      saved = "the parameters are not finite, so they are not saved"
    elif not params_finite(good):
      saved = "the state before it has non-finite parameters, so it is not saved"
    else:
      self._write(good, pin=False)
      saved = (f"the state before it is saved as checkpoint {int(good.step)}, where the same "
               "command resumes (enough if one bad batch caused this)")
    self.close()
    event = {"step": bad_step, "event": "nonfinite_halt", "nan_policy": policy}
    if good is not None:
      event["skipped_steps"] = int(good.skipped_steps)
    self.writer.write(event)
    flags = self.record.advice
    lower = flags.lower_learning_rate() if flags is not None else None
    if resume is not None:
      path = os.path.join(self.checkpoints.directory, str(resume))
      after, lowest = self.health[resume]
      judged = f"train loss {after:.4g} after it" + (f", lowest before {lowest:.4g}" if lowest is not None else "")
      how = (f"rerun with a fresh --workdir and --restore_from {path} --config.learning_rate={lower}"
             if lower else f"run fit with a fresh workdir, restore_from={path!r} and a 10x lower "
             "learning rate")
      advice = f"the last checkpoint with a sane train loss is {resume} ({judged}): to go on from it, {how}"
    else:
      how = (f"start afresh with a fresh --workdir and --config.learning_rate={lower}" if lower
             else "start afresh with a 10x lower learning rate")
      advice = f"no checkpoint of this run was followed by a sane train loss: {how}"
    parts = [f"{cause}step {bad_step} (config.nan_policy={policy!r})", saved, advice]
    if flags is not None and flags.grad_clip == 0:
      parts.append("gradient clipping is off: a fresh run with --config.grad_clip=1.0 also "
                   "guards against loss spikes")
    if policy == "halt":
      parts.append("or set config.nan_policy='skip' to drop non-finite updates and go on")
    raise JaxdpError("; ".join(parts))

  def close(self) -> None:
    """Waits for the last checkpoint save, closes the checkpointer and releases the workdir lock;
    raises JaxdpError if that save failed.
    """
    self.checkpoints.wait()
    self.checkpoints.close()
    self.lock.__exit__()

  def abort(self) -> None:
    """After an error ended the run: closes the checkpointer and the metric files and releases
    the workdir lock, each quietly (the error that ended the run is the one to report; a full
    disk would fail the metric files' last flush again), so a notebook can rerun in the same
    process once the cause is fixed."""
    for close in (self.checkpoints.close, self.writer.close, self.lock.__exit__):
      try:
        close()
      except Exception:  # noqa: BLE001 - see the docstring.
        pass


def comm_bytes_per_step(dp: DataParallel, state: TrainState, batch, compiled=None) -> float:
  """Mean bytes each device sends per step, from the collectives of the compiled train step."""
  if compiled is None:
    if dp.train_step is None:
      raise JaxdpError("comm_bytes_per_step: the DataParallel has no compiled step yet; call "
                       "dp.init_state(init_fn, seed) (or dp.abstract_state) first")
    compiled = dp.train_step.lower(state, batch).compile()
  return bytes_per_step(dp.comm, compiled.as_text())


def fit(dp: DataParallel, init_fn: InitFn, train_batches: Callable[[int], dict],
        options: FitOptions | None = None, *, workdir: str,
        eval_batches: Callable[[], Iterable[dict]] | None = None,
        lr_schedule: Callable[[int], Any] | None = None, record: RunRecord | None = None,
        sinks: Sequence[Any] = (), hooks: Sequence[Hook] = (), **option_fields: Any) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` to `num_steps`; returns {"step", "train_loss",
  "eval_loss", "best_eval_loss", "stop_reason" ("num_steps", "early_stopping", "preempted", or
  what a hook gave `ctx.stop`), "state" (the final TrainState; absent when the run had already
  stopped early), "goodput" and "goodput_all_runs" (each category's share of the wall time, this
  run and every run of the workdir: runtime/goodput.py; absent when the run trained nothing:
  already at num_steps, when it writes nothing at all, or stopped early)}.

  Args:
    dp: the DataParallel (loss, optimizer, strategy, mesh) to train with.
    init_fn: init_fn(rng) -> params, for a fresh start and as the checkpoint's target shapes.
    train_batches: step -> the global batch of that step (dict of arrays [B, ...], or the
      output of dp.put_batch); must depend only on the step (and the run's seed).
    options: num_steps, seed, log_every, eval_every, checkpoint_every, patience, keep_last,
      keep_every, step_timeout_s, progress, tokens_per_step, flops_per_device, profile_steps,
      restore_from, allow_config_change, checkpoint_every_minutes, spike_policy ("rollback":
      runtime/spikes.py) and its spike_* settings, straggler_factor, grad_outlier_factor,
      health_window (runtime/health.py) (see FitOptions). Each may also be given as a keyword
      (`fit(..., num_steps=100, log_every=5)`), which replaces the one in `options`.
    workdir: the run's directory: checkpoints/, metrics.jsonl, TensorBoard events.
    eval_batches: () -> iterable of evaluation batches; None: no evaluation. The eval loss is
      sum(loss_sum) / sum(weight_sum) over the batches, so for an exact mean they should hold
      each evaluation example exactly once (no wrap-around: a repeated example counts twice).
      A partial last batch must be padded up to a row count divisible by the data devices, the
      padding rows masked by zero weights, e.g. `jaxdp.example_weights(batch_size, real_rows)`
      multiplied into the batch's weights; zero-weight rows contribute nothing.
    lr_schedule: lr_schedule(i), the learning rate of update i, makes each train line log `lr`,
      the rate of the last update the optimizer applied (see `applied_lr`).
    record: the config and data fingerprint stored in checkpoints and checked on resume.
    sinks: more metric sinks (e.g. runtime.wandb_sink.WandbSink), given every metrics record.
    hooks: `jaxdp.Hook`s called at each step, log, evaluation point and the run's start and end
      (see runtime/hooks.py for the contract), after the loop's own.
  Raises:
    JaxdpError: a checkpoint of another config or data, a non-finite halt, a failed save, a bad
      FitOptions value.
    TypeError: a keyword that is no FitOptions field, or no num_steps.

  An evaluation that is a new best is checkpointed with its eval_loss, so the best parameters
  are kept. A halt names the last checkpoint with a sane train loss after it (kept on disk) and
  how to go on from it.
  """
  began = time.perf_counter()
  clock = GoodputClock()  # Where the wall time goes (runtime/goodput.py), from fit's start.
  options = fit_options(options, option_fields)
  record = record or RunRecord()
  # Every process of the run holds the same config, data and versions, before anything is written.
  agreement.check(record.config, record.data_digest)
  # Heartbeats, lost peers and hang reports in every phase from here (runtime/heartbeat.py).
  monitor = heartbeat.start(workdir, options.step_timeout_s)
  try:
    run = Run(workdir, dp, record, keep_last=options.keep_last, keep_every=options.keep_every,
              sinks=sinks, checkpoint_dir=options.checkpoint_dir)
  except BaseException as e:
    monitor.failed(e)
    monitor.stop("failed")
    raise
  try:
    heartbeat.set_phase("checkpoint restore")
    abstract = dp.abstract_state(init_fn, options.seed)
    with clock.span("restore"):
      state = run.restore(abstract, restore_from=options.restore_from,
                          allow_config_change=options.allow_config_change)
    restored = state is not None
    if state is not None and int(state.step) >= options.num_steps and \
        not run.meta.get("stopped_early"):
      # Nothing to train: said, and nothing written (no log, metrics, events or goodput line).
      logs.discard()
      return _nothing_to_train(run, state, workdir, options)
    # Past the last refusal (the resume check): the log held since start-up goes to its file.
    logs.release()
    if state is None:
      state = dp.init_state(init_fn, options.seed)
    ctx = LoopContext(dp=dp, options=options, workdir=workdir, record=record, state=state,
                      restored=restored, run=run, eval_batches=eval_batches, lr_schedule=lr_schedule,
                      clock=clock)
    ctx.started = began
    skipped: Any = run.meta.get("skipped_batches", ())  # Spike rollbacks' record (runtime/spikes.py).
    ctx.skipped_batches = tuple(int(i) for i in skipped)
    # A rollback's way back: the checkpoint of a step, or the initial state (step 0 unsaved).
    ctx.restore_step = lambda step: (
        run.checkpoints.restore(step, abstract) if step in run.checkpoints.all_steps()
        else (dp.init_state(init_fn, options.seed),
              {"best_eval_loss": None, "evals_without_improvement": 0}))
    if run.meta.get("stopped_early"):
      return _already_stopped(ctx)
    return _train(ctx, train_batches, list(hooks))
  except BaseException as e:
    run.abort()  # The workdir lock and files are released for a rerun in this process.
    monitor.failed(e)  # The other processes learn of it (or a lost peer behind it is named).
    raise
  finally:
    monitor.stop("failed" if monitor.failed_error else "finished")


def _nothing_to_train(run: Run, state: TrainState, workdir: str,
                      options: FitOptions) -> dict[str, Any]:
  """The result and summary of a run resumed at (or past) num_steps, which writes nothing."""
  best = _best_checkpoint(run)
  run.writer.close()
  run.close()
  step = int(state.step)
  result = {"step": step, "stop_reason": "num_steps", "train_loss": None,
            "eval_loss": run.meta.get("last_eval_loss"),
            "best_eval_loss": run.meta["best_eval_loss"], "state": state}
  if jax.process_index() == 0:
    print(report.summary(result, step, 0.0, options.tokens_per_step, 0, best, workdir), flush=True)
  return result


def _best_checkpoint(run: Run) -> tuple[int, float] | None:
  """(step, eval loss) of the kept checkpoint with the lowest eval loss, for the summary."""
  saved = [(s, run.checkpoints.eval_loss(s)) for s in run.checkpoints.all_steps()]
  return min(((s, e) for s, e in saved if e is not None), key=lambda x: x[1], default=None)


def _already_stopped(ctx: LoopContext) -> dict[str, Any]:
  run = ctx.run
  run.writer.close()
  run.close()
  ctx.say(f"the run in {ctx.workdir!r} stopped early at step {ctx.step}; nothing to do")
  return {"step": ctx.step, "stop_reason": "early_stopping", "train_loss": None,
          "eval_loss": run.meta.get("last_eval_loss"), "best_eval_loss": run.meta["best_eval_loss"]}


def _train(ctx: LoopContext, train_batches: Callable[[int], dict], user_hooks: list[Hook]) -> dict[str, Any]:
  """The loop: compile, announce, then steps until num_steps or a hook's stop; see hooks.py."""
  dp, run, num_steps = ctx.dp, ctx.run, ctx.options.num_steps
  # Batches skipped by spike rollbacks (none otherwise) move the data index past them.
  place = lambda s: dp.device_batch(train_batches(data_index(s, ctx.skipped_batches)))  # noqa: E731
  started = time.perf_counter()
  first = place(ctx.step) if ctx.step < num_steps else None
  comm_bytes = 0.0
  ledger = GoodputLedger(ctx.workdir, enabled=jax.process_index() == 0)
  lost = ledger.begin(ctx.step)
  if lost:
    ctx.write({"event": "goodput_lost", "step": ctx.step, "lost_s": lost})
  if first is not None:
    assert dp.train_step is not None  # fit initialised or restored the state, which compiles it.
    heartbeat.set_phase("compile", ctx.step)
    with ctx.clock.span("compile"):
      ctx.compiled = dp.train_step.lower(ctx.state, first).compile()
      comm_bytes = comm_bytes_per_step(dp, ctx.state, first, ctx.compiled)
    # Without tokens_per_step, throughput counts rows (examples) of the global batch per second.
    ctx.rows_per_step = int(math.prod(jax.tree.leaves(first)[0].shape[:2]))
  log = TrainLog(comm_bytes)
  hooks = builtin_hooks(ctx, user_hooks, log, ledger)
  _announce(ctx, hooks)
  cadence = Cadence(num_steps, ctx.options.log_every)
  try:
    for hook in overriding(hooks, "on_start"):
      hook.on_start(ctx)
    ctx.clock.start_steps()
    while ctx.step < num_steps:
      _steps(ctx, hooks, place, cadence, log)
      if ctx.rollback_to is None:
        break
      _rollback(ctx, hooks)
      if ctx.stop_reason is not None:
        break
  except BaseException:
    _close(ctx, hooks, quietly=True)
    raise
  _close(ctx, hooks)
  result = ctx.result
  if result["eval_loss"] is None:
    result["eval_loss"] = run.meta.get("last_eval_loss")
  result.update(step=ctx.step, best_eval_loss=run.meta["best_eval_loss"], state=ctx.state)
  with ctx.clock.span("checkpoint"):
    run.checkpoints.wait()  # The last save is part of this run's time (and of its goodput).
  ledger.update(ctx.clock, ctx.step)
  # The clock runs on: this run's seconds are the snapshot the ledger just summed, so that a
  # workdir's only run has all_runs_seconds == seconds exactly.
  this_run, every_run = dict(ledger.runs[-1]["seconds"]), ledger.total()
  result["goodput"], result["goodput_all_runs"] = shares(this_run), shares(every_run)
  ctx.write({"event": "goodput", "step": ctx.step, "seconds": this_run, "shares": shares(this_run),
             "all_runs_seconds": every_run, "all_runs_shares": shares(every_run),
             "runs": len(ledger.runs)})
  for hook in overriding(hooks, "on_end"):
    hook.on_end(ctx, result)
  run.checkpoints.wait()
  best = _best_checkpoint(run)
  run.close()
  run.writer.close()
  ctx.say(report.summary(result, ctx.start_step, time.perf_counter() - started,
                         ctx.options.tokens_per_step, ctx.rows_per_step, best, ctx.workdir))
  ctx.say(summary_line(this_run, every_run, len(ledger.runs)))
  return result


def _steps(ctx: LoopContext, hooks: list[Hook], place: Callable[[int], Any], cadence: Cadence,
           log: TrainLog) -> None:
  """Steps from ctx.step until num_steps, a stop, or a requested rollback."""
  dp, run, num_steps = ctx.dp, ctx.run, ctx.options.num_steps
  before, after = overriding(hooks, "before_step"), overriding(hooks, "after_step")
  on_log, at_boundary = overriding(hooks, "on_log"), overriding(hooks, "at_boundary")
  pause, resume = overriding(hooks, "on_pause"), overriding(hooks, "on_resume")
  with contextlib.closing(prefetch(place, ctx.step, num_steps)) as prefetched:
    batches: Iterator[Any] = ctx.clock.timed(prefetched, "data_wait")
    for hook in overriding(hooks, "wrap_batches"):
      batches = hook.wrap_batches(ctx, batches)
    for batch in batches:
      for hook in before:
        hook.before_step(ctx, ctx.step)
      dispatched = time.perf_counter()
      ctx.state, metrics = dp.step(ctx.state, batch)
      ctx.device_wait_s += time.perf_counter() - dispatched
      ctx.step += 1
      ctx.eval_loss, ctx.checkpoint_requested = None, False
      for hook in after:
        hook.after_step(ctx, ctx.step, metrics)
      ctx.log_step = cadence.log(ctx.step)
      if ctx.log_step:
        line, window = log.window(ctx)
        logging = time.perf_counter()
        for hook in on_log:
          hook.on_log(ctx, line, window)
        run.writer.write(line)
        ctx.log_s += time.perf_counter() - logging  # Process 0 alone writes: not a straggler's.
        ctx.result["train_loss"] = line["train_loss"]
      with ctx.clock.span("other"):  # Evaluation and saves charge their own categories.
        paused = time.perf_counter()
        for hook in pause:
          hook.on_pause(ctx)
        for hook in at_boundary:
          hook.at_boundary(ctx, ctx.step)
        seconds = time.perf_counter() - paused
        for hook in resume:
          hook.on_resume(ctx, seconds)
      if ctx.stop_reason is not None or ctx.rollback_to is not None:
        break


def _rollback(ctx: LoopContext, hooks: list[Hook]) -> None:
  """Returns to the checkpoint of ctx.rollback_to (see LoopContext.request_rollback): the state,
  its meta (with ctx.rollback_meta on top) and the skip record; the productive time since that
  checkpoint becomes lost time; every hook's on_rollback is told."""
  run, step = ctx.run, ctx.rollback_to
  assert step is not None and ctx.restore_step is not None  # fit sets restore_step.
  paused = time.perf_counter()
  for hook in overriding(hooks, "on_pause"):  # The restore is no step (the watchdog waits).
    hook.on_pause(ctx)
  run.checkpoints.wait()
  with ctx.clock.span("restore"):
    state, meta = ctx.restore_step(step)
  for hook in overriding(hooks, "on_resume"):
    hook.on_resume(ctx, time.perf_counter() - paused)
  ctx.clock.lose_since(step)
  run.meta = dict(meta, **ctx.rollback_meta)
  run.saved_step = step if step in run.checkpoints.all_steps() else None
  ctx.skipped_batches = tuple(int(i) for i in run.meta.get("skipped_batches", ()))
  ctx.state, ctx.step = state, int(state.step)
  ctx.rollback_to, ctx.rollback_meta = None, {}
  ctx.eval_loss, ctx.checkpoint_requested = None, False
  for hook in overriding(hooks, "on_rollback"):
    hook.on_rollback(ctx, ctx.step)


def _announce(ctx: LoopContext, hooks: list[Hook]) -> None:
  """The start banner (with the hardware line), the record's notes and the start record."""
  watch = next((h.watch for h in hooks if isinstance(h, HardwareStats)), None)
  if ctx.step < ctx.options.num_steps:
    ctx.say(report.banner(ctx.dp, ctx.state, ctx.workdir, ctx.options.num_steps, ctx.rows_per_step,
                          ctx.options.tokens_per_step, ctx.record.description, ctx.restored)
            + ("\n" + watch.describe() if watch else ""))
  for note in ctx.record.notes if jax.process_index() == 0 else ():
    print(note, file=sys.stderr, flush=True)
  if ctx.step == 0 or ctx.restored:
    ctx.write({"event": "resume" if ctx.restored else "start", "step": ctx.step,
               "strategy": ctx.dp.strategy, "num_devices": ctx.dp.mesh.size,
               "params": count_params(ctx.state.params),
               "state_bytes_per_device": state_bytes_per_device(ctx.state),
               **(watch.start_record() if watch else {})})


def _close(ctx: LoopContext, hooks: list[Hook], quietly: bool = False) -> None:
  """Every hook's close, in reverse order. `quietly` (an error already ends the run): a failing
  close does not replace that error."""
  error = None
  for hook in reversed(overriding(hooks, "close")):
    try:
      hook.close(ctx)
    except Exception as e:  # noqa: BLE001 - raised below, after the other hooks closed.
      error = error or e
  if error is not None and not quietly:
    raise error
