"""The training loop: the only place with side effects (devices, files, logging, checkpoints).

`train_and_evaluate(config, workdir)` trains, evaluates, early-stops and checkpoints; running it
again on the same workdir resumes from the latest checkpoint, bitwise as if never stopped.
`build(config)` returns the compiled pieces for notebooks that drive their own loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdp import parallel
from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint, abstract_with_shardings
from jaxdp.config import mesh_shape, validate
from jaxdp.data import Dataset, prefetch
from jaxdp.errors import JaxdpError
from jaxdp.runtime.metrics import MetricsWriter, Progress
from jaxdp.models.gpt import GPT, ModelConfig, count_params
from jaxdp.core.optimizer import learning_rate_schedule, make_optimizer
from jaxdp.core.precision import compute_dtype, initial_loss_scale
from jaxdp.core.state import TrainState, init_state
from jaxdp.parallel.exchange import CommConfig, bytes_per_step, with_comm_state
from jaxdp.runtime.watchdog import StepWatchdog

# Fields that define what is being trained: resuming with any of them changed is a different run.
RUN_DEFINING_FIELDS = ("seed", "global_batch_size", "seq_len", "data.path", "data.val_fraction",
                       "model.n_layer", "model.n_head", "model.d_model", "model.mlp_ratio",
                       "model.positions", "compression", "error_feedback", "momentum_correction",
                       "sync", "staleness", "diloco")


@dataclasses.dataclass
class Trainer:
  """Everything needed to run steps: built once per (config, devices)."""
  config: ml_collections.ConfigDict
  dataset: Dataset
  mesh: Mesh
  model: GPT
  tx: optax.GradientTransformation
  state_sharding: Any
  train_step: Callable[[TrainState, dict], tuple[TrainState, dict]]
  eval_step: Callable[[Any, dict], dict]

  def _init(self) -> TrainState:
    return initial_state(self.model, self.tx, self.config, self.mesh.size)

  def init_state(self) -> TrainState:
    return jax.jit(self._init, out_shardings=self.state_sharding)()

  def abstract_state(self):
    return abstract_with_shardings(jax.eval_shape(self._init), self.state_sharding)

  def comm_bytes_per_step(self, state: TrainState) -> float:
    """Mean bytes each device sends per step, from the collectives of the compiled train step."""
    batch = self.train_batch(int(state.step))
    hlo = self.train_step.lower(state, batch).compile().as_text()
    return bytes_per_step(CommConfig.from_config(self.config), hlo)

  def train_batch(self, step: int) -> dict[str, jax.Array]:
    """Global batch `step` on the devices; this process reads only its own rows."""
    cfg = self.config
    rows_per_micro = cfg.global_batch_size // cfg.grad_accum_steps
    rows = parallel.process_rows(self.mesh, rows_per_micro)
    return parallel.put_batch(self.dataset.train(step, rows), parallel.batch_sharding(self.mesh),
                              rows_per_micro)

  def evaluate(self, params) -> float:
    """Token-weighted mean loss over config.eval_steps validation batches."""
    rows = parallel.process_rows(self.mesh, self.config.global_batch_size)
    totals = [self.eval_step(params, parallel.put_batch(self.dataset.val(k, rows),
                                                        parallel.batch_sharding(self.mesh),
                                                        self.config.global_batch_size))
              for k in range(self.config.eval_steps)]
    totals = jax.device_get(totals)
    return float(sum(t["loss_sum"] for t in totals) / sum(t["count"] for t in totals))


def initial_state(model: GPT, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                  num_devices: int) -> TrainState:
  """A fresh state: the precision's loss scale, laid out for the communication method (sync.py)."""
  loss_scale = initial_loss_scale(config.precision, config.loss_scale_init, config.loss_scale_period)
  return with_comm_state(init_state(model, tx, config.seed, loss_scale),
                         CommConfig.from_config(config), tx, num_devices)


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Trainer:
  devices = list(jax.devices() if devices is None else devices)
  validate(config, len(devices), devices[0].platform)
  dataset = Dataset(config)
  mesh = parallel.make_mesh(devices, *mesh_shape(config, len(devices)))
  model = GPT(ModelConfig.from_config(config, dataset.tokenizer.vocab_size,
                                      compute_dtype(config.precision)))
  tx = make_optimizer(config)
  abstract = jax.eval_shape(functools.partial(initial_state, model, tx, config, mesh.size))
  sharding = parallel.state_shardings(config.strategy, mesh, abstract, config.offload_optimizer)
  return Trainer(config=config, dataset=dataset, mesh=mesh, model=model, tx=tx,
                 state_sharding=sharding,
                 train_step=parallel.compile_train_step(config.strategy, mesh, model, tx, sharding,
                                                        CommConfig.from_config(config),
                                                        max_consecutive_skips(config)),
                 eval_step=parallel.compile_eval_step(config.strategy, mesh, model))


def max_consecutive_skips(config: ml_collections.ConfigDict) -> int:
  """Dropped updates allowed in a row: none under nan_policy="halt"."""
  return config.max_consecutive_skips if config.nan_policy == "skip" else 0


def changed_fields(saved: dict, config: ml_collections.ConfigDict) -> list[str]:
  """RUN_DEFINING_FIELDS whose value differs between a checkpoint's config and `config`."""
  def get(tree, dotted):
    for part in dotted.split("."):
      tree = tree.get(part) if isinstance(tree, dict) else None
    return tree
  current = config.to_dict()
  return [f"{name} ({get(saved, name)!r} -> {get(current, name)!r})"
          for name in RUN_DEFINING_FIELDS if get(saved, name) != get(current, name)]


def state_bytes_per_device(state) -> int:
  """Bytes of the state held by the first local device, read from the arrays' shards."""
  device = jax.local_devices()[0]
  return sum(shard.data.nbytes for leaf in jax.tree.leaves(state)
             for shard in leaf.addressable_shards if shard.device == device)


def warn(message: str) -> None:
  if jax.process_index() == 0:
    print(f"jaxdp: warning: {message}", file=sys.stderr, flush=True)


def _check_config(saved: dict, trainer: Trainer, where: str, allow_config_change: bool) -> None:
  """Refuses a checkpoint whose config or data differ from this run's (unless allowed)."""
  changed = changed_fields(saved["config"], trainer.config)
  digest = saved.get("data_digest")
  if digest is not None and digest != trainer.dataset.digest:
    changed.append(f"the data at config.data.path={trainer.config.data.path!r} changed (sha256 "
                   f"{digest[:12]}... -> {trainer.dataset.digest[:12]}...); restore the data it was trained on")
  if changed and not allow_config_change:
    raise JaxdpError(f"the checkpoint in {where!r} was trained with a different config: "
                     f"{'; '.join(changed)}; use another --workdir, or --allow_config_change")


def restore_checkpoint(checkpoints: Checkpointer, trainer: Trainer, *, restore_from: str | None = None,
                       allow_config_change: bool = False) -> tuple[TrainState, dict] | None:
  """The state to resume from: `restore_from` (a step directory), or the latest valid checkpoint.

  A latest checkpoint that cannot be read back exactly is reported, moved aside and replaced by
  the one before it. A mismatching config is refused, never skipped. None means start afresh.
  """
  abstract = trainer.abstract_state()
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
      _check_config(source.restore_meta(step), trainer, path, allow_config_change)
      return source.restore(step, abstract)
    except CorruptCheckpoint as e:
      raise JaxdpError(f"--restore_from={restore_from!r}: {e}; pick another step") from None
    finally:
      source.close()
  for step in reversed(checkpoints.all_steps()):
    try:
      try:
        saved = checkpoints.restore_meta(step)
      except Exception as e:  # pylint: disable=broad-except  # Unreadable JSON or missing item.
        raise CorruptCheckpoint(f"step {step} has an unreadable meta item ({type(e).__name__})") from e
      _check_config(saved, trainer, checkpoints.directory, allow_config_change)
      return checkpoints.restore(step, abstract)
    except CorruptCheckpoint as e:
      moved = checkpoints.set_aside(step)
      warn(f"checkpoint {e}; moved it to {moved!r} and falling back to the previous checkpoint")
  return None


class StopRequests:
  """SIGTERM/SIGINT set a flag; the loop finishes its step, checkpoints and returns.

  With several processes, all must stop after the same step: SIGTERM is JAX's preemption
  notice (its service picks the step, `reached_preemption_sync_point`), and a local signal is
  shared through an all-gather at log steps, which every process reaches together.
  """

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}

  def __enter__(self) -> "StopRequests":
    if threading.current_thread() is threading.main_thread():
      signals = (signal.SIGINT,) if jax.process_count() > 1 else (signal.SIGTERM, signal.SIGINT)
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = signal.Signals(signum).name

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def should_stop(self, step: int, log_step: bool) -> bool:
    if jax.process_count() == 1:
      return self.signal_name is not None
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    if log_step:
      flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
      if np.any(flags):
        self.signal_name = self.signal_name or "SIGINT"
        return True
    return False


def train_line(fetched: list[dict], step: int, lr: float, tokens_per_sec: float,
               comm_bytes: float, count_skips: bool) -> dict[str, Any]:
  """The metrics line of the steps in `fetched` (host values): means of loss (finite steps only)
  and gradient norm; fp16's loss scale and the skip count when they matter."""
  finite_losses = [m["train_loss"] for m in fetched if math.isfinite(m["train_loss"])]
  line = {"step": step,
          "train_loss": float(np.mean(finite_losses)) if finite_losses else math.nan,
          "lr": lr,
          "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
          "tokens_per_sec": tokens_per_sec,
          "comm_bytes_per_step": comm_bytes}
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None, progress: bool = True,
                       allow_config_change: bool = False,
                       restore_from: str | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final step, losses and stop reason."""
  trainer = build(config, devices)
  checkpoints = Checkpointer(workdir, config.keep_last, config.keep_every)
  writer = MetricsWriter(workdir)
  meta = {"best_eval_loss": None, "evals_without_improvement": 0}
  restored = restore_checkpoint(checkpoints, trainer, restore_from=restore_from,
                                allow_config_change=allow_config_change)
  if restored is None:
    state = trainer.init_state()
  else:
    state, meta = restored
  step = int(state.step)
  if meta.get("stopped_early"):
    writer.close()
    Progress(step, config.num_steps, progress).write(
        f"the run in {workdir!r} stopped early at step {step}; nothing to do")
    return {"step": step, "stop_reason": "early_stopping", "train_loss": None, "eval_loss": None,
            "best_eval_loss": meta["best_eval_loss"]}
  schedule = learning_rate_schedule(config)
  comm_bytes = trainer.comm_bytes_per_step(state)
  tokens_per_step = config.global_batch_size * config.seq_len
  skip_limit = max_consecutive_skips(config)
  if step == 0 or restored is not None:
    writer.write({"event": "resume" if restored else "start", "step": step,
                  "strategy": config.strategy, "num_devices": trainer.mesh.size,
                  "params": count_params(state.params),
                  "state_bytes_per_device": state_bytes_per_device(state)})
  saved_step = step if restored is not None else None

  def save(state, eval_loss=None) -> None:
    nonlocal saved_step
    saved_step = int(state.step)
    checkpoints.save(saved_step, state, dict(
        meta, step=saved_step, examples_seen=saved_step * config.global_batch_size,
        config=config.to_dict(), data_digest=trainer.dataset.digest, strategy=config.strategy,
        num_devices=trainer.mesh.size),
        eval_loss=eval_loss)

  def halt_if_not_finite(state) -> None:
    """Ends the run if the step froze the state after too many non-finite updates in a row."""
    if int(state.consecutive_skips) <= skip_limit:
      return
    # The frozen state is the last good one; only its "in a row" count is past the limit.
    good = state.replace(consecutive_skips=jax.numpy.minimum(state.consecutive_skips, skip_limit))
    bad_step = int(good.step) + 1
    if saved_step != int(good.step):
      save(good)
    checkpoints.wait()
    checkpoints.close()
    writer.write({"step": bad_step, "event": "nonfinite_halt", "nan_policy": config.nan_policy,
                  "skipped_steps": int(good.skipped_steps)})
    in_a_row = f"{skip_limit + 1} steps in a row up to " if skip_limit else ""
    raise JaxdpError(
        f"non-finite loss or gradients at {in_a_row}step {bad_step} (config.nan_policy="
        f"{config.nan_policy!r}); the last good state is saved as checkpoint {int(good.step)}; "
        "lower config.learning_rate or set config.grad_clip and resume, or set config.nan_policy='skip'")

  bar = Progress(step, config.num_steps, progress)
  pending: list[dict] = []
  last = {"step": step, "time": time.perf_counter()}
  result = {"stop_reason": "num_steps", "train_loss": None, "eval_loss": None}
  with StopRequests() as stops, \
       contextlib.closing(prefetch(trainer.train_batch, step, config.num_steps)) as batches, \
       StepWatchdog(config.step_timeout_s, step) as watchdog:
    for batch in batches:
      _test_only_hang(step + 1)
      state, metrics = trainer.train_step(state, batch)
      watchdog.dispatched(step + 1, metrics["train_loss"])
      checkpoints.check()  # A failed background save is reported now, not at the next save.
      pending.append(metrics)
      step += 1
      final = step == config.num_steps
      log_step = step % config.log_every == 0 or final
      if log_step:
        fetched = jax.device_get(pending)  # The loop's only host sync between logs.
        halt_if_not_finite(state)
        elapsed = time.perf_counter() - last["time"]
        line = train_line(fetched, step, float(schedule(step - 1)),
                          (step - last["step"]) * tokens_per_step / elapsed, comm_bytes,
                          config.nan_policy == "skip")
        writer.write(line)
        bar.update(step - last["step"], loss=line["train_loss"], tok_s=line["tokens_per_sec"])
        result["train_loss"] = line["train_loss"]
        pending, last = [], {"step": step, "time": time.perf_counter()}
      stop = False
      eval_loss = None
      paused = time.perf_counter()  # Evaluation and checkpointing do not count against tokens/s.
      watchdog.pause()  # Nor against the step timeout.
      if (config.eval_every and step % config.eval_every == 0) or final:
        halt_if_not_finite(state)
        eval_loss = trainer.evaluate(state.params)
        writer.write({"step": step, "eval_loss": eval_loss})
        bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
        result["eval_loss"] = eval_loss
        meta = record_evaluation(meta, eval_loss, config.patience)
        if meta.get("stopped_early"):
          stop = True
          result["stop_reason"] = "early_stopping"
          writer.write({"step": step, "event": "early_stopping",
                        "best_eval_loss": meta["best_eval_loss"]})
          bar.write(f"early stopping at step {step}: no improvement in {config.patience} evaluations")
      preempted = not stop and not final and stops.should_stop(step, log_step)
      if (config.checkpoint_every and step % config.checkpoint_every == 0) or final or stop or preempted:
        halt_if_not_finite(state)
        if saved_step != step:
          save(state, eval_loss)
      last["time"] += time.perf_counter() - paused
      watchdog.resume()
      if preempted:
        result["stop_reason"] = "preempted"
        writer.write({"step": step, "event": "preempted", "signal": stops.signal_name})
        bar.write(f"{stops.signal_name}: stopped after step {step} and saved a checkpoint; "
                  "run the same command to resume")
        break
      if stop:
        break
  bar.close()
  checkpoints.wait()
  checkpoints.close()
  writer.close()
  result.update(step=step, best_eval_loss=meta["best_eval_loss"])
  return result


def _test_only_hang(step: int) -> None:
  """Test-only hook (tests/test_multihost.py): JAXDP_TEST_HANG_AT_STEP="PROCESS:STEP" makes that
  process stall before that step, as a stuck peer would, for the watchdog to catch."""
  if os.environ.get("JAXDP_TEST_HANG_AT_STEP") == f"{jax.process_index()}:{step}":
    time.sleep(3600)


def load_for_inference(workdir: str, step: int | None = None):
  """(params, model, tokenizer) of a checkpoint in `workdir` (the latest by default), on one device."""
  checkpoints = Checkpointer(workdir, create=False)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoint; train first with "
                     f"`jaxdp train --workdir {workdir}`")
  config = ml_collections.ConfigDict(checkpoints.restore_meta(step)["config"])
  # Whatever strategy and mesh trained it, inference runs on one device.
  config.strategy, config.offload_optimizer = "dp", False
  config.mesh = ml_collections.ConfigDict({"data": 0, "model": 1})
  trainer = build(config, devices=jax.local_devices()[:1])
  try:
    state, _ = checkpoints.restore(step, trainer.abstract_state())
  except CorruptCheckpoint as e:
    raise JaxdpError(f"--workdir={workdir!r}: checkpoint {e}") from None
  checkpoints.close()
  return state.params, trainer.model, trainer.dataset.tokenizer
