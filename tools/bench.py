"""Benchmarks the jaxdp train step against the hardware it runs on; JSON out, a table on the terminal.

  python tools/bench.py [--config PRESET|PATH] [--config.FIELD=VALUE ...] [--quick] [--out FILE]
                        [--steps N] [--skip scaling,memory,strategies,comm] [--cpu_devices 8]
                        [--devices N]
  python tools/bench.py --loader_data PREPARED_DIR,TOKENS.bin [--loader_batch 512]
                        [--loader_seq_len 1024] [--step_tokens_per_sec R] [--steps N]
  python tools/bench.py --generate 256 [--prompt_len 16] [--config ...] [--out FILE]
  python tools/bench.py --reduction_cost [--config PRESET] [--steps N] [--out FILE]
  python tools/bench.py --profile [--steps 20] [--devices N] [--config.FIELD=VALUE ...] [--out FILE]
  python tools/bench.py --compare torch [--steps 2000] [--round_steps 100] [--target_loss L]
                        [--devices N] [--torch_compile auto|on|off] [--config.FIELD=VALUE ...]

Every figure is a measurement of this run (ratios compare numbers taken in the same process):
  tokens_per_sec, step_time_s      jaxdp.runtime.loop.fit itself, as `jaxdp train` runs it
                                   (prefetched real batches, DataParallel.step, the loop's hooks,
                                   metrics fetched every log_every), --steps steps after one
                                   warm-up log window, on `--devices`
                                   devices (default: every accelerator; on a CPU host one emulated
                                   device per core, the data-parallel layout for a CPU);
  overhead_vs_bare_loop            jaxdp step time / a bare jitted loop of the same model, loss,
                                   optimizer and batch shape on the same devices (params
                                   replicated, batch split by jit, already on device) - 1;
  flops_per_token_hlo / _formula   compiled `cost_analysis()` FLOPs (per-device program x devices)
                                   / tokens; 6N + 12 L T D beside it;
  measured_peak_flops              best FLOP/s of 1024^2 and 2048^2 matmuls this run, on one device
                                   and on all the step's devices at once (the largest counts);
  mfu                              flops_per_token_hlo * tokens_per_sec / measured_peak_flops;
  mfu_datasheet                    the same over the vendor's dense peak (known GPUs only);
  scaling                          tokens/s at 1, 2, 4, 8 devices, weak (fixed per-device batch) and
                                   strong (fixed global batch), with efficiency = speed-up / devices;
  loader_headroom                  host batches/s of the data loader / steps/s of the step;
                                   --loader_data times only the loader on the given paths
                                   (default 512 x 1024 tokens per step), see loader_report;
  compile_time_s, memory           lower+compile seconds; compiled.memory_analysis() per strategy x
                                   precision.
  --generate N                     instead of the above: greedy tokens/s of N new tokens with the
                                   key/value cache and without it, and the speed-up, on one device.
  --compare torch                  instead: the same GPT, init, AdamW, batches and data trained by
                                   jaxdp and by a PyTorch reference (tools/torch_reference.py) in
                                   interleaved rounds on the same threads: tokens/s of each,
                                   ratio_vs_torch, losses, time and tokens to a target eval loss,
                                   time_to_target_ratio_vs_torch (tools/compare_torch.py).
  --profile                        instead: where one step of the --compare baby config goes,
                                   jaxdp traced by jax.profiler (per device, kernels grouped by
                                   their HLO instruction: matmul, elementwise, reduction,
                                   collective, sync wait) beside the PyTorch reference's operators
                                   under torch.profiler (tools/profile_step.py).
  --reduction_cost                 instead: config.reduction="fixed_order" against the default
                                   all-reduce on 2, 4 and 8 devices (capped at the devices there
                                   are): bytes each device sends per step, from the compiled step's
                                   HLO (parallel.hlo.collective_bytes), and the step time (median
                                   of interleaved rounds of --steps steps), with their ratios.
On a CPU host the "devices" are emulated: they share the host's cores, so scaling efficiency
measures overhead, not a real speed-up.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # compare_torch, torch_reference


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="default", help="preset name or config file")
  parser.add_argument("--out", default=None, help="write the JSON report here")
  parser.add_argument("--quick", action="store_true", help="few steps, 1-2 devices, fp32 only")
  parser.add_argument("--steps", type=int, default=None, help="timed steps per measurement")
  parser.add_argument("--skip", default="",
                      help="comma list of sections: bare,scaling,memory,loader,strategies,comm")
  parser.add_argument("--cpu_devices", type=int, default=8, help="emulated CPU devices")
  parser.add_argument("--rounds", type=int, default=5, help="interleaved jaxdp/bare rounds")
  parser.add_argument("--devices", type=int, default=0,
                      help="devices of the headline step (0: all accelerators, or one per core on CPU)")
  parser.add_argument("--loader_data", default="",
                      help="only time the data loader: comma list of data paths (prepared dirs, .bin)")
  parser.add_argument("--loader_batch", type=int, default=512, help="--loader_data: rows per step")
  parser.add_argument("--loader_seq_len", type=int, default=1024, help="--loader_data: tokens per row")
  parser.add_argument("--step_tokens_per_sec", type=float, default=0.0,
                      help="--loader_data: the step's rate, for headroom (0: not reported)")
  parser.add_argument("--generate", type=int, default=0, metavar="N",
                      help="instead: time greedy generation of N new tokens, cached vs uncached")
  parser.add_argument("--prompt_len", type=int, default=16, help="--generate: prompt tokens")
  parser.add_argument("--compare", default="", choices=("", "torch"),
                      help="instead: train the baby config (tools/compare_torch.py) with jaxdp and "
                           "with a PyTorch reference of the same model, interleaved, and compare")
  parser.add_argument("--round_steps", type=int, default=100, help="--compare: steps per timed round")
  parser.add_argument("--compare_eval_every", type=int, default=100,
                      help="--compare: steps between evaluations (time to target is read at them)")
  parser.add_argument("--target_loss", type=float, default=None,
                      help="--compare: eval loss target (default: the higher final eval loss of the two)")
  parser.add_argument("--torch_compile", choices=("auto", "on", "off"), default="auto",
                      help="--compare: torch.compile the reference (auto: on GPU only)")
  parser.add_argument("--profile", action="store_true",
                      help="profile the --compare baby config's step, jaxdp beside PyTorch")
  parser.add_argument("--reduction_cost", action="store_true",
                      help="bytes/step and step time: reduction=fixed_order vs the default")
  args, rest = parser.parse_known_args(argv)
  overrides = {}
  for arg in rest:
    if not arg.startswith("--config.") or "=" not in arg:
      parser.error(f"unknown argument {arg!r}; override fields as --config.FIELD=VALUE")
    name, value = arg[len("--config."):].split("=", 1)
    overrides[name] = value
  return args, overrides


def apply_overrides(config, overrides: dict[str, str]):
  """--config.FIELD=VALUE, with VALUE parsed as a Python literal (else kept as a string)."""
  from jaxdp.errors import JaxdpError
  from jaxdp.lm.config import field_names
  valid = set(field_names(config))
  for name, text in overrides.items():
    if name not in valid:
      raise JaxdpError(f"unknown config field {name!r}; valid fields: {', '.join(sorted(valid))}")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    node = config
    *parents, leaf = name.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def timed(fn, steps: int) -> float:
  """Seconds per call of fn() over `steps` calls after one warm-up call; fn returns arrays."""
  import jax
  jax.block_until_ready(fn())
  start = time.perf_counter()
  out = None
  for _ in range(steps):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / steps


def measured_peak_flops(devices, dtype, size: int, reps: int) -> float:
  """Best FLOP/s of `devices` each multiplying two size x size matrices at once (2 size^3 each)."""
  from jaxdp.runtime.peaks import matmul_flops_per_sec
  return matmul_flops_per_sec(devices, dtype, size, reps)


def datasheet_peak_flops(device_kind: str, dtype) -> float | None:
  """The datasheet's dense peak of one device (table and sources: jaxdp/runtime/peaks.py)."""
  from jaxdp.runtime.peaks import datasheet_peak_flops as peak
  return peak(device_kind, dtype)


def bare_step_fn(module, tx, mesh):
  """The reference loop's step: mean token loss, grad, optimizer update; nothing else.

  `module` is the Flax module of the model (a LanguageModel's `.module`), applied directly.

  Plain `jax.jit` over `mesh`: parameters and optimizer state replicated, the batch split over
  its rows, and XLA inserts the gradient all-reduce, as a user without jaxdp would write it.
  """
  import jax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P
  import optax

  def step(params, opt_state, inputs, targets):
    def loss_fn(p):
      logits = module.apply({"params": p}, inputs)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P(mesh.axis_names))
  return jax.jit(step, in_shardings=(replicated, replicated, rows, rows),
                 out_shardings=(replicated, replicated, replicated), donate_argnums=(0, 1))


def jaxdp_tokens_per_sec(trainer, steps: int) -> tuple[float, float]:
  """(step seconds, tokens/s) of `jaxdp.runtime.loop.fit` itself, as `jaxdp train` runs it:
  the loader's prefetch thread, `DataParallel.step`, the loop's per-step hooks (watchdog, step
  watch, checkpoint check) and its metrics fetch every `log_every` steps. fit runs one log
  window to warm up, then `steps` more (rounded up to whole windows); the time per step is the
  timed windows' total over their steps, read from metrics.jsonl (evaluation and checkpoints
  off, so no window holds a pause)."""
  import io
  import tempfile

  import numpy as np

  from jaxdp.runtime import loop
  from jaxdp.runtime.metrics import read_metrics
  cfg = trainer.config
  every = max(1, cfg.log_every)
  windows = -(-steps // every)
  tokens_per_step = cfg.global_batch_size * cfg.seq_len
  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()), \
       contextlib.redirect_stderr(io.StringIO()):
    loop.fit(trainer.dp, trainer.model.init_fn, trainer.train_batch, workdir=workdir,
             num_steps=(windows + 1) * every, seed=cfg.seed, log_every=every, progress=False,
             tokens_per_step=tokens_per_step, keep_last=1)
    rates = [m["tokens_per_sec"] for m in read_metrics(workdir) if "tokens_per_sec" in m][1:]
  seconds = float(np.mean([tokens_per_step / r for r in rates]))  # Equal windows: a plain mean.
  return seconds, tokens_per_step / seconds


def fixed_batch_tokens_per_sec(trainer, steps: int) -> float:
  """tokens/s of the compiled step alone on one batch kept on the devices (no loader)."""
  from jaxdp.analysis.measure import fixed_batch_step
  one, _ = fixed_batch_step(trainer)
  seconds = timed(one, steps)
  return trainer.config.global_batch_size * trainer.config.seq_len / seconds


def formula_flops_per_token(n_params: int, cfg) -> float:
  """6N (matmuls, forward + backward) + 12 L T D (attention scores and values)."""
  m = cfg.model
  return 6 * n_params + 12 * m.n_layer * cfg.seq_len * m.d_model


def run(args, overrides) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxdp.core.precision import compute_dtype
  from jaxdp.core.tree import count_params
  from jaxdp.errors import JaxdpError
  from jaxdp.lm import build, model_flops_per_device
  from jaxdp.lm.config import load_preset
  from jaxdp.parallel.choices import STRATEGIES
  from jaxdp.runtime import observe

  def config_with(**fields):
    config = apply_overrides(load_preset(args.config), overrides)
    for name, value in fields.items():
      config[name] = value
    return config

  config = config_with()
  skip = set(filter(None, args.skip.split(",")))
  steps = args.steps or (3 if args.quick else 10)
  devices = jax.devices()
  device = devices[0]
  report = {"config": args.config, "overrides": overrides, "quick": args.quick, "steps": steps,
            "device": device.device_kind, "platform": device.platform,
            "num_devices_available": len(devices), "host_cores": os.cpu_count(),
            "precision": config.precision, "global_batch_size": config.global_batch_size,
            "seq_len": config.seq_len, "tokens_per_step": config.global_batch_size * config.seq_len}

  # The headline step: on a CPU host one emulated device per core (a single XLA:CPU device
  # leaves cores idle outside the matmuls), on accelerators every device.
  n_step = args.devices or (min(os.cpu_count() or 1, len(devices)) if device.platform == "cpu"
                            else len(devices))
  if n_step > len(devices) or config.global_batch_size % n_step:
    raise JaxdpError(f"--devices {n_step}: need at most {len(devices)} devices, dividing "
                     f"global_batch_size {config.global_batch_size}; pick another --devices")
  step_devices = devices[:n_step]
  report["step_devices"] = n_step
  trainer = build(config, step_devices)
  state = trainer.init_state()
  batch = trainer.train_batch(0)
  start = time.perf_counter()
  compiled = trainer.train_step.lower(state, batch).compile()
  report["compile_time_s"] = time.perf_counter() - start
  n_params = count_params(state.params)
  report["params"] = n_params

  # The bare loop: same model, optimizer, batch shape and devices, batch already on the devices.
  bare = bare_step_fn(trainer.model.module, trainer.tx, trainer.mesh) if "bare" not in skip else None
  fresh = trainer.init_state()
  rows = config.global_batch_size
  inputs = jnp.asarray(np.asarray(batch["inputs"]).reshape(rows, -1))
  targets = jnp.asarray(np.asarray(batch["targets"]).reshape(rows, -1))
  holder = {"params": fresh.params, "opt_state": fresh.opt_state}
  if bare is not None:
    bare_compiled = bare.lower(holder["params"], holder["opt_state"], inputs, targets).compile()
    inputs, targets = (jax.device_put(x, bare_compiled.input_shardings[0][2]) for x in (inputs, targets))
  del fresh

  def bare_once():
    holder["params"], holder["opt_state"], loss = bare_compiled(holder["params"], holder["opt_state"],
                                                                inputs, targets)
    return loss

  # Interleaved rounds, alternating which loop goes first, so load from other processes and
  # order effects hit both alike; the overhead is the median of the per-round ratios.
  # The matmul peak is timed in every round too (one device alone, and all step devices at
  # once), and the best of all is the peak: the machine's speed drifts between runs, and MFU
  # must divide by a peak measured alongside the step.
  rounds = 1 if args.quick else args.rounds
  peak_dtype = compute_dtype(config.precision)
  # On CPU the smaller, cache-resident products win; accelerators need large ones to reach peak.
  if device.platform == "cpu":
    sizes = (1024,) if args.quick else (1024, 2048)
  else:
    sizes = (4096,) if args.quick else (4096, 8192)
  reps = 3 if args.quick else 10
  groups = {"one_device": devices[:1], "all_step_devices": step_devices} if n_step > 1 else {
      "one_device": devices[:1]}
  pairs, peaks = [], {f"{name}/{size}": [] for name in groups for size in sizes}
  with_bare = "bare" not in skip
  for r in range(rounds):
    if r % 2 and with_bare:
      bare_s = timed(bare_once, steps)
      step_s, _ = jaxdp_tokens_per_sec(trainer, steps)
    else:
      step_s, _ = jaxdp_tokens_per_sec(trainer, steps)
      bare_s = timed(bare_once, steps) if with_bare else math.nan
    pairs.append((step_s, bare_s))
    for name, group in groups.items():
      for size in sizes:
        peaks[f"{name}/{size}"].append(measured_peak_flops(group, peak_dtype, size, reps))
  step_s = float(np.median([p[0] for p in pairs]))
  bare_s = float(np.median([p[1] for p in pairs]))
  tokens_per_sec = report["tokens_per_step"] / step_s
  report["step_time_s"], report["tokens_per_sec"] = step_s, tokens_per_sec
  report["bare_step_time_s"] = bare_s
  report["bare_tokens_per_sec"] = report["tokens_per_step"] / bare_s
  report["overhead_rounds"] = [{"jaxdp_step_s": a, "bare_step_s": b} for a, b in pairs]
  report["overhead_vs_bare_loop"] = float(np.median([a / b for a, b in pairs])) - 1
  # Peak device memory: the allocators' high-water mark where the backend keeps one (GPU, TPU),
  # else the compiled step's memory_analysis() estimate for one device.
  allocator = observe.allocator_peak_bytes(step_devices)
  report["peak_memory_bytes"] = allocator if allocator is not None else observe.compiled_peak_bytes(compiled)
  report["peak_memory_source"] = "memory_stats" if allocator is not None else "memory_analysis"

  # FLOPs: from the compiled step's HLO (one device's program, times the devices: each runs the
  # model on its rows), and from the formula.
  # A looped step (accumulation, remat scan) is counted on its loop-free lowering (see
  # jaxdp.lm.builder.model_flops_per_device): XLA counts a loop body once.
  per_device = model_flops_per_device(config, trainer.dataset.tokenizer.vocab_size,
                                              step_devices, batch)
  report["flops_per_step_hlo"] = (per_device or observe.compiled_flops(compiled)) * n_step
  report["flops_per_token_hlo"] = report["flops_per_step_hlo"] / report["tokens_per_step"]
  report["flops_per_token_formula"] = formula_flops_per_token(n_params, config)
  best = max(peaks, key=lambda k: max(peaks[k]))
  report["measured_peak_flops"] = max(peaks[best])
  report["measured_peak_flops_rounds"] = peaks
  size = best.split("/")[1]
  report["peak_matmul"] = f"{best.split('/')[0]}, {size}x{size} {jnp.dtype(peak_dtype).name} per device"
  report["achieved_flops"] = report["flops_per_token_hlo"] * tokens_per_sec
  report["mfu"] = report["achieved_flops"] / report["measured_peak_flops"]
  report["mfu_formula"] = report["flops_per_token_formula"] * tokens_per_sec / report["measured_peak_flops"]
  report["mfu_bare_loop"] = (report["flops_per_token_hlo"] * report["bare_tokens_per_sec"]
                             / report["measured_peak_flops"])
  datasheet = datasheet_peak_flops(device.device_kind, peak_dtype)
  if datasheet is not None:  # GPUs only: the vendor's peak for all step devices together.
    report["datasheet_peak_flops"] = datasheet * n_step
    report["mfu_datasheet"] = report["achieved_flops"] / report["datasheet_peak_flops"]
  if not with_bare:  # --skip bare: no reference loop was timed.
    for key in ("bare_step_time_s", "bare_tokens_per_sec", "overhead_vs_bare_loop", "mfu_bare_loop"):
      report[key] = None
    report["overhead_rounds"] = [{"jaxdp_step_s": a} for a, _ in pairs]

  # Loader: host batches per second vs the step's consumption rate.
  if "loader" not in skip:
    n = max(steps, 5)
    start = time.perf_counter()
    for i in range(n):
      trainer.dataset.train(i)
    loader_batches_per_sec = n / (time.perf_counter() - start)
    report["loader_batches_per_sec"] = loader_batches_per_sec
    report["loader_headroom"] = loader_batches_per_sec * step_s

  # Scaling over emulated/real devices: weak (per-device batch fixed) and strong (global fixed).
  if "scaling" not in skip:
    counts = [n for n in ((1, 2) if args.quick else (1, 2, 4, 8)) if n <= len(devices)]
    per_device = max(1, config.global_batch_size // max(counts))
    scaling = {"devices": counts, "weak": {}, "strong": {},
               "per_device_batch_weak": per_device, "global_batch_strong": config.global_batch_size}
    for n in counts:
      for kind, global_batch in (("weak", per_device * n), ("strong", config.global_batch_size)):
        t = build(config_with(global_batch_size=global_batch), devices[:n])
        scaling[kind][str(n)] = {"tokens_per_sec": fixed_batch_tokens_per_sec(t, steps)}
    for kind in ("weak", "strong"):
      base = scaling[kind][str(counts[0])]["tokens_per_sec"]
      for n in counts:
        entry = scaling[kind][str(n)]
        entry["efficiency"] = entry["tokens_per_sec"] / (base * n / counts[0])
    report["scaling"] = scaling

  # Strategies on all devices, same config: tokens/s of the compiled step (batch on device),
  # bytes each device sends per step (from the compiled HLO) and compiled memory per device.
  group = devices[:2] if args.quick else devices
  if "strategies" not in skip and len(devices) > 1:
    per_strategy = {}
    for strategy in STRATEGIES:
      t = build(config_with(strategy=strategy), group)
      stats = t.train_step.lower(t.abstract_state(), t.train_batch(0)).compile().memory_analysis()
      per_strategy[strategy] = {
          "tokens_per_sec": fixed_batch_tokens_per_sec(t, steps),
          "comm_bytes_per_step": t.comm_bytes_per_step(t.init_state()),
          "argument_bytes": stats.argument_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes}
    base = per_strategy["dp"]["tokens_per_sec"]
    for entry in per_strategy.values():
      entry["speed_vs_dp"] = entry["tokens_per_sec"] / base
    report["strategies"] = {"num_devices": len(group), "results": per_strategy}

  # Communication methods (dp, all devices): tokens/s and bytes per step, ratio to dense.
  if "comm" not in skip and len(devices) > 1:
    methods = {"pmean": {}, "ring": dict(allreduce="ring"), "ps": dict(allreduce="ps"),
               "topk_1pct": dict(compression="topk", compression_ratio=0.01),
               "randomk_1pct": dict(compression="randomk", compression_ratio=0.01),
               "int8": dict(compression="int8"), "bf16": dict(compression="bf16"),
               "local_sgd_h4": dict(sync="local_sgd", sync_every=4)}
    comm = {}
    for name, fields in methods.items():
      t = build(config_with(**fields), group)
      comm[name] = {"tokens_per_sec": fixed_batch_tokens_per_sec(t, steps),
                    "comm_bytes_per_step": t.comm_bytes_per_step(t.init_state())}
    dense = comm["pmean"]["comm_bytes_per_step"]
    for entry in comm.values():
      entry["bytes_vs_dense"] = entry["comm_bytes_per_step"] / dense
    report["comm"] = {"num_devices": len(group), "results": comm}

  # Compiled memory per strategy and precision: one device's share of the step on all devices
  # (on one device every ZeRO stage would hold everything).
  if "memory" not in skip:
    memory = {}
    precisions = ("fp32",) if args.quick else ("fp32", "bf16", "fp16")
    for strategy in STRATEGIES:
      for precision in precisions:
        fields = dict(strategy=strategy, precision=precision)
        if precision == "fp16" and device.platform == "cpu":
          fields["attention"] = "reference"  # XLA:CPU has no f16 x f16 -> f32 dot.
        t = build(config_with(**fields), group)
        stats = t.train_step.lower(t.abstract_state(), t.train_batch(0)).compile().memory_analysis()
        memory[f"{strategy}/{precision}"] = {
            "argument_bytes": stats.argument_size_in_bytes, "output_bytes": stats.output_size_in_bytes,
            "alias_bytes": stats.alias_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
            "peak_bytes_estimate": (stats.argument_size_in_bytes + stats.output_size_in_bytes
                                    - stats.alias_size_in_bytes + stats.temp_size_in_bytes)}
    report["memory"], report["memory_num_devices"] = memory, len(group)
  return report


def loader_report(args, overrides) -> dict:
  """Host batches/s and tokens/s of the data loader alone (`Dataset.train(s)`, the grain chain that
  training runs on a prefetch thread) on each --loader_data path at --loader_batch x
  --loader_seq_len tokens per step, and the headroom over --step_tokens_per_sec when given
  (loader tokens/s / step tokens/s: above 1 the loader keeps up on one thread)."""
  from jaxdp.data import Dataset
  from jaxdp.lm.config import load_preset
  from jaxdp.lm.spec import data_spec
  report = {"loader_batch": args.loader_batch, "loader_seq_len": args.loader_seq_len, "paths": {}}
  for path in args.loader_data.split(","):
    config = apply_overrides(load_preset(args.config), overrides)
    config.data.path, config.global_batch_size = path, args.loader_batch
    config.seq_len, config.grad_accum_steps = args.loader_seq_len, 1
    dataset = Dataset(data_spec(config))
    dataset.train(0)  # Opens and touches the files once: first-access costs are not the rate.
    n = args.steps or 20
    start = time.perf_counter()
    for step in range(1, n + 1):
      dataset.train(step)
    batches_per_sec = n / (time.perf_counter() - start)
    entry = {"batches_per_sec": batches_per_sec,
             "tokens_per_sec": batches_per_sec * args.loader_batch * args.loader_seq_len,
             "tokens": len(dataset.train_source) * args.loader_seq_len}
    if args.step_tokens_per_sec > 0:
      entry["headroom"] = entry["tokens_per_sec"] / args.step_tokens_per_sec
    report["paths"][path] = entry
  return report
def run_generate(args, overrides) -> dict:
  """Greedy generation of args.generate tokens after an args.prompt_len-token prompt on one
  device, with the key/value cache and without (the whole window per token), on the config's
  model (random weights: the speed does not depend on them). Compilation is excluded (each
  mode runs once before it is timed); rounds alternate the modes; the best round counts."""
  import flax.linen as nn
  import jax
  import numpy as np

  from jaxdp import models
  from jaxdp.data.pipeline import load_corpus
  from jaxdp.errors import JaxdpError
  from jaxdp.lm.config import load_preset
  from jaxdp.lm.spec import model_config
  from jaxdp.models.sampling import generate

  config = apply_overrides(load_preset(args.config), overrides)
  n, prompt_len = args.generate, args.prompt_len
  if prompt_len + n > config.seq_len:
    raise JaxdpError(f"--prompt_len {prompt_len} + --generate {n} tokens exceed seq_len "
                     f"{config.seq_len}: past it the window slides and nothing is cached; pass "
                     f"--config.seq_len={prompt_len + n}")
  tokens, tokenizer = load_corpus(config.data.path)
  model = models.build(model_config(config, tokenizer.vocab_size))
  device = jax.devices()[0]
  params = jax.device_put(nn.unbox(jax.jit(model.init_fn)(jax.random.PRNGKey(config.seed))),
                          device)
  prompt = np.asarray(tokens[:prompt_len], np.int32)

  def once(cache: bool, count: int) -> tuple[float, list[int]]:
    start = time.perf_counter()
    out = list(generate(params, model.module, prompt, count, temperature=0.0, cache=cache))
    return time.perf_counter() - start, out

  outputs = {}
  for cache in (True, False):  # Compile: prefill and decode step, or the window step.
    once(cache, 2)
  rounds = {"cached": [], "uncached": []}
  for _ in range(max(1, args.rounds if not args.quick else 1)):
    for name, cache in (("cached", True), ("uncached", False)):
      seconds, outputs[name] = once(cache, n)
      rounds[name].append(n / seconds)
  best = {name: max(values) for name, values in rounds.items()}
  return {"mode": "generate", "config": args.config, "overrides": overrides,
          "device": device.device_kind, "platform": device.platform, "host_cores": os.cpu_count(),
          "model": f"{config.model.family}, {config.model.n_layer} layers, d_model "
                   f"{config.model.d_model}", "params": models.count_params(params),
          "seq_len": config.seq_len, "prompt_tokens": prompt_len, "new_tokens": n,
          "precision": config.precision,
          "tokens_per_sec_cached": best["cached"], "tokens_per_sec_uncached": best["uncached"],
          "speedup": best["cached"] / best["uncached"], "rounds": rounds,
          "greedy_outputs_identical": outputs["cached"] == outputs["uncached"]}


def table(report: dict) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f"{v:.4g}"
    return str(v)
  keys = ("device", "step_devices", "params", "precision", "tokens_per_step", "compile_time_s", "step_time_s",
          "tokens_per_sec", "bare_step_time_s", "overhead_vs_bare_loop", "flops_per_token_hlo",
          "flops_per_token_formula", "measured_peak_flops", "peak_matmul", "achieved_flops", "mfu",
          "mfu_formula", "mfu_bare_loop", "datasheet_peak_flops", "mfu_datasheet", "peak_memory_bytes",
          "loader_batches_per_sec", "loader_headroom")
  lines = [f"{k:<26} {fmt(report[k])}" for k in keys if report.get(k) is not None]
  if "scaling" in report:
    s = report["scaling"]
    lines.append(f"{'devices':<26} " + " ".join(f"{n:>10}" for n in s["devices"]))
    for kind in ("weak", "strong"):
      lines.append(f"{kind + ' tokens/s':<26} " + " ".join(
          f"{s[kind][str(n)]['tokens_per_sec']:>10.4g}" for n in s["devices"]))
      lines.append(f"{kind + ' efficiency':<26} " + " ".join(
          f"{s[kind][str(n)]['efficiency']:>10.3f}" for n in s["devices"]))
  for section in ("strategies", "comm"):
    for name, m in report.get(section, {}).get("results", {}).items():
      ratio = m.get("speed_vs_dp", m.get("bytes_vs_dense"))
      label = "speed vs dp" if "speed_vs_dp" in m else "bytes vs dense"
      lines.append(f"{section[:5] + ' ' + name:<26} {m['tokens_per_sec']:.4g} tok/s, "
                   f"{m['comm_bytes_per_step']:.4g} B/step/device, {label} {ratio:.3f}")
  for name, m in report.get("memory", {}).items():
    lines.append(f"{'memory ' + name:<26} temp {m['temp_bytes'] / 2**20:.1f} MiB, "
                 f"peak~ {m['peak_bytes_estimate'] / 2**20:.1f} MiB")
  return "\n".join(lines)


def _baby(args, overrides):
  """(config, devices) of --compare and --profile: the baby config (compare_torch.BABY, then
  --config.FIELD overrides) on `--devices` devices (default: one per core on CPU, every GPU)."""
  import compare_torch
  import jax

  from jaxdp.errors import JaxdpError
  from jaxdp.lm.config import load_preset
  config = load_preset(args.config)
  apply_overrides(config, {k: repr(v) for k, v in compare_torch.BABY.items()})
  apply_overrides(config, overrides)
  devices = jax.devices()
  n = args.devices or (min(os.cpu_count() or 1, len(devices)) if devices[0].platform == "cpu"
                       else len(devices))
  if n > len(devices) or config.global_batch_size % n:
    raise JaxdpError(f"--devices {n}: need at most {len(devices)} devices, dividing "
                     f"global_batch_size {config.global_batch_size}; pick another --devices")
  return config, devices[:n]


def run_compare(args, overrides) -> dict:
  """--compare torch: the baby config (BABY, then --config.FIELD overrides) through
  tools/compare_torch.py on `--devices` devices (default: one per core on CPU, every GPU)."""
  import compare_torch

  from jaxdp.errors import JaxdpError
  config, devices = _baby(args, overrides)
  if args.steps:
    config.num_steps = args.steps
  if args.round_steps < 1 or args.compare_eval_every < 1:
    raise JaxdpError("--round_steps and --compare_eval_every must be >= 1")
  compile_flag = {"auto": None, "on": True, "off": False}[args.torch_compile]
  try:
    report = compare_torch.compare(config, devices, round_steps=args.round_steps,
                                   eval_every=args.compare_eval_every, target_loss=args.target_loss,
                                   torch_compile=compile_flag)
  except ValueError as e:
    raise JaxdpError(f"--compare torch: {e}") from None
  return {"compare_torch": report, "host_cores": os.cpu_count(), "platform": devices[0].platform,
          "ratio_vs_torch": report["ratio_vs_torch"],
          "time_to_target_ratio_vs_torch": report["time_to_target_ratio_vs_torch"]}


def run_profile(args, overrides) -> dict:
  """--profile: the baby config (as --compare) profiled on both sides (tools/profile_step.py),
  `--steps` (default 20) steps each after as many warm-up steps."""
  import jax
  import profile_step

  config, devices = _baby(args, overrides)
  report = profile_step.profile(config, devices, args.steps or 20)
  return {"profile": report, **{k: report[k] for k in ("jaxdp", "torch")},
          "host_cores": os.cpu_count(), "platform": devices[0].platform,
          "device_kind": devices[0].device_kind, "jax_version": jax.__version__}


def reduction_cost(args, overrides) -> dict:
  """{"devices": {N: {mode: {"bytes_per_step", "step_time_s"}, "bytes_ratio", "time_ratio"}}}:
  the fixed-order reduction against the default all-reduce, on the config's model and batch."""
  import jax
  import numpy as np

  from jaxdp.lm import config as lm_config
  from jaxdp.lm.builder import build
  from jaxdp.parallel import hlo
  steps = args.steps or 5
  devices = jax.devices()
  out: dict = {"config": args.config, "platform": devices[0].platform,
               "device_kind": devices[0].device_kind, "steps_per_round": steps, "rounds": 3,
               "devices": {}}
  for n in (2, 4, 8):
    if n > len(devices):
      continue
    runs = {}
    for mode in ("allreduce", "fixed_order"):
      config = apply_overrides(lm_config.load_preset(args.config), overrides)
      config.reduction = mode
      lm_config.validate(config, n, devices[0].platform)
      built = build(config, devices[:n], read_init_from=False)
      dp = built.dp
      state = dp.init_state(built.model.init_fn, config.seed)
      rs = np.random.RandomState(0)
      b, t = config.global_batch_size, config.seq_len
      tokens = rs.randint(0, built.dataset.tokenizer.vocab_size, (b, t + 1)).astype(np.int32)
      batch = dp.put_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                            "weights": np.ones((b, t), np.float32)})
      compiled = dp.train_step.lower(state, batch).compile()
      counted = hlo.collective_bytes(compiled.as_text())
      state, metrics = dp.step(state, batch)  # Warm-up (and the memory check's compile).
      jax.block_until_ready(metrics)
      runs[mode] = {"dp": dp, "state": state, "batch": batch, "times": [],
                    "bytes_per_step": counted["bytes"], "collectives": counted["by_kind"]}
    for _ in range(out["rounds"]):  # Interleaved: both modes see the same load.
      for run in runs.values():
        start = time.perf_counter()
        for _ in range(steps):
          run["state"], metrics = run["dp"].step(run["state"], run["batch"])
        jax.block_until_ready(metrics)
        run["times"].append((time.perf_counter() - start) / steps)
    row = {mode: {"bytes_per_step": run["bytes_per_step"], "collectives": run["collectives"],
                  "step_time_s": float(np.median(run["times"])), "round_times_s": run["times"]}
           for mode, run in runs.items()}
    default, fixed = row["allreduce"], row["fixed_order"]
    row["bytes_ratio"] = fixed["bytes_per_step"] / max(default["bytes_per_step"], 1)
    row["time_ratio"] = fixed["step_time_s"] / default["step_time_s"]
    out["devices"][str(n)] = row
    print(f"{n} devices: bytes/step {default['bytes_per_step']:,.0f} -> {fixed['bytes_per_step']:,.0f}"
          f" (x{row['bytes_ratio']:.3f}), step {default['step_time_s']:.3f} s -> "
          f"{fixed['step_time_s']:.3f} s (x{row['time_ratio']:.2f})", file=sys.stderr)
  return out


def main(argv=None) -> int:
  args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
  import jax
  if jax.config.jax_platforms in (None, "", "cpu") and args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from jaxdp.errors import JaxdpError
  try:
    if args.loader_data:
      report = loader_report(args, overrides)
      print(json.dumps(report, indent=1))
      if args.out:
        with open(args.out, "w") as f:
          json.dump(report, f, indent=1)
      return 0
    if args.reduction_cost:
      report = reduction_cost(args, overrides)
      print(json.dumps(report, indent=1))
      if args.out:
        with open(args.out, "w") as f:
          json.dump(report, f, indent=1)
      return 0
    if args.profile:
      import profile_step
      report = run_profile(args, overrides)
      print(profile_step.table(report))
      if args.out:
        with open(args.out, "w") as f:
          json.dump(report, f, indent=1)
      return 0
    if args.compare:
      report = run_compare(args, overrides)
      import compare_torch
      print(compare_torch.table(report["compare_torch"]))
      if args.out:
        with open(args.out, "w") as f:
          json.dump(report, f, indent=1)
      return 0
    report = run_generate(args, overrides) if args.generate else run(args, overrides)
  except JaxdpError as e:
    print(f"bench: error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: v for k, v in report.items() if k != "rounds"}, indent=1)
        if args.generate else table(report))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(report, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
