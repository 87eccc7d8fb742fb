"""The built-in language-model app: presets and validation (config), the typed `RunSpec` built
once from a config (spec), the model and DataParallel builder (builder), training and inference
loading (run), one step re-run from a run's checkpoints (replay), and Hugging Face import and
export (hf_import, hf_export).

Names are imported on first use, so `jaxdp.lm.config` (and every CLI refusal) does not pay for
JAX.
"""

import importlib
from typing import Any

_EXPORTS = {
    "LMRun": "jaxdp.lm.builder", "build": "jaxdp.lm.builder",
    "build_model_and_dp": "jaxdp.lm.builder", "model_flops_per_device": "jaxdp.lm.builder",
    "with_initial_params": "jaxdp.lm.builder", "RunSpec": "jaxdp.lm.spec", "run_spec": "jaxdp.lm.spec",
    "data_spec": "jaxdp.lm.spec", "train_and_evaluate": "jaxdp.lm.run",
    "load_for_inference": "jaxdp.lm.run", "restore_checkpoint": "jaxdp.lm.run",
    "saved_config": "jaxdp.lm.run", "replay_step": "jaxdp.lm.replay",
    "ReplayResult": "jaxdp.lm.replay", "load_preset": "jaxdp.lm.config", "validate": "jaxdp.lm.config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  if name in ("Trainer", "build_model"):  # Deprecated names (they warn): see jaxdp.lm.builder.
    return getattr(importlib.import_module("jaxdp.lm.builder"), name)
  raise AttributeError(f"module 'jaxdp.lm' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
