"""`RunSpec`: a built-in language-model run as typed values, built once from its ConfigDict.

The ConfigDict stops here. `run_spec(config, num_devices, vocab_size)` reads every field the run
uses and turns it into the typed value of the layer that consumes it: `models.ModelConfig`,
`core.optimizer.OptimizerConfig`, `parallel.CommConfig`, the mesh shape, the step's settings for
`DataParallel`, `runtime.options.FitOptions` for `fit`, and `data.DataSpec` for the pipeline.
Importing this module does not import JAX (the command line reads configs without it).
Fields newer than a saved run's config take the value that run had (their old behaviour), so a
checkpoint of an earlier version still loads.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import ml_collections

from jaxdp.data.spec import DataSpec
from jaxdp.runtime.options import FitOptions
from jaxdp.runtime.targets import parse_targets

if TYPE_CHECKING:  # The typed values' modules import JAX: only the builders below load them.
  from jaxdp.core.optimizer import OptimizerConfig
  from jaxdp.models.common import ModelConfig
  from jaxdp.parallel.exchange import CommConfig


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """Device counts on each mesh axis; data * model * replica is the number of devices."""
  data: int
  model: int = 1
  replica: int = 1  # Hybrid sharding's outer axis; 1 is a plain ("data", "model") mesh.


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """How `DataParallel` runs a step (see its constructor for each field)."""
  strategy: str = "dp"  # One of parallel.data_parallel.STRATEGIES.
  grad_accum_steps: int = 1  # Micro-batches per optimizer step.
  precision: str = "fp32"  # One of core.precision.PRECISIONS.
  nan_policy: str = "halt"  # One of parallel.data_parallel.NAN_POLICIES.
  max_consecutive_skips: int = 10
  loss_scale_init: float = 2.0 ** 15  # fp16's initial dynamic loss scale.
  loss_scale_period: int = 200  # fp16: overflow-free steps before the scale doubles.
  offload_optimizer: bool = False  # ZeRO-Offload: optimizer state in pinned host memory.
  reduction: str = "allreduce"  # One of parallel.choices.REDUCTIONS.
  virtual_shards: int = 8  # reduction="fixed_order": shards per micro-batch.
  spike_policy: str = "off"  # "off" or "skip" (the step's; "rollback" is FitOptions').
  spike_sigmas: float = 6.0  # spike_policy="skip": std above the running mean that is a spike.
  spike_window: int = 100  # spike_policy="skip": steps the running mean and std average over.


@dataclasses.dataclass(frozen=True)
class WandbSpec:
  """Weights & Biases logging of the run (runtime/wandb_sink.py); project "" is off."""
  project: str = ""
  mode: str = "offline"  # One of lm.config.WANDB_MODES.


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """Everything a built-in model's run reads from its config, typed.

  Attributes:
    seed: seeds the parameter init (and, through `data`, the data order).
    model: the model's architecture for the run's (padded) vocabulary.
    optimizer: the update rule and learning-rate schedule.
    comm: how devices exchange gradients.
    mesh: the device mesh's shape.
    step: the step's strategy, accumulation, precision and NaN handling.
    fit: the loop's length and cadences (its per-call fields keep their defaults).
    data: what the pipeline reads and how it batches it.
    init_from: "" (random init) or "hf:DIR", the initial parameters of a fresh run.
    target_losses: eval losses whose first crossing is logged (runtime/targets.py), high to low.
    wandb: the W&B sink's project and mode.
  """
  seed: int
  model: ModelConfig
  optimizer: OptimizerConfig
  comm: CommConfig
  mesh: MeshSpec
  step: StepSpec
  fit: FitOptions
  data: DataSpec
  init_from: str = ""
  target_losses: tuple[float, ...] = ()
  wandb: WandbSpec = WandbSpec()


def data_spec(config: ml_collections.ConfigDict) -> DataSpec:
  """The DataSpec of `config` (config.data.*, seq_len, seed, the batch and eval sizes).

  Raises:
    JaxdpError: config.data.packing is not one of data.packing.PACKINGS.
  """
  data = config.data
  return DataSpec(path=data.path, sources=data.get("sources", ""), tokenizer=data.get("tokenizer", ""),
                  val_fraction=data.val_fraction, packing=data.get("packing", "concat"),
                  seq_len=config.seq_len, seed=config.seed,
                  global_batch_size=config.global_batch_size,
                  grad_accum_steps=config.grad_accum_steps, eval_steps=config.eval_steps)


def lr_decay_steps(config: ml_collections.ConfigDict) -> int:
  """The update at which the learning rate reaches its minimum: config.lr_decay_steps, or
  num_steps when it is None."""
  return config.num_steps if config.lr_decay_steps is None else config.lr_decay_steps


def freeze_variance_after(config: ml_collections.ConfigDict) -> int:
  """Updates before Adam's variance freezes (compression_optimizer='frozen_variance'); 0: never."""
  if config.get("compression_optimizer", "none") != "frozen_variance" or config.compression == "none":
    return 0
  return max(1, config.compression_warmup_steps)


def optimizer_config(config: ml_collections.ConfigDict) -> OptimizerConfig:
  """The run's OptimizerConfig (jaxdp.core.optimizer): config.learning_rate -> learning_rate, ...

  Raises:
    JaxdpError: an unknown optimizer or schedule, or a value out of range.
  """
  from jaxdp.core.optimizer import OptimizerConfig
  exclude = tuple(n.strip() for n in config.get("decay_exclude", "").split(",") if n.strip())
  return OptimizerConfig(name=config.get("optimizer", "adamw"), learning_rate=config.learning_rate,
                         schedule=config.get("schedule", "cosine"), warmup_steps=config.warmup_steps,
                         decay_steps=lr_decay_steps(config),
                         decay_fraction=config.get("decay_fraction", 0.2),
                         min_lr_ratio=config.min_lr_ratio, weight_decay=config.weight_decay,
                         decay_exclude=exclude, b1=config.b1, b2=config.b2,
                         momentum=config.get("momentum", 0.9),
                         nesterov=bool(config.get("nesterov", False)), grad_clip=config.grad_clip,
                         freeze_variance_after=freeze_variance_after(config))


# CommConfig's fields read from the config's top-level fields of the same name. Its `b1` and
# `grad_clip` are not among them: they are the optimizer's, mapped explicitly in comm_config.
COMM_FIELDS = ("allreduce", "compression", "compression_ratio", "error_feedback",
               "momentum_correction", "sync", "sync_every", "staleness", "diloco", "outer_lr",
               "outer_momentum", "compression_rank", "compression_warmup_steps", "local_grad_clip",
               "compression_optimizer")


def comm_config(config: ml_collections.ConfigDict) -> CommConfig:
  """The run's CommConfig (jaxdp.parallel.exchange): how devices exchange gradients.

  Raises:
    JaxdpError: a combination CommConfig refuses (see parallel.exchange.check_comm).
  """
  from jaxdp.parallel.exchange import CommConfig
  defaults = CommConfig()
  values = {name: config.get(name, getattr(defaults, name)) for name in COMM_FIELDS}
  # frozen_variance keeps its own copy of Adam's first moment during the dense warm-up: it
  # needs the optimizer's decay and clipping norm.
  return CommConfig(**values, b1=config.get("b1", defaults.b1),
                    grad_clip=config.get("grad_clip", defaults.grad_clip))


def model_config(config: ml_collections.ConfigDict, vocab_size: int) -> ModelConfig:
  """The run's ModelConfig (jaxdp.models) for a tokenizer of `vocab_size` ids, the vocabulary
  padded up to config.model.pad_vocab_to_multiple (the padding ids never take probability)."""
  from jaxdp.core.precision import COMPUTE_DTYPES
  from jaxdp.models.common import ModelConfig
  m = config.model
  multiple = m.get("pad_vocab_to_multiple", 1)
  padded = -(-vocab_size // multiple) * multiple
  return ModelConfig(vocab_size=padded, valid_vocab_size=vocab_size, seq_len=config.seq_len,
                     n_layer=m.n_layer, n_head=m.n_head, d_model=m.d_model,
                     family=m.get("family", "gpt"), mlp_ratio=m.mlp_ratio,
                     mlp_dim=m.get("mlp_dim", 0),
                     n_kv_head=m.get("n_kv_head", 0), dropout=m.dropout, positions=m.positions,
                     rope_theta=m.get("rope_theta", 10000.0),
                     tie_embeddings=m.get("tie_embeddings", True), norm_eps=m.get("norm_eps", 0.0),
                     # Configs saved before the llama variants existed lack these fields.
                     head_dim=m.get("head_dim", 0), qkv_bias=m.get("qkv_bias", False),
                     qk_norm=m.get("qk_norm", False), sliding_window=m.get("sliding_window", 0),
                     variant=m.get("variant", ""),
                     attention=config.attention, dtype=COMPUTE_DTYPES[config.precision],
                     remat=config.get("remat", "none"))


def mesh_replica(config: ml_collections.ConfigDict) -> int:
  """config.mesh.replica, 1 for configs saved before the field existed."""
  return int(config.mesh.get("replica", 1))


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes of the device mesh; config.mesh.data <= 0 means all devices left after
  mesh.model and mesh.replica."""
  model = config.mesh.model
  data = num_devices // (model * mesh_replica(config)) if config.mesh.data <= 0 else config.mesh.data
  return data, model


def mesh_spec(config: ml_collections.ConfigDict, num_devices: int) -> MeshSpec:
  """The MeshSpec of `config` on `num_devices` devices."""
  data, model = mesh_shape(config, num_devices)
  return MeshSpec(data=data, model=model, replica=mesh_replica(config))


def step_spec(config: ml_collections.ConfigDict) -> StepSpec:
  """The StepSpec of `config` (strategy, accumulation, precision, NaN handling, offload)."""
  return StepSpec(strategy=config.strategy, grad_accum_steps=config.grad_accum_steps,
                  precision=config.precision, nan_policy=config.nan_policy,
                  max_consecutive_skips=config.max_consecutive_skips,
                  loss_scale_init=config.loss_scale_init,
                  loss_scale_period=config.loss_scale_period,
                  offload_optimizer=config.offload_optimizer,
                  reduction=config.get("reduction", "allreduce"),
                  virtual_shards=config.get("virtual_shards", 8),
                  spike_policy="skip" if config.get("spike_policy", "off") == "skip" else "off",
                  spike_sigmas=config.get("spike_sigmas", 6.0),
                  spike_window=config.get("spike_window", 100))


def fit_options(config: ml_collections.ConfigDict) -> FitOptions:
  """The FitOptions of `config`: steps, cadences, retention, the step timeout and the profile
  window; tokens per step is global_batch_size * seq_len."""
  return FitOptions(num_steps=config.num_steps, seed=config.seed, log_every=config.log_every,
                    eval_every=config.eval_every, checkpoint_every=config.checkpoint_every,
                    patience=config.patience, keep_last=config.keep_last,
                    keep_every=config.keep_every, step_timeout_s=config.step_timeout_s,
                    tokens_per_step=config.global_batch_size * config.seq_len,
                    profile_steps=config.profile_steps,
                    # Checkpoints by the clock, loss-spike rollback, per-device health: a config
                    # saved before these fields existed gets today's defaults.
                    spike_policy="rollback" if config.get("spike_policy") == "rollback" else "off",
                    **{name: config.get(name, getattr(FitOptions, name)) for name in (
                        "checkpoint_dir", "checkpoint_every_minutes", "spike_sigmas", "spike_window",
                        "spike_max_rollbacks", "spike_rollback_window", "straggler_factor",
                        "grad_outlier_factor", "health_window")})


def run_spec(config: ml_collections.ConfigDict, num_devices: int, vocab_size: int) -> RunSpec:
  """The RunSpec of `config` on `num_devices` devices with a tokenizer of `vocab_size` ids.

  `config` should have passed `jaxdp.lm.config.validate` for these devices: this reads fields,
  it does not explain a bad combination.

  Raises:
    JaxdpError: a value a typed spec refuses on construction (an unknown optimizer, say).
  """
  return RunSpec(seed=config.seed, model=model_config(config, vocab_size),
                 optimizer=optimizer_config(config), comm=comm_config(config),
                 mesh=mesh_spec(config, num_devices), step=step_spec(config),
                 fit=fit_options(config), data=data_spec(config),
                 init_from=config.get("init_from", ""),
                 target_losses=parse_targets(config.get("target_losses", ""), "config.target_losses"),
                 wandb=WandbSpec(config.wandb.project, config.wandb.mode) if "wandb" in config
                 else WandbSpec())
