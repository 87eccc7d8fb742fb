"""The declared schema of every config field: its type, range, choices, the fields it needs,
and its help; `check` validates a config by it, tools/gen_config_docs.py documents it.

Each entry is a `Field`. A field's help is the one-line comment of its assignment in
configs/default.py (one source for the docs and `--help_config`); everything else about it is
declared here, and `check`, the generated messages, docs/configuration.md's "Valid" column and
tests/test_schema.py (which tries every way to break every entry) all read it. A field of the
default preset without an entry here fails tests/test_schema.py and tools/gen_config_docs.py, so a
field cannot exist without its checks.

Choice lists come from the layer that owns them (core.choices, models.choices,
parallel.choices, data.packing); rules that involve several fields beyond "needs" (the mesh
against the devices, the communication combinations) stay the owning layer's functions, which
`jaxdp.lm.config.validate` calls after `check`. Imports no JAX (a parser of a field's text
form imports its owning module only when it checks a value other than the default).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import dataclasses
import functools
import importlib
import math
import sys
from typing import Any

from jaxdp.core.choices import PRECISIONS
from jaxdp.data.packing import PACKINGS
from jaxdp.errors import JaxdpError
from jaxdp.models.choices import ATTENTION, FAMILIES, HF_CLASSES, POSITIONS, REMATS
from jaxdp.parallel.choices import (
  ALLREDUCE,
  COMPRESSION,
  COMPRESSION_OPTIMIZERS,
  NAN_POLICIES,
  REDUCTIONS,
  STRATEGIES,
  SYNC,
)
from jaxdp.runtime.fieldpath import dotted_get

WANDB_MODES = ("offline", "online", "disabled")
VARIANTS = tuple(HF_CLASSES)  # "" is Llama itself.


@dataclasses.dataclass(frozen=True)
class Rule:
  """A condition on the config that a field set away from its default needs.

  text: the condition in config terms ("config.eval_every > 0"), used in messages and docs.
  holds: the predicate on the ConfigDict.
  breaks: field -> value overrides that make it false (the schema test breaks it with them).
  fix: field -> value overrides that make it true; printed as the `--config.F=V` advice, and the
    schema test checks that the advice is accepted.
  """
  text: str
  holds: Callable[[Any], bool]
  breaks: Mapping[str, Any]
  fix: Mapping[str, Any]

  def advice(self) -> str:
    """The fix as command-line flags: "--config.eval_every=100"."""
    return " ".join(f"--config.{k}={_shown(v)}" for k, v in self.fix.items())


@dataclasses.dataclass(frozen=True)
class Excludes:
  """Another field that may not be set (away from its default) together with this one.

  other: the other field's dotted name; why: what to do instead, said after "are both set".
  """
  other: str
  why: str


@dataclasses.dataclass(frozen=True)
class Shapes:
  """A field whose value sets the shapes (or the presence) of arrays of the train state: a
  checkpoint trained with another value holds arrays this run cannot take, so no resume can
  change it, --allow_config_change included (jaxdp.lm.builder's RunRecord asks
  `layout_changes`). Found by building the state of tiny_cpu with each field changed alone and
  comparing the arrays' paths and shapes (the per-device communication state's device axis
  aside: a resume maps it to another device count).

  arrays: the arrays it sets, in words, for the refusal ("the optimizer state").
  key: for a field that sets them only in part, (get) -> the part that does (`get(name)` reads
    a field, its default where a checkpoint's config predates it): seq_len only with learned
    positions, compression_warmup_steps only as 0 or not. None: every change of the value.
  when: that condition in words, for the docs ("with config.model.positions='learned'").
  """
  arrays: str
  key: Callable[[Callable[[str], Any]], Any] | None = None
  when: str = ""


MODEL_ARRAYS = Shapes("the model's parameters and their optimizer state")
COMM_ARRAYS = "the per-device communication state"


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field's declaration.

  kind: int, float, bool or str (a float field takes an int too; never a bool).
  min/max: the valid range (numbers; `min_open`/`max_open` exclude the bound itself); numbers
    must be finite. `nullable`: None is valid too.
  choices: the valid strings, or a (module, attribute) pair read when a non-default value is
    checked (for lists whose module imports JAX: core.optimizer).
  needs: set away from its default, the field does nothing unless this rule holds: refused.
  excludes: set away from its default together with this other field: refused.
  against: checks the value against other fields of the whole config (raises JaxdpError).
  parse: the owning layer's parser of the field's text form (raises JaxdpError naming it).
  note: said after a range message, e.g. "0: no warmup".
  example: a valid value other than the default (the schema test sets it to break `needs`).
  shapes: the train state's arrays the value sets (see Shapes); None for most fields.
  defines_run: a field without `shapes` whose value still defines the run's numbers (the data it
    sees, its batches, its arithmetic): a resume with another value is refused unless
    --allow_config_change, and every process of a run must agree on it (RUN_DEFINING_FIELDS).
  """
  kind: type
  min: float | None = None
  max: float | None = None
  min_open: bool = False
  max_open: bool = False
  choices: tuple[str, ...] = ()
  nullable: bool = False
  needs: Rule | None = None
  excludes: Excludes | None = None
  against: Callable[[Any], None] | None = None
  parse: Callable[[Any], Any] | None = None
  note: str = ""
  example: Any = None
  bad: Any = None  # A value of the right type that `parse` refuses (the schema test tries it).
  lazy_choices: tuple[str, str] | None = None
  shapes: Shapes | None = None
  defines_run: bool = False

  def valid_choices(self) -> tuple[str, ...]:
    """The valid strings (a lazy list imports its module)."""
    if self.lazy_choices:
      module, name = self.lazy_choices
      return tuple(getattr(importlib.import_module(module), name))
    return tuple(self.choices)

  def range_text(self) -> str:
    """'positive', '>= 0', 'in [0, 1)'; '' without a range."""
    if self.min is None and self.max is None:
      return ""
    if self.max is None:
      return "positive" if self.min == 0 and self.min_open else \
          f"{'>' if self.min_open else '>='} {_shown(self.min)}"
    if self.min is None:
      return f"{'<' if self.max_open else '<='} {_shown(self.max)}"
    return (f"in {'(' if self.min_open else '['}{_shown(self.min)}, {_shown(self.max)}"
            f"{')' if self.max_open else ']'}")

  def valid_text(self, resolve: bool = True, needs: bool = True) -> str:
    """What the docs' "Valid" column says: type, range or choices, and (`needs`) what it needs.
    resolve=False leaves out choices that would import their (JAX-importing) module."""
    kind = {int: "integer", float: "number", bool: "true/false", str: "text"}[self.kind]
    parts = [kind + (" or None" if self.nullable else "")]
    if self.range_text():
      parts.append(self.range_text())
    if self.choices or (self.lazy_choices and resolve):
      parts = [", ".join(f"`{c!r}`" if c == "" else f"`{c}`" for c in self.valid_choices())]
    if self.needs and needs:
      parts.append(f"needs {self.needs.text}")
    if self.excludes and needs:
      parts.append(f"not with config.{self.excludes.other}")
    if self.shapes:
      parts.append("shapes the checkpoint" + (f" {self.shapes.when}" if self.shapes.when else ""))
    return "; ".join(parts)


def _shown(value: Any) -> str:
  """A value as written after --config.F= (integers in full, floats shortest, None as None)."""
  if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
    return repr(value)
  return f"{value:g}" if isinstance(value, float) else str(value)


# The conditions fields depend on, named once.
EVALUATES = Rule("periodic evaluation (config.eval_every > 0)", lambda c: c.eval_every > 0,
                 {"eval_every": 0}, {"eval_every": 100})
FP16 = Rule("config.precision='fp16'", lambda c: c.precision == "fp16", {"precision": "fp32"},
            {"precision": "fp16"})
SKIPS = Rule("config.nan_policy='skip'", lambda c: c.nan_policy == "skip", {"nan_policy": "halt"},
             {"nan_policy": "skip"})
SPARSIFIES = Rule("config.compression='topk' or 'randomk'",
                  lambda c: c.compression in ("topk", "randomk"), {"compression": "none"},
                  {"compression": "topk"})
COMPRESSES = Rule("a config.compression method", lambda c: c.compression != "none",
                  {"compression": "none"}, {"compression": "int8"})
POWERSGD = Rule("config.compression='powersgd'", lambda c: c.compression == "powersgd",
                {"compression": "none"}, {"compression": "powersgd"})
WARMS_UP = Rule("config.compression='topk' or 'randomk', or config.compression_optimizer="
                "'frozen_variance'",
                lambda c: c.compression in ("topk", "randomk") or
                (c.compression != "none" and c.compression_optimizer == "frozen_variance"),
                {"compression": "none"}, {"compression": "topk"})
LOCAL_SGD = Rule("config.sync='local_sgd'", lambda c: c.sync == "local_sgd",
                 {"sync": "every_step"}, {"sync": "local_sgd"})
STALE = Rule("config.sync='stale'", lambda c: c.sync == "stale", {"sync": "every_step"},
             {"sync": "stale"})
FIXED_ORDER = Rule("config.reduction='fixed_order'", lambda c: c.reduction == "fixed_order",
                   {"reduction": "allreduce"}, {"reduction": "fixed_order"})
DILOCO = Rule("config.diloco=True", lambda c: bool(c.diloco), {"diloco": False},
              {"sync": "local_sgd", "diloco": True})
LLAMA = Rule("config.model.family='llama'", lambda c: c.model.family == "llama",
             {"model.family": "gpt"}, {"model.family": "llama"})
WANDB = Rule("config.wandb.project", lambda c: c.wandb.project != "", {"wandb.project": ""},
             {"wandb.project": "my-project"})
SGD = Rule("config.optimizer='sgd'", lambda c: c.get("optimizer", "adamw") == "sgd",
           {"optimizer": "adamw"}, {"optimizer": "sgd"})
WSD = Rule("config.schedule='wsd'", lambda c: c.get("schedule", "cosine") == "wsd",
           {"schedule": "cosine"}, {"schedule": "wsd"})
SPIKES = Rule("config.spike_policy='skip' or 'rollback'", lambda c: c.spike_policy != "off",
              {"spike_policy": "off"}, {"spike_policy": "rollback"})
ROLLS_BACK = Rule("config.spike_policy='rollback'", lambda c: c.spike_policy == "rollback",
                  {"spike_policy": "off"}, {"spike_policy": "rollback"})


def _checkpoint_dir(value: Any) -> Any:
  from jaxdp.runtime.checkpoint import parse_checkpoint_dir
  return parse_checkpoint_dir(value)


def _profile(value: Any) -> Any:
  from jaxdp.runtime.profiling import parse_profile_steps
  return parse_profile_steps(value)


def _profile_reached(config: Any) -> None:
  from jaxdp.runtime.profiling import parse_profile_steps
  window = parse_profile_steps(config.profile_steps)
  steps = config.num_steps
  if window is not None and window[0] >= steps:  # The trace starts after the last step.
    raise JaxdpError(f"config.profile_steps={config.profile_steps!r} can have no effect: it traces "
                     f"the steps after step {window[0]}, and the run ends at config.num_steps="
                     f"{steps}; give a window that starts below it, e.g. --config.profile_steps="
                     f"{steps // 2}:{steps}, or --config.num_steps={window[1]} to trace it all")


def _targets(value: Any) -> Any:
  from jaxdp.runtime.targets import parse_targets
  return parse_targets(value, field="config.target_losses")


def _batch_ramp(value: Any) -> Any:
  from jaxdp.data.schedule import parse_ramp
  # The form alone: each stage against global_batch_size is `against`'s, with the whole config.
  return parse_ramp(value, sys.maxsize)


def _batch_ramp_against(config: Any) -> None:
  from jaxdp.data.schedule import parse_ramp
  # Each stage at most global_batch_size; its split over the devices is lm/config's
  # validate_batch_ramp, which needs the device count.
  parse_ramp(config.batch_ramp, config.global_batch_size)


def _sources(value: Any) -> Any:
  from jaxdp.data.mixture import parse_sources
  from jaxdp.data.sources import check_trainable
  entries = parse_sources(value)
  for path, _ in entries:
    check_trainable(path, "config.data.sources entry")
  return entries


def _data_path(value: Any) -> None:
  from jaxdp.data.sources import check_trainable
  check_trainable(value)


def _init_from(value: Any) -> None:
  if not (value == "" or (value.startswith("hf:") and len(value) > 3)):
    raise JaxdpError(f"config.init_from={value!r} must be '' (random init) or 'hf:DIR', a local "
                     "Hugging Face checkpoint directory")


def _eval_tasks(value: Any) -> Any:
  from jaxdp.lm.evaluate import parse_tasks
  return parse_tasks(value, "config.eval_tasks")


def _preempt_code(value: int) -> None:
  if not (value == 0 or 4 <= value <= 255):
    raise JaxdpError(f"config.preempt_exit_code={value} must be 0 or in [4, 255] (1-3 mean "
                     "failure, bad input and a step timeout)")


def _factor(name: str) -> Callable[[Any], None]:
  def check(value: float) -> None:
    if 0 < value <= 1:
      raise JaxdpError(f"config.{name}={value!r} must be > 1 (a ratio to the median), or 0 to "
                       "turn the warning off")
  return check


SCHEMA: dict[str, Field] = {
    "seed": Field(int, 0, 2 ** 32, max_open=True, example=1, defines_run=True),
    "num_steps": Field(int, 0, min_open=True, example=5),
    "global_batch_size": Field(int, 0, min_open=True, example=64, defines_run=True),
    "batch_ramp": Field(str, parse=_batch_ramp, against=_batch_ramp_against, example="8:2", bad="8",
                        defines_run=True),
    "seq_len": Field(int, 0, min_open=True, example=64, shapes=Shapes(
        "the learned position embeddings", lambda get: (
            get("seq_len") if get("model.positions") == "learned" else None),
        "with config.model.positions='learned'")),
    "grad_accum_steps": Field(int, 0, min_open=True, example=2),
    "optimizer": Field(str, lazy_choices=("jaxdp.core.optimizer", "OPTIMIZERS"),
                       example="sgd", shapes=Shapes("the optimizer state")),
    "learning_rate": Field(float, 0, min_open=True, example=1e-3),
    "schedule": Field(str, lazy_choices=("jaxdp.core.optimizer", "SCHEDULES"),
                      example="linear"),
    "min_lr_ratio": Field(float, 0, 1, example=0.5),
    "warmup_steps": Field(int, 0, note="0: no warmup", example=10),
    "lr_decay_steps": Field(int, 0, min_open=True, nullable=True, note="None: num_steps",
                            example=100),
    "decay_fraction": Field(float, 0, 1, min_open=True, needs=WSD,
                            note="1: decay over the whole of lr_decay_steps", example=0.5),
    "weight_decay": Field(float, 0, note="0: no decay", example=0.01),
    "decay_exclude": Field(str, example="wpe"),
    "b1": Field(float, 0, 1, max_open=True, example=0.8),
    "b2": Field(float, 0, 1, max_open=True, example=0.95),
    "momentum": Field(float, 0, 1, max_open=True, needs=SGD, note="0: plain SGD", example=0.5),
    "nesterov": Field(bool, needs=SGD, example=True),
    "grad_clip": Field(float, 0, note="0 disables clipping", example=0.5),
    "log_every": Field(int, 0, min_open=True, example=5),
    "eval_every": Field(int, 0, note="0: no periodic evaluation", example=50),
    "eval_steps": Field(int, 0, note="0: the whole validation split", example=2),
    "eval_tasks": Field(str, parse=_eval_tasks, example="", bad="nokind"),
    "patience": Field(int, 0, needs=EVALUATES, note="0 disables", example=3),
    "checkpoint_every": Field(int, 0, note="0: only the final checkpoint", example=50),
    "keep_last": Field(int, 0, min_open=True, example=2),
    "keep_every": Field(int, 0, note="0 keeps none extra", example=100),
    "checkpoint_dir": Field(str, parse=_checkpoint_dir, example="s3://bucket/run", bad="ftp://host/x"),
    "nan_policy": Field(str, choices=NAN_POLICIES, example="skip"),
    "max_consecutive_skips": Field(int, 1, needs=SKIPS, example=3),
    "spike_policy": Field(str, choices=("off", "skip", "rollback"), example="rollback"),
    "spike_sigmas": Field(float, 0, min_open=True, needs=SPIKES, example=4.0),
    "spike_window": Field(int, 1, needs=SPIKES, example=20),
    "spike_max_rollbacks": Field(int, 1, needs=ROLLS_BACK, example=5),
    "spike_rollback_window": Field(int, 1, needs=ROLLS_BACK, example=500),
    "checkpoint_every_minutes": Field(float, 0, note="0 disables", example=30.0),
    "straggler_factor": Field(float, 0, parse=_factor("straggler_factor"), note="0 disables",
                              example=2.0, bad=0.5),
    "grad_outlier_factor": Field(float, 0, parse=_factor("grad_outlier_factor"),
                                 note="0 disables", example=5.0, bad=0.5),
    "health_window": Field(int, 1, example=3),
    "strategy": Field(str, choices=STRATEGIES, example="zero1"),
    "offload_optimizer": Field(bool, example=True),
    "step_timeout_s": Field(float, 0, note="0 disables", example=60.0),
    "preempt_exit_code": Field(int, 0, 255, parse=_preempt_code, example=0, bad=2),
    "reduction": Field(str, choices=REDUCTIONS, example="fixed_order"),
    "virtual_shards": Field(int, 1, needs=FIXED_ORDER, note="a power of two", example=4),
    "allreduce": Field(str, choices=ALLREDUCE, example="ring"),
    "compression": Field(str, choices=COMPRESSION, example="int8", shapes=Shapes(
        f"{COMM_ARRAYS} (the error-feedback residual, PowerSGD's factors)")),
    "compression_ratio": Field(float, 0, 1, min_open=True, needs=SPARSIFIES, example=0.1),
    "error_feedback": Field(bool, needs=COMPRESSES, example=False,
                            shapes=Shapes(f"{COMM_ARRAYS} (the error-feedback residual)")),
    "compression_rank": Field(int, 1, needs=POWERSGD, example=2,
                              shapes=Shapes(f"{COMM_ARRAYS} (PowerSGD's factors)")),
    "compression_warmup_steps": Field(int, 0, needs=WARMS_UP, note="0 disables", example=4,
                                      shapes=Shapes(f"{COMM_ARRAYS} (the warm-up's step count)",
                                                    lambda get: get("compression_warmup_steps") > 0,
                                                    "as 0 or not")),
    "local_grad_clip": Field(float, 0, needs=COMPRESSES, note="0 disables", example=1.0),
    "compression_optimizer": Field(str, choices=COMPRESSION_OPTIMIZERS, needs=COMPRESSES,
                                   example="frozen_variance", shapes=Shapes(
                                       f"the optimizer state and {COMM_ARRAYS}")),
    "momentum_correction": Field(float, 0, 1, max_open=True, note="0 disables", example=0.9,
                                 shapes=Shapes(f"{COMM_ARRAYS} (the corrected momentum)",
                                               lambda get: get("momentum_correction") > 0,
                                               "as 0 or not")),
    "sync": Field(str, choices=SYNC, example="local_sgd", shapes=Shapes(
        f"{COMM_ARRAYS} (local_sgd's optimizer copies, the stale gradients)")),
    "sync_every": Field(int, 1, needs=LOCAL_SGD, example=8),
    "staleness": Field(int, 0, needs=STALE, example=2, shapes=Shapes(
        f"{COMM_ARRAYS} (the stale gradients it keeps)",
        lambda get: get("staleness") if get("sync") == "stale" else None,
        "with config.sync='stale'")),
    "diloco": Field(bool, needs=LOCAL_SGD, example=True,
                    shapes=Shapes("the optimizer state (the outer momentum)")),
    "outer_lr": Field(float, 0, min_open=True, needs=DILOCO, example=0.5),
    "outer_momentum": Field(float, 0, 1, max_open=True, needs=DILOCO, example=0.5),
    "attention": Field(str, choices=ATTENTION, example="reference"),
    "precision": Field(str, choices=PRECISIONS, example="bf16"),
    "loss_scale_init": Field(float, 1, needs=FP16, example=1024.0),
    "loss_scale_period": Field(int, 0, min_open=True, needs=FP16, example=100),
    "init_from": Field(str, parse=_init_from, example="hf:some/dir", bad="some/dir"),
    "target_losses": Field(str, parse=_targets, example="2.0", bad="low"),
    "profile_steps": Field(str, parse=_profile, against=_profile_reached, example="1:2", bad="5"),
    "remat": Field(str, choices=REMATS, example="block"),
    "wandb.project": Field(str, example="my-project"),
    "wandb.mode": Field(str, choices=WANDB_MODES, needs=WANDB, example="online"),
    "data.path": Field(str, parse=_data_path, example="corpus.txt", bad="corpus.jsonl",
                       excludes=Excludes("data.sources", "give the mixture's paths in data.sources "
                                         "only, or leave config.data.sources at its default ''")),
    "data.val_fraction": Field(float, 0, 1, min_open=True, max_open=True, example=0.2,
                               defines_run=True),
    "data.tokenizer": Field(str, example="tokenizer.json"),
    "data.packing": Field(str, choices=PACKINGS, example="document", defines_run=True),
    "data.sources": Field(str, parse=_sources, example="a.txt:1,b.txt:1", bad="a.txt"),
    "mesh.data": Field(int, -1, note="0 or -1: all devices left after mesh.model", example=2),
    "mesh.replica": Field(int, 1, note="1: no hybrid sharding", example=2),
    "mesh.model": Field(int, 1, note="1: plain data parallelism", example=2),
    "model.family": Field(str, choices=FAMILIES, example="llama", shapes=MODEL_ARRAYS),
    "model.n_layer": Field(int, 0, min_open=True, example=2, shapes=MODEL_ARRAYS),
    "model.n_head": Field(int, 0, min_open=True, example=2, shapes=MODEL_ARRAYS),
    "model.d_model": Field(int, 0, min_open=True, example=64, shapes=MODEL_ARRAYS),
    "model.mlp_ratio": Field(float, 0, min_open=True, example=2.0, shapes=Shapes(
        MODEL_ARRAYS.arrays, lambda get: None if get("model.mlp_dim") else get("model.mlp_ratio"),
        "with config.model.mlp_dim=0")),
    "model.mlp_dim": Field(int, 0, note="0 means from mlp_ratio", example=96,
                           shapes=MODEL_ARRAYS),
    "model.dropout": Field(float, 0, 1, max_open=True, example=0.1),
    "model.positions": Field(str, choices=POSITIONS, example="learned", shapes=MODEL_ARRAYS),
    "model.rope_theta": Field(float, 0, min_open=True, example=500000.0, defines_run=True),
    "model.n_kv_head": Field(int, 0, needs=LLAMA, note="0 means n_head", example=2,
                             shapes=MODEL_ARRAYS),
    "model.pad_vocab_to_multiple": Field(int, 1, note="1: no padding", example=64,
                                         shapes=MODEL_ARRAYS),
    "model.tie_embeddings": Field(bool, example=False, shapes=MODEL_ARRAYS),
    "model.norm_eps": Field(float, 0, 1, max_open=True, note="0: the family default",
                            example=1e-5, defines_run=True),
    "model.variant": Field(str, choices=VARIANTS, example="mistral"),
    "model.head_dim": Field(int, 0, note="0 means d_model / n_head", example=16,
                            shapes=MODEL_ARRAYS),
    "model.qkv_bias": Field(bool, example=True, shapes=MODEL_ARRAYS),
    "model.qk_norm": Field(bool, example=True, shapes=MODEL_ARRAYS),
    "model.sliding_window": Field(int, 0, note="0 means all", example=16),
}


# The fields a run is defined by: each that sets the train state's arrays or is declared
# `defines_run`. A checkpoint records them; a resume that changes one is refused (unless
# --allow_config_change, for those without arrays), and the processes of a run must agree on them.
RUN_DEFINING_FIELDS = tuple(name for name, field in SCHEMA.items()
                            if field.defines_run or field.shapes is not None)


def field_names(config: Any, prefix: str = "") -> list[str]:
  """Dotted names of every leaf field of a ConfigDict, e.g. ["seed", ..., "model.n_layer"]."""
  names = []
  for key, value in config.items():
    if hasattr(value, "items"):  # A ConfigDict section.
      names += field_names(value, f"{prefix}{key}.")
    else:
      names.append(prefix + key)
  return names


@functools.cache
def defaults() -> dict[str, Any]:
  """{field: value} of the default preset (the reference `needs` compares against)."""
  # The installed name of configs/default.py (a package mapped in pyproject.toml).
  config = importlib.import_module("jaxdp.configs.default").get_config()
  return {name: dotted_get(config, name) for name in field_names(config)}


def missing_entries(names: list[str] | None = None) -> list[str]:
  """Fields of the default preset (or of `names`) without a schema entry."""
  return [n for n in (list(defaults()) if names is None else names) if n not in SCHEMA]


def check_value(name: str, value: Any, field: Field | None = None) -> None:
  """Raises a one-line JaxdpError naming config.`name` if `value` is not valid on its own."""
  field = field or SCHEMA[name]
  shown = f"config.{name}={value!r}"
  if value is None and field.nullable:
    return
  example = field.example if field.example not in (None, "") else defaults().get(name)
  kind = field.kind
  if value is None:  # Set to None (--config.F=None, or a config file) where None means nothing.
    default = defaults().get(name)
    valid = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}[kind]
    if field.choices or field.lazy_choices:
      valid = "one of " + ", ".join(repr(c) if c == "" else c for c in field.valid_choices())
    elif field.range_text():
      valid += f", {field.range_text()}" + (f" ({field.note})" if field.note else "")
    also = "" if default is None or default == example else \
        f", or --config.{name}={_shown(default)} ({'empty, ' if default == '' else ''}the default preset's)"
    raise JaxdpError(f"config.{name}=None: config.{name} cannot be None; it takes {valid}; give "
                     f"e.g. --config.{name}={_shown(example)}{also}")
  ok = (isinstance(value, bool) if kind is bool else
        isinstance(value, int) and not isinstance(value, bool) if kind is int else
        isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float else
        isinstance(value, str))
  if not ok:
    what = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}[kind]
    raise JaxdpError(f"{shown} must be {what}{' or None' if field.nullable else ''}; give e.g. "
                     f"--config.{name}={_shown(example)}")
  if kind in (int, float):
    if not math.isfinite(value):
      raise JaxdpError(f"{shown} must be a finite number; give e.g. --config.{name}="
                       f"{_shown(example)}")
    low = field.min is not None and (value <= field.min if field.min_open else value < field.min)
    high = field.max is not None and (value >= field.max if field.max_open else value > field.max)
    if low or high:
      note = f" ({field.note})" if field.note else ""
      raise JaxdpError(f"config.{name}={_shown(value)} must be {field.range_text()}{note}")
  if (field.choices or field.lazy_choices) and value != defaults().get(name):
    choices = field.valid_choices()
    if value not in choices:
      raise JaxdpError(f"{shown} is not one of {', '.join(repr(c) if c == '' else c for c in choices)}")
  # The default is valid (tests/test_schema.py checks); skipping it keeps parsers that import
  # JAX (runtime.checkpoint) off the command line's path for the usual config.
  if field.parse is not None and value != defaults().get(name):
    field.parse(value)


def check(config: Any) -> None:
  """Validates every field of `config` by its schema entry, then every `needs` and `excludes`.

  Raises:
    JaxdpError: one line naming the first field of the wrong type, out of range, not one of its
      choices, set away from its default where it has no effect, or set with a field it excludes.
  """
  # A field without an entry is a developer's omission, caught by tests/test_schema.py and
  # tools/gen_config_docs.py, not a user's error: it is not refused here.
  names = [name for name in field_names(config) if name in SCHEMA]
  for name in names:
    check_value(name, dotted_get(config, name))
  for name in names:
    field = SCHEMA[name]
    value = dotted_get(config, name)
    if field.needs and value != defaults().get(name) and not field.needs.holds(config):
      raise JaxdpError(f"config.{name}={value!r} has no effect without {field.needs.text}; set "
                       f"{field.needs.advice()}, or leave config.{name} at its default "
                       f"{defaults().get(name)!r}")
    if field.against is not None and value != defaults().get(name):
      field.against(config)
    excludes = field.excludes
    if excludes and value != defaults().get(name) and \
        dotted_get(config, excludes.other) != defaults().get(excludes.other):
      raise JaxdpError(f"config.{excludes.other} and config.{name}={value!r} are both set; "
                       f"{excludes.why}")


def layout_changes(saved: Any, current: Any) -> list[tuple[str, Any, str]]:
  """(field, saved value, the arrays it sets) of each field with `shapes` whose change between a
  checkpoint's config `saved` and `current` (dicts or ConfigDicts) changes the train state's
  arrays: no resume can take that checkpoint with this config. A field a config lacks (saved
  before it existed) has its default."""
  if not saved:  # A checkpoint without a config (a generic `fit` record): nothing to compare.
    return []

  def getter(config: Any) -> Callable[[str], Any]:
    return lambda name: dotted_get(config, name, defaults().get(name))
  old, new = getter(saved), getter(current)
  out = []
  for name, field in SCHEMA.items():
    if field.shapes is None:
      continue
    key = field.shapes.key
    if (key(old) != key(new)) if key else old(name) != new(name):
      out.append((name, old(name), field.shapes.arrays))
  return out


def ignored(config: Any) -> list[str]:
  """The `needs` rules `config` breaks, as messages (for callers that warn, not refuse)."""
  out = []
  for name in field_names(config):
    field = SCHEMA.get(name)
    value = dotted_get(config, name)
    if field and field.needs and value != defaults().get(name) and not field.needs.holds(config):
      out.append(f"config.{name}={value!r} has no effect without {field.needs.text}")
  return out
