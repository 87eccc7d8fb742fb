"""One prepared check of jaxdp on a machine with NVIDIA GPU(s): one JSON report and one log.

  python tools/gpu_check.py OUTDIR [--dry-run] [--budget_s 420]
  (tools/gpu_check.sh OUTDIR [--dry-run] [--wheels DIR] installs jaxdp first, then runs this)

Each check runs in its own process (a crash, an out-of-memory or a hang costs that check only,
and each bench variant's peak memory is its own), under its own timeout and the run's overall
budget; every result is recorded and a failure never stops the run. Checks:

  environment        versions, devices, the GPU's memory, which packages are installed
  bench_xla_none     tools/bench.py on gpt2_124m (GPT-2's exact shapes: the byte corpus with the
  bench_cudnn_none   vocabulary padded to 50304), bf16, 32 x 1024 tokens per step, one GPU:
  bench_xla_block    tokens/s, step time, MFU against the datasheet and against a bf16 matmul
                     timed in the same run, peak memory, compile time; attention xla vs cudnn,
                     remat none vs block (the first also times a bare jitted loop)
  precisions         fp32, bf16, fp16 (dynamic loss scaling) for 20 steps: finite, decreasing
  offload            zero1 with the optimizer state in pinned host memory vs on the device: the
                     same losses, device bytes saved, step time cost
  zero               dp, zero1, zero2, zero3 on every visible GPU: the same losses, and the
                     collectives of each compiled step (reduce-scatter expected under zero2
                     with more than one GPU)
  determinism        config.reduction="fixed_order" against the default all-reduce on every
                     visible GPU: step time of each and their ratio; each mode trained twice
                     (run-to-run: bitwise equal losses and final parameters expected of
                     fixed_order, reported for the default); with several GPUs fixed_order on
                     all of them against one GPU, bitwise (its XLA options include
                     xla_gpu_deterministic_ops, jaxdp.parallel.fixed_order.compiler_options)
  generate           `jaxdp generate` from a short run: its tokens/s line (KV-cache decoding
                     where the installed jaxdp has it) and tokens per wall second
  pytest_gpu         the `gpu`-marked tests (tests/test_gpu.py)
  compare_torch      tools/bench.py --compare torch: the baby GPT (4 layers, 128 wide, context 64,
                     batch 12) trained by jaxdp and by its PyTorch reference (CUDA, torch.compile)
                     on the same batches: tokens/s of each, ratio_vs_torch, time to target loss

--dry-run runs every check on CPU with tiny sizes (the report is complete, "dry_run": true): CI
runs it so the script cannot rot. Report: OUTDIR/gpu_check.json; log: OUTDIR/gpu_check.log.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BENCH_VARIANTS = {"bench_xla_none": ("xla", "none"), "bench_cudnn_none": ("cudnn", "none"),
                  "bench_xla_block": ("xla", "block")}
# In the order they run: the headline numbers first, so a short budget still records them.
CHECKS = ("environment", "bench_xla_none", "bench_cudnn_none", "compare_torch", "precisions",
          "offload", "zero", "determinism", "generate", "pytest_gpu", "bench_xla_block")
BENCH_FIELDS = ("attention", "attention_used", "remat", "params", "tokens_per_step", "tokens_per_sec",
                "step_time_s", "compile_time_s", "mfu_datasheet", "mfu_measured_peak",
                "datasheet_peak_flops", "measured_peak_flops", "peak_matmul", "flops_per_token_hlo",
                "peak_memory_bytes", "peak_memory_source", "overhead_vs_bare_loop")
# The fields each check's results always hold (None where not applicable, e.g. offload on CPU).
FIELDS = {
    "environment": ("python", "jax_version", "jaxlib_version", "platform", "device_kind",
                    "num_devices", "device_memory_bytes", "packages", "jaxdp_path"),
    **{name: BENCH_FIELDS for name in BENCH_VARIANTS},
    "precisions": ("steps", "fp32", "bf16", "fp16"),
    "offload": ("strategy", "supported", "losses_on_device", "losses_offloaded", "max_loss_diff",
                "device_state_bytes_on_device", "device_state_bytes_offloaded",
                "device_bytes_saved", "step_time_s_on_device", "step_time_s_offloaded",
                "step_time_ratio"),
    "zero": ("num_devices", "losses", "max_rel_diff_vs_dp", "collectives", "reduce_scatter_in_zero2"),
    "determinism": ("num_devices", "steps", "virtual_shards", "step_time_s", "time_ratio",
                    "run_to_run_bitwise", "fixed_order_matches_one_device", "compiler_options"),
    "generate": ("train_steps", "new_tokens", "tokens_per_sec", "tokens_per_sec_line", "cache",
                 "tokens_per_wall_sec", "wall_s"),
    "pytest_gpu": ("returncode", "passed", "failed", "skipped", "errors", "summary"),
    "compare_torch": ("steps", "torch_device", "torch_compile", "jaxdp_tokens_per_sec",
                      "torch_tokens_per_sec", "ratio_vs_torch", "time_to_target_ratio_vs_torch",
                      "target_loss", "loss_difference_at_end"),
}
TIMEOUTS = {"environment": 60, "precisions": 120, "offload": 120, "zero": 120, "determinism": 150,
            "generate": 150,
            "pytest_gpu": 180, "compare_torch": 150, **{name: 150 for name in BENCH_VARIANTS}}
# XLA flags of a dry run's checks (see drive).
DRY_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true",
                 "--xla_cpu_use_fusion_emitters=false")


# ---------------------------------------------------------------------------------------------
# The checks (each runs in its own process: `gpu_check.py OUTDIR --check NAME`). Each returns
# (results, failures): failures is a list of one-line reasons, empty when the check is green.

def _devices(dry: bool):
  import jax
  devices = jax.devices()
  return devices[:2] if dry else devices


def check_environment(dry: bool, outdir: str):
  import importlib.metadata as md

  import jax
  import jaxlib

  import jaxdp
  device = jax.devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  packages = {}
  for name in ("flax", "optax", "orbax-checkpoint", "grain", "ml-collections", "tensorboardX",
               "array-record", "tokenizers", "tqdm", "wandb", "jax-cuda12-plugin",
               "jax-cuda13-plugin", "jax-cuda12-pjrt", "jax-cuda13-pjrt"):
    try:
      packages[name] = md.version(name)
    except md.PackageNotFoundError:
      packages[name] = None
  results = {"python": platform.python_version(), "jax_version": jax.__version__,
             "jaxlib_version": jaxlib.__version__, "platform": device.platform,
             "device_kind": device.device_kind, "num_devices": len(jax.devices()),
             "device_memory_bytes": (stats or {}).get("bytes_limit"), "packages": packages,
             "jaxdp_path": os.path.dirname(jaxdp.__file__)}
  failures = [] if dry or device.platform == "gpu" else [f"no GPU: jax sees {device.platform}"]
  return results, failures


def check_compare_torch(dry: bool, outdir: str):
  """tools/bench.py --compare torch on the first GPU: the baby GPT trained by jaxdp and by the
  PyTorch reference (CUDA, torch.compile where it works), interleaved."""
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "tools", "bench.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  steps = 4 if dry else 1000
  argv = ["--compare", "torch", "--steps", str(steps), "--devices", "1",
          "--round_steps", "2" if dry else "100", "--compare_eval_every", "2" if dry else "200"]
  if dry:
    argv += ["--config.model.n_layer=1", "--config.model.d_model=32", "--config.model.n_head=2",
             "--config.seq_len=16"]
  args, overrides = bench.parse_args(argv)
  report = bench.run_compare(args, overrides)
  compare = report["compare_torch"]
  import compare_torch
  print(compare_torch.table(compare), flush=True)
  results = {"steps": steps, "torch_device": compare["torch_device"],
             "torch_compile": compare["torch_compile"],
             "jaxdp_tokens_per_sec": compare["jaxdp"]["tokens_per_sec"],
             "torch_tokens_per_sec": compare["torch"]["tokens_per_sec"],
             "ratio_vs_torch": report["ratio_vs_torch"],
             "time_to_target_ratio_vs_torch": report["time_to_target_ratio_vs_torch"],
             "target_loss": compare["target_loss"],
             "loss_difference_at_end": compare["loss_difference_at_end"], "argv": argv}
  failures = []
  if not abs(compare["loss_difference_at_end"]) < 1e-2 * abs(compare["torch"]["train_loss_at_end"]):
    failures.append(f"jaxdp and the reference disagree on the loss: {compare['loss_difference_at_end']}")
  return results, failures


def check_bench(name: str, dry: bool, outdir: str):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench", os.path.join(REPO, "tools", "bench.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  import jax
  attention, remat = BENCH_VARIANTS[name]
  gpu = jax.devices()[0].platform == "gpu"
  used = attention if gpu or attention != "cudnn" else "xla"  # cuDNN needs a GPU.
  # The bare jitted loop (framework overhead) once, with the first variant, on the GPU only.
  skip = "scaling,memory,strategies,comm,loader" + ("" if name == "bench_xla_none" and not dry else ",bare")
  if dry:
    argv = ["--config", "tiny_cpu", "--quick", "--steps", "2", "--devices", "1", "--skip", skip,
            "--config.log_every=1", f"--config.attention={used}", f"--config.remat={remat}",
            "--config.precision=bf16", "--config.model.pad_vocab_to_multiple=320",
            "--config.model.n_layer=1"]  # The dry run checks the path, not the model: one block.
  else:
    argv = ["--config", "gpt2_124m", "--steps", "10", "--rounds", "2", "--devices", "1",
            "--skip", skip, "--config.global_batch_size=32", "--config.grad_accum_steps=1",
            "--config.log_every=10", "--config.model.pad_vocab_to_multiple=50304",
            f"--config.attention={used}", f"--config.remat={remat}"]
  args, overrides = bench.parse_args(argv)
  report = bench.run(args, overrides)
  print(bench.table(report), flush=True)
  results = {"attention": attention, "attention_used": used, "remat": remat,
             "params": report["params"], "tokens_per_step": report["tokens_per_step"],
             "tokens_per_sec": report["tokens_per_sec"], "step_time_s": report["step_time_s"],
             "compile_time_s": report["compile_time_s"],
             "mfu_datasheet": report.get("mfu_datasheet"), "mfu_measured_peak": report["mfu"],
             "datasheet_peak_flops": report.get("datasheet_peak_flops"),
             "measured_peak_flops": report["measured_peak_flops"], "peak_matmul": report["peak_matmul"],
             "flops_per_token_hlo": report["flops_per_token_hlo"],
             "peak_memory_bytes": report["peak_memory_bytes"],
             "peak_memory_source": report["peak_memory_source"],
             "overhead_vs_bare_loop": report.get("overhead_vs_bare_loop"), "argv": argv}
  failures = [f"{k} is not finite and positive: {results[k]}" for k in
              ("tokens_per_sec", "step_time_s", "mfu_measured_peak", "peak_memory_bytes")
              if not (isinstance(results[k], (int, float)) and math.isfinite(results[k]) and results[k] > 0)]
  if gpu and results["mfu_datasheet"] is None:
    failures.append(f"no datasheet peak for {jax.devices()[0].device_kind!r} (jaxdp/runtime/peaks.py)")
  return results, failures


def _small_config(dry: bool, **fields):
  from jaxdp.lm.config import load_preset
  c = load_preset("tiny_cpu")
  if not dry:  # A model that keeps a GPU busy for a moment, compiled in seconds.
    c.model.n_layer, c.model.d_model, c.model.n_head, c.seq_len = 4, 256, 4, 256
    c.global_batch_size = 32
  else:  # One block: every check's code path, at half tiny_cpu's compiling (CI runs the dry run).
    c.model.n_layer = 1
  c.learning_rate, c.warmup_steps = 3e-3, 5
  for name, value in fields.items():
    setattr(c, name, value)
  return c


def _train(config, devices, steps: int, trainer=None):
  """(per-step losses, final state, trainer, seconds per step after the first, fetched metrics)
  of `steps` steps of `config` (or of an already built `trainer`)."""
  import jax

  from jaxdp.lm import build
  trainer = trainer or build(config, devices)
  state = trainer.init_state()
  metrics = []
  state, m = trainer.dp.step(state, trainer.train_batch(0))  # Compiles.
  metrics.append(m)
  jax.block_until_ready(m)
  start = time.perf_counter()
  for i in range(1, steps):
    state, m = trainer.dp.step(state, trainer.train_batch(i))
    metrics.append(m)
  jax.block_until_ready((state, metrics))
  per_step = (time.perf_counter() - start) / max(1, steps - 1)
  fetched = jax.device_get(metrics)
  return [float(x["train_loss"]) for x in fetched], state, trainer, per_step, fetched


def check_precisions(dry: bool, outdir: str):
  import jax
  steps = 20
  results, failures = {"steps": steps}, []
  for precision in ("fp32", "bf16", "fp16"):
    fields = {"precision": precision}
    if precision == "fp16" and jax.devices()[0].platform == "cpu":
      fields["attention"] = "reference"  # XLA:CPU has no f16 x f16 -> f32 dot.
    losses, state, _, per_step, fetched = _train(_small_config(dry, **fields), jax.devices()[:1], steps)
    finite = all(math.isfinite(x) for x in losses)
    decreasing = finite and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5
    results[precision] = {"losses": losses, "finite": finite, "decreasing": decreasing,
                          "first_loss": losses[0], "last_loss": losses[-1], "step_time_s": per_step,
                          "skipped_steps": int(state.skipped_steps),
                          "loss_scale": float(fetched[-1]["loss_scale"]) if "loss_scale" in fetched[-1] else None}
    if not decreasing:
      failures.append(f"{precision}: losses not finite and decreasing ({losses[0]:.4g} -> {losses[-1]:.4g})")
  return results, failures


def _device_state_bytes(state) -> int:
  """Bytes of `state` in device memory on the first device (pinned host copies excluded)."""
  import jax
  device = jax.devices()[0]
  total = 0
  for leaf in jax.tree.leaves(state):
    if getattr(leaf.sharding, "memory_kind", None) == "pinned_host":
      continue
    total += sum(s.data.nbytes for s in leaf.addressable_shards if s.device == device)
  return total


def check_offload(dry: bool, outdir: str):
  import jax
  # Full fp32 dots: TF32 (XLA's GPU default) could let two programs round differently.
  jax.config.update("jax_default_matmul_precision", "highest")
  devices = jax.devices()[:1]
  steps = 5 if dry else 10
  config = _small_config(dry, strategy="zero1")
  if not dry:  # Parameters and optimizer state large enough that the saving is plain to see.
    config.model.n_layer, config.model.d_model, config.model.n_head = 8, 1024, 8
    config.global_batch_size, config.seq_len = 8, 256
  losses_dev, state_dev, _, time_dev, _ = _train(config, devices, steps)
  results = {"strategy": "zero1", "losses_on_device": losses_dev,
             "device_state_bytes_on_device": _device_state_bytes(state_dev),
             "step_time_s_on_device": time_dev}
  del state_dev
  offload = config.copy_and_resolve_references()
  offload.offload_optimizer = True
  try:
    losses_off, state_off, _, time_off, _ = _train(offload, devices, steps)
  except Exception as e:  # noqa: BLE001 - XLA:CPU has no pinned host memory space.
    if jax.devices()[0].platform != "cpu":
      raise
    results.update(supported=False, losses_offloaded=None, max_loss_diff=None,
                   device_state_bytes_offloaded=None, device_bytes_saved=None,
                   step_time_s_offloaded=None, step_time_ratio=None,
                   note=f"offload is GPU/TPU only: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return results, []
  diff = max(abs(a - b) for a, b in zip(losses_dev, losses_off))
  results.update(supported=True, losses_offloaded=losses_off, max_loss_diff=diff,
                 device_state_bytes_offloaded=_device_state_bytes(state_off),
                 step_time_s_offloaded=time_off, step_time_ratio=time_off / time_dev)
  results["device_bytes_saved"] = (results["device_state_bytes_on_device"]
                                   - results["device_state_bytes_offloaded"])
  failures = []
  if diff > 1e-5 * max(1.0, abs(losses_dev[0])):
    failures.append(f"offloaded losses differ from on-device ones by {diff:.3g}")
  if results["device_bytes_saved"] <= 0:
    failures.append("offloading saved no device memory")
  return results, failures


def check_zero(dry: bool, outdir: str):
  import jax

  from jaxdp.lm import build
  from jaxdp.parallel.hlo import collective_bytes
  jax.config.update("jax_default_matmul_precision", "highest")  # As in check_offload.
  devices = _devices(dry)
  steps = 5
  results = {"num_devices": len(devices), "losses": {}, "collectives": {}, "max_rel_diff_vs_dp": {}}
  for strategy in ("dp", "zero1", "zero2", "zero3"):
    config = _small_config(dry, strategy=strategy)
    trainer = build(config, devices)
    # Compiled once: the steps below reuse this executable (jit's cache).
    text = trainer.train_step.lower(trainer.abstract_state(), trainer.train_batch(0)).compile().as_text()
    losses, state, trainer, per_step, _ = _train(config, devices, steps, trainer)
    buffers = collective_bytes(text)["buffers"]
    results["losses"][strategy] = losses
    results["collectives"][strategy] = {op: v["count"] for op, v in buffers.items()}
    results.setdefault("step_time_s", {})[strategy] = per_step
  dp = results["losses"]["dp"]
  failures = []
  for strategy, losses in results["losses"].items():
    rel = max(abs(a - b) / max(abs(b), 1e-8) for a, b in zip(losses, dp))
    results["max_rel_diff_vs_dp"][strategy] = rel
    if rel > 1e-4:
      failures.append(f"{strategy}: losses differ from dp by {rel:.3g} (relative)")
  scatter = results["collectives"]["zero2"].get("reduce-scatter", 0) > 0
  results["reduce_scatter_in_zero2"] = scatter if len(devices) > 1 else None
  if len(devices) > 1 and jax.devices()[0].platform == "gpu" and not scatter:
    failures.append("zero2 on several GPUs compiled without a reduce-scatter")
  return results, failures


def check_determinism(dry: bool, outdir: str):
  import jax
  import numpy as np

  from jaxdp.parallel import fixed_order
  devices = _devices(dry)
  steps = 6 if dry else 20
  results = {"num_devices": len(devices), "steps": steps, "virtual_shards": 8, "step_time_s": {},
             "run_to_run_bitwise": {},
             "compiler_options": fixed_order.compiler_options(devices[0].platform)}

  def run(reduction, devs):
    config = _small_config(dry, reduction=reduction, virtual_shards=8)
    losses, state, _, per_step, fetched = _train(config, devs, steps)
    params = [np.asarray(x) for x in jax.tree.leaves(jax.device_get(state.params))]
    norms = [float(m["grad_norm"]) for m in fetched]
    return losses + norms, params, per_step

  def same(a, b):
    return a[0] == b[0] and all(np.array_equal(x, y) for x, y in zip(a[1], b[1]))

  first = {}
  for reduction in ("allreduce", "fixed_order"):
    first[reduction] = run(reduction, devices)
    again = run(reduction, devices)
    results["step_time_s"][reduction] = min(first[reduction][2], again[2])
    results["run_to_run_bitwise"][reduction] = same(first[reduction], again)
  results["time_ratio"] = results["step_time_s"]["fixed_order"] / results["step_time_s"]["allreduce"]
  failures = []
  if not results["run_to_run_bitwise"]["fixed_order"]:
    failures.append("fixed_order: two runs of the same program differ")
  if len(devices) > 1:
    one = run("fixed_order", devices[:1])
    results["fixed_order_matches_one_device"] = same(first["fixed_order"], one)
    if not results["fixed_order_matches_one_device"]:
      failures.append(f"fixed_order on {len(devices)} devices differs from one device")
  else:
    results["fixed_order_matches_one_device"] = None
  return results, failures


def check_generate(dry: bool, outdir: str):
  workdir = os.path.join(outdir, "generate_run")
  steps, new_tokens = (4, 32) if dry else (100, 512)
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  cli = [sys.executable, "-m", "jaxdp.cli.main"]
  train = subprocess.run(cli + ["train", "--config", "tiny_cpu" if dry else "default", "--workdir",
                                workdir, f"--config.num_steps={steps}", "--config.eval_every=0",
                                f"--config.checkpoint_every={steps}", "--config.log_every=2"]
                         + (["--cpu_devices", "2", "--config.model.n_layer=1"] if dry else []),
                         capture_output=True, text=True, env=env, timeout=120)
  print(train.stdout[-2000:], train.stderr[-2000:], flush=True)
  if train.returncode:
    raise RuntimeError(f"jaxdp train exited {train.returncode}: {train.stderr.strip()[-300:]}")
  start = time.perf_counter()
  gen = subprocess.run(cli + ["generate", "--workdir", workdir, "--prompt", "ROMEO:",
                              "--max_new_tokens", str(new_tokens), "--seed", "0"],
                       capture_output=True, text=True, env=env, timeout=120)
  wall = time.perf_counter() - start
  print(gen.stdout[-2000:], gen.stderr[-2000:], flush=True)
  if gen.returncode:
    raise RuntimeError(f"jaxdp generate exited {gen.returncode}: {gen.stderr.strip()[-300:]}")
  # The tokens/s line of a jaxdp that reports it (KV-cache generation); absent in older ones.
  line = next((x for x in (gen.stderr + gen.stdout).splitlines() if "tokens/s" in x), None)
  match = re.search(r"([\d.]+) tokens/s", line or "")
  cache = re.search(r"\((cached|uncached)", line or "")
  results = {"train_steps": steps, "new_tokens": new_tokens,
             "tokens_per_sec": float(match.group(1)) if match else None, "tokens_per_sec_line": line,
             "cache": cache.group(1) if cache else None, "tokens_per_wall_sec": new_tokens / wall,
             "wall_s": wall}
  return results, [] if gen.stdout.startswith("ROMEO:") else ["generate did not echo the prompt"]


def check_pytest_gpu(dry: bool, outdir: str):
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  if not dry:
    env["JAX_PLATFORMS"] = "cuda,cpu"  # tests/conftest.py would otherwise pick the CPU.
  proc = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                         os.path.join(REPO, "tests", "test_gpu.py")],
                        capture_output=True, text=True, env=env, cwd=REPO, timeout=170)
  print(proc.stdout[-6000:], proc.stderr[-2000:], flush=True)
  summary = (proc.stdout.strip().splitlines() or [""])[-1]
  counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
  results = {"returncode": proc.returncode, "passed": counts.get("passed", 0),
             "failed": counts.get("failed", 0), "skipped": counts.get("skipped", 0),
             "errors": counts.get("error", 0) + counts.get("errors", 0), "summary": summary}
  failures = [] if proc.returncode == 0 else [f"pytest -m gpu: {summary}"]
  if not dry and results["passed"] == 0:
    failures.append("no gpu test ran (is the GPU visible to jax?)")
  return results, failures


def run_check(name: str, dry: bool, outdir: str) -> dict:
  if name in BENCH_VARIANTS:
    results, failures = check_bench(name, dry, outdir)
  else:
    results, failures = globals()[f"check_{name}"](dry, outdir)
  missing = [f for f in FIELDS[name] if f not in results]
  if missing:
    failures.append(f"results lack {missing}")
  return {"results": results, "failures": failures}


# ---------------------------------------------------------------------------------------------
# The driver.

def _jsonable(value):
  if isinstance(value, float) and not math.isfinite(value):
    return None
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return value


def headline(checks: dict) -> dict:
  """The numbers a reader looks for first: the best gpt2_124m bf16 variant and each check's status."""
  benches = {n: c["results"] for n, c in checks.items()
             if n in BENCH_VARIANTS and c.get("results", {}).get("tokens_per_sec")}
  best = max(benches, key=lambda n: benches[n]["tokens_per_sec"], default=None)
  out = {"status": {n: c["status"] for n, c in checks.items()}}
  if best:
    b = benches[best]
    out.update(best_bench=best, tokens_per_sec=b["tokens_per_sec"], step_time_s=b["step_time_s"],
               mfu_datasheet=b["mfu_datasheet"], mfu_measured_peak=b["mfu_measured_peak"],
               peak_memory_bytes=b["peak_memory_bytes"],
               # The goal on one H200: MFU >= 50% of the datasheet's dense bf16 peak.
               mfu_goal_met=None if b["mfu_datasheet"] is None else b["mfu_datasheet"] >= 0.5)
  return out


def drive(outdir: str, dry: bool, budget_s: float) -> dict:
  os.makedirs(os.path.join(outdir, "checks"), exist_ok=True)
  log_path = os.path.join(outdir, "gpu_check.log")
  env = dict(os.environ)
  if dry:
    env["JAX_PLATFORMS"] = "cpu"
    # The dry run checks code paths on tiny programs, not their speed: XLA:CPU compiles them in
    # about half the time without LLVM's optimisations (compiling is most of a dry run: 177 s ->
    # 108 s in all), and in about two thirds of that again with its elemental emitter instead of
    # the fusion emitters; every check passes as before. The checks and their children inherit it.
    given = (env.get("XLA_FLAGS") or "").split()
    env["XLA_FLAGS"] = " ".join(given + [f for f in DRY_XLA_FLAGS if f not in given])
  started = time.time()
  report = {"dry_run": dry, "started_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "host": platform.node(), "budget_s": budget_s, "repo": REPO, "checks": {}}
  with open(log_path, "a") as log:
    for name in CHECKS:
      elapsed = time.time() - started
      left = budget_s - elapsed
      entry = {"status": "skipped", "seconds": 0.0, "results": {f: None for f in FIELDS[name]},
               "failures": []}
      if left < 20:
        entry["failures"] = [f"time budget of {budget_s:.0f} s spent before this check"]
        report["checks"][name] = entry
        print(f"gpu_check: {name}: skipped (budget)", flush=True)
        continue
      out = os.path.join(outdir, "checks", f"{name}.json")
      if os.path.exists(out):
        os.remove(out)
      cmd = [sys.executable, os.path.abspath(__file__), outdir, "--check", name] + (["--dry-run"] if dry else [])
      log.write(f"\n===== {name}: {' '.join(cmd)}\n")
      log.flush()
      t0 = time.time()
      # A dry run's sizes are tiny, but a loaded CI machine compiles slowly: more slack.
      limit = TIMEOUTS[name] * (3 if dry else 1)
      # Its own process group: a check that runs past its time is stopped with its children
      # (a `jaxdp train` or pytest it started), which would otherwise hold the GPU.
      proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                              start_new_session=True)
      try:
        rc = proc.wait(timeout=min(limit, left))
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rc = None
      entry["seconds"] = time.time() - t0
      if os.path.exists(out):
        with open(out) as f:
          done = json.load(f)
        entry["results"] = {**entry["results"], **done["results"]}
        entry["failures"] = done["failures"]
        entry["status"] = "pass" if not done["failures"] else "fail"
      else:
        entry["status"] = "error"
        entry["failures"] = ["timed out" if rc is None else f"exited {rc} (see the log)"]
      log.write(f"===== {name}: {entry['status']} in {entry['seconds']:.1f} s {entry['failures']}\n")
      log.flush()
      print(f"gpu_check: {name}: {entry['status']} ({entry['seconds']:.1f} s)"
            + (f": {'; '.join(entry['failures'])}" if entry["failures"] else ""), flush=True)
      report["checks"][name] = entry
  report["total_s"] = time.time() - started
  report["finished_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
  report["all_green"] = all(c["status"] == "pass" for c in report["checks"].values())
  report["headline"] = headline(report["checks"])
  with open(os.path.join(outdir, "gpu_check.json"), "w") as f:
    json.dump(_jsonable(report), f, indent=1)
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("outdir", help="folder for gpu_check.json, gpu_check.log and run files")
  parser.add_argument("--dry-run", action="store_true", help="every check on CPU, tiny sizes")
  parser.add_argument("--budget_s", type=float, default=None,
                      help="stop starting checks after this many seconds (default 420; dry run 1200)")
  parser.add_argument("--check", default=None, help=argparse.SUPPRESS)  # One check, in-process.
  args = parser.parse_args(argv)
  args.outdir = os.path.abspath(args.outdir)  # The checks run with the checkout as their cwd.
  if args.check:
    import jax
    if args.dry_run:
      jax.config.update("jax_num_cpu_devices", 2)
    done = run_check(args.check, args.dry_run, args.outdir)
    with open(os.path.join(args.outdir, "checks", f"{args.check}.json"), "w") as f:
      json.dump(_jsonable(done), f, indent=1)
    return 0
  budget = args.budget_s or (1200.0 if args.dry_run else 420.0)
  report = drive(args.outdir, args.dry_run, budget)
  print(f"gpu_check: {'all green' if report['all_green'] else 'NOT all green'} in "
        f"{report['total_s']:.0f} s; report {os.path.join(args.outdir, 'gpu_check.json')}")
  return 0 if report["all_green"] else 1


if __name__ == "__main__":
  sys.exit(main())
