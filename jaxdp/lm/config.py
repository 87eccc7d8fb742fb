"""The language-model app's presets (jaxdp.configs) and the checks of a config against the
devices it will run on.

Each choice list and each rule a lower layer owns is imported from it (parallel.choices,
models.choices, data.spec, runtime.profiling) and worded with config.* names here; what is
checked only here is how the app's fields combine. Imports no JAX: the command line reads
presets and refuses bad values without loading it. jaxdp.lm.spec turns a valid config into
typed values.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os

import ml_collections

from jaxdp.errors import JaxdpError, need
from jaxdp.lm.spec import COMM_FIELDS, data_spec, mesh_replica, mesh_shape, model_config
from jaxdp.models.choices import ATTENTION, FAMILIES, POSITIONS, REMATS, check_variant
from jaxdp.parallel.choices import check_comm, check_reduction, check_step, is_dense
from jaxdp.runtime.profiling import parse_profile_steps
from jaxdp.runtime.targets import parse_targets

WANDB_MODES = ("offline", "online", "disabled")


def preset_path(name_or_path: str) -> str:
  """Resolves a preset name ("tiny_cpu") or a file path to a config file path."""
  if os.path.exists(name_or_path):
    return name_or_path
  spec = importlib.util.find_spec(f"jaxdp.configs.{name_or_path}") if name_or_path.isidentifier() else None
  if spec is None or spec.origin is None:
    raise JaxdpError(
        f"--config {name_or_path!r}: no such file or preset; presets are {', '.join(list_presets())}")
  return spec.origin


def list_presets() -> list[str]:
  """The names of the presets that ship with jaxdp (jaxdp/configs), sorted."""
  package_file = importlib.import_module("jaxdp.configs").__file__
  assert package_file is not None  # A regular package: configs/__init__.py.
  folder = os.path.dirname(package_file)
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def _exec_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path`; any failure is one JaxdpError naming the file."""
  spec = importlib.util.spec_from_file_location(f"_jaxdp_config_{abs(hash(path))}", path)
  if spec is None or spec.loader is None:  # No loader for the file's suffix (e.g. README.md).
    raise JaxdpError(f"--config {path!r} is not a Python file; give a preset name "
                     f"({', '.join(list_presets())}) or a .py file defining get_config()")
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except SyntaxError as e:
    raise JaxdpError(f"--config {path!r} has a syntax error at line {e.lineno}: {e.msg}; fix the "
                     "file (a preset is Python defining get_config())") from None
  except Exception as e:  # noqa: BLE001 - a user's file may raise anything while loading.
    raise JaxdpError(f"--config {path!r} failed to load: {type(e).__name__}: {e}") from None
  if not callable(getattr(module, "get_config", None)):
    raise JaxdpError(f"--config {path!r} defines no get_config(); a preset returns its "
                     "ConfigDict from get_config()")
  try:
    config = module.get_config()
  except Exception as e:  # noqa: BLE001
    raise JaxdpError(f"--config {path!r}: get_config() raised {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise JaxdpError(f"--config {path!r}: get_config() returned {type(config).__name__}, not an "
                     "ml_collections.ConfigDict")
  return config


def load_preset(name: str = "default") -> ml_collections.ConfigDict:
  """Returns the ConfigDict of a preset by name or path, for notebooks: `load_preset("tiny_cpu")`.

  Raises:
    JaxdpError: no such preset, a file that does not load, or a config that lacks fields of the
      default preset or has fields it does not know (the message lists them and the fix).
  """
  path = preset_path(name)
  config = _exec_config(path)
  default_path = preset_path("default")
  if os.path.abspath(path) != os.path.abspath(default_path):
    expected = set(field_names(_exec_config(default_path)))
    found = set(field_names(config))
    missing, unknown = sorted(expected - found), sorted(found - expected)
    if missing or unknown:
      parts = ([f"lacks {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing
               else []) + ([f"has unknown fields {', '.join(unknown[:8])}"] if unknown else [])
      raise JaxdpError(f"--config {path!r} {' and '.join(parts)}; start a preset from the "
                       "default (`from jaxdp.configs import default; c = default.get_config()`) "
                       "and change fields")
  return config


def field_names(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  """Dotted names of every leaf field, e.g. ["seed", ..., "model.n_layer"]."""
  names = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      names += field_names(value, f"{prefix}{key}.")
    else:
      names.append(prefix + key)
  return names


def model_hidden(config: ml_collections.ConfigDict) -> int:
  """The MLP hidden width of the config's model family."""
  from jaxdp.models import llama
  if config.model.family == "llama":
    return llama.mlp_hidden(model_config(config, 256))
  return int(config.model.get("mlp_dim", 0) or config.model.d_model * config.model.mlp_ratio)


def validate(config: ml_collections.ConfigDict, num_devices: int, platform: str | None = None) -> None:
  """Raises JaxdpError naming the first field that cannot work on `num_devices` devices.

  `platform` ("cpu", "gpu", "tpu"), when given, also checks fields that need particular hardware.
  Each field alone, and the fields it needs, by its declared schema first (jaxdp.lm.schema);
  then how fields combine with each other and the devices.
  """
  from jaxdp.lm import schema
  schema.check(config)
  validate_comm(config)
  # The step's own rules, worded with config.* names (parallel.choices.check_step).
  check_step(strategy=config.strategy, precision=config.precision, nan_policy=config.nan_policy,
             comm={name: config[name] for name in COMM_FIELDS}, mesh_model=config.mesh.model,
             mesh_replica=mesh_replica(config), offload_optimizer=config.offload_optimizer,
             where="config.", comm_where="config.")
  need(config.attention in ATTENTION,
       f"config.attention={config.attention!r} is not one of {', '.join(ATTENTION)}")
  need(platform is None or config.attention != "cudnn" or platform == "gpu",
       f"config.attention='cudnn' needs a GPU but the devices are {platform}; use "
       "config.attention=xla (the same math, portable)")
  need(platform != "cpu" or config.precision != "fp16" or config.attention != "xla",
       "config.precision='fp16' with config.attention='xla' fails on CPU (XLA:CPU has no "
       "f16 x f16 -> f32 dot); use config.attention=reference, or config.precision=bf16")
  need(config.remat in REMATS, f"config.remat={config.remat!r} is not one of {', '.join(REMATS)}")
  need(config.get("spike_policy", "off") != "skip" or (
       config.get("reduction", "allreduce") == "allreduce" and config.sync != "local_sgd"),
       "config.spike_policy='skip' needs config.reduction='allreduce' and a config.sync other "
       "than 'local_sgd' (their steps do not judge spikes yet); use "
       "--config.spike_policy=rollback")
  need(config.loss_scale_period > 0,
       f"config.loss_scale_period={config.loss_scale_period} must be positive")
  need(config.loss_scale_init >= 1, f"config.loss_scale_init={config.loss_scale_init} must be >= 1")
  need(config.model.family in FAMILIES,
       f"config.model.family={config.model.family!r} is not one of {', '.join(FAMILIES)}")
  validate_model_family(config)
  need(config.model.positions in POSITIONS,
       f"config.model.positions={config.model.positions!r} is not one of {', '.join(POSITIONS)}")
  for name in ("num_steps", "global_batch_size", "seq_len", "grad_accum_steps", "log_every",
               "keep_last"):
    need(config[name] > 0, f"config.{name}={config[name]} must be positive")
  for name in ("n_layer", "n_head", "d_model", "mlp_ratio"):
    need(config.model[name] > 0, f"config.model.{name}={config.model[name]} must be positive")
  for name in ("warmup_steps", "eval_every", "eval_steps", "checkpoint_every", "patience",
               "step_timeout_s", "keep_every", "max_consecutive_skips"):
    need(config[name] >= 0, f"config.{name}={config[name]} must be >= 0")
  need(0 <= config.model.dropout < 1, f"config.model.dropout={config.model.dropout} must be in [0, 1)")
  need(0 < config.data.val_fraction < 1,
       f"config.data.val_fraction={config.data.val_fraction} must be in (0, 1)")
  validate_data(config)
  head_dim = config.model.get("head_dim", 0)
  need(head_dim or config.model.d_model % config.model.n_head == 0,
       f"config.model.d_model={config.model.d_model} is not divisible by config.model.n_head="
       f"{config.model.n_head}; pick d_model a multiple of n_head (or set config.model.head_dim)")
  if config.model.positions == "rope":
    need((head_dim or config.model.d_model // config.model.n_head) % 2 == 0,
         "config.model.positions='rope' needs an even head size (config.model.head_dim, or "
         "d_model / n_head when it is 0)")
  code = config.get("preempt_exit_code", 75)
  need(code == 0 or 4 <= code <= 255,
       f"config.preempt_exit_code={code} must be 0 or in [4, 255] (1-3 mean failure, bad input "
       "and a step timeout)")
  need(config.mesh.model > 0, f"config.mesh.model={config.mesh.model} must be positive")
  need(config.mesh.data >= -1, f"config.mesh.data={config.mesh.data} must be a device count, or 0 "
       "(or -1) for all devices left after mesh.model")
  need(0 <= config.seed < 2 ** 32, f"config.seed={config.seed} must be in [0, 2**32)")
  need(num_devices % config.mesh.model == 0,
       f"config.mesh.model={config.mesh.model} does not divide the {num_devices} devices; pick a "
       "divisor of the device count")
  replica = mesh_replica(config)
  need(replica >= 1, f"config.mesh.replica={replica} must be >= 1 (1: no hybrid sharding)")
  need(num_devices % (config.mesh.model * replica) == 0,
       f"config.mesh.replica={replica} x config.mesh.model={config.mesh.model} does not divide the "
       f"{num_devices} devices; pick divisors of the device count")
  data, model = mesh_shape(config, num_devices)
  hybrid = f"config.mesh.replica={replica} x " if replica > 1 else ""
  need(replica * data * model == num_devices,
       f"{hybrid}config.mesh.data={config.mesh.data} x config.mesh.model={model} != {num_devices} "
       "devices; set config.mesh.data=0 to use all remaining devices")
  if model > 1:
    hidden = model_hidden(config)
    kv = config.model.n_kv_head or config.model.n_head
    need(config.model.n_head % model == 0 and hidden % model == 0 and kv % model == 0,
         f"config.mesh.model={model} must divide config.model.n_head={config.model.n_head}, the "
         f"key/value heads {kv} and the MLP hidden size {hidden}")
  validate_observability(config)
  # Before the batch check, whose fix ("a multiple of 3, e.g. 15") fixed_order would then refuse.
  validate_reduction(config, replica * data)
  per_step = replica * data * config.grad_accum_steps
  need(config.global_batch_size % per_step == 0,
       f"config.global_batch_size={config.global_batch_size} is not divisible by data devices x "
       f"grad_accum_steps = {replica * data} x {config.grad_accum_steps} = {per_step}; use a multiple "
       f"of {per_step} (e.g. {per_step * max(1, round(config.global_batch_size / per_step))})")
  validate_batch_ramp(config, per_step)
  validate_optimizer(config)
  validate_init_from(config)


def validate_reduction(config: ml_collections.ConfigDict, data_devices: int) -> None:
  """config.reduction and, for "fixed_order", config.virtual_shards against the data devices, the
  micro-batch's rows and the exchange (parallel.choices.check_reduction)."""
  reduction, shards = config.get("reduction", "allreduce"), config.get("virtual_shards", 8)
  check_reduction(reduction=reduction, virtual_shards=shards,
                  dense=is_dense(config.allreduce, config.compression, config.sync),
                  mesh_model=config.mesh.model, mesh_replica=mesh_replica(config),
                  offload_optimizer=config.offload_optimizer, data_devices=data_devices,
                  where="config.", to_dense="set config.allreduce='pmean', "
                  "config.compression='none', config.sync='every_step'")
  if reduction == "fixed_order":
    rows = config.global_batch_size // config.grad_accum_steps
    need(rows % shards == 0,
         f"config.reduction='fixed_order' splits each micro-batch of {rows} rows "
         f"(config.global_batch_size / config.grad_accum_steps) into config.virtual_shards={shards} "
         f"shards; use a global_batch_size that is a multiple of {shards * config.grad_accum_steps}, "
         "or fewer virtual_shards")


def validate_batch_ramp(config: ml_collections.ConfigDict, per_step: int) -> None:
  """config.batch_ramp: well-formed (data.schedule.parse_ramp), each stage's batch divisible like
  global_batch_size, and few stages (each batch size compiles the train step once more)."""
  from jaxdp.data.schedule import parse_ramp
  ramp = config.get("batch_ramp", "")
  need(isinstance(ramp, str), f"config.batch_ramp={ramp!r} must be a string like '8:100,16:100'")
  sizes = parse_ramp(ramp, config.global_batch_size).sizes()
  accum = config.grad_accum_steps
  what = f"data devices x grad_accum_steps = {per_step // accum} x {accum}"
  if config.get("reduction", "allreduce") == "fixed_order":  # Each micro-batch splits in shards.
    shards = config.get("virtual_shards", 8)
    per_step = math.lcm(per_step, shards * accum)
    what += f", and by virtual_shards x grad_accum_steps = {shards} x {accum} (reduction='fixed_order')"
  stages = [x.strip().split(":") for x in ramp.split(",") if x.strip()]
  for size, steps in stages:
    if int(size) % per_step:
      # Each stage rounded to a multiple (at most global_batch_size, itself one): the advice.
      fixed = ",".join(f"{min(config.global_batch_size, max(per_step, round(int(b) / per_step) * per_step))}"
                       f":{int(n)}" for b, n in stages)
      raise JaxdpError(f"config.batch_ramp={ramp!r}: a batch of {int(size)} is not divisible by {what} "
                       f"(stage '{size.strip()}:{steps.strip()}'); use multiples of {per_step} in every "
                       f"stage, e.g. --config.batch_ramp={fixed}")
  need(len(sizes) <= 8, f"config.batch_ramp={ramp!r} has {len(sizes)} batch sizes; each compiles "
       "the train step once more: use at most 8 (2-4 stages are typical)")


def validate_init_from(config: ml_collections.ConfigDict) -> None:
  """config.init_from: "" or "hf:DIR" (the checkpoint itself is read, and checked against
  config.model field by field, when the run starts: jaxdp.lm.hf_import)."""
  value = config.get("init_from", "")
  need(isinstance(value, str) and (value == "" or (value.startswith("hf:") and len(value) > 3)),
       f"config.init_from={value!r} must be '' (random init) or 'hf:DIR', a local Hugging Face "
       "checkpoint directory")


def ignored_fields(config: ml_collections.ConfigDict) -> list[str]:
  """Fields set away from their default that have no effect in this config, one message each
  (the `needs` of jaxdp.lm.schema; `validate` refuses them)."""
  from jaxdp.lm import schema
  return schema.ignored(config)


def validate_data(config: ml_collections.ConfigDict) -> None:
  """The data fields' choices and forms (the paths themselves are checked when opened)."""
  from jaxdp.data.mixture import parse_sources
  data_spec(config)  # DataSpec refuses a packing that is not one of data.packing.PACKINGS.
  need(isinstance(config.data.sources, str), "config.data.sources must be a string like "
       "'a:0.7,b:0.3'")
  if parse_sources(config.data.sources):  # Raises on a malformed entry.
    need(not config.data.path, f"config.data.sources and config.data.path={config.data.path!r} are "
         "both set; give the mixture's paths in data.sources only")


def validate_model_family(config: ml_collections.ConfigDict) -> None:
  """Fields that only one model family has, and their ranges."""
  m = config.model
  need(m.rope_theta > 0, f"config.model.rope_theta={m.rope_theta} must be positive")
  need(m.n_kv_head >= 0, f"config.model.n_kv_head={m.n_kv_head} must be >= 0 (0 means n_head)")
  eps = m.get("norm_eps", 0.0)
  need(0 <= eps < 1, f"config.model.norm_eps={eps} must be in [0, 1) (0: the family default)")
  if m.family == "gpt":
    need(m.n_kv_head in (0, m.n_head),
         f"config.model.n_kv_head={m.n_kv_head}: grouped-query attention is a llama feature; set "
         "config.model.family=llama, or config.model.n_kv_head=0")
  else:
    need(m.positions == "rope", f"config.model.positions={m.positions!r}: llama uses rotary "
         "positions only; set config.model.positions=rope")
    need(m.n_kv_head == 0 or m.n_head % m.n_kv_head == 0,
         f"config.model.n_kv_head={m.n_kv_head} must divide config.model.n_head={m.n_head}")
  # The llama variants' fields (models.choices owns the rule; configs saved before them lack them).
  check_variant(m.family, m.get("variant", ""), head_dim=m.get("head_dim", 0),
                qkv_bias=m.get("qkv_bias", False), qk_norm=m.get("qk_norm", False),
                sliding_window=m.get("sliding_window", 0))


def validate_eval_tasks(config: ml_collections.ConfigDict) -> None:
  """config.eval_tasks: "" or KIND:FILE[,KIND:FILE] (jaxdp.lm.evaluate), each file present; their
  contents are read and checked when the run starts, before the first step."""
  from jaxdp.lm.evaluate import parse_tasks
  value = config.get("eval_tasks", "")
  need(isinstance(value, str), f"config.eval_tasks={value!r} must be a string, e.g. "
       "'hellaswag:hellaswag_val.jsonl,text:valid.txt', or '' for none")
  for task in parse_tasks(value, "config.eval_tasks"):
    need(os.path.isfile(task.path), f"config.eval_tasks: {task.path!r}: no such file; give the "
         "path of an existing file")


def validate_observability(config: ml_collections.ConfigDict) -> None:
  """Profiling, experiment tracking and vocabulary padding fields."""
  parse_profile_steps(config.profile_steps)
  parse_targets(config.target_losses, field="config.target_losses")
  validate_eval_tasks(config)
  need(isinstance(config.wandb.project, str),
       f"config.wandb.project={config.wandb.project!r} must be a project name, or '' for no W&B")
  need(config.wandb.mode in WANDB_MODES,
       f"config.wandb.mode={config.wandb.mode!r} is not one of {', '.join(WANDB_MODES)}")
  multiple = config.model.pad_vocab_to_multiple
  need(isinstance(multiple, int) and multiple >= 1,
       f"config.model.pad_vocab_to_multiple={multiple!r} must be an integer >= 1 (1: no padding)")


def validate_optimizer(config: ml_collections.ConfigDict) -> None:
  """The optimizer and schedule fields: choices and ranges (jaxdp/core/optimizer.py).

  A horizon shorter than the warmup is allowed (a short run stays in warmup).
  """
  import optax

  from jaxdp.core.optimizer import OPTIMIZERS, SCHEDULES
  name = config.get("optimizer", "adamw")
  need(name != "muon" or "muon" in OPTIMIZERS,
       f"config.optimizer='muon' needs an optax with Muon (optax.contrib.muon; this is optax "
       f"{optax.__version__}); upgrade optax or pick another optimizer")
  need(name in OPTIMIZERS, f"config.optimizer={name!r} is not one of {', '.join(OPTIMIZERS)}")
  schedule = config.get("schedule", "cosine")
  need(schedule in SCHEDULES, f"config.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}")
  need(config.learning_rate > 0, f"config.learning_rate={config.learning_rate} must be positive")
  need(config.warmup_steps >= 0, f"config.warmup_steps={config.warmup_steps} must be >= 0 (0: no warmup)")
  need(config.lr_decay_steps is None or config.lr_decay_steps > 0,
       f"config.lr_decay_steps={config.lr_decay_steps} must be positive, or None for num_steps")
  need(config.grad_clip >= 0,
       f"config.grad_clip={config.grad_clip} must be >= 0; set config.grad_clip=0 to disable clipping")
  need(config.weight_decay >= 0, f"config.weight_decay={config.weight_decay} must be >= 0 (0: no decay)")
  need(0 <= config.min_lr_ratio <= 1, f"config.min_lr_ratio={config.min_lr_ratio} must be in [0, 1]")
  for field in ("b1", "b2"):
    need(0 <= config[field] < 1, f"config.{field}={config[field]} must be in [0, 1)")
  momentum = config.get("momentum", 0.9)
  need(0 <= momentum < 1, f"config.momentum={momentum} must be in [0, 1) (0: plain SGD)")
  fraction = config.get("decay_fraction", 0.2)
  need(0 < fraction <= 1, f"config.decay_fraction={fraction} must be in (0, 1] (1: decay over "
       "the whole of lr_decay_steps)")
  need(isinstance(config.get("decay_exclude", ""), str),
       f"config.decay_exclude={config.get('decay_exclude')!r} must be a string of comma-separated "
       "names, e.g. 'wpe,embedding'")


def validate_comm(config: ml_collections.ConfigDict) -> None:
  """The communication fields: how they combine with the optimizer, then the exchange's own
  rules (parallel.choices.check_comm, worded with config.* names). How they combine with the
  strategy, precision and mesh is parallel.choices.check_step's (see `validate`)."""
  if config.compression_optimizer == "frozen_variance" and config.compression != "none":
    need(config.get("optimizer", "adamw") == "adamw",
         f"config.compression_optimizer='frozen_variance' freezes Adam's variance; set "
         f"config.optimizer=adamw (got {config.get('optimizer')!r}) or compression_optimizer=none")
  check_comm({name: config[name] for name in COMM_FIELDS}, "config.")
