"""The peak FLOP/s a run's MFU is measured against: a vendor datasheet's dense peak for known
GPUs and TPUs, else a matmul timed on the devices themselves (CPUs, unknown accelerators).

MFU (model FLOPs utilisation, PaLM, Chowdhery et al. 2022, appendix B) = the step's FLOPs per
second / the hardware's peak. The datasheet figures are *dense* (no 2:4 sparsity) tensor-core
peaks per device, in FLOP/s, by compute dtype; fp32 dots run as TF32 under XLA's default
precision on these GPUs, and as bf16 passes on TPUs, so fp32 is compared with those. Sources:

- NVIDIA H100 / H200 datasheets (nvidia.com/en-us/data-center/h100, /h200): H100 SXM and H200
  SXM bf16/fp16 989.4 TFLOP/s, TF32 494.7; H100 PCIe 756 / 378; H200 NVL 835.5 / 417.5 (the
  datasheets print twice these "with sparsity").
- NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): bf16/fp16 312, TF32 156.
- NVIDIA L4 and L40S datasheets: L4 121 / 60; L40S 362 / 183.
- NVIDIA B200 (DGX B200 datasheet, per GPU): bf16 2250, TF32 1100.
- Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e), bf16
  per chip: v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import datetime
import functools
import json
import logging
import math
import os
import socket
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

T = 1e12
# (words of jax's device_kind, {dtype name: dense FLOP/s per device}); checked in order, so the
# more specific name comes first ("H100 PCIe" before "H100").
DATASHEET_PEAK_FLOPS = (
    ("H100 PCIe", {"float32": 378 * T, "bfloat16": 756 * T, "float16": 756 * T}),
    ("H100", {"float32": 494.7 * T, "bfloat16": 989.4 * T, "float16": 989.4 * T}),  # SXM
    ("H200 NVL", {"float32": 417.5 * T, "bfloat16": 835.5 * T, "float16": 835.5 * T}),
    ("H200", {"float32": 494.7 * T, "bfloat16": 989.4 * T, "float16": 989.4 * T}),  # SXM
    ("B200", {"float32": 1100 * T, "bfloat16": 2250 * T, "float16": 2250 * T}),
    ("A100", {"float32": 156 * T, "bfloat16": 312 * T, "float16": 312 * T}),
    ("L40S", {"float32": 183 * T, "bfloat16": 362 * T, "float16": 362 * T}),
    ("L4", {"float32": 60 * T, "bfloat16": 121 * T, "float16": 121 * T}),
    ("TPU v6 lite", {"float32": 918 * T, "bfloat16": 918 * T}),  # v6e (Trillium)
    ("TPU v5 lite", {"float32": 197 * T, "bfloat16": 197 * T}),  # v5e
    ("TPU v5p", {"float32": 459 * T, "bfloat16": 459 * T}),
    ("TPU v5", {"float32": 459 * T, "bfloat16": 459 * T}),  # v5p reports "TPU v5"
    ("TPU v4", {"float32": 275 * T, "bfloat16": 275 * T}),
)


def datasheet_peak_flops(device_kind: str, dtype) -> float | None:
  """Dense peak FLOP/s of one device of `device_kind` (jax's Device.device_kind, e.g. "NVIDIA
  H200") computing in `dtype`; None for CPUs, unknown devices and dtypes without a figure."""
  words = device_kind.replace("-", " ").split()
  for name, peaks in DATASHEET_PEAK_FLOPS:
    if all(part in words for part in name.split()):
      return peaks.get(np.dtype(dtype).name)
  return None


def matmul_flops_per_sec(devices: Sequence[jax.Device], dtype, size: int, reps: int) -> float:
  """Best FLOP/s of `devices` each multiplying two `size` x `size` matrices of `dtype` at once
  (2 size^3 FLOPs each), over `reps` timed calls after a warm-up."""
  mesh = Mesh(np.array(devices), ("d",))
  a = jax.device_put(jnp.ones((len(devices) * size, size), dtype), NamedSharding(mesh, P("d")))
  b = jax.device_put(jnp.ones((size, size), dtype), NamedSharding(mesh, P()))
  matmul = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(matmul(a, b))
  best = math.inf
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a, b))
    best = min(best, time.perf_counter() - start)
  return len(devices) * 2 * size ** 3 / best


@dataclasses.dataclass(frozen=True)
class Peak:
  """The peak FLOP/s of a group of devices together, and where the figure comes from."""
  flops_per_sec: float
  source: str  # "datasheet" or "measured"
  detail: str  # One phrase for the start banner.


def peak_cache_path() -> str:
  """The file of measured peaks: $JAXDP_CACHE_DIR/peaks.json, else jaxdp/peaks.json under
  $XDG_CACHE_HOME (default ~/.cache)."""
  root = os.environ.get("JAXDP_CACHE_DIR") or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxdp")
  return os.path.join(root, "peaks.json")


def _machine_key(devices: tuple[jax.Device, ...], dtype_names: tuple[str, ...]) -> str:
  """What a measured peak belongs to: this host, its devices, the dtypes and the JAX version."""
  return " | ".join([socket.gethostname(), devices[0].platform, devices[0].device_kind,
                     f"{len(devices)} devices", f"{os.cpu_count()} host cores",
                     "+".join(dtype_names), f"jax {jax.__version__}"])


def _read_cache(path: str) -> dict:
  try:
    with open(path) as f:
      entries = json.load(f)
    return entries if isinstance(entries, dict) else {}
  except (OSError, ValueError):  # None yet, unreadable or half-written by hand: measure again.
    return {}


def _write_cache(path: str, key: str, entry: dict) -> bool:
  """Adds `entry` under `key` (atomically: a reader never sees half a file); False where the
  folder cannot be written (the run goes on with the peak it measured)."""
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    entries = dict(_read_cache(path), **{key: entry})
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".peaks-", suffix=".json")
    try:
      with os.fdopen(fd, "w") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    return True
  except OSError as e:
    logging.getLogger(__name__).info("measured peak not cached in %s: %s", path, e)
    return False


def _time_matmuls(devices: tuple[jax.Device, ...], dtype_names: tuple[str, ...]) -> tuple[float, str]:
  # On accelerators a small matmul is launch-bound; on a CPU the cache-resident 512^2 or 1024^2
  # is the fastest (docs/benchmarks.md), and which one varies with the load of the machine.
  sizes = (512, 1024) if devices[0].platform == "cpu" else (4096,)
  groups = [devices[:1], devices] if len(devices) > 1 else [devices]
  best, how = 0.0, ""
  for name in dtype_names:
    for group in groups:
      for size in sizes:
        rate = matmul_flops_per_sec(group, jnp.dtype(name), size, reps=5)
        if rate > best:
          best, how = rate, f"{size}x{size} {name} matmul on {len(group)} device(s) at once"
  return best, how


@functools.cache
def _measured(devices: tuple[jax.Device, ...], dtype_names: tuple[str, ...]) -> Peak:
  """Timed once per machine (host, devices, dtypes, JAX version) and kept in peak_cache_path():
  every later run on the machine divides by the same peak, so MFUs of runs compare, and no run
  spends its start-up (about 0.6 s of 2 CPU cores) timing matmuls again."""
  path, key = peak_cache_path(), _machine_key(devices, dtype_names)
  entry = _read_cache(path).get(key)
  if isinstance(entry, dict) and isinstance(entry.get("flops_per_sec"), (int, float)) \
      and entry["flops_per_sec"] > 0:
    best = float(entry["flops_per_sec"])
    return Peak(best, "measured", f"measured {best / T:.3g} TFLOP/s ({entry.get('how')}, timed "
                                  f"{entry.get('measured_utc')}, kept in {path}; delete it to time again)")
  best, how = _time_matmuls(devices, dtype_names)
  when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  kept = _write_cache(path, key, {"flops_per_sec": best, "how": how, "measured_utc": when})
  return Peak(best, "measured", f"measured {best / T:.3g} TFLOP/s ({how}, timed at start-up"
                                + (f", kept in {path} for later runs)" if kept else ")"))


def step_peak(devices: Sequence[jax.Device], dtype) -> Peak:
  """The peak FLOP/s of `devices` together for a step computing in `dtype`.

  Known GPUs/TPUs: the datasheet's dense peak per device times the devices. Otherwise a matmul
  timed on the devices (a fraction of a second, the first time on this machine; later runs read
  it from peak_cache_path()): in `dtype` and in float32, on one device alone and on all at once
  (emulated CPU devices share the host's cores), the best of these. The hardware's fastest
  matmul is the honest ceiling: a bf16 matmul slower than fp32 (CPUs without bf16 units) must
  not inflate MFU.
  """
  devices = tuple(devices)
  name = np.dtype(dtype).name
  per_device = datasheet_peak_flops(devices[0].device_kind, name)
  if per_device is not None:
    return Peak(per_device * len(devices), "datasheet",
                f"datasheet {per_device / T:.4g} TFLOP/s dense {name} per device "
                f"({devices[0].device_kind}) x {len(devices)}")
  return _measured(devices, tuple(dict.fromkeys((name, "float32"))))
