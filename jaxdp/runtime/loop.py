"""The training loop for any model: `fit(dp, init_fn, train_batches, ...)`.

Evaluation, early stopping, orbax checkpoints with bitwise resume, metrics (JSONL and
TensorBoard), a progress bar, SIGTERM/SIGINT handling and a step watchdog, given a
`DataParallel`, an `init_fn(rng) -> params` and a data source whose batch for step `s` is a
function of `(seed, s)` only (so resuming at step `s` needs nothing but `s`). The loop itself
only sequences small named pieces: `Run` (checkpoints, resume, halting), `Cadence` (when to
log, evaluate, checkpoint), `train_line` and `record_evaluation`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.config import parse_profile_steps
from jaxdp.core.noise import NoiseScaleEMA
from jaxdp.core.state import InitFn, TrainState
from jaxdp.core.step import applied_updates
from jaxdp.data.pipeline import prefetch
from jaxdp.errors import JaxdpError
from jaxdp.models.common import count_params
from jaxdp.parallel.data_parallel import DataParallel
from jaxdp.parallel.exchange import CommConfig, bytes_per_step
from jaxdp.runtime import observe, report, signals
from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint
from jaxdp.runtime.lock import WorkdirLock
from jaxdp.runtime.metrics import MetricsWriter, Progress, read_metrics
from jaxdp.runtime.watchdog import StepWatchdog


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates and checkpoints (every N steps; 0 = only at the end)."""
  num_steps: int
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0

  def log(self, step: int) -> bool:
    return step % self.log_every == 0 or step == self.num_steps

  def evaluate(self, step: int) -> bool:
    return bool(self.eval_every and step % self.eval_every == 0) or step == self.num_steps

  def checkpoint(self, step: int) -> bool:
    return bool(self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.num_steps


def state_bytes_per_device(state) -> int:
  """Bytes of the state held by the first local device, read from the arrays' shards."""
  device = jax.local_devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


def warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"jaxdp: warning: {message}", file=sys.stderr, flush=True)


def changed_fields(saved: dict, current: dict, fields: Sequence[str],
                   defaults: dict | None = None) -> list[str]:
  """Dotted `fields` whose value differs between a checkpoint's config and `current`.

  A field the checkpoint's config lacks (written before the field existed) had the behaviour of
  its default then: `defaults[name]` stands in for it.
  """
  absent = object()

  def get(tree, dotted):
    for part in dotted.split("."):
      tree = tree.get(part, absent) if isinstance(tree, dict) else absent
    return tree

  def old(name):
    value = get(saved, name)
    return (defaults or {}).get(name) if value is absent else value
  return [f"{name} ({old(name)!r} -> {get(current, name)!r})"
          for name in fields if old(name) != get(current, name)]


def train_line(fetched: list[dict], step: int, lr: float | None, tokens_per_sec: float,
               comm_bytes: float, count_skips: bool) -> dict[str, Any]:
  """The metrics line of the steps in `fetched` (host values): means of loss (finite steps only)
  and gradient norm; fp16's loss scale and the skip count when they matter."""
  finite_losses = [m["train_loss"] for m in fetched if math.isfinite(m["train_loss"])]
  line = {"step": step,
          "train_loss": float(np.mean(finite_losses)) if finite_losses else math.nan,
          "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
          "tokens_per_sec": tokens_per_sec,
          "comm_bytes_per_step": comm_bytes}
  if lr is not None:
    line["lr"] = lr
  if "loss_scale" in fetched[-1]:  # fp16: the scale of the last step.
    line["loss_scale"] = float(fetched[-1]["loss_scale"])
  if count_skips or "loss_scale" in fetched[-1]:
    line["skipped_steps"] = int(fetched[-1]["skipped_steps"])
  return line


def record_evaluation(meta: dict, eval_loss: float, patience: int) -> dict:
  """The early-stopping record after an evaluation; sets "stopped_early" once `patience`
  evaluations in a row have not improved on the best (patience 0 never stops)."""
  if meta["best_eval_loss"] is None or eval_loss < meta["best_eval_loss"]:
    return dict(meta, best_eval_loss=eval_loss, evals_without_improvement=0)
  meta = dict(meta, evals_without_improvement=meta["evals_without_improvement"] + 1)
  if patience and meta["evals_without_improvement"] >= patience:
    meta["stopped_early"] = True
  return meta


class StopRequests:
  """SIGTERM/SIGINT/SIGUSR1 are recorded (runtime/signals.py); the loop finishes its step,
  checkpoints and returns. A second signal exits at once.

  With several processes, all stop after the same step, whichever process got the signal
  (`signals.agreed_stop`: JAX's preemption service, or an all-gather at log steps).
  """

  def __init__(self):
    self._previous = {}
    self._name: str | None = None

  @property
  def signal_name(self) -> str | None:
    return self._name or signals.pending()

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      wanted, forward = signals.for_the_loop()
      self._previous = {sig: signal.getsignal(sig) for sig in wanted}
      signals.install(wanted, forward)
    return self

  def __exit__(self, *exc) -> None:
    if self.signal_name is not None:
      signals.clear()  # Acted on: the run stopped and saved.
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int, log_step: bool) -> bool:
    self._name = signals.agreed_stop(step, log_step)
    return self._name is not None


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
  defaults: dict = dataclasses.field(default_factory=dict)  # Run-defining field -> its default.


def check_record(saved: dict, record: RunRecord, where: str, allow_config_change: bool) -> None:
  """Refuses a checkpoint whose config or data differ from this run's (unless allowed)."""
  changed = changed_fields(saved.get("config", {}), record.config, record.run_defining,
                           record.defaults)
  digest = saved.get("data_digest")
  if digest is not None and record.data_digest is not None and digest != record.data_digest:
    changed.append(f"{record.data_name} changed (sha256 {digest[:12]}... -> "
                   f"{record.data_digest[:12]}...); restore the data it was trained on")
  if changed and not allow_config_change:
    raise JaxdpError(f"the checkpoint in {where!r} was trained with a different config: "
                     f"{'; '.join(changed)}; use another --workdir, or --allow_config_change")


def restore(checkpoints: Checkpointer, abstract, record: RunRecord, *,
            restore_from: str | None = None,
            allow_config_change: bool = False) -> tuple[TrainState, dict] | None:
  """(state, meta) to resume from: `restore_from` (a step directory), or the latest valid
  checkpoint. A latest checkpoint that cannot be read back exactly is reported, moved aside and
  replaced by the one before it. A mismatching config is refused, never skipped. None means
  start afresh."""
  if restore_from:
    path = os.path.abspath(restore_from.rstrip("/"))
    name = os.path.basename(path)
    if not name.isdigit() or not os.path.isdir(path):
      raise JaxdpError(f"--restore_from={restore_from!r} is not a checkpoint step directory; "
                       f"give e.g. WORKDIR/checkpoints/<step> (see `jaxdp inspect WORKDIR`)")
    step = int(name)
    same_dir = os.path.dirname(path) == checkpoints.directory
    later = [s for s in checkpoints.all_steps() if s > step or not same_dir]
    if later:
      raise JaxdpError(f"--restore_from={restore_from!r}: --workdir already has checkpoints at "
                       f"steps {later}; pick a fresh --workdir to continue from step {step}")
    source = Checkpointer("", create=False, directory=os.path.dirname(path))
    try:
      check_record(source.restore_meta(step), record, path, allow_config_change)
      return source.restore(step, abstract)
    except CorruptCheckpoint as e:
      raise JaxdpError(f"--restore_from={restore_from!r}: {e}; pick another step") from None
    finally:
      source.close()
  for step in reversed(checkpoints.all_steps()):
    try:
      try:
        saved = checkpoints.restore_meta(step)
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


def applied_lr(lr_schedule: Callable[[int], Any], state: TrainState) -> float:
  """The learning rate of the last update the optimizer applied (0 until one is): the schedule
  at the optimizer's own count, which dropped steps (fp16 overflows, skipped NaNs) do not move."""
  applied = int(jax.device_get(applied_updates(state)))
  return float(lr_schedule(applied - 1)) if applied > 0 else 0.0


class Run:
  """The run's checkpoints and metrics: restore, save, halt on non-finite state.

  It also judges each checkpoint by the train loss right after it (the loss of its parameters
  on the next batch): sane when finite and not a spike over the lowest loss before it. A halt
  names the last sane checkpoint, keeps it on disk and says how to go on from it.
  """

  def __init__(self, workdir: str, dp: DataParallel, record: RunRecord, *, keep_last: int = 3,
               keep_every: int = 0, sinks: Sequence[Any] = ()):
    self.workdir, self.dp, self.record = workdir, dp, record
    # One run per workdir (process 0 holds the lock; a crashed run cannot leave it stuck).
    self.lock = WorkdirLock(workdir, enabled=jax.process_index() == 0).__enter__()
    self.checkpoints = Checkpointer(workdir, keep_last, keep_every)
    self.writer = MetricsWriter(workdir, sinks)
    self.meta = {"best_eval_loss": None, "evals_without_improvement": 0}
    self.saved_step: int | None = None
    self.lowest_loss: float | None = None  # The lowest finite train loss so far.
    # Checkpoint step -> (the train loss right after it, the lowest train loss up to it).
    self.health: dict[int, tuple[float, float | None]] = {}
    self._unjudged: list[int] = []  # Checkpoint steps whose next train loss is not known yet.

  def restore(self, abstract, *, restore_from: str | None = None,
              allow_config_change: bool = False) -> TrainState | None:
    """The state to resume from (see `restore`), or None to start afresh."""
    restored = restore(self.checkpoints, abstract, self.record, restore_from=restore_from,
                       allow_config_change=allow_config_change)
    if restored is None:
      return None
    state, self.meta = restored
    self.saved_step = int(state.step)
    self._judge_logged(self.saved_step)
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
    self.saved_step = step
    if step not in self._unjudged and step not in self.health:
      self._unjudged.append(step)
      if pin:
        self._pin()
    self.checkpoints.save(step, state, dict(
        self.meta, step=step, examples_seen=step * self.record.examples_per_step,
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
    cfg = self.record.config
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
    lr = cfg.get("learning_rate")
    lower = f"{lr / 10:.3g}" if isinstance(lr, (int, float)) else None
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
    if cfg.get("grad_clip") == 0:
      parts.append("gradient clipping is off: a fresh run with --config.grad_clip=1.0 also "
                   "guards against loss spikes")
    if policy == "halt":
      parts.append("or set config.nan_policy='skip' to drop non-finite updates and go on")
    raise JaxdpError("; ".join(parts))

  def close(self) -> None:
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
  compiled = compiled or dp.train_step.lower(state, batch).compile()
  return bytes_per_step(dp.comm, compiled.as_text())


def noise_scale_unavailable(dp: DataParallel) -> str:
  """The one line saying why this run logs no gradient noise scale, and how to get one."""
  accumulate = "set grad_accum_steps > 1 (its micro-batches are compared with their sum)"
  if dp.data_size == 1:
    return ("note: grad_noise_scale is unavailable: it compares two batch sizes, and this run has "
            f"one data device and one micro-batch per step; {accumulate}")
  # The fields CommConfig.dense reads, against their defaults (the dense all-reduce).
  dense = CommConfig()
  names = ("allreduce", "compression", "sync")
  changed = [f"{n}={getattr(dp.comm, n)!r}" for n in names if getattr(dp.comm, n) != getattr(dense, n)]
  default = ", ".join(f"{n}={getattr(dense, n)!r}" for n in names)
  return (f"note: grad_noise_scale is unavailable: this run's gradient exchange ({', '.join(changed)}) "
          f"never forms the dense mean gradient of its {dp.data_size} devices; {accumulate}, or use "
          f"the dense all-reduce ({default})")


def fit(dp: DataParallel, init_fn: InitFn, train_batches: Callable[[int], dict], *, workdir: str,
        num_steps: int, seed: int = 0,
        eval_batches: Callable[[], Iterable[dict]] | None = None, log_every: int = 10,
        eval_every: int = 0, checkpoint_every: int = 0, patience: int = 0, keep_last: int = 3,
        keep_every: int = 0, step_timeout_s: float = 0.0, progress: bool = True,
        lr_schedule: Callable[[int], Any] | None = None, tokens_per_step: int | None = None,
        record: RunRecord | None = None, restore_from: str | None = None,
        allow_config_change: bool = False, flops_per_device: float | None = None,
        profile_steps: str = "", sinks: Sequence[Any] = ()) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir` to `num_steps`; returns {"step", "train_loss",
  "eval_loss", "best_eval_loss", "stop_reason" ("num_steps", "early_stopping", "preempted"),
  "state" (the final TrainState; absent when the run had already stopped early)}.

  Args:
    dp: the DataParallel (loss, optimizer, strategy, mesh) to train with.
    init_fn: init_fn(rng) -> params, for a fresh start and as the checkpoint's target shapes.
    train_batches: step -> the global batch of that step (dict of arrays [B, ...], or the
      output of dp.put_batch); must depend only on the step (and the run's seed).
    eval_batches: () -> iterable of evaluation batches; None: no evaluation. The eval loss is
      sum(loss_sum) / sum(weight_sum) over the batches, so for an exact mean they should hold
      each evaluation example exactly once (no wrap-around: a repeated example counts twice).
      A partial last batch must be padded up to a row count divisible by the data devices, the
      padding rows masked by zero weights, e.g. `jaxdp.example_weights(batch_size, real_rows)`
      multiplied into the batch's weights; zero-weight rows contribute nothing.
    tokens_per_step: for the tokens/s of the log (default: the global batch's rows, so the
      log's tokens_per_sec is then examples per second).
    record: the config and data fingerprint stored in checkpoints and checked on resume.
    flops_per_device: FLOPs of one step on one device, for the log's mfu (default: the compiled
      step's cost_analysis(), which counts a lax.scan body once: give it for looped steps).
    profile_steps: "START:STOP" writes a jax.profiler trace of those steps to WORKDIR/profile.
    sinks: more metric sinks (e.g. runtime.wandb_sink.WandbSink), given every metrics record.
  Raises:
    JaxdpError: a checkpoint of another config or data, a non-finite halt, a failed save.

  `lr_schedule(i)` (the learning rate of update i) makes each train line log `lr`, the rate of
  the last update the optimizer applied (see `applied_lr`). An evaluation that is a new best is
  checkpointed with its eval_loss, so the best parameters are kept. A halt names the last
  checkpoint with a sane train loss after it (kept on disk) and how to go on from it.
  """
  record = record or RunRecord()
  profiler = observe.StepProfiler(parse_profile_steps(profile_steps),
                                  os.path.join(workdir, "profile"))
  run = Run(workdir, dp, record, keep_last=keep_last, keep_every=keep_every, sinks=sinks)
  try:
    cadence = Cadence(num_steps, log_every, eval_every if eval_batches is not None else 0,
                      checkpoint_every)
    state = run.restore(dp.abstract_state(init_fn, seed), restore_from=restore_from,
                        allow_config_change=allow_config_change)
    restored = state is not None
    if state is None:
      state = dp.init_state(init_fn, seed)
    step = int(state.step)
    if run.meta.get("stopped_early"):
      run.writer.close()
      run.close()
      Progress(step, num_steps, progress).write(
          f"the run in {workdir!r} stopped early at step {step}; nothing to do")
      return {"step": step, "stop_reason": "early_stopping", "train_loss": None,
              "eval_loss": run.meta.get("last_eval_loss"), "best_eval_loss": run.meta["best_eval_loss"]}
    place = lambda s: dp.device_batch(train_batches(s))  # noqa: E731
    started = time.perf_counter()
    first = place(step) if step < num_steps else None
    compiled = dp.train_step.lower(state, first).compile() if first is not None else None
    comm_bytes = comm_bytes_per_step(dp, state, first, compiled) if first is not None else 0.0
    watch = None if compiled is None else observe.StepWatch(
        [d for d in dp.mesh.devices.flat if d.process_index == jax.process_index()],
        dp.compute_dtype or jnp.float32, flops_per_device or observe.compiled_flops(compiled),
        observe.compiled_peak_bytes(compiled))
    # Without tokens_per_step, throughput counts rows (examples) of the global batch per second.
    first_rows = 0 if first is None else int(np.prod(jax.tree.leaves(first)[0].shape[:2]))
    start_step = step
    bar_out = Progress(step, num_steps, False)  # Plain lines, process 0 only.
    if step < num_steps:
      bar_out.write(report.banner(dp, state, workdir, num_steps, first_rows, tokens_per_step,
                                  record.description, restored) + "\n" + watch.describe())
    for note in record.notes if jax.process_index() == 0 else ():
      print(note, file=sys.stderr, flush=True)
    if step == 0 or restored:
      run.writer.write({"event": "resume" if restored else "start", "step": step,
                        "strategy": dp.strategy, "num_devices": dp.mesh.size,
                        "params": count_params(state.params),
                        "state_bytes_per_device": state_bytes_per_device(state),
                        **(watch.start_record() if watch else {})})
    bar = Progress(step, num_steps, progress)
    pending: list[dict] = []
    noise_scale, noise_noted = NoiseScaleEMA(), False
    last = {"step": step, "time": time.perf_counter()}
    result = {"stop_reason": "num_steps", "train_loss": None, "eval_loss": None}
    with StopRequests() as stops, \
         contextlib.closing(prefetch(place, step, num_steps)) as batches, \
         StepWatchdog(step_timeout_s, step) as watchdog, profiler:
      for batch in watch.timed(batches) if watch else batches:
        _test_only_hang(step + 1)
        profiler.before_step(step)
        state, metrics = dp.step(state, batch)
        profiler.after_step(step + 1, metrics)
        watchdog.dispatched(step + 1, metrics["train_loss"])
        run.checkpoints.check()  # A failed background save is reported now, not at the next save.
        pending.append(metrics)
        step += 1
        log_step = cadence.log(step)
        if log_step:
          fetched = jax.device_get(pending)  # The loop's only host sync between logs.
          run.note_losses(last["step"] + 1, fetched, state)
          run.halt_if_not_finite(state)
          elapsed = time.perf_counter() - last["time"]
          per_step = tokens_per_step or first_rows
          line = train_line(fetched, step, None if lr_schedule is None else applied_lr(lr_schedule, state),
                            (step - last["step"]) * per_step / elapsed, comm_bytes,
                            dp.nan_policy == "skip")
          line.update(watch.fields(step - last["step"], elapsed))
          for m in fetched:
            noise_scale.update(float(m.get("gns_g2", math.nan)), float(m.get("gns_trace", math.nan)))
          if noise_scale.available:  # B_simple (McCandlish et al. 2018): loss weights (tokens), rows.
            line["grad_noise_scale"] = noise_scale.b_simple
            if tokens_per_step and first_rows:
              line["grad_noise_scale_examples"] = noise_scale.b_simple * first_rows / tokens_per_step
          elif not noise_noted:
            noise_noted = True
            bar.write(noise_scale_unavailable(dp))
          run.writer.write(line)
          bar.update(step - last["step"], loss=line["train_loss"], tok_s=line["tokens_per_sec"],
                     **report.hardware_postfix(line))
          result["train_loss"] = line["train_loss"]
          pending, last = [], {"step": step, "time": time.perf_counter()}
        stop, eval_loss = False, None
        paused = time.perf_counter()  # Evaluation and checkpointing do not count against tokens/s.
        watchdog.pause()  # Nor against the step timeout.
        new_best = False
        if eval_batches is not None and cadence.evaluate(step):
          run.halt_if_not_finite(state, pending, last["step"] + 1)
          eval_loss = dp.evaluate(state.params, eval_batches())
          run.writer.write({"step": step, "eval_loss": eval_loss})
          bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
          result["eval_loss"] = eval_loss
          run.meta = dict(record_evaluation(run.meta, eval_loss, patience), last_eval_loss=eval_loss)
          # A new best is checkpointed with its eval_loss, which keeps it (BestN): early stopping
          # then leaves the best parameters on disk even between checkpoint_every steps.
          new_best = run.meta["evals_without_improvement"] == 0
          if run.meta.get("stopped_early"):
            stop = True
            result["stop_reason"] = "early_stopping"
            run.writer.write({"step": step, "event": "early_stopping",
                              "best_eval_loss": run.meta["best_eval_loss"]})
            bar.write(f"early stopping at step {step}: no improvement in {patience} evaluations")
        final = step == num_steps
        preempted = not stop and not final and stops.should_stop(step, log_step)
        if cadence.checkpoint(step) or stop or preempted or new_best:
          run.halt_if_not_finite(state, pending, last["step"] + 1)
          run.save(state, eval_loss)
        last["time"] += time.perf_counter() - paused
        watchdog.resume()
        if preempted:
          result["stop_reason"] = "preempted"
          run.writer.write({"step": step, "event": "preempted", "signal": stops.signal_name})
          bar.write(f"{stops.signal_name}: stopped after step {step} and saved a checkpoint; "
                    "run the same command to resume")
          break
        if stop:
          break
    bar.close()
    run.checkpoints.wait()
    saved = [(s, run.checkpoints.eval_loss(s)) for s in run.checkpoints.all_steps()]
    best = min(((s, e) for s, e in saved if e is not None), key=lambda x: x[1], default=None)
    run.close()
    run.writer.close()
    if result["eval_loss"] is None:
      result["eval_loss"] = run.meta.get("last_eval_loss")
    result.update(step=step, best_eval_loss=run.meta["best_eval_loss"], state=state)
    bar_out.write(report.summary(result, start_step, time.perf_counter() - started, tokens_per_step,
                                 first_rows, best, workdir))
    return result
  except BaseException:
    run.abort()  # The workdir lock and files are released for a rerun in this process.
    raise


def _test_only_hang(step: int) -> None:
  """Test-only hook (tests/test_multihost.py): JAXDP_TEST_HANG_AT_STEP="PROCESS:STEP" makes that
  process stall before that step, as a stuck peer would, for the watchdog to catch."""
  if os.environ.get("JAXDP_TEST_HANG_AT_STEP") == f"{jax.process_index()}:{step}":
    time.sleep(3600)
