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
import functools
import math
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


@functools.cache
def _measured(devices: tuple[jax.Device, ...], dtype_names: tuple[str, ...]) -> Peak:
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
  return Peak(best, "measured", f"measured {best / T:.3g} TFLOP/s ({how}, timed at start-up)")


def step_peak(devices: Sequence[jax.Device], dtype) -> Peak:
  """The peak FLOP/s of `devices` together for a step computing in `dtype`.

  Known GPUs/TPUs: the datasheet's dense peak per device times the devices. Otherwise a matmul
  timed now (a fraction of a second, once per process and device group): in `dtype` and in
  float32, on one device alone and on all at once (emulated CPU devices share the host's cores),
  the best of these. The hardware's fastest matmul is the honest ceiling: a bf16 matmul slower
  than fp32 (CPUs without bf16 units) must not inflate MFU.
  """
  devices = tuple(devices)
  name = np.dtype(dtype).name
  per_device = datasheet_peak_flops(devices[0].device_kind, name)
  if per_device is not None:
    return Peak(per_device * len(devices), "datasheet",
                f"datasheet {per_device / T:.4g} TFLOP/s dense {name} per device "
                f"({devices[0].device_kind}) x {len(devices)}")
  return _measured(devices, tuple(dict.fromkeys((name, "float32"))))
