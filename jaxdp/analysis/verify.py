"""Does a parallel setup compute what one device computes? `jaxdp verify` answers with numbers.

The reference is the plain global step (`steps.train_step`, axis_name=None) jitted on one
device; each case runs the same config, data and steps under a strategy and mesh shape on N
devices. The result per case is the largest relative difference of the losses (step by step)
and of the final parameters (per array, max |a - b| / max |b|). Every run uses the config with
warmup_steps=0, so that the compared steps move the parameters at the full learning rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxdp.core import step as steps
from jaxdp.lm.builder import LMRun, build
from jaxdp.lm.config import model_hidden

# Float32 sums in another order differ in the last bits: losses agree to ~1e-6. Parameters drift
# further because Adam divides by sqrt(nu): an element with a tiny second moment turns a last-bit
# gradient difference into a visible step (measured ~5e-5 after 10 tiny_cpu steps). A real mistake
# (a missing average, a wrong shard) moves both by 1e-2 or more within a few steps.
DEFAULT_TOLERANCE = {"loss": 1e-5, "params": 1e-3}


@dataclasses.dataclass(frozen=True)
class Case:
  """One way to run the config: a strategy on a (data, model) mesh, or (replica, data, model)
  with replica > 1 (hybrid sharding).

  `compile_step`, if given, replaces `parallel.compile_train_step` (layout, loss_fn, tx, state
  sharding) -> step: how tests check that verify catches a broken strategy.
  """
  name: str
  strategy: str
  data: int = 0
  model: int = 1
  replica: int = 1
  compile_step: Callable[..., Callable] | None = None


def default_cases(config: ml_collections.ConfigDict, num_devices: int) -> list[Case]:
  """Every strategy on all devices, each ZeRO stage on a (N/2) x 2 mesh when heads allow, and
  dp and each ZeRO stage on a hybrid mesh of 2 replica groups of N/2 devices (N >= 4)."""
  cases = [Case(s, s) for s in ("dp", "zero1", "zero2", "zero3")]
  if num_devices >= 4 and num_devices % 2 == 0:
    cases += [Case(f"{s}@r2x{num_devices // 2}", s, num_devices // 2, replica=2)
              for s in ("dp", "zero1", "zero2", "zero3")]
  hidden = model_hidden(config)
  kv = config.model.n_kv_head or config.model.n_head
  if (num_devices >= 4 and num_devices % 2 == 0 and config.model.n_head % 2 == 0 and hidden % 2 == 0
      and kv % 2 == 0):
    cases += [Case(f"{s}@{num_devices // 2}x2", s, num_devices // 2, 2)
              for s in ("zero1", "zero2", "zero3")]
  return cases


def case_config(config: ml_collections.ConfigDict, case: Case) -> ml_collections.ConfigDict:
  """`config` run as `case` (the reference is Case("reference", "dp") on one device)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.strategy, config.mesh.data, config.mesh.model = case.strategy, case.data, case.model
  config.mesh.replica = case.replica
  config.offload_optimizer = False
  # Warmup's first steps use a small fraction of the learning rate, so they barely move the
  # parameters and would hide a wrong gradient; the comparison runs the schedule without it.
  config.warmup_steps = 0
  return config


def run_trainer(trainer: LMRun, num_steps: int) -> tuple[list[float], Any, Any]:
  """(losses of steps 0..num_steps-1, final state, trainer) from a fresh state."""
  state = trainer.init_state()
  metrics = []
  for step in range(num_steps):
    state, m = trainer.train_step(state, trainer.train_batch(step))
    metrics.append(m)
  return [float(m["train_loss"]) for m in jax.device_get(metrics)], state, trainer


def run_reference(config: ml_collections.ConfigDict, device: jax.Device, num_steps: int):
  """The plain global step, jitted on one device."""
  trainer = build(case_config(config, Case("reference", "dp")), [device])
  trainer.dp.train_step = jax.jit(functools.partial(
      steps.train_step, loss_fn=trainer.model.loss_fn, tx=trainer.tx,
      compute_dtype=trainer.dp.compute_dtype))
  return run_trainer(trainer, num_steps)


def run_case(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], case: Case,
             num_steps: int):
  """(losses, final state, trainer) of `num_steps` steps of `case` on `devices` (see run_trainer)."""
  trainer = build(case_config(config, case), devices)
  if case.compile_step is not None:
    trainer.dp.train_step = case.compile_step(trainer.dp.layout, trainer.model.loss_fn,
                                              trainer.tx, trainer.state_sharding)
  return run_trainer(trainer, num_steps)


def relative_differences(losses, state, ref_losses, ref_state) -> dict[str, float]:
  """{"loss": max over steps of |loss - ref| / |ref|, "params": max over arrays of
  max|p - ref| / max|ref|} (dimensionless).
  """
  loss = max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses))
  leaves = zip(jax.tree.leaves(jax.device_get(state.params)),
               jax.tree.leaves(jax.device_get(ref_state.params)))
  params = max(float(np.max(np.abs(a - b)) / np.max(np.abs(b))) for a, b in leaves)
  return {"loss": float(loss), "params": params}


def verify(config: ml_collections.ConfigDict, devices: Sequence[jax.Device], num_steps: int,
           cases: Sequence[Case] | None = None, tolerance: dict[str, float] | None = None,
           report: Callable[[str], None] = lambda line: None) -> dict[str, dict[str, Any]]:
  """{case name: {"mesh", "loss", "params", "ok"}} against the one-device reference."""
  devices = list(devices)
  tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
  cases = default_cases(config, len(devices)) if cases is None else cases
  ref_losses, ref_state, _ = run_reference(config, devices[0], num_steps)
  results = {}
  for case in cases:
    losses, state, trainer = run_case(config, devices, case, num_steps)
    diff = relative_differences(losses, state, ref_losses, ref_state)
    mesh = dict(trainer.mesh.shape)
    results[case.name] = dict(diff, mesh=mesh, ok=all(diff[k] <= tolerance[k] for k in diff))
    hybrid = f"replica={mesh['replica']} " if "replica" in mesh else ""
    report(f"{case.name:<14} mesh {hybrid}data={mesh['data']} model={mesh['model']}  "
           f"loss rel diff {diff['loss']:.2e}  params rel diff {diff['params']:.2e}  "
           f"{'ok' if results[case.name]['ok'] else 'FAIL'}")
  return results
