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
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from jaxdp import parallel
from jaxdp.checkpoint import Checkpointer, abstract_with_shardings
from jaxdp.config import validate
from jaxdp.data import Dataset, prefetch
from jaxdp.errors import JaxdpError
from jaxdp.metrics import MetricsWriter, Progress
from jaxdp.model import GPT, ModelConfig, count_params
from jaxdp.optim import learning_rate_schedule, make_optimizer
from jaxdp.state import TrainState, init_state
from jaxdp.sync import CommConfig, bytes_per_step, with_comm_state

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
    local = rows_per_micro // jax.process_count()
    rows = slice(jax.process_index() * local, (jax.process_index() + 1) * local)
    return parallel.put_batch(self.dataset.train(step, rows), parallel.batch_sharding(self.mesh),
                              rows_per_micro)

  def evaluate(self, params) -> float:
    """Token-weighted mean loss over config.eval_steps validation batches."""
    totals = [self.eval_step(params, parallel.put_batch(self.dataset.val(k),
                                                        parallel.batch_sharding(self.mesh)))
              for k in range(self.config.eval_steps)]
    totals = jax.device_get(totals)
    return float(sum(t["loss_sum"] for t in totals) / sum(t["count"] for t in totals))


def initial_state(model: GPT, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
                  num_devices: int) -> TrainState:
  """A fresh state laid out for the config's communication method (jaxdp/sync.py)."""
  return with_comm_state(init_state(model, tx, config.seed), CommConfig.from_config(config), tx,
                         num_devices)


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Trainer:
  devices = list(jax.devices() if devices is None else devices)
  validate(config, len(devices))
  dataset = Dataset(config)
  mesh = parallel.make_mesh(devices)
  model = GPT(ModelConfig.from_config(config, dataset.tokenizer.vocab_size))
  tx = make_optimizer(config)
  comm_cfg = CommConfig.from_config(config)
  abstract = jax.eval_shape(functools.partial(initial_state, model, tx, config, mesh.size))
  sharding = parallel.state_shardings(config.strategy, mesh, abstract)
  return Trainer(config=config, dataset=dataset, mesh=mesh, model=model, tx=tx,
                 state_sharding=sharding,
                 train_step=parallel.compile_train_step(config.strategy, mesh, model, tx, sharding,
                                                        comm_cfg),
                 eval_step=parallel.compile_eval_step(config.strategy, mesh, model))


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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None, progress: bool = True,
                       allow_config_change: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final step, losses and stop reason."""
  trainer = build(config, devices)
  checkpoints = Checkpointer(workdir, config.keep_checkpoints)
  writer = MetricsWriter(workdir)
  meta = {"best_eval_loss": None, "evals_without_improvement": 0}
  latest = checkpoints.latest_step()
  if latest is None:
    state = trainer.init_state()
  else:
    saved = checkpoints.restore_meta(latest)
    changed = changed_fields(saved["config"], config)
    if changed and not allow_config_change:
      raise JaxdpError(f"the checkpoint in {workdir!r} was trained with a different config: "
                       f"{'; '.join(changed)}; use another --workdir, or --allow_config_change")
    state, meta = checkpoints.restore(latest, trainer.abstract_state())
  step = int(state.step)
  if meta.get("stopped_early"):
    Progress(step, config.num_steps, progress).write(
        f"the run in {workdir!r} stopped early at step {step}; nothing to do")
    return {"step": step, "stop_reason": "early_stopping", "train_loss": None, "eval_loss": None,
            "best_eval_loss": meta["best_eval_loss"]}
  schedule = learning_rate_schedule(config)
  comm_bytes = trainer.comm_bytes_per_step(state)
  tokens_per_step = config.global_batch_size * config.seq_len
  if step == 0 or latest is not None:
    writer.write({"event": "resume" if latest else "start", "step": step,
                  "strategy": config.strategy, "num_devices": trainer.mesh.size,
                  "params": count_params(state.params),
                  "state_bytes_per_device": state_bytes_per_device(state)})

  def save(state) -> None:
    checkpoints.save(int(state.step), state, dict(
        meta, step=int(state.step), examples_seen=int(state.step) * config.global_batch_size,
        config=config.to_dict(), strategy=config.strategy, num_devices=trainer.mesh.size))

  bar = Progress(step, config.num_steps, progress)
  pending: list[dict] = []
  last = {"step": step, "time": time.perf_counter()}
  result = {"stop_reason": "num_steps", "train_loss": None, "eval_loss": None}
  with contextlib.closing(prefetch(trainer.train_batch, step, config.num_steps)) as batches:
    for batch in batches:
      state, metrics = trainer.train_step(state, batch)
      pending.append(metrics)
      step += 1
      final = step == config.num_steps
      if step % config.log_every == 0 or final:
        fetched = jax.device_get(pending)  # The loop's only host sync between logs.
        elapsed = time.perf_counter() - last["time"]
        line = {"step": step,
                "train_loss": float(np.mean([m["train_loss"] for m in fetched])),
                "lr": float(schedule(step - 1)),
                "grad_norm": float(np.mean([m["grad_norm"] for m in fetched])),
                "tokens_per_sec": (step - last["step"]) * tokens_per_step / elapsed,
                "comm_bytes_per_step": comm_bytes}
        if not math.isfinite(line["train_loss"]):
          raise JaxdpError(f"non-finite training loss at step {step}; lower config.learning_rate "
                           "or set config.grad_clip")
        writer.write(line)
        bar.update(step - last["step"], loss=line["train_loss"], tok_s=line["tokens_per_sec"])
        result["train_loss"] = line["train_loss"]
        pending, last = [], {"step": step, "time": time.perf_counter()}
      stop = False
      paused = time.perf_counter()  # Evaluation and checkpointing do not count against tokens/s.
      if (config.eval_every and step % config.eval_every == 0) or final:
        eval_loss = trainer.evaluate(state.params)
        writer.write({"step": step, "eval_loss": eval_loss})
        bar.write(f"step {step}: eval_loss {eval_loss:.4f}")
        result["eval_loss"] = eval_loss
        if meta["best_eval_loss"] is None or eval_loss < meta["best_eval_loss"]:
          meta = dict(meta, best_eval_loss=eval_loss, evals_without_improvement=0)
        else:
          meta = dict(meta, evals_without_improvement=meta["evals_without_improvement"] + 1)
          if config.patience and meta["evals_without_improvement"] >= config.patience:
            stop = True
            meta["stopped_early"] = True
            result["stop_reason"] = "early_stopping"
            writer.write({"step": step, "event": "early_stopping",
                          "best_eval_loss": meta["best_eval_loss"]})
            bar.write(f"early stopping at step {step}: no improvement in {config.patience} evaluations")
      if (config.checkpoint_every and step % config.checkpoint_every == 0) or final or stop:
        save(state)
      last["time"] += time.perf_counter() - paused
      if stop:
        break
  bar.close()
  checkpoints.wait()
  checkpoints.close()
  result.update(step=step, best_eval_loss=meta["best_eval_loss"])
  return result


def load_for_inference(workdir: str, step: int | None = None):
  """(params, model, tokenizer) of a checkpoint in `workdir` (the latest by default), on one device."""
  checkpoints = Checkpointer(workdir, create=False)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoint; train first with "
                     f"`jaxdp train --workdir {workdir}`")
  config = ml_collections.ConfigDict(checkpoints.restore_meta(step)["config"])
  trainer = build(config, devices=jax.local_devices()[:1])
  state, _ = checkpoints.restore(step, trainer.abstract_state())
  checkpoints.close()
  return state.params, trainer.model, trainer.dataset.tokenizer
