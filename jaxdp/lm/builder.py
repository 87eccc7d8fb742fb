"""The built-in language models built from a config: `build(config)` -> `LMRun`.

An ordinary user of the generic API: the config is validated and turned into a typed `RunSpec`
once (jaxdp.lm.spec), the model into `init_fn`/`loss_fn`, and the run into a `DataParallel`.
`build(config)` returns the pieces for notebooks, tools and tests that drive their own loop;
jaxdp.lm.run trains them with `fit`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any
import warnings

import jax
from jax.sharding import Mesh
import ml_collections
import optax

from jaxdp import models
from jaxdp.core.optimizer import make_optimizer
from jaxdp.core.state import TrainState
from jaxdp.data.pipeline import Dataset
from jaxdp.data.schedule import DataSchedule, parse_ramp
from jaxdp.lm import schema
from jaxdp.lm.config import ignored_fields, load_preset, validate
from jaxdp.lm.spec import RunSpec, data_spec, run_spec
from jaxdp.parallel import DataParallel, make_mesh
from jaxdp.parallel.mesh import batch_sharding, process_rows, put_batch
from jaxdp.runtime import loop
from jaxdp.runtime.fieldpath import dotted_get
from jaxdp.runtime.observe import lowered_flops

# Fields that define what is being trained (declared in the schema): resuming with any of them
# changed is a different run. The data is identified by its content (sha256, checked
# separately), not by config.data.path, so the same bytes under another path (relative or
# absolute, moved) resume as the same run.
RUN_DEFINING_FIELDS = schema.RUN_DEFINING_FIELDS


def run_defining_defaults() -> dict:
  """RUN_DEFINING_FIELDS -> the default preset's value (what a checkpoint written before a field
  existed was trained with)."""
  default = load_preset("default").to_dict()
  return {name: dotted_get(default, name) for name in RUN_DEFINING_FIELDS}


@dataclasses.dataclass
class LMRun:
  """Everything needed to run steps of a config's model: built once per (config, devices).

  It runs no loop itself: `train_step`/`evaluate` for a hand-written loop, or
  jaxdp.lm.run.train_and_evaluate for `fit`.

  Attributes:
    config: the config it was built from (stored with every checkpoint).
    spec: the config's typed values on these devices.
    dataset: the training and validation streams.
    model: the built-in model (init_fn, loss_fn, module).
    dp: the DataParallel that runs its steps.
    schedule: where each step's batch starts in the training examples and how large it is
      (config.batch_ramp, then global_batch_size; a resume continues its checkpoint's).
  """
  config: ml_collections.ConfigDict
  spec: RunSpec
  dataset: Dataset
  model: models.LanguageModel
  dp: DataParallel
  schedule: DataSchedule = dataclasses.field(default_factory=lambda: DataSchedule.constant(1))

  @property
  def mesh(self) -> Mesh:
    """The device mesh the steps run on (dp.mesh)."""
    return self.dp.mesh

  @property
  def tx(self) -> optax.GradientTransformation:
    """The optax optimizer built from the config (dp.tx)."""
    return self.dp.tx

  @property
  def state_sharding(self) -> Any:
    """The train state's shardings (dp.state_sharding)."""
    return self.dp.state_sharding

  @property
  def train_step(self) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """The compiled step, (state, batch [A, b, ...]) -> (state, metrics) (DataParallel.train_step)."""
    return self.dp.train_step

  @property
  def eval_step(self) -> Callable[[Any, dict], dict]:
    """The compiled evaluation, (params, batch) -> {"loss_sum", "count"} (DataParallel.eval_step)."""
    return self.dp.eval_step

  def init_state(self) -> TrainState:
    """The initial state on the devices, from the config's seed (or config.init_from)."""
    return self.dp.init_state(self.model.init_fn, self.spec.seed)

  def abstract_state(self) -> TrainState:
    """The state's shapes, dtypes and shardings, without computing it."""
    return self.dp.abstract_state(self.model.init_fn, self.spec.seed)

  def comm_bytes_per_step(self, state: TrainState) -> float:
    """Mean bytes each device sends per step, from the collectives of the compiled train step."""
    return loop.comm_bytes_per_step(self.dp, state, self.train_batch(int(state.step)))

  def train_batch(self, step: int) -> dict[str, jax.Array]:
    """Global batch `step` on the devices (its examples and size from `schedule`); this process
    reads only its own rows."""
    size = self.schedule.batch_size(step)
    rows_per_micro = size // self.spec.data.grad_accum_steps
    rows = process_rows(self.mesh, rows_per_micro)
    return put_batch(self.dataset.train.at(self.schedule.start(step), size, rows),
                     batch_sharding(self.mesh), rows_per_micro)

  def val_batches(self):
    """The evaluation batches, each placed on the devices: every validation window once (the
    first config.eval_steps global batches' worth when it is > 0), the last batch padded with
    zero-weight rows (see data.pipeline.EvalBatches); this process reads only its own rows."""
    batch_size = self.spec.data.global_batch_size
    rows = process_rows(self.mesh, batch_size)
    for k in range(self.dataset.val.num_batches):
      yield put_batch(self.dataset.val(k, rows), batch_sharding(self.mesh), batch_size)

  def record(self) -> loop.RunRecord:
    """What checkpoints of this config store and what a resume must match."""
    return loop.RunRecord(config=self.config.to_dict(), run_defining=RUN_DEFINING_FIELDS,
                          data_digest=self.dataset.digest,
                          data_name=(f"the data at config.data.sources={self.spec.data.sources!r}"
                                     if self.dataset.mixture is not None else
                                     f"the data at config.data.path={self.spec.data.path!r}"),
                          description=self.describe(),
                          examples_per_step=self.spec.data.global_batch_size,
                          examples_at=self.schedule.start,
                          meta={"data_schedule": self.schedule.to_meta()},
                          defaults=run_defining_defaults(),
                          # Changes no resume can take (the state's arrays): the schema's Shapes.
                          layout_changes=schema.layout_changes,
                          advice=loop.HaltAdvice(learning_rate=float(self.spec.optimizer.learning_rate),
                                                 grad_clip=float(self.spec.optimizer.grad_clip)))

  def describe(self) -> str:
    """The model and data in a few words (the start banner's)."""
    m, tok = self.spec.model, self.dataset.tokenizer
    data = (self.spec.data.sources if self.dataset.mixture is not None
            else self.spec.data.path or "the built-in corpus")
    kv = f", {m.n_kv_head} key/value heads" if m.family == "llama" and m.n_kv_head else ""
    if m.head_dim:
      kv += f", head_dim {m.head_dim}"
    if m.sliding_window:
      kv += f", sliding window {m.sliding_window}"
    name = f"{m.family} {m.variant}" if m.variant else m.family  # e.g. "llama qwen3"
    return (f"{name} ({m.n_layer} layers, d_model {m.d_model}, {m.n_head} heads{kv}); data: "
            f"{data} ({getattr(tok, 'name', type(tok).__name__)} tokenizer, vocab {tok.vocab_size}, "
            f"{self.dataset.examples_per_epoch:,} training windows of {self.spec.data.seq_len})")

  def evaluate(self, params) -> float:
    """Token-weighted mean loss over the validation windows of `val_batches`, each counted once."""
    return self.dp.evaluate(params, self.val_batches())


def build(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None, *,
          read_init_from: bool = True) -> LMRun:
  """The dataset, model and DataParallel of `config` on `devices` (all by default).

  With `read_init_from` (and config.init_from set) the model's init_fn gives the checkpoint's
  parameters; False when the run resumes from its own checkpoint instead.

  Raises:
    JaxdpError: a field that cannot work on these devices, or data that cannot be read.
  """
  devices = list(jax.devices() if devices is None else devices)
  validate(config, len(devices), devices[0].platform)
  for message in ignored_fields(config):
    loop.warn(message)
  dataset = Dataset(data_spec(config))
  spec = run_spec(config, len(devices), dataset.tokenizer.vocab_size)
  model, dp = build_model_and_dp(spec, devices, read_init_from=read_init_from)
  built = LMRun(config=config, spec=spec, dataset=dataset, model=model, dp=dp,
                schedule=parse_ramp(config.get("batch_ramp", ""), spec.data.global_batch_size))
  built.abstract_state()  # Builds the layout and compiles lazily; errors surface here.
  return built


def build_model_and_dp(spec: RunSpec, devices: Sequence[jax.Device], *,
                       read_init_from: bool = True) -> tuple[models.LanguageModel, DataParallel]:
  """The model of `spec` and its DataParallel on `devices` (see `build` for `read_init_from`).

  Raises:
    JaxdpError: a mesh that does not fit the devices, or a config.init_from checkpoint that
      cannot be read or does not match the model.
  """
  model = models.build(spec.model)
  if read_init_from and spec.init_from:
    model = with_initial_params(model, spec.init_from)
  mesh = make_mesh(devices, spec.mesh.data, spec.mesh.model, replica=spec.mesh.replica)
  step = spec.step
  dp = DataParallel(model.loss_fn, make_optimizer(spec.optimizer), strategy=step.strategy,
                    mesh=mesh, grad_accum_steps=step.grad_accum_steps, precision=step.precision,
                    comm=spec.comm, nan_policy=step.nan_policy,
                    max_consecutive_skips=step.max_consecutive_skips,
                    loss_scale_init=step.loss_scale_init,
                    loss_scale_period=step.loss_scale_period,
                    offload_optimizer=step.offload_optimizer, reduction=step.reduction,
                    virtual_shards=step.virtual_shards, spike_policy=step.spike_policy,
                    spike_sigmas=step.spike_sigmas, spike_window=step.spike_window)
  return model, dp


def with_initial_params(model: models.LanguageModel, init_from: str) -> models.LanguageModel:
  """`model` whose init_fn returns the parameters of config.init_from ("hf:DIR") instead of a
  random draw, in the same boxed tree (so every strategy shards them as it would its own init).

  The checkpoint is read and checked (config.json against the model's fields, every tensor's
  shape) here, once, before anything compiles.
  """
  from flax.core import meta

  from jaxdp.lm.hf_import import load_params
  loaded = load_params(init_from, model.cfg)
  is_box = lambda x: isinstance(x, meta.AxisMetadata)  # noqa: E731
  # The random init's boxed tree (logical axis names): the structure the shardings expect.
  boxed = jax.eval_shape(model.init_fn, jax.random.PRNGKey(0))

  def init_fn(rng):
    del rng  # The parameters are the checkpoint's.
    return jax.tree.map(lambda b, x: b.replace_boxed(jax.numpy.asarray(x)) if is_box(b)
                        else jax.numpy.asarray(x), boxed, loaded, is_leaf=is_box)
  return dataclasses.replace(model, init_fn=init_fn)


def model_flops_per_device(config: ml_collections.ConfigDict, vocab_size: int,
                           devices: Sequence[jax.Device], batch: dict) -> float | None:
  """FLOPs per device of one optimizer step of a built-in model's `config`, counted on a loop-free
  lowering of the same step, or None when the compiled step itself has no loop to miscount.

  Gradient accumulation (a lax.scan over micro-batches 2..A) and remat (a scan over the blocks)
  put the step's work in while loops, whose body XLA's cost analysis counts once. The count here
  lowers (without compiling) the step of one device's whole share of the batch, on one device,
  without accumulation or remat: the model's FLOPs, recomputation excluded, as MFU defines them.
  `batch` is the run's first placed batch [A, b, ...] (shapes and dtypes only are used).
  """
  if config.remat == "none" and config.grad_accum_steps <= 2:  # A 1-trip scan is unrolled.
    return None
  spec = run_spec(config, len(devices), vocab_size)
  # Shapes only: the initial parameters (config.init_from) are not read.
  variant = dataclasses.replace(
      spec, model=dataclasses.replace(spec.model, remat="none"), mesh=dataclasses.replace(
          spec.mesh, data=1, model=1, replica=1), step=dataclasses.replace(
              spec.step, grad_accum_steps=1, strategy="dp", offload_optimizer=False))
  rows = spec.data.global_batch_size // (spec.mesh.data * spec.mesh.replica)  # One device's share.
  lm, dp = build_model_and_dp(variant, list(devices)[:1], read_init_from=False)
  sharding = batch_sharding(dp.mesh)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct((1, rows) + x.shape[2:], x.dtype,
                                                       sharding=sharding), batch)
  abstract = dp.abstract_state(lm.init_fn, spec.seed)
  return lowered_flops(dp.train_step.lower(abstract, shapes)) / spec.mesh.model


_DEPRECATED = {"Trainer": ("LMRun", "it builds a run and trains nothing"),
               "build_model": ("build_model_and_dp", "it returns (model, DataParallel), while "
                               "jaxdp.build_model is jaxdp.models.build")}


def __getattr__(name: str) -> Any:
  if name in _DEPRECATED:
    new, why = _DEPRECATED[name]
    warnings.warn(f"jaxdp.lm.builder.{name} is deprecated: use {new} ({why})", DeprecationWarning,
                  stacklevel=2)
    if name == "build_model":
      def build_model(config, vocab_size, devices, *, read_init_from=True):
        return build_model_and_dp(run_spec(config, len(devices), vocab_size), devices,
                                  read_init_from=read_init_from)
      return build_model
    return globals()[new]
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
