"""jaxdp: data-parallel training for any JAX model.

The public API, for notebooks and scripts:

  loss_fn(params, batch, rng) -> (loss_sum, weight_sum)    # sums, float32 scalars
  init_fn(rng) -> params                                    # any pytree (Linen, NNX, plain)

  dp = jaxdp.DataParallel(loss_fn, optax.adamw(1e-3), strategy="zero3")
  state = dp.init_state(init_fn, seed=0)
  state, metrics = dp.step(state, global_batch)             # dict of NumPy arrays [B, ...]
  jaxdp.fit(dp, init_fn, batch_of_step, workdir="runs/x", num_steps=1000)

  params, module, tokenizer = jaxdp.load_for_inference("runs/x")   # a built-in model's run
  ids = list(jaxdp.generate(params, module, tokenizer.encode("ROMEO:"), 64))  # KV cache
  jaxdp.export_hf("runs/x", "hf/x")   # transformers' from_pretrained("hf/x") loads it
  jaxdp.replay_step("runs/x", 120, devices=jax.devices()[:1]).worst_first()  # rows of step 120

The built-in language models and the command line (`jaxdp train`) are users of this API.
"""

import importlib
from typing import Any

# Name -> the module that defines it. Imported on first use, so `import jaxdp` (and every CLI
# refusal) does not pay for JAX until a name that needs it is touched.
_EXPORTS = {
    "load_preset": "jaxdp.lm.config", "cross_entropy_sum": "jaxdp.core.losses",
    "OptimizerConfig": "jaxdp.core.optimizer", "learning_rate_schedule": "jaxdp.core.optimizer",
    "make_optimizer": "jaxdp.core.optimizer", "TrainState": "jaxdp.core.state",
    "example_keys": "jaxdp.core.step", "JaxdpError": "jaxdp.errors",
    "LanguageModel": "jaxdp.models", "ModelConfig": "jaxdp.models", "build_model": "jaxdp.models",
    "generate": "jaxdp.models.sampling", "export_hf": "jaxdp.lm.hf_export",
    "CommConfig": "jaxdp.parallel", "DataParallel": "jaxdp.parallel",
    "example_weights": "jaxdp.parallel", "make_mesh": "jaxdp.parallel",
    "RunRecord": "jaxdp.runtime.loop", "fit": "jaxdp.runtime.loop",
    "FitOptions": "jaxdp.runtime.options", "Hook": "jaxdp.runtime.hooks",
    "TargetLosses": "jaxdp.runtime.targets",
    "read_metrics": "jaxdp.runtime.metrics", "build": "jaxdp.lm.builder", "LMRun": "jaxdp.lm.builder",
    "RunSpec": "jaxdp.lm.spec",
    "load_for_inference": "jaxdp.lm.run", "train_and_evaluate": "jaxdp.lm.run",
    "replay_step": "jaxdp.lm.replay", "ReplayResult": "jaxdp.lm.replay",
}
_RENAMED = {"build_model": "build", "export_hf": "export"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxdp' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), _RENAMED.get(name, name))
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
