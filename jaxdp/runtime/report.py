"""What a run tells its user: a start banner and a final summary (process 0 only)."""

from __future__ import annotations

import os
from typing import Any

import jax


def _count(n: float) -> str:
  for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
    if n >= size:
      return f"{n / size:.1f}{unit}"
  return f"{n:.0f}"


def banner(dp, state, workdir: str, num_steps: int, rows_per_step: int,
           tokens_per_step: int | None, description: str, restored: bool) -> str:
  """One block of lines: model, parameters, devices, strategy, precision, data, tokens per
  step, where files go, and whether the run starts or resumes."""
  params = sum(x.size for x in jax.tree.leaves(state.params))
  device = dp.mesh.devices.flat[0]
  mesh = " x ".join(f"{name}={size}" for name, size in dp.mesh.shape.items())
  step = int(state.step)
  lines = [
      f"jaxdp: {'resuming at step ' + str(step) if restored else 'starting'}, training to step "
      f"{num_steps}: {_count(params)} parameters" + (f", {description}" if description else ""),
      f"  devices: {dp.mesh.size} x {device.platform} ({device.device_kind}), mesh {mesh}, "
      f"{jax.process_count()} process(es); strategy {dp.strategy}, precision {dp.precision}, "
      f"nan_policy {dp.nan_policy}",
      f"  batch: {rows_per_step} rows per step in {dp.grad_accum_steps} micro-batch(es)"
      + (f", {tokens_per_step:,} tokens per step" if tokens_per_step else ""),
      _files(workdir)]
  return "\n".join(lines)


def _files(workdir: str) -> str:
  """The banner's line of where files go: checkpoints beside the logs, or where
  config.checkpoint_dir (recorded in WORKDIR/checkpoints.json) sends them, e.g. a bucket."""
  from jaxdp.runtime.checkpoint import location
  here = os.path.abspath(workdir)
  where = location(here)
  if where == os.path.join(here, "checkpoints"):
    return f"  files: {here} (checkpoints/, metrics.jsonl, TensorBoard events, jaxdp.log)"
  return f"  files: {here} (metrics.jsonl, TensorBoard events, jaxdp.log); checkpoints: {where}"


def hardware_postfix(line: dict[str, Any]) -> dict[str, str]:
  """The progress line's hardware numbers of a train line: MFU, step time, the share of time
  waiting for input, peak device memory."""
  shown = {"mfu": f"{line['mfu']:.1%}" if "mfu" in line else None,
           "step": f"{line['step_time_s']:.3g}s" if "step_time_s" in line else None,
           "wait": f"{line['data_wait_fraction']:.1%}" if "data_wait_fraction" in line else None,
           "mem": byte_size(line["peak_memory_bytes"]) if "peak_memory_bytes" in line else None}
  return {k: v for k, v in shown.items() if v is not None}


def byte_size(n: float) -> str:
  """Bytes for a person: 812KiB, 31.2MiB, 1.50GiB."""
  for unit, size in (("GiB", 2**30), ("MiB", 2**20)):
    if n >= size:
      return f"{n / size:.3g}{unit}" if unit == "MiB" else f"{n / size:.2f}{unit}"
  return f"{n / 2**10:.0f}KiB"


def summary(result: dict[str, Any], start_step: int, seconds: float, tokens_per_step: int | None,
            rows_per_step: int, best: tuple[int, float] | None, workdir: str) -> str:
  """The closing lines: steps, time, tokens (or examples) per second, eval losses, best
  checkpoint."""
  steps = result["step"] - start_step
  unit, per_step = ("tokens", tokens_per_step) if tokens_per_step else ("examples", rows_per_step)
  rate = steps * per_step / seconds if seconds > 0 else 0.0
  if steps == 0:
    lines = [f"jaxdp: the run in {workdir!r} is already at step {result['step']}; nothing to train"]
  else:
    why = {"num_steps": "reached num_steps", "early_stopping": "stopped early",
           "preempted": "stopped by a signal"}.get(result["stop_reason"], result["stop_reason"])
    lines = [f"jaxdp: done ({why}): {steps} steps to step {result['step']} in {seconds:.1f} s, "
             f"{_count(steps * per_step)} {unit}, {_count(rate)} {unit}/s"]
  final, best_loss = result.get("eval_loss"), result.get("best_eval_loss")
  if final is not None:
    lines.append(f"  eval_loss: final {final:.4f}, best {best_loss:.4f}" if best_loss is not None
                 else f"  eval_loss: final {final:.4f}")
  if best is not None:
    from jaxdp.runtime.checkpoint import is_url, location
    where = location(os.path.abspath(workdir))  # A bucket URL when config.checkpoint_dir names one.
    path = f"{where.rstrip('/')}/{best[0]}" if is_url(where) else os.path.join(where, str(best[0]))
    lines.append(f"  best checkpoint: {path} (eval_loss {best[1]:.4f})")
  for hit in result.get("targets_reached", ()):  # runtime/targets.py
    lines.append(f"  target eval_loss {hit['target']:g}: step {hit['step']}, {_count(hit['tokens'])} "
                 f"{unit}, {hit['productive_s']:.1f} s of training ({hit['wall_s']:.1f} s wall)")
  return "\n".join(lines)
