"""`jaxdp plan --measure`: time collectives on the actual mesh, fit the alpha-beta model, predict
each strategy's and communication method's step time, and compare with the measured step.

1. Collectives: all-reduce (psum), reduce-scatter (psum_scatter), all-gather and a ring
   ppermute are compiled over each mesh axis of size > 1 at several message sizes, one array
   each, and at one size split into several arrays (XLA's combiners merge a step's many
   gradient arrays into one collective of many operands), and timed (the fastest of the
   repeats after a warm-up). Each op is fitted by least squares to
       t = alpha + delta * (operands - 1) + beta * buffer_bytes
   where buffer_bytes is the op's full buffer as `parallel.hlo.collective_bytes` reads it from
   the compiled program (an all-reduce's operand, a reduce-scatter's input, an all-gather's
   output, a permute's operand): the same quantities the prediction reads from a step's HLO.
   Each time is net of a program that moves nothing (its launch and synchronisation), which
   the step's compute time already holds once: what is fitted is what a collective adds.
   alpha is measured directly: a program of CHAIN dependent collectives of the smallest size
   against one, (t_CHAIN - t_1) / (CHAIN - 1), the latency each adds back to back inside a
   program (a ZeRO-3 step runs about a hundred); delta and beta are then fitted.
   delta, the cost of each further operand, matters on emulated CPU devices, where an
   all-reduce of 50 arrays costs several times one of their concatenation.
2. A step's prediction is its compute time plus, for every collective in its HLO,
   alpha + delta * (operands - 1) + beta * buffer (collectives inside loops counted once, as in
   the byte counts; a local-SGD average, which runs every H steps, weighted 1/H).
   Compute time: the candidate's own step (its strategy, optimizer and compression) compiled on
   one device over one device's share of the batch (global batch / data devices): what each
   device computes, collectives of one device being free, times a concurrency factor measured
   once per mesh: the dp step run on the whole mesh with no collective executing (local SGD
   whose averaging never comes due), over the same step on one device. It is about 1 where each
   device has its own hardware; for emulated CPU devices sharing the host's cores it holds the
   sharing and the one launch the devices share. (A mesh with a model axis, where local SGD does
   not apply, times one copy of the one-device step per device at once instead.)
3. Each candidate step (the strategies dp, zero1, zero2, zero3, and the communication methods
   under dp) is run for real and its step time (fastest repeat) measured beside the prediction.

Timings on a shared CPU are noisy; the report gives every number it used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import functools
import json
import time
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from jaxdp import parallel
from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.parallel import exchange, hlo

OPS = ("all-reduce", "reduce-scatter", "all-gather", "collective-permute")
SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 19, 1 << 21)  # f32 elements per device (4 KiB .. 8 MiB).
SPLITS = (8, 64)  # Operands of the multi-array probes (a step's gradients are tens of arrays).
CHAIN = 16  # Dependent collectives in the latency probe (a ZeRO-3 step runs about a hundred).
METHODS: dict[str, dict[str, Any]] = {  # Communication methods compared under dp: name -> config overrides.
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


def _chained(op: str, axis: str, n: int) -> Callable[[jax.Array], jax.Array]:
  """The op followed by a local reshaping back to its input's shape, so CHAIN of them depend on
  each other (XLA can neither combine nor drop them)."""
  fn = _collective(op, axis, n)
  if op == "reduce-scatter":
    return lambda x: jnp.tile(fn(x), n)
  if op == "all-gather":
    return lambda x: fn(x)[:x.shape[0]]
  return fn


def time_collectives(mesh: Mesh, axis: str, sizes: Sequence[int] = SIZES,
                     repeats: int = 10, splits: Sequence[int] = SPLITS,
                     ) -> dict[str, list[dict[str, float]]]:
  """{op: [{"buffer_bytes", "operands", "seconds", "program_s"}, ...]} for each op of OPS over
  `axis` of `mesh`: one array of each size in `sizes`, then the middle size split into each
  count of `splits` arrays (fewer where the size does not allow it).

  "program_s" is the whole program's time; "seconds" is that minus the time of a program that
  moves nothing (a 1-element array doubled on every device: the launch and synchronisation
  every program pays), i.e. what the collective adds inside a program, as it does inside a
  step whose launch the compute time already holds."""
  n = mesh.shape[axis]
  others = tuple(a for a in mesh.axis_names if a != axis)
  spec = P((axis,) + others)  # One row per device.
  sharding = jax.sharding.NamedSharding(mesh, spec)
  tiny = jax.device_put(jnp.ones((mesh.size, 1), jnp.float32), sharding)
  empty = jax.jit(jax.shard_map(lambda x: x * 2, mesh=mesh, in_specs=spec, out_specs=spec))
  launches = []  # Timed before every probe; the least disturbed (fastest) is the launch cost.
  shapes = [(-(-size // n) * n,) for size in sizes]  # Reduce-scatter needs multiples of n.
  middle = sizes[len(sizes) // 2]
  for k in splits:
    part = max(middle // k // n, 1) * n
    shapes.append((part,) * k)
  out = {}
  for op in OPS:
    rows = []
    for parts in shapes:
      launches.append(_seconds(lambda: empty(tiny), repeats))
      fn = _collective(op, axis, n)
      mapped = jax.jit(jax.shard_map(lambda *xs, fn=fn: tuple(fn(x[0])[None] for x in xs),
                                     mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False))
      xs = [jax.device_put(jnp.ones((mesh.size, size), jnp.float32), sharding) for size in parts]
      compiled = mapped.lower(*xs).compile()
      text = compiled.as_text()
      if text is None:
        raise JaxdpError(f"plan --measure: the {jax.default_backend()} backend gives no text of its "
                         "compiled programs, so collective bytes cannot be counted; measure on "
                         "CPU or GPU")
      buffers = hlo.collective_bytes(text)["buffers"][op]
      rows.append({"buffer_bytes": float(buffers["bytes"] / max(buffers["count"], 1)),
                   "operands": float(buffers["operands"] / max(buffers["count"], 1)),
                   "program_s": _seconds(functools.partial(compiled, *xs), repeats)})
    # Latency: CHAIN dependent ops of the smallest size against one; their difference over
    # CHAIN - 1 is what each collective adds back to back inside a program, as in a step.
    size = -(-sizes[0] // n) * n
    x = jax.device_put(jnp.ones((mesh.size, size), jnp.float32), sharding)
    timed = {}
    for k in (1, CHAIN):
      def body(x, k=k, fn=_chained(op, axis, n)):
        y = x[0]
        for _ in range(k):
          y = fn(y)
        return y[None]
      compiled = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec,
                                       check_vma=False)).lower(x).compile()
      timed[k] = _seconds(functools.partial(compiled, x), repeats)
    rows.append({"buffer_bytes": rows[0]["buffer_bytes"], "operands": 1.0, "chain": CHAIN,
                 "program_s": timed[CHAIN], "single_program_s": timed[1]})
    out[op] = rows
  launch = min(launches)
  for rows in out.values():
    for row in rows:
      row["seconds"] = max(row["program_s"] - launch, 1e-7)
  return out


def fit_alpha_beta(rows: Sequence[dict[str, float]]) -> dict[str, float]:
  """Fits t = alpha + delta * (operands - 1) + beta * bytes, each coefficient clipped at 0; rows
  without "operands" have one. alpha comes from a "chain" row when there is one (a program of
  `chain` dependent collectives against one, "program_s" and "single_program_s": alpha is their
  difference over chain - 1), else from the intercept; delta and beta by least squares in
  relative error (weights 1/t, so small messages count as much as large ones). Returns
  {"alpha_s", "delta_s_per_operand", "beta_s_per_byte", "bandwidth_bytes_per_s"}."""
  chains = [r for r in rows if r.get("chain", 1) > 1]
  rows = [r for r in rows if r.get("chain", 1) <= 1]
  x = np.array([r["buffer_bytes"] for r in rows])
  k = np.array([r.get("operands", 1.0) - 1.0 for r in rows])
  t = np.array([r["seconds"] for r in rows])
  w = 1.0 / np.maximum(t, 1e-12)
  extra = [k] if np.any(k > 0) else []
  if chains:
    alpha = float(np.median([(r["program_s"] - r["single_program_s"]) / (r["chain"] - 1)
                             for r in chains]))
    alpha = max(alpha, 0.0)
    coef = np.linalg.lstsq(np.stack([x] + extra, 1) * w[:, None], (t - alpha) * w, rcond=None)[0]
    beta, delta = coef[0], (coef[1] if extra else 0.0)
  else:
    coef = np.linalg.lstsq(np.stack([np.ones_like(t), x] + extra, 1) * w[:, None], t * w,
                           rcond=None)[0]
    alpha, beta, delta = coef[0], coef[1], (coef[2] if extra else 0.0)
  alpha, beta, delta = max(float(alpha), 0.0), max(float(beta), 0.0), max(float(delta), 0.0)
  return {"alpha_s": alpha, "delta_s_per_operand": delta, "beta_s_per_byte": beta,
          "bandwidth_bytes_per_s": 1.0 / beta if beta > 0 else float("inf")}


def predicted_comm_seconds(hlo_text: str, fits: dict[str, dict[str, float]],
                           cfg: exchange.CommConfig | None = None) -> float:
  """Sum over the HLO's collectives of alpha + delta * (operands - 1) + beta * buffer
  (all-to-all timed as all-gather); a local-SGD average weighted by how often its branch runs."""
  counted = hlo.collective_bytes(hlo_text)
  total = 0.0
  for op, entry in counted["buffers"].items():
    fit = fits.get(op) or fits["all-gather"]
    total += (entry["count"] * fit["alpha_s"] + entry["bytes"] * fit["beta_s_per_byte"]
              + (entry["operands"] - entry["count"]) * fit.get("delta_s_per_operand", 0.0))
  if cfg is not None and cfg.sync == "local_sgd" and counted["bytes"] > 0:
    always = counted["bytes"] - counted["conditional_bytes"]
    total *= (always + counted["conditional_bytes"] / cfg.sync_every) / counted["bytes"]
  return total


def concurrency_factor(config: ml_collections.ConfigDict, devices: Sequence[jax.Device],
                       repeats: int) -> dict[str, float]:
  """How much longer a one-device step takes when every device of `devices` runs a copy at once
  than when one runs alone: {"factor", "one_s", "all_s"}. `config` is a one-device config
  (mesh 1 x 1). Emulated CPU devices share the host's cores, so their factor is up to N; devices
  with their own hardware give about 1. Timed on this process's devices only."""
  local = [d for d in devices if d.process_index == jax.process_index()]
  steps = [fixed_batch_step(build(config, [d]))[0] for d in local]
  alone = _seconds(lambda: steps[0]()["train_loss"], repeats)
  together = _seconds(lambda: [one()["train_loss"] for one in steps], repeats)  # Async dispatch.
  return {"factor": max(together / alone, 1.0), "one_s": alone, "all_s": together}


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
                 sizes: Sequence[int] = SIZES, splits: Sequence[int] = SPLITS) -> dict[str, Any]:
  """Fits, per-candidate predicted and measured step seconds, and the recommendation."""
  devices = list(jax.devices() if devices is None else devices)
  config = ml_collections.ConfigDict(config.to_dict())
  methods = METHODS if methods is None else methods
  probe = build(config, devices)
  mesh = probe.mesh
  fits, timings = {}, {}
  for axis in mesh.axis_names:
    if mesh.shape[axis] > 1:
      timings[axis] = time_collectives(mesh, axis, sizes, repeats, splits)
      fits[axis] = {op: fit_alpha_beta(rows) for op, rows in timings[axis].items()}
  data_fits = fits.get(parallel.DATA) or next(iter(fits.values()), None)
  data = mesh.shape[parallel.DATA] * dict(mesh.shape).get(parallel.REPLICA, 1)  # Batch shards.

  def one_device(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The candidate on one device over one device's share of the batch: its own arithmetic
    (model, optimizer, compression), collectives of size one."""
    single = ml_collections.ConfigDict(c.to_dict())
    single.global_batch_size = c.global_batch_size // data
    single.mesh.data, single.mesh.model, single.mesh.replica = 1, 1, 1
    if single.strategy != "dp" and mesh.shape[parallel.MODEL] > 1:
      single.strategy = "zero1"
    return single
  one_device_s: dict[str, float] = {}  # One timing per one-device config: dp's is the reference.

  def one_device_seconds(c: ml_collections.ConfigDict) -> float:
    single = one_device(c)
    key = json.dumps(single.to_dict(), sort_keys=True, default=str)
    if key not in one_device_s:
      one_device_s[key] = _step_seconds(single, devices[:1], repeats)[0]
    return one_device_s[key]
  reference = ml_collections.ConfigDict(config.to_dict())
  reference.update(strategy="dp", compression="none")
  if mesh.shape[parallel.MODEL] == 1:
    # The mesh's compute in one program with no collective running: the dp step as local SGD
    # that never averages (the averaging branch is not taken), against the same step on one
    # device over one share. Their ratio is the concurrency factor every candidate's one-device
    # compute is scaled by (devices sharing cores, and one launch for all of them).
    local = ml_collections.ConfigDict(reference.to_dict())
    local.update(sync="local_sgd", sync_every=1 << 30)
    mesh_s = _step_seconds(local, devices, repeats)[0]
    one_s = one_device_seconds(reference)
    concurrency = {"factor": max(mesh_s / one_s, 1.0), "one_s": one_s, "all_s": mesh_s,
                   "method": "the dp step without collectives (local SGD that never averages) "
                             "on the mesh / the dp step on one device over one share"}
  else:  # Local SGD needs a pure data mesh: time one copy per device at once instead.
    concurrency = dict(concurrency_factor(one_device(reference), devices, repeats),
                       method="one copy of the one-device step per device at once / one alone")
  factor = concurrency["factor"]
  candidates = [(s, {"strategy": s}) for s in strategies
                if not (s == "dp" and mesh.shape[parallel.MODEL] > 1)]
  candidates += [(f"dp + {name}", dict(overrides, strategy="dp")) for name, overrides in methods.items()
                 if mesh.shape[parallel.MODEL] == 1]
  rows = []
  for name, overrides in candidates:
    c = ml_collections.ConfigDict(config.to_dict())
    c.update(overrides)
    measured, text, trainer = _step_seconds(c, devices, repeats)
    compute_one = one_device_seconds(c)
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
          "collective_timings": timings, "compute_concurrency_factor": factor,
          "compute_concurrency": concurrency, "candidates": rows,
          "recommendation": {"candidate": best["candidate"], "reason": reason}}


def format_measure(result: dict[str, Any]) -> str:
  """The `jaxdp plan --measure` report of `measure_plan`'s result: link fits, then one line per
  candidate (predicted, compute, comm and measured step times in ms; bytes per step).
  """
  lines = [f"measured on {result['num_devices']} devices, mesh {result['mesh']}"]
  for axis, fits in result["fits"].items():
    for op, fit in fits.items():
      lines.append(f"  {axis} {op:<19} alpha {fit['alpha_s'] * 1e6:9.1f} us   per further array "
                   f"{fit.get('delta_s_per_operand', 0.0) * 1e6:7.1f} us   bandwidth "
                   f"{fit['bandwidth_bytes_per_s'] / 1e9:8.2f} GB/s")
  lines.append(f"compute: each candidate's step on one device over one device's share, x "
               f"{result['compute_concurrency_factor']:.2f} (measured: "
               f"{result['compute_concurrency']['method']})")
  lines.append(f"{'candidate':<18}{'predicted':>12}{'compute':>10}{'comm':>10}{'measured':>11}"
               f"{'error':>8}{'bytes/step':>12}")
  for r in result["candidates"]:
    lines.append(f"{r['candidate']:<18}{r['predicted_s'] * 1e3:>10.2f}ms{r['compute_s'] * 1e3:>8.2f}ms"
                 f"{r['comm_s'] * 1e3:>8.2f}ms{r['measured_s'] * 1e3:>9.2f}ms{r['error']:>+8.0%}"
                 f"{r['bytes_per_step']:>12,.0f}")
  rec = result["recommendation"]
  lines.append(f"recommended: {rec['candidate']}: {rec['reason']}")
  return "\n".join(lines)
