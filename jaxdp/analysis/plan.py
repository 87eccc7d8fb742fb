"""What each strategy costs per device, measured: `jaxdp plan`.

Per strategy: bytes of parameters, gradients and optimizer state held by one device (summed over
that device's `addressable_shards` of real arrays placed as the step places them: the train
state, and the summed gradients in the strategy's gradient sharding), the compiled step's memory
(`compiled.memory_analysis()`), and the collective bytes per step read from the compiled HLO.
Beside each, the ZeRO paper's formula (Rajbhandari et al. 2020, fp32 training with Adam: 4 bytes
per parameter for weights and for gradients, 8 for the two moments; stage s divides its parts by
the data-parallel degree N).

Collective bytes use the paper's accounting, per device and step: an all-reduce counts twice its
buffer (it is a reduce-scatter then an all-gather), a reduce-scatter its input, an all-gather its
output, a collective-permute or all-to-all its buffer. HLO shapes after partitioning are
per-device. Ops inside loops (grad_accum_steps > 1) are counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdp import parallel
from jaxdp.core.tree import count_params
from jaxdp.lm import build
from jaxdp.parallel import hlo
from jaxdp.parallel.choices import STRATEGIES
from jaxdp.runtime.loop import state_bytes_per_device

# How many times its buffer each collective moves, in the paper's accounting.
BUFFER_PASSES = {"all-reduce": 2, "reduce-scatter": 1, "all-gather": 1, "collective-permute": 1,
                 "all-to-all": 1}


def paper_bytes(strategy: str, params_per_device: int, data: int) -> dict[str, float]:
  """The ZeRO paper's per-device figures for `params_per_device` fp32 parameters on N=data."""
  parts = parallel.ZERO_PARTS[strategy]
  return {"params_bytes_per_device": 4 * params_per_device / (data if "params" in parts else 1),
          "grads_bytes_per_device": 4 * params_per_device / (data if "grads" in parts else 1),
          "opt_state_bytes_per_device": 8 * params_per_device / (data if parts else 1),
          "collective_bytes_per_step": (3 if "params" in parts else 2) * 4 * params_per_device}


def _zeros(like: Any, sharding: jax.sharding.Sharding) -> jax.Array:
  """An array of zeros of `like`'s shape and dtype, placed with `sharding`."""
  return jax.device_put(np.zeros(like.shape, like.dtype), sharding)


def measure_strategy(config: ml_collections.ConfigDict, strategy: str,
                     devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
  """Measured per-device memory and communication of `strategy` on `devices` (all by default).

  Also the entry point for benchmarks that want the same figures beside their tokens/s.
  """
  config = ml_collections.ConfigDict(config.to_dict())
  config.strategy = strategy
  trainer = build(config, devices)
  abstract = trainer.abstract_state()
  # Bytes per device depend on the arrays' shapes, dtypes and shardings, not their values: the
  # state and the summed gradients (a gradient has its parameter's shape and dtype) are real
  # arrays of zeros placed as the step places them, which spares compiling an initialisation and
  # a backward pass per strategy only to fill them.
  state = jax.tree.map(lambda a: _zeros(a, a.sharding), abstract)
  grads = jax.tree.map(_zeros, state.params,
                       parallel.gradient_shardings(strategy, trainer.dp.layout, state.params))
  batch = trainer.train_batch(0)
  compiled = trainer.train_step.lower(state, batch).compile()
  memory = compiled.memory_analysis()
  collectives = hlo.collective_bytes(compiled.as_text())["buffers"]
  # Which mesh axes each collective's device groups span (only "replica" crosses hosts when a
  # data group is one host's devices).
  by_axes = hlo.bytes_by_axes(compiled.as_text(), dict(trainer.mesh.shape))
  data = trainer.mesh.shape[parallel.DATA]
  return {
      "params_bytes_per_device": state_bytes_per_device(state.params),
      "grads_bytes_per_device": state_bytes_per_device(grads),
      "opt_state_bytes_per_device": state_bytes_per_device(state.opt_state),
      "compiled_temp_bytes": int(memory.temp_size_in_bytes),
      "collective_bytes_per_step": int(sum(BUFFER_PASSES[op] * c["bytes"] for op, c in collectives.items())),
      "compiled_argument_bytes": int(memory.argument_size_in_bytes),
      "compiled_output_bytes": int(memory.output_size_in_bytes),
      "collectives": {op: c for op, c in collectives.items() if c["count"]},
      "paper": paper_bytes(strategy, trainer.dp.layout.params_per_device(abstract.params), data),
      "replicated": parallel.replicated_report(strategy, trainer.dp.layout, abstract),
      "mesh": dict(trainer.mesh.shape),
      "collective_bytes_by_axes": {axes: int(v["bytes"]) for axes, v in by_axes.items()},
  }


def plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
         strategies: Sequence[str] = STRATEGIES) -> dict[str, Any]:
  """{"num_devices", "params", "strategies": {name: measure_strategy(...)}}; dp is left out on a
  mesh with a model axis (it is data parallel only)."""
  from jaxdp.lm.config import validate
  devices = list(jax.devices() if devices is None else devices)
  if config.mesh.model > 1:
    strategies = [s for s in strategies if s != "dp"]
  candidates = {}
  for s in strategies:  # Every candidate checked before any compiles (which take minutes).
    candidates[s] = ml_collections.ConfigDict(config.to_dict())
    candidates[s].strategy = s
    validate(candidates[s], len(devices), devices[0].platform)
  results = {s: measure_strategy(candidates[s], s, devices) for s in strategies}
  # Counted under a candidate: the config's own strategy may be one the mesh rules out (dp).
  params = count_params(build(candidates[strategies[0]], devices).abstract_state().params)
  return {"num_devices": len(devices), "params": params, "strategies": results}


def _human(n: float) -> str:
  for unit in ("B", "KiB", "MiB", "GiB"):
    if abs(n) < 1024 or unit == "GiB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024
  return ""


def format_table(result: dict[str, Any]) -> str:
  """The plan as a terminal table: measured (paper formula) per column."""
  columns = [("params/dev", "params_bytes_per_device"), ("grads/dev", "grads_bytes_per_device"),
             ("opt state/dev", "opt_state_bytes_per_device"),
             ("collectives/step", "collective_bytes_per_step")]
  header = (f"{'strategy':<9}" + "".join(f"{name:>24}" for name, _ in columns) +
            f"{'step args':>12}{'step out':>12}{'step temp':>12}")
  lines = [f"{result['params']:,} parameters on {result['num_devices']} devices; "
           "measured (ZeRO paper formula)", header]
  for name, r in result["strategies"].items():
    cells = "".join(f"{_human(r[key]) + ' (' + _human(r['paper'][key]) + ')':>24}"
                    for _, key in columns)
    lines.append(f"{name:<9}{cells}{_human(r['compiled_argument_bytes']):>12}"
                 f"{_human(r['compiled_output_bytes']):>12}{_human(r['compiled_temp_bytes']):>12}")
  for name, r in result["strategies"].items():
    ops = ", ".join(f"{op} x{c['count']} {_human(c['bytes'])}" for op, c in r["collectives"].items())
    hybrid = f"replica={r['mesh']['replica']} " if "replica" in r["mesh"] else ""
    axes = ", ".join(f"{a} {_human(b)}" for a, b in r["collective_bytes_by_axes"].items())
    lines.append(f"{name}: mesh {hybrid}data={r['mesh']['data']} model={r['mesh']['model']}; "
                 f"collectives: {ops or 'none'}; sent per device by mesh axes: {axes or 'none'}")
    if r["replicated"]:
      kept = ", ".join(f"{x['array']} ({x['why']})" for x in r["replicated"])
      lines.append(f"  kept whole over data ({_human(sum(x['bytes'] for x in r['replicated']))}): {kept}")
  return "\n".join(lines)
