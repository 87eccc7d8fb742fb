"""Data parallelism over a device mesh: meshes, shardings, compiled steps, gradient exchange,
local SGD, and `DataParallel`, the public entry point for any model.

Imports nothing of jaxdp's runtime: only jaxdp.core and jaxdp.errors. Names are imported on
first use, so jaxdp.parallel.choices (strategies, NaN policies, exchange rules) is read without
loading JAX.
"""

import importlib
from typing import Any

from jaxdp.parallel.choices import NAN_POLICIES as NAN_POLICIES
from jaxdp.parallel.choices import STRATEGIES as STRATEGIES

# Name -> the module that defines it.
_EXPORTS = {
    **dict.fromkeys(("DataParallel", "example_weights"), "jaxdp.parallel.data_parallel"),
    "CommConfig": "jaxdp.parallel.exchange",
    **dict.fromkeys(("BATCH_SPEC", "DATA", "MODEL", "REPLICA", "batch_axes", "batch_sharding",
                     "make_mesh", "process_rows", "put_batch", "replicated"), "jaxdp.parallel.mesh"),
    **dict.fromkeys(("DEFAULT_RULES", "ZERO_PARTS", "Layout", "check_offload", "gradient_shardings",
                     "replicated_report", "state_shardings"), "jaxdp.parallel.shardings"),
    "path_names": "jaxdp.core.tree",
    **dict.fromkeys(("compile_eval_step", "compile_train_step", "pmap_train_step", "replicate",
                     "split_for_pmap", "unreplicate"), "jaxdp.parallel.steps"),
}

__all__ = sorted([*_EXPORTS, "NAN_POLICIES", "STRATEGIES"])


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxdp.parallel' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
