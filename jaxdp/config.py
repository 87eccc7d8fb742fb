"""Loading presets and checking a config against the devices it will run on."""

from __future__ import annotations

import importlib
import importlib.util
import os

import ml_collections

from jaxdp.errors import JaxdpError

STRATEGIES = ("dp", "zero1", "zero2", "zero3")
ATTENTION = ("xla", "cudnn", "reference")
POSITIONS = ("rope", "learned")
NAN_POLICIES = ("halt", "skip")
PRECISIONS = ("fp32", "bf16", "fp16")
REMATS = ("none", "block", "full")
ALLREDUCE = ("pmean", "ring", "ps")
COMPRESSION = ("none", "topk", "randomk", "int8", "bf16", "powersgd")
COMPRESSION_OPTIMIZERS = ("none", "frozen_variance")
SYNC = ("every_step", "local_sgd", "stale")
FAMILIES = ("gpt", "llama")
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
  folder = os.path.dirname(importlib.import_module("jaxdp.configs").__file__)
  return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def _exec_config(path: str) -> ml_collections.ConfigDict:
  """get_config() of the config file at `path`; any failure is one JaxdpError naming the file."""
  spec = importlib.util.spec_from_file_location(f"_jaxdp_config_{abs(hash(path))}", path)
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


def lr_decay_steps(config: ml_collections.ConfigDict) -> int:
  return config.num_steps if config.lr_decay_steps is None else config.lr_decay_steps


# The ConfigDict stays here, at the edge: these turn it into the typed values the core takes.

def optimizer_config(config: ml_collections.ConfigDict):
  """The run's OptimizerConfig (jaxdp.core.optimizer).

  Fields added after a run was saved default to their old behaviour (AdamW, cosine), so a
  config from an earlier version still loads.
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


def freeze_variance_after(config: ml_collections.ConfigDict) -> int:
  """Updates before Adam's variance freezes (compression_optimizer='frozen_variance'); 0: never."""
  if config.get("compression_optimizer", "none") != "frozen_variance" or config.compression == "none":
    return 0
  return max(1, config.compression_warmup_steps)


def comm_config(config: ml_collections.ConfigDict):
  """The run's CommConfig (jaxdp.parallel.exchange): how devices exchange gradients."""
  import dataclasses

  from jaxdp.parallel.exchange import CommConfig
  # Fields newer than a saved run's config take their default (the behaviour it was run with).
  return CommConfig(**{f.name: config.get(f.name, f.default) for f in dataclasses.fields(CommConfig)})


def model_config(config: ml_collections.ConfigDict, vocab_size: int):
  """The run's ModelConfig (jaxdp.models) for a tokenizer of `vocab_size` ids."""
  from jaxdp.core.precision import COMPUTE_DTYPES
  from jaxdp.models import ModelConfig
  m = config.model
  multiple = m.get("pad_vocab_to_multiple", 1)
  padded = -(-vocab_size // multiple) * multiple
  return ModelConfig(vocab_size=padded, valid_vocab_size=vocab_size, seq_len=config.seq_len, n_layer=m.n_layer,
                     n_head=m.n_head, d_model=m.d_model, family=m.get("family", "gpt"),
                     mlp_ratio=m.mlp_ratio, n_kv_head=m.get("n_kv_head", 0), dropout=m.dropout,
                     positions=m.positions, rope_theta=m.get("rope_theta", 10000.0),
                     tie_embeddings=m.get("tie_embeddings", True), norm_eps=m.get("norm_eps", 0.0),
                     attention=config.attention,
                     dtype=COMPUTE_DTYPES[config.precision], remat=config.get("remat", "none"))


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, int]:
  """(data, model) sizes of the device mesh; config.mesh.data <= 0 means all devices left after
  mesh.model and mesh.replica (see mesh_replica)."""
  model = config.mesh.model
  data = num_devices // (model * mesh_replica(config)) if config.mesh.data <= 0 else config.mesh.data
  return data, model


def mesh_replica(config: ml_collections.ConfigDict) -> int:
  """config.mesh.replica, 1 for configs saved before the field existed."""
  return int(config.mesh.get("replica", 1))


def model_hidden(config: ml_collections.ConfigDict) -> int:
  """The MLP hidden width of the config's model family."""
  from jaxdp.models import llama
  if config.model.family == "llama":
    return llama.mlp_hidden(model_config(config, 256))
  return int(config.model.d_model * config.model.mlp_ratio)


def need(ok: bool, message: str) -> None:
  """Raises JaxdpError(message) unless `ok`: every check below names its field and the fix."""
  if not ok:
    raise JaxdpError(message)


def validate(config: ml_collections.ConfigDict, num_devices: int, platform: str | None = None) -> None:
  """Raises JaxdpError naming the first field that cannot work on `num_devices` devices.

  `platform` ("cpu", "gpu", "tpu"), when given, also checks fields that need particular hardware.
  """
  need(config.strategy in STRATEGIES,
       f"config.strategy={config.strategy!r} is not one of {', '.join(STRATEGIES)}")
  need(config.nan_policy in NAN_POLICIES,
       f"config.nan_policy={config.nan_policy!r} is not one of {', '.join(NAN_POLICIES)}")
  need(config.attention in ATTENTION,
       f"config.attention={config.attention!r} is not one of {', '.join(ATTENTION)}")
  need(platform is None or config.attention != "cudnn" or platform == "gpu",
       f"config.attention='cudnn' needs a GPU but the devices are {platform}; use "
       "config.attention=xla (the same math, portable)")
  need(config.precision in PRECISIONS,
       f"config.precision={config.precision!r} is not one of {', '.join(PRECISIONS)}")
  need(platform != "cpu" or config.precision != "fp16" or config.attention != "xla",
       "config.precision='fp16' with config.attention='xla' fails on CPU (XLA:CPU has no "
       "f16 x f16 -> f32 dot); use config.attention=reference, or config.precision=bf16")
  need(config.remat in REMATS, f"config.remat={config.remat!r} is not one of {', '.join(REMATS)}")
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
  need(config.learning_rate > 0, f"config.learning_rate={config.learning_rate} must be positive")
  need(0 <= config.model.dropout < 1, f"config.model.dropout={config.model.dropout} must be in [0, 1)")
  need(0 < config.data.val_fraction < 1,
       f"config.data.val_fraction={config.data.val_fraction} must be in (0, 1)")
  validate_data(config)
  need(config.model.d_model % config.model.n_head == 0,
       f"config.model.d_model={config.model.d_model} is not divisible by config.model.n_head="
       f"{config.model.n_head}; pick d_model a multiple of n_head")
  if config.model.positions == "rope":
    need((config.model.d_model // config.model.n_head) % 2 == 0,
         "config.model.positions='rope' needs an even head size (d_model / n_head)")
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
  dense = config.allreduce == "pmean" and config.compression == "none" and config.sync == "every_step"
  need(replica == 1 or dense,
       f"config.mesh.replica={replica} supports only the dense all-reduce; set "
       "config.allreduce='pmean', config.compression='none', config.sync='every_step', or "
       "config.mesh.replica=1")
  if model > 1:
    need(config.strategy != "dp",
         f"config.mesh.model={model} needs a jit strategy (zero1, zero2, zero3); "
         "config.strategy='dp' is data parallel only")
    hidden = model_hidden(config)
    kv = config.model.n_kv_head or config.model.n_head
    need(config.model.n_head % model == 0 and hidden % model == 0 and kv % model == 0,
         f"config.mesh.model={model} must divide config.model.n_head={config.model.n_head}, the "
         f"key/value heads {kv} and the MLP hidden size {hidden}")
  need(not (config.offload_optimizer and config.strategy == "dp"),
       "config.offload_optimizer=True needs a ZeRO strategy; set config.strategy=zero1, zero2 or zero3")
  validate_comm(config)
  validate_observability(config)
  per_step = replica * data * config.grad_accum_steps
  need(config.global_batch_size % per_step == 0,
       f"config.global_batch_size={config.global_batch_size} is not divisible by data devices x "
       f"grad_accum_steps = {replica * data} x {config.grad_accum_steps} = {per_step}; use a multiple "
       f"of {per_step} (e.g. {per_step * max(1, round(config.global_batch_size / per_step))})")
  validate_optimizer(config)
  validate_init_from(config)


def validate_init_from(config: ml_collections.ConfigDict) -> None:
  """config.init_from: "" or "hf:DIR" (the checkpoint itself is read, and checked against
  config.model field by field, when the run starts: jaxdp.runtime.hf)."""
  value = config.get("init_from", "")
  need(isinstance(value, str) and (value == "" or (value.startswith("hf:") and len(value) > 3)),
       f"config.init_from={value!r} must be '' (random init) or 'hf:DIR', a local Hugging Face "
       "checkpoint directory")


# (field, the fields and values it depends on, described): a field changed from its default
# while its condition does not hold can never do what the user asked.
DEPENDENT_FIELDS = (
    ("loss_scale_init", lambda c: c.precision == "fp16", "config.precision='fp16'"),
    ("loss_scale_period", lambda c: c.precision == "fp16", "config.precision='fp16'"),
    ("max_consecutive_skips", lambda c: c.nan_policy == "skip", "config.nan_policy='skip'"),
    ("compression_ratio", lambda c: c.compression in ("topk", "randomk"),
     "config.compression='topk' or 'randomk'"),
    ("error_feedback", lambda c: c.compression != "none", "a config.compression method"),
    ("compression_rank", lambda c: c.compression == "powersgd", "config.compression='powersgd'"),
    ("compression_warmup_steps", lambda c: c.compression in ("topk", "randomk") or
     (c.compression != "none" and c.compression_optimizer == "frozen_variance"),
     "config.compression='topk' or 'randomk', or config.compression_optimizer='frozen_variance'"),
    ("local_grad_clip", lambda c: c.compression != "none", "a config.compression method"),
    ("compression_optimizer", lambda c: c.compression != "none", "a config.compression method"),
    ("sync_every", lambda c: c.sync == "local_sgd", "config.sync='local_sgd'"),
    ("staleness", lambda c: c.sync == "stale", "config.sync='stale'"),
    ("outer_lr", lambda c: c.diloco, "config.diloco=True"),
    ("outer_momentum", lambda c: c.diloco, "config.diloco=True"),
    ("model.n_kv_head", lambda c: c.model.family == "llama", "config.model.family='llama'"),
    ("wandb.mode", lambda c: c.wandb.project != "", "config.wandb.project"),
)


def ignored_fields(config: ml_collections.ConfigDict) -> list[str]:
  """Warnings for fields set away from their default that have no effect in this config."""
  default = _exec_config(preset_path("default"))

  def get(c, dotted):
    for part in dotted.split("."):
      c = c[part]
    return c
  return [f"config.{name}={get(config, name)!r} has no effect without {needs}"
          for name, applies, needs in DEPENDENT_FIELDS
          if get(config, name) != get(default, name) and not applies(config)]


def validate_data(config: ml_collections.ConfigDict) -> None:
  """The data fields' choices and forms (the paths themselves are checked when opened)."""
  from jaxdp.data.mixture import parse_sources
  from jaxdp.data.packing import PACKINGS
  need(config.data.packing in PACKINGS,
       f"config.data.packing={config.data.packing!r} is not one of {', '.join(PACKINGS)}")
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
    need(m.tie_embeddings, "config.model.tie_embeddings=False: gpt always ties its output head; "
         "set config.model.family=llama for an untied head")
  else:
    need(m.positions == "rope", f"config.model.positions={m.positions!r}: llama uses rotary "
         "positions only; set config.model.positions=rope")
    need(m.n_kv_head == 0 or m.n_head % m.n_kv_head == 0,
         f"config.model.n_kv_head={m.n_kv_head} must divide config.model.n_head={m.n_head}")


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """config.profile_steps "START:STOP" -> (START, STOP); "" -> None (no trace).

  Raises:
    JaxdpError: not two integers with 0 <= START < STOP.
  """
  if text == "":
    return None
  parts = str(text).split(":")
  try:
    start, stop = (int(p) for p in parts) if len(parts) == 2 else (-1, -1)
  except ValueError:
    start, stop = -1, -1
  need(0 <= start < stop, f"config.profile_steps={text!r} must be 'START:STOP' with 0 <= START < "
       "STOP (e.g. '10:15' traces the 5 steps after step 10), or '' for no trace")
  return start, stop


def validate_observability(config: ml_collections.ConfigDict) -> None:
  """Profiling, experiment tracking and vocabulary padding fields."""
  parse_profile_steps(config.profile_steps)
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
  """The communication fields (jaxdp/parallel/exchange.py): choices, ranges and combinations that work."""
  for name, choices in (("allreduce", ALLREDUCE), ("compression", COMPRESSION), ("sync", SYNC)):
    need(config[name] in choices, f"config.{name}={config[name]!r} is not one of {', '.join(choices)}")
  need(0 < config.compression_ratio <= 1,
       f"config.compression_ratio={config.compression_ratio} must be in (0, 1]")
  need(0 <= config.momentum_correction < 1,
       f"config.momentum_correction={config.momentum_correction} must be in [0, 1)")
  need(config.compression_rank >= 1,
       f"config.compression_rank={config.compression_rank} must be >= 1 (the rank of PowerSGD's factors)")
  need(config.compression_warmup_steps >= 0,
       f"config.compression_warmup_steps={config.compression_warmup_steps} must be >= 0 (0: no warm-up)")
  need(config.local_grad_clip >= 0,
       f"config.local_grad_clip={config.local_grad_clip} must be >= 0 (0: no local clipping)")
  need(config.compression_optimizer in COMPRESSION_OPTIMIZERS,
       f"config.compression_optimizer={config.compression_optimizer!r} is not one of "
       f"{', '.join(COMPRESSION_OPTIMIZERS)}")
  if config.compression_optimizer == "frozen_variance" and config.compression != "none":
    need(config.get("optimizer", "adamw") == "adamw",
         f"config.compression_optimizer='frozen_variance' freezes Adam's variance; set "
         f"config.optimizer=adamw (got {config.get('optimizer')!r}) or compression_optimizer=none")
    need(config.compression != "powersgd",
         "config.compression_optimizer='frozen_variance' compresses the momentum elementwise; use "
         "config.compression=topk, randomk, int8 or bf16 with it")
    need(config.compression_warmup_steps >= 1,
         "config.compression_optimizer='frozen_variance' needs config.compression_warmup_steps >= 1 "
         "(the dense steps that estimate Adam's variance; 1-bit Adam uses 15-25% of the run)")
    need(config.sync == "every_step",
         f"config.compression_optimizer='frozen_variance' needs config.sync='every_step' (got "
         f"{config.sync!r})")
  need(config.momentum_correction == 0 or config.compression in ("topk", "randomk"),
       f"config.momentum_correction={config.momentum_correction} needs config.compression="
       f"'topk' or 'randomk' (got {config.compression!r}); set it to 0")
  need(config.sync_every >= 1, f"config.sync_every={config.sync_every} must be >= 1")
  need(config.staleness >= 0, f"config.staleness={config.staleness} must be >= 0")
  need(config.sync != "local_sgd" or config.compression == "none",
       f"config.sync='local_sgd' averages parameters uncompressed; set config.compression='none' "
       f"(got {config.compression!r})")
  need(config.sync != "local_sgd" or config.precision != "fp16",
       "config.sync='local_sgd' has no loss scaling; use config.precision='fp32' or 'bf16'")
  need(not config.diloco or config.sync == "local_sgd",
       f"config.diloco=True needs config.sync='local_sgd' (got {config.sync!r})")
  need(config.outer_lr > 0, f"config.outer_lr={config.outer_lr} must be positive")
  need(0 <= config.outer_momentum < 1,
       f"config.outer_momentum={config.outer_momentum} must be in [0, 1)")
  dense = config.allreduce == "pmean" and config.compression == "none" and config.sync == "every_step"
  need(dense or config.strategy == "dp",
       f"config.strategy={config.strategy!r} supports only the dense all-reduce; set "
       "config.allreduce='pmean', config.compression='none', config.sync='every_step'")
