"""The built-in models, each an ordinary user of the generic core.

A model family provides a Flax module built from a `ModelConfig`, its closed-form parameter
count, and (through jaxdp.models.common) the `init_fn` and `loss_fn` that `DataParallel`
takes; its parameters carry logical axis names, so tensor parallelism needs no table here.

Names are imported on first use: jaxdp.models.choices (the families, positions, attention
kernels and remat modes) is read without loading Flax or JAX.
"""

import importlib
from typing import Any

from jaxdp.models.choices import ATTENTION, FAMILIES, POSITIONS, REMATS

_EXPORTS = {"LanguageModel": "jaxdp.models.registry", "build": "jaxdp.models.registry",
            "ModelConfig": "jaxdp.models.common", "count_params": "jaxdp.core.tree"}
_MODULES = ("gpt", "llama", "common", "hf", "sampling", "registry")

__all__ = ["ATTENTION", "FAMILIES", "LanguageModel", "ModelConfig", "POSITIONS", "REMATS", "build",
           "count_params", "gpt", "llama"]


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
  elif name in _MODULES:
    value = importlib.import_module(f"jaxdp.models.{name}")
  else:
    raise AttributeError(f"module 'jaxdp.models' has no attribute {name!r}")
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
