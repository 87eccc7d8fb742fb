"""`jaxdp plan --measure`: time collectives on the actual mesh, fit the alpha-beta model, predict
each strategy's and communication method's step time, and compare with the measured step.

1. Collectives: all-reduce (psum), reduce-scatter (psum_scatter), all-gather and a ring
   ppermute are compiled over each mesh axis of size > 1 at several message sizes and timed
   (the fastest of the repeats after a warm-up). Each is fitted by least squares to
       t = alpha + beta * buffer_bytes
   where buffer_bytes is the op's full buffer as `analysis.hlo.collective_bytes` reads it from
   the compiled program (an all-reduce's operand, a reduce-scatter's input, an all-gather's
   output, a permute's operand): the same quantity the prediction reads from a step's HLO.
2. A step's prediction is its compute time plus, for every collective in its HLO,
   alpha + beta * buffer (collectives inside loops counted once, as in the byte counts;
   a local-SGD average, which runs every H steps, weighted 1/H).
   Compute time: the candidate's own step (its strategy, optimizer and compression) compiled on
   one device over one device's share of the batch (global batch / data devices): what each
   device computes, collectives of one device being free. When the
   devices are emulated CPU devices of one process, they share the host's cores, so N devices'
   compute takes N / min(N, cores) times as long: that factor is applied and reported.
3. Each candidate step (the strategies dp, zero1, zero2, zero3, and the communication methods
   under dp) is run for real and its step time (fastest repeat) measured beside the prediction.

Timings on a shared CPU are noisy; the report gives every number it used.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from jaxdp import parallel
from jaxdp.analysis import hlo
from jaxdp.parallel import exchange
from jaxdp.runtime.trainer import build

OPS = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute")
SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 19, 1 << 21)  # f32 elements per device (4 KiB .. 8 MiB).
METHODS = {  # Communication methods compared under dp: name -> config overrides.
    "ring": {"allreduce": "ring"},
    "topk 1%": {"compression": "topk", "compression_ratio": 0.01},
    "int8": {"compression": "int8"},
    "powersgd r4": {"compression": "powersgd", "compression_rank": 4},
}


def _seconds(fn: Callable[[], Any], repeats: int) -> float:
  """The fastest of `repeats` timed calls after a warm-up: on a machine shared with other work
  the minimum is the least disturbed estimate, and every timing here uses the same statistic."""
  jax.block_until_ready(fn())  # Warm-up (and compilation).
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def _collective(op: str, axis: str, n: int) -> Callable[[jax.Array], jax.Array]:
  if op == "all-reduce":
    return lambda x: lax.psum(x, axis)
  if op == "reduce-scatter":
    return lambda x: lax.psum_scatter(x, axis, tiled=True)
  if op == "all-gather":
    return lambda x: lax.all_gather(x, axis, tiled=True)
  return lambda x: lax.ppermute(x, axis, [(i, (i + 1) % n) for i in range(n)])


def time_collectives(mesh: Mesh, axis: str, sizes: Sequence[int] = SIZES,
                     repeats: int = 10) -> dict[str, list[dict[str, float]]]:
  """{op: [{"buffer_bytes", "seconds"}, ...]} for each op of OPS over `axis` of `mesh`."""
  n = mesh.shape[axis]
  others = tuple(a for a in mesh.axis_names if a != axis)
  spec = P((axis,) + others)  # One row per device.
  out = {}
  for op in OPS:
    rows = []
    for size in sizes:
      size = -(-size // n) * n  # Reduce-scatter needs a multiple of the group size.
      fn = _collective(op, axis, n)
      mapped = jax.jit(jax.shard_map(lambda x, fn=fn: fn(x[0])[None], mesh=mesh, in_specs=spec,
                                     out_specs=spec, check_vma=False))
      x = jax.device_put(jnp.ones((mesh.size, size), jnp.float32),
                         jax.sharding.NamedSharding(mesh, spec))
      compiled = mapped.lower(x).compile()
      buffers = hlo.collective_bytes(compiled.as_text())["buffers"]
      rows.append({"buffer_bytes": float(buffers[op]["bytes"] / max(buffers[op]["count"], 1)),
                   "seconds": _seconds(lambda c=compiled, x=x: c(x), repeats)})
    out[op] = rows
  return out


def fit_alpha_beta(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  """Least-squares t = alpha + beta * bytes in relative error (weights 1/t, so the small
  messages that fix alpha count as much as the large ones that fix beta), alpha and beta clipped
  at 0: {"alpha_s", "beta_s_per_byte", "bandwidth_bytes_per_s"}."""
  x = np.array([r["buffer_bytes"] for r in rows])
  t = np.array([r["seconds"] for r in rows])
  beta, alpha = np.polyfit(x, t, 1, w=1.0 / np.maximum(t, 1e-12))
  alpha, beta = max(float(alpha), 0.0), max(float(beta), 0.0)
  return {"alpha_s": alpha, "beta_s_per_byte": beta,
          "bandwidth_bytes_per_s": 1.0 / beta if beta > 0 else float("inf")}


def predicted_comm_seconds(hlo_text: str, fits: dict[str, dict[str, float]],
                           cfg: exchange.CommConfig | None = None) -> float:
  """Sum over the HLO's collectives of alpha + beta * buffer (all-to-all timed as all-gather);
  a local-SGD average weighted by how often its branch runs."""
  counted = hlo.collective_bytes(hlo_text)
  total = 0.0
  for op, entry in counted["buffers"].items():
    fit = fits.get(op) or fits["all-gather"]
    total += entry["count"] * fit["alpha_s"] + entry["bytes"] * fit["beta_s_per_byte"]
  if cfg is not None and cfg.sync == "local_sgd" and counted["bytes"] > 0:
    always = counted["bytes"] - counted["conditional_bytes"]
    total *= (always + counted["conditional_bytes"] / cfg.sync_every) / counted["bytes"]
  return total


def _concurrency_factor(devices: Sequence[jax.Device]) -> float:
  """How much longer N emulated CPU devices take to compute than one (they share the cores)."""
  if devices[0].platform != "cpu":
    return 1.0
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return len(devices) / min(len(devices), cores or 1)


def fixed_batch_step(trainer) -> tuple[Callable[[], dict], Any]:
  """(one, compiled): `one()` runs the trainer's compiled step on its step-0 batch, kept on the
  devices, carrying the (donated) state from call to call, and returns the step's metrics; the
  step alone, no loader. `compiled` is the executable (its HLO, memory and cost analyses)."""
  state = trainer.init_state()
  batch = trainer.train_batch(0)
  compiled = trainer.train_step.lower(state, batch).compile()
  holder = {"state": state}

  def one():
    holder["state"], metrics = compiled(holder["state"], batch)
    return metrics
  return one, compiled


def _step_seconds(config: ml_collections.ConfigDict, devices, repeats: int):
  trainer = build(config, devices)
  one, compiled = fixed_batch_step(trainer)
  return _seconds(lambda: one()["train_loss"], repeats), compiled.as_text(), trainer


def measure_plan(config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None,
                 repeats: int = 10, methods: dict[str, dict] | None = None,
                 strategies: Sequence[str] = parallel.ZERO_PARTS.keys(),
                 sizes: Sequence[int] = SIZES) -> dict[str, Any]:
  """Fits, per-candidate predicted and measured step seconds, and the recommendation."""
  devices = list(jax.devices() if devices is None else devices)
  config = ml_collections.ConfigDict(config.to_dict())
  methods = METHODS if methods is None else methods
  probe = build(config, devices)
  mesh = probe.mesh
  fits, timings = {}, {}
  for axis in mesh.axis_names:
    if mesh.shape[axis] > 1:
      timings[axis] = time_collectives(mesh, axis, sizes, repeats)
      fits[axis] = {op: fit_alpha_beta(rows) for op, rows in timings[axis].items()}
  data_fits = fits.get(parallel.DATA) or next(iter(fits.values()), None)
  data = mesh.shape[parallel.DATA]
  factor = _concurrency_factor(devices)

  def compute_seconds(c: ml_collections.ConfigDict) -> float:
    """The candidate's step on one device over one device's share of the batch: its own
    arithmetic (model, optimizer, compression), collectives of size one."""
    single = ml_collections.ConfigDict(c.to_dict())
    single.global_batch_size = c.global_batch_size // data
    single.mesh.data, single.mesh.model = 1, 1
    if single.strategy != "dp" and mesh.shape[parallel.MODEL] > 1:
      single.strategy = "zero1"
    return _step_seconds(single, devices[:1], repeats)[0]
  candidates = [(s, {"strategy": s}) for s in strategies
                if not (s == "dp" and mesh.shape[parallel.MODEL] > 1)]
  candidates += [(f"dp + {name}", dict(overrides, strategy="dp")) for name, overrides in methods.items()
                 if mesh.shape[parallel.MODEL] == 1]
  rows = []
  for name, overrides in candidates:
    c = ml_collections.ConfigDict(config.to_dict())
    c.update(overrides)
    measured, text, trainer = _step_seconds(c, devices, repeats)
    compute_one = compute_seconds(c)
    compute = compute_one * factor
    comm = predicted_comm_seconds(text, data_fits, trainer.dp.comm) if data_fits else 0.0
    predicted = compute + comm
    rows.append({"candidate": name, "predicted_s": predicted, "compute_s": compute,
                 "compute_one_device_s": compute_one,
                 "comm_s": comm, "measured_s": measured,
                 "error": (predicted - measured) / measured,
                 "bytes_per_step": exchange.bytes_per_step(trainer.dp.comm, text)})
  best = min(rows, key=lambda r: r["predicted_s"])
  dense = [r for r in rows if r["candidate"] in strategies]
  reason = (f"{best['candidate']} has the lowest predicted step time, {best['predicted_s'] * 1e3:.2f} ms "
            f"({best['compute_s'] * 1e3:.2f} ms compute + {best['comm_s'] * 1e3:.2f} ms "
            f"communication on the fitted links)")
  if best["candidate"].startswith("dp + "):
    reason += "; a compressed or local method changes the optimisation: check its loss first"
  elif dense and best["comm_s"] < 0.1 * best["compute_s"]:
    reason += "; communication is under 10% of the step, so memory (the table above) decides"
  return {"num_devices": len(devices), "mesh": dict(mesh.shape), "fits": fits,
          "collective_timings": timings, "compute_concurrency_factor": factor, "candidates": rows,
          "recommendation": {"candidate": best["candidate"], "reason": reason}}


def format_measure(result: dict[str, Any]) -> str:
  lines = [f"measured on {result['num_devices']} devices, mesh {result['mesh']}"]
  for axis, fits in result["fits"].items():
    for op, fit in fits.items():
      lines.append(f"  {axis} {op:<19} alpha {fit['alpha_s'] * 1e6:9.1f} us   bandwidth "
                   f"{fit['bandwidth_bytes_per_s'] / 1e9:8.2f} GB/s")
  lines.append(f"compute: each candidate's step on one device over one device's share, x "
               f"{result['compute_concurrency_factor']:.2f} (devices sharing the host's cores)")
  lines.append(f"{'candidate':<18}{'predicted':>12}{'compute':>10}{'comm':>10}{'measured':>11}"
               f"{'error':>8}{'bytes/step':>12}")
  for r in result["candidates"]:
    lines.append(f"{r['candidate']:<18}{r['predicted_s'] * 1e3:>10.2f}ms{r['compute_s'] * 1e3:>8.2f}ms"
                 f"{r['comm_s'] * 1e3:>8.2f}ms{r['measured_s'] * 1e3:>9.2f}ms{r['error']:>+8.0%}"
                 f"{r['bytes_per_step']:>12,.0f}")
  rec = result["recommendation"]
  lines.append(f"recommended: {rec['candidate']}: {rec['reason']}")
  return "\n".join(lines)
