"""The training loop's own behaviour, as hooks (runtime/hooks.py): the train line, progress bar,
hardware numbers, gradient noise scale, evaluation and early stopping, preemption, checkpoints,
the step watchdog and the profiler. `fit` installs the ones a run needs, in the order of
`builtin_hooks`; each is usable (and tested) on its own with a `LoopContext`.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.core.noise import NoiseScaleEMA
from jaxdp.core.state import TrainState
from jaxdp.core.step import applied_updates
from jaxdp.parallel.data_parallel import DataParallel
from jaxdp.parallel.exchange import CommConfig
from jaxdp.runtime import heartbeat, observe, report, signals
from jaxdp.runtime.hooks import Hook, LogWindow, LoopContext
from jaxdp.runtime.metrics import Progress
from jaxdp.runtime.watchdog import StepWatchdog


@dataclasses.dataclass(frozen=True)
class Cadence:
  """When the loop logs, evaluates and checkpoints (every N steps; 0 = only at the end)."""
  num_steps: int
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0

  def log(self, step: int) -> bool:
    """Whether `step` writes a train line: every log_every steps and at the last."""
    return step % self.log_every == 0 or step == self.num_steps

  def evaluate(self, step: int) -> bool:
    """Whether `step` evaluates: every eval_every steps (if > 0) and at the last."""
    return bool(self.eval_every and step % self.eval_every == 0) or step == self.num_steps

  def checkpoint(self, step: int) -> bool:
    """Whether `step` saves: every checkpoint_every steps (if > 0) and at the last."""
    return bool(self.checkpoint_every and step % self.checkpoint_every == 0) or step == self.num_steps


def cadence(ctx: LoopContext) -> Cadence:
  """The run's Cadence (made once per context: hooks ask every step)."""
  found = ctx._cadence  # noqa: SLF001
  if found is None:
    o = ctx.options
    found = ctx._cadence = Cadence(o.num_steps, o.log_every,  # noqa: SLF001
                                   o.eval_every if ctx.eval_batches is not None else 0,
                                   o.checkpoint_every)
  return found


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
  if count_skips or "loss_scale" in fetched[-1] or "loss_spike" in fetched[-1]:
    line["skipped_steps"] = int(fetched[-1]["skipped_steps"])
  if "loss_spike" in fetched[-1]:  # spike_policy="skip": updates dropped as spikes, this window.
    line["loss_spikes"] = int(sum(int(m["loss_spike"]) for m in fetched))
  return line


def applied_lr(lr_schedule, state: TrainState) -> float:
  """The learning rate of the last update the optimizer applied (0 until one is): the schedule
  at the optimizer's own count, which dropped steps (fp16 overflows, skipped NaNs) do not move."""
  applied = int(jax.device_get(applied_updates(state)))
  return float(lr_schedule(applied - 1)) if applied > 0 else 0.0


CARRIED_WINDOW = "log_window"  # Checkpoint meta: the unlogged steps' metrics (TrainLog.carried).
CARRIED_NOISE = "noise_scale_ema"  # Checkpoint meta: the noise-scale averages (NoiseScale).


def carried(ctx: LoopContext) -> dict[str, Any]:
  """The run's meta key -> value function saved with every checkpoint (loop.Run.carried; a
  throwaway dict for a context without a Run, e.g. a hook tested alone)."""
  found = getattr(ctx.run, "carried", None)
  return found if isinstance(found, dict) else {}


def _encoded(tree: Any) -> Any:
  """A dict of host arrays as JSON: each array's dtype, shape and bytes (hex), exactly."""
  if isinstance(tree, dict):
    return {k: _encoded(v) for k, v in tree.items()}
  a = np.asarray(tree)
  return {"dtype": a.dtype.name, "shape": list(a.shape), "hex": a.tobytes().hex()}


def _decoded(tree: Any) -> Any:
  """The arrays `_encoded` wrote, bit for bit."""
  if isinstance(tree, dict) and set(tree) != {"dtype", "shape", "hex"}:
    return {k: _decoded(v) for k, v in tree.items()}
  return np.frombuffer(bytes.fromhex(tree["hex"]), dtype=jnp.dtype(tree["dtype"])) \
      .reshape(tree["shape"]).copy()


class TrainLog(Hook):
  """The train line: collects each step's device metrics, and at a log step fetches them (the
  loop's only host sync between logs), judges the losses and the state (a halt raises), and
  builds the line of means and throughput over the window since the previous line.

  `comm_bytes`: bytes each device sends per step (from the compiled step's collectives).
  """

  def __init__(self, comm_bytes: float = 0.0):
    self.comm_bytes = comm_bytes
    self.pending: list[dict] = []
    self.first_step = 0  # The step of pending[0].
    self.started = 0.0  # When the window began, moved on by the seconds spent paused.

  def on_start(self, ctx: LoopContext) -> None:
    """Opens the first window, at the step after the one the run starts from; a resumed run
    continues the window its checkpoint carried (see `carried`)."""
    self.first_step = ctx.step + 1
    self.started = time.perf_counter()
    self._continue(ctx)
    ctx.unlogged = lambda: (self.pending, self.first_step)
    carried(ctx)[CARRIED_WINDOW] = self.carried

  def carried(self) -> dict[str, Any]:
    """The steps since the last train line, as saved with a checkpoint: their metrics fetched to
    the host, each array's dtype, shape and bytes exactly, so the line a resumed run logs at the
    next log step is the uninterrupted run's, bit for bit."""
    # Fetched only at a save inside a window (the save waits for the state anyway).
    fetched = jax.device_get(self.pending) if self.pending else []
    return {"first_step": self.first_step, "metrics": [_encoded(m) for m in fetched]}

  def _continue(self, ctx: LoopContext) -> None:
    """Takes up the window saved with the checkpoint the run resumed from (or returned to), when
    it ends at that checkpoint's step."""
    saved = getattr(ctx.run, "meta", {}).get(CARRIED_WINDOW)
    if isinstance(saved, dict) and saved.get("first_step", 0) + len(saved.get("metrics", ())) \
        == ctx.step + 1:
      self.pending = [_decoded(m) for m in saved["metrics"]]
      self.first_step = int(saved["first_step"])

  def after_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
    """Keeps the step's device metrics for the next train line (no host sync)."""
    self.pending.append(metrics)

  def on_resume(self, ctx: LoopContext, seconds: float) -> None:
    """Moves the window's start on by the paused seconds."""
    self.started += seconds  # Evaluation and checkpoints do not count against tokens/s.

  def on_rollback(self, ctx: LoopContext, step: int) -> None:
    """Drops the metrics of the steps rolled back; the next window starts after `step` (with
    the steps before it that the checkpoint carried)."""
    self.pending, self.first_step, self.started = [], step + 1, time.perf_counter()
    self._continue(ctx)

  def window(self, ctx: LoopContext) -> tuple[dict[str, Any], LogWindow]:
    """The train line of the steps since the last one (and the window, for on_log hooks)."""
    waited = time.perf_counter()
    fetched = jax.device_get(self.pending)
    ctx.device_wait_s += time.perf_counter() - waited
    ctx.run.note_losses(self.first_step, fetched, ctx.state)
    ctx.run.halt_if_not_finite(ctx.state)
    seconds = time.perf_counter() - self.started
    window = LogWindow(self.first_step, ctx.step, seconds, fetched)
    per_step = ctx.options.tokens_per_step or ctx.rows_per_step
    lr = None if ctx.lr_schedule is None else applied_lr(ctx.lr_schedule, ctx.state)
    line = train_line(fetched, ctx.step, lr, window.steps * per_step / seconds, self.comm_bytes,
                      ctx.dp.nan_policy == "skip")
    self.pending, self.first_step, self.started = [], ctx.step + 1, time.perf_counter()
    return line, window


class ProgressBar(Hook):
  """A tqdm bar over the steps (plain lines when off or not on a terminal); while it is open,
  `ctx.say` writes above it."""

  def __init__(self):
    self.bar: Progress | None = None

  def on_start(self, ctx: LoopContext) -> None:
    """Opens the bar at the run's first step; `ctx.say` now writes above it."""
    self.bar = Progress(ctx.step, ctx.options.num_steps, ctx.options.progress)
    self._printer, ctx.printer = ctx.printer, self.bar.write

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Advances the bar to this step, showing loss, tokens/s and the hardware fields."""
    if self.bar is not None:  # Opened in on_start.
      self.bar.update(window.steps, loss=line["train_loss"], tok_s=line["tokens_per_sec"],
                      **report.hardware_postfix(line))

  def close(self, ctx: LoopContext) -> None:
    """Closes the bar and gives `ctx.say` its previous printer back."""
    if self.bar is not None:
      self.bar.close()
      ctx.printer = self._printer


class HardwareStats(Hook):
  """mfu, step_time_s, data_wait_fraction and peak_memory_bytes on every train line
  (observe.StepWatch), its banner line and its fields of the start record."""

  def __init__(self, watch: observe.StepWatch):
    self.watch = watch

  @classmethod
  def of(cls, ctx: LoopContext) -> HardwareStats:
    """For the run's compiled step (ctx.compiled) and this process's devices."""
    compiled = ctx.compiled
    devices = [d for d in ctx.dp.mesh.devices.flat if d.process_index == jax.process_index()]
    return cls(observe.StepWatch(devices, ctx.dp.compute_dtype or jnp.float32,
                                 ctx.options.flops_per_device or observe.compiled_flops(compiled),
                                 observe.compiled_peak_bytes(compiled)))

  def wrap_batches(self, ctx: LoopContext, batches: Iterator) -> Iterator:
    """Times how long each step waits for its batch (data_wait_fraction)."""
    return self.watch.timed(batches)

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Adds mfu, step_time_s, data_wait_fraction and peak_memory_bytes to the line."""
    line.update(self.watch.fields(window.steps, window.seconds))


def noise_scale_unavailable(dp: DataParallel, steps: int = 0, skipped: int = 0) -> str:
  """The one line saying why this run logs no gradient noise scale, and how to get one.

  `steps`, `skipped`: the steps taken so far and how many of them were skipped (non-finite
  gradients, e.g. every fp16 step overflowing): a run whose steps do compare two batch sizes
  has no estimate only because no step gave a finite one.
  """
  accumulate = "set grad_accum_steps > 1 (its micro-batches are compared with their sum)"
  # The fields CommConfig.dense reads, against their defaults (the dense all-reduce).
  dense = CommConfig()
  names = ("allreduce", "compression", "sync")
  changed = [f"{n}={getattr(dp.comm, n)!r}" for n in names if getattr(dp.comm, n) != getattr(dense, n)]
  # Which steps estimate it (core.step.train_step): accumulation's micro-batches always; else
  # each device's share, under the dense all-reduce (or jit's per-device groups).
  estimates = dp.grad_accum_steps > 1 or (dp.data_size > 1 and not changed)
  if estimates:
    overflow = (f"{skipped} of its {steps} steps so far were skipped for non-finite gradients"
                + (" (fp16 overflow: the loss scale is still coming down)" if dp.precision == "fp16"
                   else "") if skipped else f"its {steps} steps so far gave no finite estimate")
    return (f"note: grad_noise_scale is unavailable yet: this run estimates it every step, but "
            f"{overflow}; it is logged from the first finite step on")
  if dp.data_size == 1:
    return ("note: grad_noise_scale is unavailable: it compares two batch sizes, and this run has "
            f"one data device and one micro-batch per step; {accumulate}")
  default = ", ".join(f"{n}={getattr(dense, n)!r}" for n in names)
  return (f"note: grad_noise_scale is unavailable: this run's gradient exchange ({', '.join(changed)}) "
          f"never forms the dense mean gradient of its {dp.data_size} devices; {accumulate}, or use "
          f"the dense all-reduce ({default})")


class NoiseScale(Hook):
  """grad_noise_scale (B_simple, McCandlish et al. 2018) on train lines, from the per-step
  estimates the step returns (gns_g2, gns_trace) smoothed over the run; a run that cannot
  estimate it says why once."""

  def __init__(self):
    self.ema = NoiseScaleEMA()
    self.noted = False

  def on_start(self, ctx: LoopContext) -> None:
    """Continues the averages saved with the checkpoint the run resumed from; saves them with
    every checkpoint, so a resumed run logs the uninterrupted run's grad_noise_scale."""
    self._continue(ctx)
    carried(ctx)[CARRIED_NOISE] = lambda: [self.ema.g2, self.ema.trace, self.ema.weight]

  def on_rollback(self, ctx: LoopContext, step: int) -> None:
    """Back to the averages of the checkpoint returned to."""
    self.ema = NoiseScaleEMA(self.ema.decay)
    self._continue(ctx)

  def _continue(self, ctx: LoopContext) -> None:
    saved = getattr(ctx.run, "meta", {}).get(CARRIED_NOISE)
    if isinstance(saved, list) and len(saved) == 3:
      self.ema.g2, self.ema.trace, self.ema.weight = (float(v) for v in saved)

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Folds the window's estimates into the moving averages and adds grad_noise_scale (in tokens,
    and in rows as grad_noise_scale_examples when tokens_per_step is known).
    """
    for m in window.metrics:
      self.ema.update(float(m.get("gns_g2", math.nan)), float(m.get("gns_trace", math.nan)))
    if self.ema.available:  # In loss weights (tokens); in rows too when both are known.
      line["grad_noise_scale"] = self.ema.b_simple
      if ctx.options.tokens_per_step and ctx.rows_per_step:
        line["grad_noise_scale_examples"] = (self.ema.b_simple * ctx.rows_per_step
                                             / ctx.options.tokens_per_step)
    elif not self.noted:
      self.noted = True
      skipped = int(window.metrics[-1].get("skipped_steps", 0)) if window.metrics else 0
      ctx.say(noise_scale_unavailable(ctx.dp, window.step, skipped))


def record_evaluation(meta: dict, eval_loss: float, patience: int) -> dict:
  """The early-stopping record after an evaluation; sets "stopped_early" once `patience`
  evaluations in a row have not improved on the best (patience 0 never stops)."""
  if meta["best_eval_loss"] is None or eval_loss < meta["best_eval_loss"]:
    return dict(meta, best_eval_loss=eval_loss, evals_without_improvement=0)
  meta = dict(meta, evals_without_improvement=meta["evals_without_improvement"] + 1)
  if patience and meta["evals_without_improvement"] >= patience:
    meta["stopped_early"] = True
  return meta


class Evaluation(Hook):
  """Evaluates every eval_every steps and at the last; keeps the early-stopping record in the
  checkpoints' meta, checkpoints every new best (with its eval_loss, which keeps it on disk),
  and stops the run after `patience` evaluations without a new best."""

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """At an evaluation step: evaluates, writes eval_loss, updates the early-stopping record, asks
    for a checkpoint at a new best and stops the run when patience runs out.
    """
    if ctx.eval_batches is None or not cadence(ctx).evaluate(step):
      return
    ctx.check_finite()
    if ctx.rollback_to is not None:
      return  # This state is about to be replaced (a loss spike's rollback).
    with heartbeat.phase("evaluation", step), ctx.clock.span("eval"):
      eval_loss = ctx.dp.evaluate(ctx.state.params, ctx.eval_batches())
    ctx.write({"step": step, "eval_loss": eval_loss})
    ctx.say(f"step {step}: eval_loss {eval_loss:.4f}")
    ctx.eval_loss = ctx.result["eval_loss"] = eval_loss
    run = ctx.run
    run.meta = dict(record_evaluation(run.meta, eval_loss, ctx.options.patience),
                    last_eval_loss=eval_loss)
    if run.meta["evals_without_improvement"] == 0:
      ctx.request_checkpoint()
    if run.meta.get("stopped_early"):
      ctx.stop("early_stopping")
      ctx.write({"step": step, "event": "early_stopping", "best_eval_loss": run.meta["best_eval_loss"]})
      ctx.say(f"early stopping at step {step}: no improvement in {ctx.options.patience} evaluations")


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
    """The signal that stopped (or will stop) the run, if any."""
    return self._name or signals.pending()

  def __enter__(self) -> StopRequests:
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
    """Whether every process stops after `step`; may run a collective, so every process calls it at
    the same steps.
    """
    self._name = signals.agreed_stop(step, log_step)
    return self._name is not None


class Preemption(Hook):
  """SIGTERM/SIGINT/SIGUSR1 stop the run after the step in progress, with a checkpoint (every
  process after the same step: `StopRequests`); the run says so when it ends."""

  def __init__(self):
    self.stops = StopRequests()

  def on_start(self, ctx: LoopContext) -> None:
    """Installs the signal handlers (main thread only); a stop signal that any process received
    before this point (start-up, compilation) stops every process before the first step
    (`signals.Interrupted`: nothing to save)."""
    self.stops.__enter__()
    if ctx.step < ctx.options.num_steps:
      with heartbeat.phase("barrier", ctx.step, after="start"):
        held = signals.agree_before_training()
      if held is not None:
        every = "every process stops, " if jax.process_count() > 1 else ""
        raise signals.Interrupted(f"{held} before the first step of this run; {every}nothing "
                                  "was saved")

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """Stops the run after this step when a signal arrived on any process."""
    # Every process asks at the same steps (the agreement may be a collective): never after a
    # stop or at the last step, which every process knows alike.
    if ctx.stop_reason is None and step != ctx.options.num_steps and \
       self.stops.should_stop(step, ctx.log_step):
      ctx.stop("preempted")

  def close(self, ctx: LoopContext) -> None:
    """Restores the previous signal handlers."""
    self.stops.__exit__()

  def on_end(self, ctx: LoopContext, result: dict[str, Any]) -> None:
    """After a preemption stop: writes the `preempted` event and says how to resume."""
    if result["stop_reason"] == "preempted":
      name = self.stops.signal_name
      ctx.write({"step": result["step"], "event": "preempted", "signal": name})
      ctx.say(f"{name}: stopped after step {result['step']} and saved a checkpoint; "
              "run the same command to resume")


def minutes_clock() -> float:
  """The clock of checkpoint_every_minutes, in seconds (tests replace it with a fake)."""
  return time.monotonic()


def agreed(flag: bool) -> bool:
  """Process 0's `flag` on every process (a broadcast, so every process calls it at the same
  steps); the flag itself with one process."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


class Checkpointing(Hook):
  """Saves every checkpoint_every steps, every checkpoint_every_minutes (judged at train lines by
  process 0's clock, broadcast so every process saves at the same step), at the last step, when
  a hook stops the run or asks for one (a new best evaluation); a failed background save is
  reported after the next step."""

  def __init__(self) -> None:
    self.last_save: float | None = None  # minutes_clock() at the last save (or the start).

  def on_start(self, ctx: LoopContext) -> None:
    """Starts the checkpoint_every_minutes clock."""
    self.last_save = minutes_clock()

  def on_rollback(self, ctx: LoopContext, step: int) -> None:
    """The checkpoint returned to counts as the last save."""
    self.last_save = minutes_clock()

  def after_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
    """Raises JaxdpError if a background save has failed since the last step."""
    ctx.run.checkpoints.check()

  def minutes_due(self, ctx: LoopContext) -> bool:
    """Whether checkpoint_every_minutes asks for a save now: only at train lines, where every
    process asks (process 0's answer counts for all)."""
    minutes = ctx.options.checkpoint_every_minutes
    if not minutes or not ctx.log_step or self.last_save is None:
      return False
    return agreed(minutes_clock() - self.last_save >= minutes * 60.0)

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """Saves at checkpoint steps, the last step, a stop, when a hook asked for one, or when
    checkpoint_every_minutes passed since the last save."""
    if (self.minutes_due(ctx) or cadence(ctx).checkpoint(step) or ctx.stop_reason
        or ctx.checkpoint_requested):
      ctx.check_finite()
      if ctx.rollback_to is not None:
        return  # A loss spike: this state is not saved; the loop goes back instead.
      with ctx.clock.span("checkpoint"):
        ctx.run.save(ctx.state, ctx.eval_loss)
      self.last_save = minutes_clock()


class Watchdog(Hook):
  """Exits the process (status 3) when a step does not finish within step_timeout_s
  (runtime/watchdog.py); evaluation and checkpoints are not timed."""

  def __init__(self, timeout_s: float, **watchdog: Any):
    self.timeout_s = timeout_s
    self._options = watchdog  # StepWatchdog's exit and clock (tests replace them).
    self.watchdog: StepWatchdog | None = None

  def on_start(self, ctx: LoopContext) -> None:
    """Starts the watchdog thread (none when timeout_s is 0)."""
    self.watchdog = StepWatchdog(self.timeout_s, ctx.step, **self._options).__enter__()

  def after_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
    """Times the step until its train_loss is ready."""
    if self.watchdog is not None:  # Made in on_start.
      self.watchdog.dispatched(step, metrics["train_loss"])

  def on_pause(self, ctx: LoopContext) -> None:
    """Stops the watchdog's clock during evaluation and checkpoints."""
    if self.watchdog is not None:
      self.watchdog.pause()

  def on_resume(self, ctx: LoopContext, seconds: float) -> None:
    """Restarts the watchdog's clock."""
    if self.watchdog is not None:
      self.watchdog.resume()

  def close(self, ctx: LoopContext) -> None:
    """Stops the watchdog thread."""
    if self.watchdog is not None:
      self.watchdog.__exit__()


class Profile(Hook):
  """A jax.profiler trace of steps START+1..STOP into WORKDIR/profile (observe.StepProfiler)."""

  def __init__(self, window: tuple[int, int], directory: str):
    self.profiler = observe.StepProfiler(window, directory)

  def before_step(self, ctx: LoopContext, step: int) -> None:
    """Starts the trace when the next step falls inside the window (START+1..STOP)."""
    self.profiler.before_step(step)

  def after_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
    """Ends the trace after the window's last step (waiting for its metrics)."""
    self.profiler.after_step(step, metrics)

  def close(self, ctx: LoopContext) -> None:
    """Ends a trace still running."""
    self.profiler.stop()  # A run that ends (or fails) inside the window still closes its trace.


HANG_ENV = "JAXDP_TEST_HANG_AT_STEP"


class HangForTests(Hook):
  """Test-only (tests/test_multihost.py): stalls this process before `step`, as a stuck peer
  would, for the watchdog to catch."""

  def __init__(self, step: int, seconds: float = 3600.0):
    self.step, self.seconds = step, seconds

  def before_step(self, ctx: LoopContext, step: int) -> None:
    """Sleeps `seconds` before the update to `step` runs (this process only)."""
    if step + 1 == self.step:
      time.sleep(self.seconds)

  @classmethod
  def from_env(cls) -> HangForTests | None:
    """JAXDP_TEST_HANG_AT_STEP="PROCESS:STEP": the hook for that process, read once per run."""
    process, _, step = os.environ.get(HANG_ENV, "").partition(":")
    if process.isdigit() and step.isdigit() and int(process) == jax.process_index():
      return cls(int(step))
    return None


DIE_ENV = "JAXDP_TEST_DIE_AT_STEP"


class DieForTests(Hook):
  """Test-only (tests/test_launch_restarts.py): this process kills itself with SIGKILL before
  the first update numbered `step` or later, as a crashed host would (nothing saved, no line)."""

  def __init__(self, step: int):
    self.step = step

  def before_step(self, ctx: LoopContext, step: int) -> None:
    """SIGKILL to this process before the update to `step` + 1 when that is >= `self.step`."""
    if step + 1 >= self.step:
      os.kill(os.getpid(), signal.SIGKILL)

  @classmethod
  def from_env(cls) -> DieForTests | None:
    """JAXDP_TEST_DIE_AT_STEP="PROCESS:STEP[:ATTEMPT],...": the hook for this process in this
    attempt of a `jaxdp launch` (JAXDP_RESTART_COUNT, 0 when unset; ATTEMPT defaults to 0),
    read once per run."""
    attempt = os.environ.get("JAXDP_RESTART_COUNT", "0")
    for spec in os.environ.get(DIE_ENV, "").split(","):
      process, step, at = (spec.split(":") + ["", ""])[:3]
      if (process.isdigit() and step.isdigit() and int(process) == jax.process_index()
          and (at or "0") == attempt):
        return cls(int(step))
    return None


class Goodput(Hook):
  """The goodput bookkeeping (runtime/goodput.py): `goodput` (this run's productive share so far)
  on every train line, and WORKDIR/goodput.json rewritten at train lines and after saves."""

  def __init__(self, ledger: Any):
    self.ledger = ledger

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """Adds `goodput` to the line and records the run's seconds."""
    from jaxdp.runtime.goodput import shares
    self.ledger.update(ctx.clock, step=ctx.step)
    line["goodput"] = shares(self.ledger.runs[-1]["seconds"])["productive"]  # The same snapshot.

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """After a save: remembers the productive seconds reached at this checkpoint."""
    if ctx.run.saved_step == step and step not in ctx.clock.productive_at:
      ctx.clock.mark_step(step)
      self.ledger.update(ctx.clock, step=step)


def builtin_hooks(ctx: LoopContext, user: list[Hook], log: TrainLog, ledger: Any = None) -> list[Hook]:
  """fit's hooks for this run, in order: the train log and what adds to its line, the user's
  hooks, then checkpoints (which see every stop request) and the progress bar (every field)."""
  from jaxdp.runtime.health import DeviceHealth, SlowForTests
  from jaxdp.runtime.spikes import SpikeRollback, SpikeSkips
  o = ctx.options
  head: list[Hook] = [log]
  if o.spike_policy == "rollback":  # Judges each window's losses before any hook uses them.
    head.append(SpikeRollback(o.spike_sigmas, o.spike_window, o.spike_max_rollbacks,
                              o.spike_rollback_window))
  if o.step_timeout_s:
    head.append(Watchdog(o.step_timeout_s))
  window = observe.parse_profile_steps(o.profile_steps) if isinstance(o.profile_steps, str) \
      else o.profile_steps
  if window:
    head.append(Profile(window, os.path.join(ctx.workdir, "profile")))
  hang = HangForTests.from_env()
  if hang is not None:
    head.append(hang)
  die = DieForTests.from_env()
  if die is not None:
    head.append(die)
  if getattr(ctx.dp, "spike_policy", "off") == "skip":
    head.append(SpikeSkips())
  slow = SlowForTests.from_env()
  if slow is not None:
    head.append(slow)
  head.append(DeviceHealth(o.straggler_factor, o.grad_outlier_factor, o.health_window))
  if ctx.compiled is not None:
    head.append(HardwareStats.of(ctx))
  head += [NoiseScale(), Evaluation(), Preemption()]
  tail: list[Hook] = [Checkpointing()] + ([Goodput(ledger)] if ledger is not None else [])
  return head + list(user) + tail + [ProgressBar()]
