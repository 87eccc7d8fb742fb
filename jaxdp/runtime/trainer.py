"""The built-in language models trained from a config: `train_and_evaluate(config, workdir)`.

An ordinary user of the generic API: the config is turned into typed values (model, optimizer,
communication, mesh), the model into `init_fn`/`loss_fn`, and the run into `DataParallel` plus
`fit`. `build(config)` returns the pieces for notebooks, tools and tests that drive their own
loop. Running `train_and_evaluate` again on the same workdir resumes from the latest checkpoint,
bitwise as if never stopped.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Sequence

import jax
from jax.sharding import Mesh
import ml_collections
import optax

from jaxdp import config as configs
from jaxdp import models
from jaxdp.core.optimizer import learning_rate_schedule, make_optimizer
from jaxdp.core.state import TrainState
from jaxdp.data.pipeline import Dataset
from jaxdp.data.prepare import load_tokenizer, save_tokenizer
from jaxdp.errors import JaxdpError
from jaxdp.parallel import DataParallel, make_mesh
from jaxdp.parallel.mesh import batch_sharding, process_rows, put_batch
from jaxdp.runtime import loop, observe
from jaxdp.runtime.checkpoint import Checkpointer, CorruptCheckpoint

# Fields that define what is being trained: resuming with any of them changed is a different run.
# The data is identified by its content (sha256, checked separately), not by config.data.path,
# so the same bytes under another path (relative or absolute, moved) resume as the same run.
RUN_DEFINING_FIELDS = ("seed", "global_batch_size", "seq_len", "data.val_fraction", "optimizer",
                       "model.family", "model.n_layer", "model.n_head", "model.n_kv_head",
                       "model.d_model", "model.mlp_ratio", "model.positions", "model.rope_theta",
                       "model.tie_embeddings", "compression", "error_feedback",
                       "momentum_correction", "sync", "staleness", "diloco", "data.packing",
                       "model.norm_eps", "model.pad_vocab_to_multiple", "compression_rank",
                       "compression_optimizer")


def run_defining_defaults() -> dict:
  """RUN_DEFINING_FIELDS -> the default preset's value (what a checkpoint written before a field
  existed was trained with)."""
  default = configs.load_preset("default")
  values = {}
  for name in RUN_DEFINING_FIELDS:
    value = default
    for part in name.split("."):
      value = value[part]
    values[name] = value
  return values


@dataclasses.dataclass
class Trainer:
  """Everything needed to run steps of a config's model: built once per (config, devices)."""
  config: ml_collections.ConfigDict
  dataset: Dataset
  model: models.LanguageModel
  dp: DataParallel

  @property
  def mesh(self) -> Mesh:
    return self.dp.mesh

  @property
  def tx(self) -> optax.GradientTransformation:
    return self.dp.tx

  @property
  def state_sharding(self) -> Any:
    return self.dp.state_sharding

  @property
  def train_step(self) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    return self.dp.train_step

  @property
  def eval_step(self) -> Callable[[Any, dict], dict]:
    return self.dp.eval_step

  def init_state(self) -> TrainState:
    return self.dp.init_state(self.model.init_fn, self.config.seed)

  def abstract_state(self) -> TrainState:
    return self.dp.abstract_state(self.model.init_fn, self.config.seed)

  def comm_bytes_per_step(self, state: TrainState) -> float:
    """Mean bytes each device sends per step, from the collectives of the compiled train step."""
    return loop.comm_bytes_per_step(self.dp, state, self.train_batch(int(state.step)))

  def train_batch(self, step: int) -> dict[str, jax.Array]:
    """Global batch `step` on the devices; this process reads only its own rows."""
    cfg = self.config
    rows_per_micro = cfg.global_batch_size // cfg.grad_accum_steps
    rows = process_rows(self.mesh, rows_per_micro)
    return put_batch(self.dataset.train(step, rows), batch_sharding(self.mesh), rows_per_micro)

  def val_batches(self):
    """The evaluation batches, each placed on the devices: every validation window once (the
    first config.eval_steps global batches' worth when it is > 0), the last batch padded with
    zero-weight rows (see data.pipeline.EvalBatches); this process reads only its own rows."""
    rows = process_rows(self.mesh, self.config.global_batch_size)
    for k in range(self.dataset.val.num_batches):
      yield put_batch(self.dataset.val(k, rows), batch_sharding(self.mesh),
                      self.config.global_batch_size)

  def record(self) -> loop.RunRecord:
    """What checkpoints of this config store and what a resume must match."""
    return loop.RunRecord(config=self.config.to_dict(), run_defining=RUN_DEFINING_FIELDS,
                          data_digest=self.dataset.digest,
                          data_name=(f"the data at config.data.sources={self.config.data.sources!r}"
                                     if self.dataset.mixture is not None else
                                     f"the data at config.data.path={self.config.data.path!r}"),
                          description=self.describe(),
                          examples_per_step=self.config.global_batch_size,
                          defaults=run_defining_defaults())

  def describe(self) -> str:
    """The model and data in a few words (the start banner's)."""
    m, tok = self.config.model, self.dataset.tokenizer
    data = (self.config.data.sources if self.dataset.mixture is not None
            else self.config.data.path or "the built-in corpus")
    kv = f", {m.n_kv_head} key/value heads" if m.family == "llama" and m.n_kv_head else ""
    return (f"{m.family} ({m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads{kv}); data: "
            f"{data} ({getattr(tok, 'name', type(tok).__name__)} tokenizer, vocab {tok.vocab_size}, "
            f"{self.dataset.examples_per_epoch:,} training windows of {self.config.seq_len})")

  def evaluate(self, params) -> float:
    """Token-weighted mean loss over the validation windows of `val_batches`, each counted once."""
    return self.dp.evaluate(params, self.val_batches())


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None, *,
          read_init_from: bool = True) -> Trainer:
  """The dataset, model and DataParallel of `config` on `devices` (all by default).

  With `read_init_from` (and config.init_from set) the model's init_fn gives the checkpoint's
  parameters; False when the run resumes from its own checkpoint instead.

  Raises:
    JaxdpError: a field that cannot work on these devices, or data that cannot be read.
  """
  devices = list(jax.devices() if devices is None else devices)
  configs.validate(config, len(devices), devices[0].platform)
  for message in configs.ignored_fields(config):
    loop.warn(message)
  dataset = Dataset(config)
  model, dp = build_model(config, dataset.tokenizer.vocab_size, devices,
                          read_init_from=read_init_from)
  trainer = Trainer(config=config, dataset=dataset, model=model, dp=dp)
  trainer.abstract_state()  # Builds the layout and compiles lazily; errors surface here.
  return trainer


def build_model(config: ml_collections.ConfigDict, vocab_size: int,
                devices: Sequence[jax.Device], *,
                read_init_from: bool = True) -> tuple[models.LanguageModel, DataParallel]:
  """The config's model for a tokenizer of `vocab_size` ids, and its DataParallel on `devices`
  (see `build` for `read_init_from`)."""
  model = models.build(configs.model_config(config, vocab_size))
  if read_init_from and config.get("init_from", ""):
    model = with_initial_params(model, config.init_from)
  mesh = make_mesh(devices, *configs.mesh_shape(config, len(devices)),
                   replica=configs.mesh_replica(config))
  dp = DataParallel(model.loss_fn, make_optimizer(configs.optimizer_config(config)),
                    strategy=config.strategy, mesh=mesh, grad_accum_steps=config.grad_accum_steps,
                    precision=config.precision, comm=configs.comm_config(config),
                    nan_policy=config.nan_policy,
                    max_consecutive_skips=config.max_consecutive_skips,
                    loss_scale_init=config.loss_scale_init,
                    loss_scale_period=config.loss_scale_period,
                    offload_optimizer=config.offload_optimizer)
  return model, dp


def with_initial_params(model: models.LanguageModel, init_from: str) -> models.LanguageModel:
  """`model` whose init_fn returns the parameters of config.init_from ("hf:DIR") instead of a
  random draw, in the same boxed tree (so every strategy shards them as it would its own init).

  The checkpoint is read and checked (config.json against the model's fields, every tensor's
  shape) here, once, before anything compiles.
  """
  from flax.core import meta

  from jaxdp.runtime import hf
  loaded = hf.load_params(init_from, model.cfg)
  is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
  # The random init's boxed tree (logical axis names): the structure the shardings expect.
  boxed = jax.eval_shape(model.init_fn, jax.random.PRNGKey(0))

  def init_fn(rng):
    del rng  # The parameters are the checkpoint's.
    return jax.tree.map(lambda b, x: b.replace_boxed(jax.numpy.asarray(x)) if is_box(b)
                        else jax.numpy.asarray(x), boxed, loaded, is_leaf=is_box)
  return dataclasses.replace(model, init_fn=init_fn)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices: Sequence[jax.Device] | None = None, progress: bool = True,
                       allow_config_change: bool = False,
                       restore_from: str | None = None) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final step, losses and stop reason."""
  if config.data.path or config.data.sources or config.data.tokenizer:  # Stored resolved: the saved config names the
    config = config.copy_and_resolve_references()  # data from anywhere.
    if config.data.path:
      config.data.path = os.path.abspath(config.data.path)
    if config.data.sources:
      config.data.sources = resolve_sources(config.data.sources)
    if config.data.tokenizer:
      config.data.tokenizer = os.path.abspath(config.data.tokenizer)
  config, note = keep_decay_horizon(config, workdir, restore_from)
  # config.init_from only seeds a fresh run: a resume does not read (or need) the checkpoint.
  trainer = build(config, devices, read_init_from=saved_config(workdir, restore_from) is None)
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    save_tokenizer(trainer.dataset.tokenizer, workdir)
  record = dataclasses.replace(trainer.record(), notes=(note,) if note else ())
  sinks = []
  if config.wandb.project and jax.process_index() == 0:
    from jaxdp.runtime.wandb_sink import WandbSink
    sinks.append(WandbSink(config.wandb.project, config.wandb.mode, workdir, config.to_dict()))
  flops = observe.model_flops_per_device(config, trainer.dataset.tokenizer.vocab_size,
                                         trainer.mesh.devices.flat, trainer.train_batch(0))
  result = loop.fit(trainer.dp, trainer.model.init_fn, trainer.train_batch, workdir=workdir,
                  num_steps=config.num_steps, seed=config.seed,
                  eval_batches=trainer.val_batches, log_every=config.log_every,
                  eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
                  patience=config.patience, keep_last=config.keep_last,
                  keep_every=config.keep_every, step_timeout_s=config.step_timeout_s,
                  progress=progress,
                  lr_schedule=learning_rate_schedule(configs.optimizer_config(config)),
                  tokens_per_step=config.global_batch_size * config.seq_len, record=record,
                  restore_from=restore_from, allow_config_change=allow_config_change,
                  flops_per_device=flops, profile_steps=config.profile_steps, sinks=sinks)
  report_mixture(trainer, workdir, result)
  return result


def resolve_sources(spec: str) -> str:
  """config.data.sources with each path made absolute (weights as given)."""
  from jaxdp.data.mixture import parse_sources
  parse_sources(spec)  # Raises on a malformed entry before anything is rewritten.
  entries = [item.strip().rpartition(":") for item in spec.split(",")]
  return ",".join(f"{os.path.abspath(path)}:{weight}" for path, _, weight in entries)


def report_mixture(trainer: Trainer, workdir: str, result: dict[str, Any]) -> None:
  """With config.data.sources: the realised share of each source over the run's examples (steps
  0..step-1, exact) goes into `result["data_mixture"]`, a "data_mixture" event of
  metrics.jsonl and one line on stdout."""
  examples = int(result.get("step") or 0) * trainer.config.global_batch_size
  shares = trainer.dataset.realised_mixture(examples)
  if shares is None:
    return
  result["data_mixture"] = shares
  if jax.process_index() != 0:
    return
  from jaxdp.runtime.metrics import MetricsWriter
  writer = MetricsWriter(workdir)
  try:
    writer.write({"event": "data_mixture", "step": result.get("step"), "examples": examples,
                  "shares": shares, "weights": dict(trainer.dataset.sources)})
  finally:
    writer.close()
  print("data mixture over " + f"{examples:,} examples: " + ", ".join(
      f"{path} {share:.1%} (weight {weight:.1%})"
      for (path, weight), share in zip(trainer.dataset.sources, shares.values())), flush=True)


def saved_config(workdir: str, restore_from: str | None = None) -> dict | None:
  """The config stored with the checkpoint a run would resume from (`restore_from`, else the
  latest readable one in `workdir`), or None when there is none."""
  if restore_from:
    path = os.path.abspath(restore_from.rstrip("/"))
    directory, steps = os.path.dirname(path), [os.path.basename(path)]
  else:
    directory, steps = os.path.join(workdir, "checkpoints"), None
  if not os.path.isdir(directory) or (steps and not steps[0].isdigit()):
    return None  # Nothing to resume, or a --restore_from that the restore itself refuses.
  checkpoints = Checkpointer("", create=False, directory=directory)
  try:
    for step in [int(s) for s in steps] if steps else reversed(checkpoints.all_steps()):
      try:
        return checkpoints.restore_meta(step).get("config")
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


def restore_checkpoint(checkpoints: Checkpointer, trainer: Trainer, *,
                       restore_from: str | None = None,
                       allow_config_change: bool = False) -> tuple[TrainState, dict] | None:
  """(state, meta) of the checkpoint a run of `trainer` would resume from (see loop.restore)."""
  return loop.restore(checkpoints, trainer.abstract_state(), trainer.record(),
                      restore_from=restore_from, allow_config_change=allow_config_change)


def load_for_inference(workdir: str, step: int | None = None):
  """(params, model module, tokenizer) of a checkpoint in `workdir` (the latest by default), on
  one device."""
  checkpoints = Checkpointer(workdir, create=False)
  step = checkpoints.latest_step() if step is None else step
  if step is None:
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoint; train first with "
                     f"`jaxdp train --workdir {workdir}`")
  config = ml_collections.ConfigDict(checkpoints.restore_meta(step)["config"])
  # Whatever strategy and mesh trained it, inference runs on one device.
  config.strategy, config.offload_optimizer = "dp", False
  config.mesh = ml_collections.ConfigDict({"data": 0, "model": 1})
  # The run's own tokenizer copy: no data needed (runs from before it existed read the data).
  tokenizer = load_tokenizer(workdir) or Dataset(config).tokenizer
  model, dp = build_model(config, tokenizer.vocab_size, jax.local_devices()[:1],
                          read_init_from=False)
  try:
    state, _ = checkpoints.restore(step, dp.abstract_state(model.init_fn, config.seed))
  except CorruptCheckpoint as e:
    raise JaxdpError(f"--workdir={workdir!r}: checkpoint {e}") from None
  checkpoints.close()
  return state.params, model.module, tokenizer
