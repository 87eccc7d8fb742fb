"""`tools/bench.py --profile`: where one train step's time goes, in jaxdp and in the PyTorch reference.

jaxdp's step is traced with `jax.profiler` (XLA:CPU or GPU events per device), and every traced
kernel is given the category of its HLO instruction in the compiled step (`categories`):
  matmul        a fusion or op that contains a dot or convolution (the GEMMs, attention's two);
  elementwise   fusions of elementwise ops, copies, transposes, broadcasts, gathers;
  reduction     fusions that contain a reduce (layer-norm statistics, softmax sums, norms);
  collective    all-reduce, all-gather, reduce-scatter, collective-permute (the gradient exchange);
  sync wait     a device waiting at a rendezvous for the others (on a CPU host the emulated
                devices share the cores, so this is the time one device's thread is not running).
The reference's step (tools/torch_reference.py, the same model, batch and AdamW) is profiled
with `torch.profiler`: each operator's self CPU time, with matmul = aten's mm/addmm/bmm and the
fused attention kernel, optimizer = the fused AdamW update and gradient clipping.

Reported per side: milliseconds per step (per device for jaxdp: the devices run in parallel),
share of the profiled time and kernels per step, per category; the step time with and without
the profiler (a profiler adds a cost per event, so the shares are of the profiled step).
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time
from typing import Any

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
# Profiler events of an XLA thread that are not kernels: the executor's own span around all of
# them, the "end:" markers of asynchronous kernels, thread-pool bookkeeping, and on the PjRt client's
# threads the launch of an execution ("[0] CommonPjRtLoadedExecutable::Execute (jit_train_step)",
# argument and output buffer handling).
_WRAPPERS = ("ThunkExecutor", "end:", "ThreadpoolListener", "SlinkyThreadPool", "CommonPjRt",
             "AllocateOutputBuffers", "Handle input", "[")
# XLA:CPU starts a step's thunks on the PjRt client thread that launched it and continues on its
# Eigen pool after the first hand-off, so which thread runs a kernel (the gradient all-reduce
# included) depends on scheduling: both kinds of thread hold kernels.
_CPU_KERNEL_THREADS = ("tf_XLAEigen", "tf_XLAPjRtCpuClient")
_WAITS = ("Rendezvous", "InvokeRendezvous", "Wait for rendezvous callback", "Wait:")


def _computations(hlo_text: str) -> dict[str, list[str]]:
  """{computation name: its instruction lines} of a compiled module's text."""
  bodies: dict[str, list[str]] = {}
  current = None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      current = head.group(1)
      bodies[current] = []
    elif line.startswith("}"):
      current = None
    elif current is not None:
      bodies[current].append(line)
  return bodies


_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%([\w.\-]+) = .*? ([\w\-]+)\(")


def categories(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: category} for every instruction of a compiled module (`as_text()`);
  a fusion takes the category of what it calls (a dot anywhere inside makes it a matmul)."""
  bodies = _computations(hlo_text)
  memo: dict[str, set[str]] = {}

  def opcodes(name: str) -> set[str]:
    if name not in memo:
      memo[name] = set()
      for line in bodies.get(name, []):
        found = _INSTRUCTION.match(line)
        if found:
          memo[name].add(found.group(2))
        for called in re.findall(r"(?:calls|to_apply)=%([\w.\-]+)", line):
          memo[name] |= opcodes(called)
    return memo[name]

  out = {}
  for body in bodies.values():
    for line in body:
      found = _INSTRUCTION.match(line)
      if not found:
        continue
      name, op = found.groups()
      called = re.search(r"calls=%([\w.\-]+)", line)
      ops = opcodes(called.group(1)) | {op} if called else {op}
      if op.split("-start")[0] in COLLECTIVES:
        out[name] = "collective"
      elif "dot" in ops or "convolution" in ops or "custom-call" in ops and "matmul" in line:
        out[name] = "matmul"
      elif "reduce" in ops or "reduce-window" in ops:
        out[name] = "reduction"
      else:
        out[name] = "elementwise"
  return out


def _summary(ms: dict[str, float], kernels: dict[str, float], steps: int, per: int) -> dict:
  total = sum(ms.values()) or 1.0
  return {c: {"ms_per_step": ms[c] / steps / per, "share": ms[c] / total,
              "kernels_per_step": kernels[c] / steps / per} for c in sorted(ms, key=lambda c: -ms[c])}


def jaxdp_profile(dp, state, batches: list, hlo_text: str) -> tuple[Any, dict]:
  """Traces `dp.step` over `batches` (already placed; the step compiled and warm); returns
  (state, {"untraced_step_ms", "traced_step_ms", "categories": {category: {"ms_per_step",
  "share", "kernels_per_step"}}, "uncategorised_ms_per_step"}), per device and step.

  Raises:
    RuntimeError: the trace holds no device kernels (a profiler that records nothing here).
  """
  import jax
  from jax.profiler import ProfileData

  start = time.perf_counter()
  for batch in batches:
    state, metrics = dp.step(state, batch)
  jax.block_until_ready(metrics)
  untraced = (time.perf_counter() - start) / len(batches)
  with tempfile.TemporaryDirectory() as trace_dir:
    jax.profiler.start_trace(trace_dir)
    start = time.perf_counter()
    for batch in batches:
      state, metrics = dp.step(state, batch)
    jax.block_until_ready(metrics)
    traced = (time.perf_counter() - start) / len(batches)
    jax.profiler.stop_trace()
    path, = glob.glob(os.path.join(trace_dir, "plugins", "profile", "*", "*.xplane.pb"))
    profile = ProfileData.from_file(path)
  kind = categories(hlo_text)
  ms: dict[str, float] = collections.defaultdict(float)
  kernels: dict[str, float] = collections.defaultdict(float)
  unknown = 0.0
  for plane in profile.planes:
    gpu = plane.name.startswith("/device:GPU")
    for line in plane.lines:
      # A GPU's device plane has an "XLA Ops" line of HLO instructions (this GPU path has not run
      # yet: no GPU lent).
      if not (line.name.startswith(_CPU_KERNEL_THREADS) if not gpu else line.name == "XLA Ops"):
        continue
      for event in line.events:
        if event.name.startswith(_WRAPPERS):
          continue
        category = "sync wait" if event.name.startswith(_WAITS) else kind.get(event.name)
        if category is None:
          unknown += event.duration_ns / 1e6
          continue
        ms[category] += event.duration_ns / 1e6
        kernels[category] += 1
  if not ms:
    raise RuntimeError("the jax.profiler trace holds no device kernels")
  n = dp.mesh.devices.size
  return state, {"untraced_step_ms": untraced * 1e3, "traced_step_ms": traced * 1e3,
                 "devices": n, "categories": _summary(ms, kernels, len(batches), n),
                 "uncategorised_ms_per_step": unknown / len(batches) / n}


_TORCH_MATMUL = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                 "aten::_scaled_dot_product_flash_attention_for_cpu",
                 "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
_TORCH_OPTIMIZER = ("aten::_fused_adamw_", "aten::_foreach", "Optimizer.", "aten::linalg_vector_norm",
                    "aten::clamp", "aten::_foreach_norm")


def _torch_category(name: str) -> str:
  if name.startswith(_TORCH_MATMUL):
    return "matmul"
  if name.startswith(_TORCH_OPTIMIZER):
    return "optimizer and clipping"
  if any(r in name for r in ("sum", "mean", "norm", "softmax", "max", "logsumexp")):
    return "reduction"
  return "elementwise"


def torch_profile(run_step, steps: int) -> dict:
  """Profiles `run_step()` (one reference train step) `steps` times with torch.profiler; returns
  {"untraced_step_ms", "traced_step_ms", "categories": {...}} of the operators' self CPU time
  (only leaf work counts, so nothing is counted twice)."""
  import torch

  start = time.perf_counter()
  for _ in range(steps):
    run_step()
  untraced = (time.perf_counter() - start) / steps
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      run_step()
    traced = (time.perf_counter() - start) / steps
  ms: dict[str, float] = collections.defaultdict(float)
  kernels: dict[str, float] = collections.defaultdict(float)
  for event in prof.key_averages():
    if event.self_cpu_time_total <= 0 or event.key.startswith("ProfilerStep"):
      continue
    category = _torch_category(event.key)
    ms[category] += event.self_cpu_time_total / 1e3
    kernels[category] += event.count
  return {"untraced_step_ms": untraced * 1e3, "traced_step_ms": traced * 1e3, "devices": 1,
          "categories": _summary(ms, kernels, steps, 1)}


def profile(config, devices, steps: int) -> dict[str, Any]:
  """Both sides' profiles of the baby config's step (compare_torch.BABY unless overridden),
  after `steps` warm-up steps each, over the next `steps` steps."""
  import compare_torch
  from flax.core import meta
  import jax
  import torch
  import torch_reference as ref

  import jaxdp

  built = jaxdp.build(config, devices)
  dp = built.dp
  state = dp.init_state(built.model.init_fn, config.seed)
  batches = [built.train_batch(i) for i in range(2 * steps)]
  hlo_text = dp.train_step.lower(state, batches[0]).compile().as_text()
  for batch in batches[:steps]:
    state, metrics = dp.step(state, batch)
  jax.block_until_ready(metrics)
  state, jaxdp_side = jaxdp_profile(dp, state, batches[steps:], hlo_text)

  torch.set_num_threads(os.cpu_count() or 1)
  model = ref.GPT(ref.GPTShape.of(built.model.cfg))
  ref.load_jaxdp_params(model, meta.unbox(jax.device_get(state.params)))
  optimizer, _ = ref.make_optimizer(
      model, learning_rate=config.learning_rate, weight_decay=config.weight_decay, b1=config.b1,
      b2=config.b2, warmup_steps=config.warmup_steps,
      decay_steps=config.lr_decay_steps or config.num_steps, min_lr_ratio=config.min_lr_ratio)
  torch_batch = compare_torch._torch_batch(built.dataset.train(0), "cpu")  # noqa: SLF001

  def torch_step():
    loss = ref.loss_fn(model, torch_batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if config.grad_clip:
      torch.nn.utils.clip_grad_norm_(model.parameters(), float(config.grad_clip))
    optimizer.step()

  for _ in range(steps):
    torch_step()
  return {"steps": steps, "tokens_per_step": config.global_batch_size * config.seq_len,
          "jaxdp": jaxdp_side, "torch": torch_profile(torch_step, steps),
          "torch_threads": torch.get_num_threads()}


def table(report: dict) -> str:
  """Both profiles side by side: ms per step and share per category."""
  names = sorted(set(report["jaxdp"]["categories"]) | set(report["torch"]["categories"]),
                 key=lambda c: -report["jaxdp"]["categories"].get(c, {}).get("ms_per_step", 0.0))
  lines = [f"{'category':<24} {'jaxdp ms/step/device':>22} {'torch ms/step':>16}"]
  for c in names:
    cells = []
    for side in ("jaxdp", "torch"):
      entry = report[side]["categories"].get(c)
      cells.append("-" if entry is None else f"{entry['ms_per_step']:.2f} ({entry['share']:.0%})")
    lines.append(f"{c:<24} {cells[0]:>22} {cells[1]:>16}")
  for side in ("jaxdp", "torch"):
    s = report[side]
    lines.append(f"{side}: step {s['untraced_step_ms']:.1f} ms without the profiler, "
                 f"{s['traced_step_ms']:.1f} ms with it")
  return "\n".join(lines)
