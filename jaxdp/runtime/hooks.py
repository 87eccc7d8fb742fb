"""The hook interface of `jaxdp.fit`: behaviour added to the training loop without touching it.

`fit(..., hooks=[MyHook()])` calls each hook's methods at fixed points of every run; the loop's
own progress bar, hardware numbers, noise scale, evaluation and early stopping, checkpoints,
preemption, watchdog and profiler are hooks of the same kind (runtime/loop_hooks.py). Hooks run
in the order given: fit's built-in ones that add to the train line first, then the user's, then
the progress bar (so it shows every field).

One step of the loop, with what a hook sees:

  before_step(ctx, step)          step = ctx.step, the state's step before the update
  ctx.state, metrics = dp.step(ctx.state, batch)
  after_step(ctx, step, metrics)  step = the new ctx.step; metrics are DEVICE arrays
  on_log(ctx, line, window)       at log steps only: line is the host train line (a dict the
                                  hook may add fields to, written after every hook saw it)
  at_boundary(ctx, step)          evaluation, stop requests, checkpoints (paused: not counted
                                  against tokens/s or the step watchdog)
  the loop stops after a step where a hook called ctx.stop(...)

and around the run: `wrap_batches(ctx, batches)` once before the first step (may wrap the
iterator of placed batches, e.g. to time it), `on_start(ctx)` once before it, `close(ctx)` after
the last step, in reverse order, whether the run ended or failed (like `__exit__`), and
`on_end(ctx, result)` after every close, when the run ended without an error.

Host syncs: `metrics` in `after_step` are device arrays; reading one (`float(...)`,
`jax.device_get`) waits for the step and costs the loop its overlap of host and device. A hook
that needs values every step should read them in `on_log` (window.metrics holds every step's
host metrics since the last log, fetched once for all hooks), or sync only every N steps
(`every(n, fn)`).

What a hook may change: fields of the train line in `on_log`; `ctx.stop(reason)`;
`ctx.request_checkpoint()`; `ctx.request_rollback(step, meta)` (after this step's boundary the
loop restores the checkpoint of `step`, re-creates the batch iterator from there, honouring
`ctx.skipped_batches`, and calls every hook's `on_rollback`); `ctx.state` in `after_step` or
`at_boundary` as long as its step is unchanged (e.g. a repaired state). `ctx.guards`: callables
`guard(ctx)` run by `ctx.check_finite()`, i.e. before every evaluation and checkpoint save (a
guard may request a rollback; the save and evaluation are then skipped). `ctx.clock` (the run's
goodput clock, runtime/goodput.py): `with ctx.clock.span("eval"): ...` charges work to a
category. Everything else on `ctx` is to read.

Several processes: every process runs the same hooks at the same steps. A hook that stops the
run, asks for a checkpoint or runs a collective must decide the same way on every process (from
values every process has, e.g. the train line, which is the global mean), or the processes
part ways in the next collective.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
import dataclasses
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # Only for annotations: this module imports no JAX.
  from jaxdp.core.state import TrainState
  from jaxdp.parallel.data_parallel import DataParallel
  from jaxdp.runtime.goodput import GoodputClock
  from jaxdp.runtime.options import FitOptions


class Hook:
  """Base class of the loop's hooks: override the methods you need (each default does nothing;
  the loop calls only the methods a hook overrides). See this module's docstring for when each
  runs and what it may change."""

  def on_start(self, ctx: LoopContext) -> None:
    """Once, after restoring or initialising the state and compiling the step."""

  def wrap_batches(self, ctx: LoopContext, batches: Iterator) -> Iterator:
    """Once, before the first step: the iterator of placed batches the loop will consume."""
    return batches

  def before_step(self, ctx: LoopContext, step: int) -> None:
    """Before each step; `step` is the state's step (the update about to run is step + 1)."""

  def after_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
    """After each step was dispatched; `metrics` are device arrays (reading them syncs)."""

  def on_log(self, ctx: LoopContext, line: dict[str, Any], window: LogWindow) -> None:
    """At each log step, with the train line about to be written (host values; add fields)."""

  def at_boundary(self, ctx: LoopContext, step: int) -> None:
    """After each step (and its log), with the step clock and watchdog paused."""

  def on_pause(self, ctx: LoopContext) -> None:
    """Work that is not a step starts (evaluation, checkpoints): clocks of steps stop."""

  def on_resume(self, ctx: LoopContext, seconds: float) -> None:
    """That work ended after `seconds`."""

  def on_rollback(self, ctx: LoopContext, step: int) -> None:
    """The loop went back to the checkpoint of `step` (`ctx.request_rollback`): ctx.state and
    ctx.step are that checkpoint's now; the steps after it will be trained again."""

  def close(self, ctx: LoopContext) -> None:
    """After the last step, in reverse hook order, also when the run failed."""

  def on_end(self, ctx: LoopContext, result: dict[str, Any]) -> None:
    """After every hook's close, when the run ended without an error; `result` is fit's."""


@dataclasses.dataclass
class LogWindow:
  """The steps since the previous train line: first_step..step (inclusive), their `metrics`
  fetched to the host (one dict per step, in order), and the wall `seconds` they took
  (evaluation and checkpoints excluded)."""
  first_step: int
  step: int
  seconds: float
  metrics: list[dict[str, Any]]

  @property
  def steps(self) -> int:
    """Steps in the window (first_step..step inclusive)."""
    return self.step - self.first_step + 1


class LoopContext:
  """What hooks read (and the little they may change) of the running loop.

  Read: dp, options, workdir, record (the RunRecord), eval_batches, lr_schedule, started (the
  perf_counter time fit began), start_step,
  restored, compiled (the compiled train step; None when nothing is left to train),
  rows_per_step (rows of one global batch), step, state, log_step (whether this step logs),
  stop_reason, result, clock (the goodput clock), device_wait_s, log_s, skipped_batches. Change:
  `stop`, `request_checkpoint`, `request_rollback`, `state` (same step only), `guards`.
  """

  def __init__(self, *, dp: DataParallel, options: FitOptions, workdir: str, record: Any,
               state: TrainState, restored: bool, run: Any,
               eval_batches: Callable[[], Iterable[dict]] | None = None,
               lr_schedule: Callable[[int], Any] | None = None, clock: GoodputClock | None = None):
    from jaxdp.runtime.goodput import GoodputClock
    self.dp, self.options, self.workdir, self.record = dp, options, workdir, record
    self.eval_batches, self.lr_schedule = eval_batches, lr_schedule
    self.state = state
    # Where the run's wall time goes (productive steps, compilation, saves, ...); fit's own.
    self.clock = clock if clock is not None else GoodputClock()
    self.started = time.perf_counter()  # When fit began (fit sets it before restoring).
    # Seconds the host spent waiting for the devices (dispatching steps, fetching the train line):
    # the rest of a window is this process's own host time (runtime/health.py).
    self.device_wait_s = 0.0
    self.log_s = 0.0  # Host seconds spent in on_log hooks and writing train lines.
    self.guards: list[Callable[[LoopContext], None]] = []  # Run by check_finite (see above).
    self.rollback_to: int | None = None  # A requested rollback's checkpoint step.
    self.rollback_meta: dict[str, Any] = {}  # Meta the run keeps across that rollback.
    # Data indices never trained on (spike rollbacks); the batch of step s is
    # train_batches(runtime.spikes.data_index(s, skipped_batches)).
    self.skipped_batches: tuple[int, ...] = ()
    # step -> (state, meta) of the checkpoint at `step` (the initial state for an unsaved 0).
    self.restore_step: Callable[[int], tuple[Any, dict]] | None = None
    self.step = self.start_step = int(state.step)
    self.restored = restored
    self.run = run  # The run's checkpoints and metrics file (loop.Run).
    self.compiled: Any = None
    self.rows_per_step = 0
    self.log_step = False
    self.stop_reason: str | None = None
    self.checkpoint_requested = False
    self.eval_loss: float | None = None  # This step's, if it evaluated (saved with it).
    self.result: dict[str, Any] = {"stop_reason": "num_steps", "train_loss": None, "eval_loss": None}
    self.printer: Callable[[str], None] = _plain_print
    self.unlogged: Callable[[], tuple[list, int]] = lambda: ([], self.step + 1)
    self._cadence: Any = None  # loop_hooks.cadence's Cadence, made on first use.

  def stop(self, reason: str) -> None:
    """Ends the run after this step (checkpointed); `reason` becomes result["stop_reason"]."""
    if self.stop_reason is None:
      self.stop_reason = reason
      self.result["stop_reason"] = reason

  def request_checkpoint(self) -> None:
    """Saves a checkpoint at the end of this step, whatever checkpoint_every says."""
    self.checkpoint_requested = True

  def request_rollback(self, step: int, meta: dict[str, Any] | None = None) -> None:
    """After this step's boundary, returns to the checkpoint of `step` (0 without one: the
    initial state); `meta` (e.g. "skipped_batches", a sorted list of data indices to skip from
    then on) replaces those keys of the restored checkpoint's meta, so later saves record them."""
    if self.rollback_to is None:
      self.rollback_to, self.rollback_meta = step, dict(meta or {})

  def say(self, line: str) -> None:
    """Prints a line for the user (process 0), above the progress bar if there is one."""
    self.printer(line)

  def write(self, record: dict[str, Any]) -> None:
    """Appends a record to metrics.jsonl (and TensorBoard and the sinks; process 0 only)."""
    self.run.writer.write(record)

  def check_finite(self) -> None:
    """Halts the run (JaxdpError, with its advice) if the state froze after too many non-finite
    updates in a row; the steps not logged yet are fetched only then."""
    pending, first = self.unlogged()
    self.run.halt_if_not_finite(self.state, pending, first)
    for guard in self.guards:
      guard(self)


def _plain_print(line: str) -> None:
  import jax
  if jax.process_index() == 0:
    print(line, flush=True)


class _Every(Hook):
  def __init__(self, n: int, fn: Callable[[LoopContext, int, dict[str, Any]], Any]):
    if n < 1:
      raise ValueError(f"every(n={n}): n must be >= 1")
    self.n, self.fn = n, fn

  def after_step(self, ctx: LoopContext, step: int, metrics: dict[str, Any]) -> None:
    if step % self.n == 0 or step == ctx.options.num_steps:
      self.fn(ctx, step, metrics)

  def __repr__(self) -> str:
    return f"every({self.n}, {getattr(self.fn, '__name__', self.fn)!r})"


def every(n: int, fn: Callable[[LoopContext, int, dict[str, Any]], Any]) -> Hook:
  """A hook calling `fn(ctx, step, metrics)` after every step that is a multiple of `n`, and
  after the last step (Levanter's `add_hook(fn, every=n)`); `metrics` are device arrays, so a
  hook that reads them syncs only every `n` steps.

  Raises:
    ValueError: n < 1.
  """
  return _Every(n, fn)


def overriding(hooks: Iterable[Hook], method: str) -> list[Hook]:
  """The hooks that override `method` of Hook: the only ones the loop calls for it."""
  base = getattr(Hook, method)
  return [h for h in hooks if getattr(type(h), method, base) is not base]

