"""`FitOptions`: how long `jaxdp.fit` trains and how often it logs, evaluates and checkpoints.

Plain values only, and no JAX import: the command line builds one from its config without
paying for JAX, and a refusal of a bad value costs nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdp.errors import JaxdpError


@dataclasses.dataclass(frozen=True)
class FitOptions:
  """The scalar settings of `jaxdp.fit` (see its docstring for the rest of its arguments).

  Steps count optimizer updates; an `*_every` of 0 means only at the end of the run.

  Attributes:
    num_steps: train (or resume) up to this step.
    seed: the seed of the initial parameters (and of the data, if the batches use it).
    log_every: a metrics line every N steps (and at the last); the loop's only host sync.
    eval_every: evaluate every N steps (and at the last) when `eval_batches` is given.
    checkpoint_every: save every N steps (and at the last, at an early stop or preemption,
      and at every new best evaluation).
    patience: stop after this many evaluations in a row without a new best (0: never).
    keep_last: checkpoints kept on disk, newest first (besides the best and the pinned).
    keep_every: also keep every checkpoint whose step is a multiple of N (0: none).
    step_timeout_s: seconds a step may take before the process exits with status 3 (0: off;
      the first step, which compiles, is not timed); with several processes, also how long a
      peer may send no heartbeat, in any phase (0: 60 s; runtime/heartbeat.py).
    progress: a tqdm bar on a terminal (plain lines otherwise).
    tokens_per_step: tokens of one global batch, for tokens/s (None: its rows, so the log's
      tokens_per_sec counts examples).
    flops_per_device: FLOPs of one step on one device, for mfu (None: the compiled step's
      cost_analysis(), which counts a lax.scan body once).
    profile_steps: "START:STOP" (or (START, STOP)) traces steps START+1..STOP with
      jax.profiler into WORKDIR/profile; "" or None: no trace.
    restore_from: a checkpoint step directory to start from instead of the workdir's latest.
    allow_config_change: resume although the run-defining config or data changed.
    checkpoint_dir: where checkpoints go (None or "": WORKDIR/checkpoints): a folder, or an
      s3:// or gs:// URL (runtime/checkpoint.py); recorded in WORKDIR/checkpoints.json.
    checkpoint_every_minutes: also save when this many minutes passed since the last save
      (whichever of it and checkpoint_every comes first); judged at train lines, by process 0's
      clock for every process (0: off).
    spike_policy: "off" or "rollback" (runtime/spikes.py: back to the last checkpoint before a
      loss spike, skipping its batch); "skip" is the step's (DataParallel(spike_policy="skip")).
    spike_sigmas, spike_window: a spike is a loss above the mean + spike_sigmas std of about the
      last spike_window steps' losses.
    spike_max_rollbacks, spike_rollback_window: halt at the spike that would be rollback number
      spike_max_rollbacks + 1 within spike_rollback_window steps.
    straggler_factor: flag a process whose host time per step exceeds the processes' median by
      this factor, averaged over health_window train lines (runtime/health.py; 0: off).
    grad_outlier_factor: flag a data-parallel device whose local gradient norm is this factor
      above (or below 1/factor of) the devices' median, averaged over health_window lines (0: off).
    health_window: train lines the straggler and gradient-outlier judgements average over.

  Raises:
    JaxdpError: a negative count, log_every below 1, or a spike or health setting out of range.
  """
  num_steps: int
  seed: int = 0
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 0
  patience: int = 0
  keep_last: int = 3
  keep_every: int = 0
  step_timeout_s: float = 0.0
  progress: bool = True
  tokens_per_step: int | None = None
  flops_per_device: float | None = None
  profile_steps: str | tuple[int, int] | None = ""
  restore_from: str | None = None
  allow_config_change: bool = False
  checkpoint_dir: str | None = None
  checkpoint_every_minutes: float = 0.0
  spike_policy: str = "off"
  spike_sigmas: float = 6.0
  spike_window: int = 100
  spike_max_rollbacks: int = 3
  spike_rollback_window: int = 1000
  straggler_factor: float = 1.5
  grad_outlier_factor: float = 3.0
  health_window: int = 5

  def __post_init__(self):
    for name in ("num_steps", "eval_every", "checkpoint_every", "patience", "keep_every",
                 "step_timeout_s"):
      if getattr(self, name) < 0:
        raise JaxdpError(f"FitOptions.{name}={getattr(self, name)!r} must be >= 0")
    for name in ("log_every", "keep_last"):
      if getattr(self, name) < 1:
        raise JaxdpError(f"FitOptions.{name}={getattr(self, name)!r} must be >= 1")
    if self.patience and not self.eval_every:  # The same rule as config.patience's (lm.schema).
      raise JaxdpError(f"FitOptions.patience={self.patience} has no effect without periodic "
                       "evaluation; give eval_every > 0 (and eval_batches), or patience=0")
    if self.spike_policy not in ("off", "rollback"):
      raise JaxdpError(f"FitOptions.spike_policy={self.spike_policy!r} must be 'off' or 'rollback' "
                       "(spike_policy='skip' is DataParallel's: the step drops the update)")
    for name in ("checkpoint_every_minutes", "straggler_factor", "grad_outlier_factor"):
      if not getattr(self, name) >= 0:
        raise JaxdpError(f"FitOptions.{name}={getattr(self, name)!r} must be >= 0")
    for name in ("straggler_factor", "grad_outlier_factor"):
      if 0 < getattr(self, name) <= 1:
        raise JaxdpError(f"FitOptions.{name}={getattr(self, name)!r} must be > 1 (or 0: off)")
    if not self.spike_sigmas > 0:
      raise JaxdpError(f"FitOptions.spike_sigmas={self.spike_sigmas!r} must be > 0")
    for name in ("spike_window", "spike_max_rollbacks", "spike_rollback_window", "health_window"):
      if getattr(self, name) < 1:
        raise JaxdpError(f"FitOptions.{name}={getattr(self, name)!r} must be >= 1")


FIELDS = frozenset(f.name for f in dataclasses.fields(FitOptions))


def fit_options(options: FitOptions | None, fields: dict[str, Any]) -> FitOptions:
  """`options` with `fields` (FitOptions field names given to `fit` as keywords) replacing its
  values; without `options`, FitOptions(**fields).

  Raises:
    TypeError: a keyword that is no FitOptions field (as for any unknown keyword argument), or
      neither `options` nor `num_steps`.
  """
  unknown = sorted(set(fields) - FIELDS)
  if unknown:
    raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
  if options is None:
    if "num_steps" not in fields:
      raise TypeError("fit() needs num_steps= or options=FitOptions(num_steps=...)")
    return FitOptions(**fields)
  return dataclasses.replace(options, **fields) if fields else options
