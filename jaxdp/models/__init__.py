"""The built-in models, each an ordinary user of the generic core.

A model family provides a Flax module built from a `ModelConfig`, its closed-form parameter
count, and (through jaxdp.models.common) the `init_fn` and `loss_fn` that `DataParallel`
takes; its parameters carry logical axis names, so tensor parallelism needs no table here.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

from jaxdp.errors import JaxdpError
from jaxdp.models import gpt, llama
from jaxdp.models.common import ModelConfig, count_params, lm_init, lm_loss

FAMILIES = {"gpt": (gpt.GPT, gpt.param_count), "llama": (llama.Llama, llama.param_count)}


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """A built-in model ready for DataParallel: module, init_fn(rng), loss_fn(params, batch, rng)."""
  cfg: ModelConfig
  module: nn.Module
  init_fn: Callable[[Any], Any]
  loss_fn: Callable
  param_count: int  # Closed form, from the config.


def build(cfg: ModelConfig) -> LanguageModel:
  """The model of `cfg.family`, with its init and loss functions."""
  if cfg.family not in FAMILIES:
    raise JaxdpError(f"config.model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}")
  module_class, closed_form = FAMILIES[cfg.family]
  module = module_class(cfg)
  return LanguageModel(cfg=cfg, module=module, init_fn=lm_init(module, cfg.seq_len),
                       loss_fn=lm_loss(module), param_count=closed_form(cfg))


__all__ = ["FAMILIES", "LanguageModel", "ModelConfig", "build", "count_params", "gpt", "llama"]
