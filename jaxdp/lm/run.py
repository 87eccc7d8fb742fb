"""Training a built-in language model from a config: `train_and_evaluate(config, workdir)`.

`jaxdp.lm.builder.build` makes the run's pieces; `fit` (jaxdp.runtime.loop) trains them. Running
`train_and_evaluate` again on the same workdir resumes from the latest checkpoint, bitwise as if
never stopped. `load_for_inference` reads a run's checkpoint back for sampling or export.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import time
from typing import Any

import jax
import ml_collections

from jaxdp.core.optimizer import learning_rate_schedule
from jaxdp.core.state import TrainState
from jaxdp.data.pipeline import Dataset
from jaxdp.data.prepare import load_tokenizer, save_tokenizer
from jaxdp.data.schedule import DataSchedule
from jaxdp.errors import JaxdpError, writing
from jaxdp.lm import preflight
from jaxdp.lm.builder import LMRun, build, build_model_and_dp, model_flops_per_device
from jaxdp.lm.evaluate import loop_hooks as eval_task_hooks
from jaxdp.lm.spec import data_spec, run_spec
from jaxdp.runtime import agreement, loop
from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint, is_url, step_directory
from jaxdp.runtime.checkpoint import check_location as check_checkpoint_location
from jaxdp.runtime.checkpoint import claim as claim_checkpoint_dir
from jaxdp.runtime.checkpoint import exists as checkpoint_exists
from jaxdp.runtime.checkpoint import location as checkpoint_location
from jaxdp.runtime.hooks import Hook
from jaxdp.runtime.targets import TargetLosses


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None, progress: bool = True,
                       allow_config_change: bool = False,
                       restore_from: str | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final step, losses and stop reason.

  Every input is checked before anything is written (jaxdp.lm.preflight, then the checkpoint's
  config against this one): a refused run leaves the workdir as it was.

  Raises:
    JaxdpError: a bad input (one line naming it and the fix), or a failure of the run itself.
  """
  if config.data.path or config.data.sources or config.data.tokenizer or config.get("eval_tasks"):
    # Stored resolved: the saved config names the data (and task files) from anywhere.
    config = config.copy_and_resolve_references()
    if config.get("eval_tasks"):
      config.eval_tasks = resolve_tasks(config.eval_tasks)
    if config.data.path:
      config.data.path = os.path.abspath(config.data.path)
    if config.data.sources:
      config.data.sources = resolve_sources(config.data.sources)
    if config.data.tokenizer:
      config.data.tokenizer = os.path.abspath(config.data.tokenizer)
  preflight.check_paths(config, workdir, restore_from)
  # A missing bucket, a prefix of another run's, or a place other than where this workdir's run
  # keeps its checkpoints is refused before anything is written.
  check_checkpoint_location(workdir, config.get("checkpoint_dir") or "")
  claim_checkpoint_dir(workdir, config.get("checkpoint_dir") or checkpoint_location(workdir))
  saved = saved_meta(workdir, restore_from)
  preflight.check_resume(config, workdir, restore_from, saved)
  config, note = keep_decay_horizon(config, workdir, restore_from)
  # config.init_from only seeds a fresh run: a resume does not read (or need) the checkpoint.
  fresh = saved is None
  built = build(config, devices, read_init_from=fresh)
  # Before the workdir is touched: every process runs this config on this data (fit checks again,
  # for its own callers), and the checkpoint it resumes was trained with a config it may resume
  # (fit's restore checks again, for its own callers).
  agreement.check(built.config.to_dict(), built.dataset.digest)
  if saved is not None:
    loop.check_record(saved[1], built.record(), resumed_from(workdir, config, restore_from),
                      allow_config_change, restore_from)
  built.schedule = resumed_schedule(built, saved)
  spec = built.spec
  hooks: list[Hook] = [TargetLosses(spec.target_losses)] if spec.target_losses else []
  # After the validation loss's hook: scores at the same evaluation points. The task files are
  # read and checked now, before anything is written to the workdir.
  hooks += eval_task_hooks(config, built.dataset.tokenizer, built.model.cfg.seq_len,
                           spec.data.global_batch_size)
  if jax.process_index() == 0:
    with writing(workdir, "--workdir: writing"):
      try:
        os.makedirs(workdir, exist_ok=True)
      except (FileNotFoundError, NotADirectoryError) as e:  # A folder that holds none (/proc).
        raise JaxdpError(f"--workdir={workdir!r} cannot be created ({e.strerror}: "
                         f"{e.filename!r}); give a run directory in a folder you can write") from None
      save_tokenizer(built.dataset.tokenizer, workdir)
  notes: tuple[str, ...] = (note,) if note else ()
  if fresh and built.spec.init_from:  # Positions of the checkpoint the run does not keep, said.
    from jaxdp.lm.hf_import import position_note
    notes += tuple(n for n in (position_note(built.spec.init_from, built.model.cfg),) if n)
  record = dataclasses.replace(built.record(), notes=notes)
  sinks = []
  if spec.wandb.project and jax.process_index() == 0:
    from jaxdp.runtime.wandb_sink import WandbSink
    sinks.append(WandbSink(spec.wandb.project, spec.wandb.mode, workdir, record.config))
  flops = model_flops_per_device(config, built.dataset.tokenizer.vocab_size,
                                 list(built.mesh.devices.flat), built.train_batch(0))
  options = dataclasses.replace(spec.fit, progress=progress, flops_per_device=flops,
                                restore_from=restore_from, allow_config_change=allow_config_change)
  result = loop.fit(built.dp, built.model.init_fn, built.train_batch, options, workdir=workdir,
                    eval_batches=built.val_batches, lr_schedule=learning_rate_schedule(spec.optimizer),
                    record=record, sinks=sinks, hooks=hooks)
  if "goodput" in result:  # It trained (a run with nothing to train writes nothing).
    report_mixture(built, workdir, result)
  return result


def resumed_from(workdir: str, config: ml_collections.ConfigDict, restore_from: str | None) -> str:
  """Where the checkpoint a run resumes from is, as fit's restore names it in messages."""
  where = restore_from or config.get("checkpoint_dir") or checkpoint_location(workdir)
  return where.rstrip("/") if is_url(where) else os.path.abspath(where.rstrip("/") or where)


def resumed_schedule(built: LMRun, saved: tuple[int, dict] | None) -> DataSchedule:
  """The data schedule of a run that resumes from the checkpoint `saved` (step, meta): the
  checkpoint's own up to its step (or, written before schedules were recorded, its config's
  global_batch_size throughout), then this config's batch sizes from the position the data
  reached, so a changed global_batch_size or batch_ramp neither skips nor repeats an example."""
  if saved is None:
    return built.schedule
  step, meta = saved
  if meta.get("data_schedule"):
    before = DataSchedule.from_meta(meta["data_schedule"])
  else:
    size = (meta.get("config") or {}).get("global_batch_size", built.spec.data.global_batch_size)
    before = DataSchedule.constant(int(size))
  return before.continued(step, built.schedule)


def resolve_sources(spec: str) -> str:
  """config.data.sources with each path made absolute (weights as given)."""
  from jaxdp.data.mixture import parse_sources
  parse_sources(spec)  # Raises on a malformed entry before anything is rewritten.
  entries = [item.strip().rpartition(":") for item in spec.split(",")]
  return ",".join(f"{os.path.abspath(path)}:{weight}" for path, _, weight in entries)


def resolve_tasks(spec: str) -> str:
  """config.eval_tasks with each task's file made absolute (kinds as given), so a resume from
  another directory reads the same files."""
  from jaxdp.lm.evaluate import parse_tasks
  tasks = parse_tasks(spec, "config.eval_tasks")  # Raises on a malformed entry first.
  return ",".join(f"{task.kind}:{os.path.abspath(task.path)}" for task in tasks)


def report_mixture(built: LMRun, workdir: str, result: dict[str, Any]) -> None:
  """With config.data.sources: the realised share of each source over the run's examples (steps
  0..step-1, exact) goes into `result["data_mixture"]`, a "data_mixture" event of
  metrics.jsonl and one line on stdout."""
  examples = int(result.get("step") or 0) * built.spec.data.global_batch_size
  shares = built.dataset.realised_mixture(examples)
  if shares is None:
    return
  result["data_mixture"] = shares
  if jax.process_index() != 0:
    return
  from jaxdp.runtime.metrics import MetricsWriter
  writer = MetricsWriter(workdir)
  try:
    writer.write({"event": "data_mixture", "step": result.get("step"), "examples": examples,
                  "shares": shares, "weights": dict(built.dataset.sources)})
  finally:
    writer.close()
  print("data mixture over " + f"{examples:,} examples: " + ", ".join(
      f"{path} {share:.1%} (weight {weight:.1%})"
      for (path, weight), share in zip(built.dataset.sources, shares.values())), flush=True)


def saved_config(workdir: str, restore_from: str | None = None) -> dict | None:
  """The config stored with the checkpoint a run would resume from (`restore_from`, else the
  latest readable one in `workdir`), or None when there is none."""
  found = saved_meta(workdir, restore_from)
  return None if found is None else found[1].get("config")


def saved_meta(workdir: str, restore_from: str | None = None) -> tuple[int, dict] | None:
  """(step, meta) of the checkpoint a run would resume from (`restore_from`, else the latest
  readable one in `workdir`), or None when there is none."""
  if restore_from:
    found = step_directory(restore_from)
    if found is None:
      return None  # A --restore_from that the restore itself refuses.
    directory, steps = found[0], [found[1]]
  else:
    directory, steps = checkpoint_location(workdir), None
  if not checkpoint_exists(directory):
    return None  # Nothing to resume.
  checkpoints = Checkpointer("", create=False, directory=directory)
  try:
    for step in steps if steps else reversed(checkpoints.all_steps()):
      try:
        return step, checkpoints.restore_meta(step)
      except Exception:  # noqa: BLE001  # Unreadable: the restore reports it (or falls back).
        continue
    return None
  finally:
    checkpoints.close()


def keep_decay_horizon(config: ml_collections.ConfigDict, workdir: str,
                       restore_from: str | None = None) -> tuple[ml_collections.ConfigDict, str | None]:
  """(`config` with the learning-rate horizon of the checkpoint it resumes from, the note to
  show once the resume succeeded, or None).

  With config.lr_decay_steps None the schedule decays over num_steps, as it was when the run
  started: a resume with another num_steps (extending a finished run, say) keeps that horizon,
  says so on one line, and records it as config.lr_decay_steps; set lr_decay_steps to change it.
  """
  if config.lr_decay_steps is not None:
    return config, None
  saved = saved_config(workdir, restore_from)
  if not saved:
    return config, None
  horizon = saved.get("lr_decay_steps") or saved.get("num_steps")
  if not horizon or horizon == config.num_steps:
    return config, None
  config = config.copy_and_resolve_references()
  config.lr_decay_steps = int(horizon)
  return config, (f"jaxdp: note: config.lr_decay_steps is unset, so the learning rate keeps the "
                  f"checkpoint's horizon, step {horizon}, not num_steps={config.num_steps}; set "
                  f"--config.lr_decay_steps={config.num_steps} to decay over the new num_steps "
                  "instead")


def restore_checkpoint(checkpoints: Checkpointer, built: LMRun, *,
                       restore_from: str | None = None,
                       allow_config_change: bool = False) -> tuple[TrainState, dict] | None:
  """(state, meta) of the checkpoint a run of `built` would resume from (see loop.restore)."""
  return loop.restore(checkpoints, built.abstract_state(), built.record(),
                      restore_from=restore_from, allow_config_change=allow_config_change)


def load_for_inference(workdir: str, step: int | None = None) -> tuple[Any, Any, Any]:
  """(params, model module, tokenizer) of a checkpoint in `workdir` (the latest by default), on
  one device: params the unboxed float32 tree, the module a Flax Linen module of the run's
  model (`module.cfg` its ModelConfig), the tokenizer the run's own.

  Raises:
    JaxdpError: `workdir` has no checkpoint, or the checkpoint cannot be read back exactly.
  """
  return load_step_for_inference(workdir, step)[1:]


def load_step_for_inference(workdir: str, step: int | None = None) -> tuple[int, Any, Any, Any]:
  """(step, params, module, tokenizer): `load_for_inference` of `step`, or of the latest
  checkpoint. On a live workdir the step is held while it is read (`Checkpointer.hold`: the
  run's retention keeps it); a latest step deleted before the hold was seen is retried (up to
  10 times) on the newest step then, and after two such losses on the newest step that
  outlived a save (one retention keeps); a given `step` is not replaced.

  Raises:
    JaxdpError: no checkpoint, a given step deleted, or a checkpoint that cannot be read exactly.
  """
  # A run saving every step with keep_last=1 deletes each latest step within a save interval,
  # which can be shorter than one read on a loaded host: every retry of the latest would lose
  # the race. Steps seen in two listings outlived a save (retention keeps them: the best, the
  # last one followed by a sane loss), so later attempts read the newest of those instead.
  survivors: set[int] = set()
  failed: set[int] = set()
  attempts = 10  # Each lost race costs one read (0.1-3 s here): bounded, and rarely all lost.
  for attempt in range(attempts):
    checkpoints = Checkpointer(workdir, create=False)
    chosen = checkpoints.latest_step() if step is None else step
    if step is None and attempt >= 2 and survivors:
      chosen = max(survivors)
    if chosen is None:
      raise JaxdpError(f"--workdir={workdir!r} has no checkpoint; train first with "
                       f"`jaxdp train --workdir {workdir}`")
    try:
      with checkpoints.hold(chosen):  # The live run's retention keeps it while it is read.
        return (chosen, *_load_for_inference(workdir, checkpoints, chosen))
    except Exception:
      listed = set(checkpoints.all_steps())
      time.sleep(0.2)  # A deletion in progress (retention removes a folder file by file) ends.
      now = checkpoints.refreshed_steps()
      failed.add(chosen)
      survivors = ((survivors | listed) & set(now)) - failed
      newer = step is None and bool(now) and now[-1] > chosen
      if attempt == attempts - 1 or (chosen in now and not newer):
        raise  # Still there, and no newer step to read instead: damage, reported as such.
      if step is not None:
        raise JaxdpError(f"--step={step}: the live run in {workdir!r} deleted that checkpoint "
                         f"(keep_last) while it was read; its checkpoints now: "
                         f"{', '.join(map(str, checkpoints.all_steps())) or 'none'}") from None
    finally:
      checkpoints.close()
  raise AssertionError("unreachable")


def _load_for_inference(workdir: str, checkpoints: Checkpointer, step: int) -> tuple[Any, Any, Any]:
  config = ml_collections.ConfigDict(checkpoints.restore_meta(step)["config"])
  # Whatever strategy and mesh trained it, inference runs on one device.
  config.strategy, config.offload_optimizer = "dp", False
  config.mesh = ml_collections.ConfigDict({"data": 0, "model": 1})
  # The run's own tokenizer copy: no data needed (runs from before it existed read the data).
  tokenizer = load_tokenizer(workdir) or Dataset(data_spec(config)).tokenizer
  devices = jax.local_devices()[:1]
  spec = run_spec(config, len(devices), tokenizer.vocab_size)
  model, dp = build_model_and_dp(spec, devices, read_init_from=False)
  try:
    state, _ = checkpoints.restore(step, dp.abstract_state(model.init_fn, spec.seed))
  except CorruptCheckpoint as e:
    raise JaxdpError(f"--workdir={workdir!r}: checkpoint {e}") from None
  return state.params, model.module, tokenizer
