"""Building a built-in model from its `ModelConfig`: the family's Flax module, its init and loss
functions (jaxdp.models.common) and its closed-form parameter count."""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any

import flax.linen as nn

from jaxdp.errors import JaxdpError
from jaxdp.models import gpt, llama
from jaxdp.models.choices import FAMILIES, check_variant
from jaxdp.models.common import ModelConfig, lm_init, lm_loss

# Family -> (module class, closed-form parameter count); the names are models.choices.FAMILIES.
MODULES = {"gpt": (gpt.GPT, gpt.param_count), "llama": (llama.Llama, llama.param_count)}
assert tuple(MODULES) == FAMILIES


@dataclasses.dataclass(frozen=True)
class LanguageModel:
  """A built-in model ready for DataParallel: module, init_fn(rng), loss_fn(params, batch, rng)."""
  cfg: ModelConfig
  module: nn.Module
  init_fn: Callable[[Any], Any]
  loss_fn: Callable
  param_count: int  # Closed form, from the config.


def build(cfg: ModelConfig) -> LanguageModel:
  """The model of `cfg.family`, with its init and loss functions.

  Raises:
    JaxdpError: `cfg.family` is not one of models.choices.FAMILIES, or a llama-variant field
      that the family or `cfg.variant` lacks (models.choices.check_variant).
  """
  if cfg.family not in MODULES:
    raise JaxdpError(f"config.model.family={cfg.family!r} is not one of {', '.join(FAMILIES)}")
  check_variant(cfg.family, cfg.variant, head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias,
                qk_norm=cfg.qk_norm, sliding_window=cfg.sliding_window)
  module_class, closed_form = MODULES[cfg.family]
  module = module_class(cfg)
  return LanguageModel(cfg=cfg, module=module, init_fn=lm_init(module, cfg.seq_len),
                       loss_fn=lm_loss(module), param_count=closed_form(cfg))
