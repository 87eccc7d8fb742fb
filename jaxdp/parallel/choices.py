"""Data parallelism's named choices and the rules of a gradient exchange, without JAX.

The lists and `check_comm` live here once: `DataParallel` and `CommConfig` check their arguments
with them, and the language-model app's config validation calls the same functions with its
field prefix ("config."), so a rule has one wording whichever door it is met at. Importing
this module does not import JAX (the command line refuses a bad value before loading it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from jaxdp.errors import need

STRATEGIES = ("dp", "zero1", "zero2", "zero3")  # Replicated state, or ZeRO stages 1-3 under jit.
NAN_POLICIES = ("halt", "skip")  # A non-finite step stops the run, or its update is dropped.
ALLREDUCE = ("pmean", "ring", "ps")  # XLA all-reduce, explicit ppermute ring, parameter server.
COMPRESSION = ("none", "topk", "randomk", "int8", "bf16", "powersgd")
COMPRESSION_OPTIMIZERS = ("none", "frozen_variance")  # frozen_variance: 1-bit Adam.
SYNC = ("every_step", "local_sgd", "stale")
# How the gradients are summed over devices: XLA's all-reduce (fast; its order of addition
# depends on the device count) or jaxdp.parallel.fixed_order (the same bits on any device count).
REDUCTIONS = ("allreduce", "fixed_order")


def is_dense(allreduce: str, compression: str, sync: str) -> bool:
  """True for the default exchange: one XLA all-reduce of the gradients every step."""
  return allreduce == "pmean" and compression == "none" and sync == "every_step"


def check_comm(fields: Mapping[str, Any], where: str = "CommConfig.") -> None:
  """Checks the exchange fields (CommConfig's names: allreduce, compression, ...): each a known
  choice or in range, and the combinations that work.

  `where` prefixes each field named in a message: "CommConfig." for the library, "config." for
  the language-model app's config.

  Raises:
    JaxdpError: the first field that cannot work, named with its fix.
  """
  f = fields
  for name, choices in (("allreduce", ALLREDUCE), ("compression", COMPRESSION), ("sync", SYNC),
                        ("compression_optimizer", COMPRESSION_OPTIMIZERS)):
    need(f[name] in choices, f"{where}{name}={f[name]!r} is not one of {', '.join(choices)}")
  need(0 < f["compression_ratio"] <= 1,
       f"{where}compression_ratio={f['compression_ratio']} must be in (0, 1]")
  need(0 <= f["momentum_correction"] < 1,
       f"{where}momentum_correction={f['momentum_correction']} must be in [0, 1)")
  need(f["compression_rank"] >= 1,
       f"{where}compression_rank={f['compression_rank']} must be >= 1 (the rank of PowerSGD's factors)")
  need(f["compression_warmup_steps"] >= 0,
       f"{where}compression_warmup_steps={f['compression_warmup_steps']} must be >= 0 (0: no warm-up)")
  need(f["local_grad_clip"] >= 0,
       f"{where}local_grad_clip={f['local_grad_clip']} must be >= 0 (0: no local clipping)")
  if f["compression_optimizer"] == "frozen_variance" and f["compression"] != "none":
    need(f["compression"] != "powersgd",
         f"{where}compression_optimizer='frozen_variance' compresses the momentum elementwise; use "
         f"{where}compression=topk, randomk, int8 or bf16 with it")
    need(f["compression_warmup_steps"] >= 1,
         f"{where}compression_optimizer='frozen_variance' needs {where}compression_warmup_steps >= 1 "
         "(the dense steps that estimate Adam's variance; 1-bit Adam uses 15-25% of the run)")
    need(f["sync"] == "every_step",
         f"{where}compression_optimizer='frozen_variance' needs {where}sync='every_step' (got "
         f"{f['sync']!r})")
  need(f["momentum_correction"] == 0 or f["compression"] in ("topk", "randomk"),
       f"{where}momentum_correction={f['momentum_correction']} needs {where}compression="
       f"'topk' or 'randomk' (got {f['compression']!r}); set it to 0")
  need(f["sync_every"] >= 1, f"{where}sync_every={f['sync_every']} must be >= 1")
  need(f["staleness"] >= 0, f"{where}staleness={f['staleness']} must be >= 0")
  need(f["sync"] != "local_sgd" or f["compression"] == "none",
       f"{where}sync='local_sgd' averages parameters uncompressed; set {where}compression='none' "
       f"(got {f['compression']!r})")
  need(not f["diloco"] or f["sync"] == "local_sgd",
       f"{where}diloco=True needs {where}sync='local_sgd' (got {f['sync']!r})")
  need(f["outer_lr"] > 0, f"{where}outer_lr={f['outer_lr']} must be positive")
  need(0 <= f["outer_momentum"] < 1,
       f"{where}outer_momentum={f['outer_momentum']} must be in [0, 1)")


def check_step(*, strategy: str, precision: str, nan_policy: str, comm: Mapping[str, Any],
               mesh_model: int = 1, mesh_replica: int = 1, offload_optimizer: bool = False,
               where: str = "", comm_where: str = "comm.", reduction: str = "allreduce",
               virtual_shards: int = 8, data_devices: int | None = None) -> None:
  """Checks how a data-parallel step is asked to run: the strategy, precision and NaN policy
  are known choices, and they fit the mesh and the exchange (`comm`, CommConfig's fields).

  `where`/`comm_where` prefix the fields named in a message: "" and "comm." for `DataParallel`'s
  arguments, "config." for the language-model app's config.

  Raises:
    JaxdpError: the first setting that cannot work, named with its fix.
  """
  from jaxdp.core.choices import PRECISIONS
  for name, value, choices in (("strategy", strategy, STRATEGIES),
                               ("nan_policy", nan_policy, NAN_POLICIES),
                               ("precision", precision, PRECISIONS)):
    need(value in choices, f"{where}{name}={value!r} is not one of {', '.join(choices)}")
  dense = is_dense(comm["allreduce"], comm["compression"], comm["sync"])
  to_dense = (f"set {comm_where}allreduce='pmean', {comm_where}compression='none', "
              f"{comm_where}sync='every_step'")
  need(mesh_replica == 1 or dense,
       f"{where}mesh.replica={mesh_replica} supports only the dense all-reduce; {to_dense}, or "
       f"{where}mesh.replica=1")
  need(mesh_model == 1 or strategy != "dp",
       f"{where}mesh.model={mesh_model} needs a jit strategy (zero1, zero2, zero3); "
       f"{where}strategy='dp' is data parallel only")
  need(not (offload_optimizer and strategy == "dp"),
       f"{where}offload_optimizer=True needs a ZeRO strategy; set {where}strategy=zero1, zero2 or "
       "zero3")
  need(dense or strategy == "dp",
       f"{where}strategy={strategy!r} supports only the dense all-reduce; {to_dense}, or "
       f"{where}strategy='dp'")
  need(comm["sync"] != "local_sgd" or precision != "fp16",
       f"{comm_where}sync='local_sgd' has no loss scaling; use {where}precision='fp32' or 'bf16'")
  check_reduction(reduction=reduction, virtual_shards=virtual_shards, dense=dense,
                  mesh_model=mesh_model, mesh_replica=mesh_replica,
                  offload_optimizer=offload_optimizer, data_devices=data_devices, where=where,
                  to_dense=to_dense)


def is_power_of_two(n: int) -> bool:
  """True for 1, 2, 4, 8, ..."""
  return n >= 1 and n & (n - 1) == 0


def check_reduction(*, reduction: str, virtual_shards: int, dense: bool = True, mesh_model: int = 1,
                    mesh_replica: int = 1, offload_optimizer: bool = False,
                    data_devices: int | None = None, where: str = "",
                    to_dense: str = "use the dense exchange") -> None:
  """Checks `reduction` and, for "fixed_order", what it covers: a power-of-two virtual shard
  count that the data-parallel device count divides (also a power of two), the dense exchange,
  and a plain data mesh (no model or replica axis, no offloaded optimizer state).

  Raises:
    JaxdpError: the first setting that cannot work, named with its fix.
  """
  need(reduction in REDUCTIONS,
       f"{where}reduction={reduction!r} is not one of {', '.join(REDUCTIONS)}")
  if reduction != "fixed_order":
    return
  need(isinstance(virtual_shards, int) and is_power_of_two(virtual_shards),
       f"{where}virtual_shards={virtual_shards!r} must be a power of two (1, 2, 4, ..., e.g. 64): "
       "the fixed-order reduction adds shards in a balanced binary tree")
  need(dense, f"{where}reduction='fixed_order' sums the full gradients in a fixed tree; "
       f"{to_dense}, or {where}reduction='allreduce' for compression, another exchange or local SGD")
  need(mesh_model == 1, f"{where}reduction='fixed_order' is data parallel only; set "
       f"{where}mesh.model=1, or {where}reduction='allreduce' for tensor parallelism")
  need(mesh_replica == 1, f"{where}reduction='fixed_order' needs a plain data mesh; set "
       f"{where}mesh.replica=1, or {where}reduction='allreduce' for hybrid sharding")
  need(not offload_optimizer, f"{where}reduction='fixed_order' keeps the optimizer state on the "
       f"device; set {where}offload_optimizer=False, or {where}reduction='allreduce'")
  if data_devices is not None:
    # No power of two is divisible by a count that is not one: raising virtual_shards cannot help.
    other = (f"set {where}virtual_shards to a power of two that {data_devices} divides"
             if is_power_of_two(data_devices) else f"{where}reduction='allreduce'")
    need(is_power_of_two(data_devices) and virtual_shards % data_devices == 0,
         f"{where}reduction='fixed_order' runs on a power-of-two device count that divides "
         f"{where}virtual_shards={virtual_shards}, not {data_devices} devices; use "
         f"{qualifying(virtual_shards)} devices, or {other}")


def qualifying(virtual_shards: int) -> str:
  """The device counts the fixed-order reduction runs on: '1, 2, 4 or 8' for 8 virtual shards."""
  counts = [str(2 ** k) for k in range(virtual_shards.bit_length()) if 2 ** k <= virtual_shards]
  return counts[0] if len(counts) == 1 else ", ".join(counts[:-1]) + " or " + counts[-1]
