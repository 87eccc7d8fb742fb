"""Batch size vs time to loss: trains one run per global batch size, then tabulates and plots.

  python tools/batch_sweep.py --out_dir runs/sweep [--batches 8,16,32,64] [--steps 200]
                              [--thresholds 2.5,2.3,2.15] [--cpu_devices 2] [--config PRESET]

Each run is `jaxdp train` on the preset with only the batch size changed (plus the step count and
evaluation cadence given here). Time to a loss is training time: the steps taken until the first
evaluation at or below it, times tokens/step over the run's median tokens/s (evaluation
excluded), so the table shows what a batch size costs. Writes sweep.json, sweep.md (the table)
and sweep.png (evaluation loss against training seconds) into --out_dir; runs already finished
there are reused, not retrained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def summarize(records: list[dict], tokens_per_step: int, thresholds: list[float]) -> dict:
  """tokens/s, the first step and training seconds at or below each threshold, final eval loss."""
  rates = [r["tokens_per_sec"] for r in records if "train_loss" in r][1:]  # First holds compile.
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  tokens_per_sec = statistics.median(rates)
  seconds = lambda step: step * tokens_per_step / tokens_per_sec
  reached = {}
  for threshold in thresholds:
    step = next((s for s, loss in evals if loss <= threshold), None)
    reached[str(threshold)] = None if step is None else {"step": step, "seconds": seconds(step)}
  return {"tokens_per_sec": tokens_per_sec, "reached": reached, "final_eval_loss": evals[-1][1],
          "curve": [(s, seconds(s), loss) for s, loss in evals]}


def markdown(results: dict[int, dict], thresholds: list[float]) -> str:
  head = "| global batch | tokens/s | " + " | ".join(f"eval loss <= {t}" for t in thresholds)
  lines = [head + " | eval loss at the end |", "|---:|---:|" + "---|" * len(thresholds) + "---:|"]
  for batch, r in sorted(results.items()):
    cells = [("not reached" if r["reached"][str(t)] is None else
              f"step {r['reached'][str(t)]['step']}, {r['reached'][str(t)]['seconds']:.1f} s")
             for t in thresholds]
    lines.append(f"| {batch} | {r['tokens_per_sec']:,.0f} | " + " | ".join(cells)
                 + f" | {r['final_eval_loss']:.3f} |")
  return "\n".join(lines) + "\n"


def plot(results: dict[int, dict], out: str) -> None:
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for batch, r in sorted(results.items()):
    ax.plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]], marker=".", label=f"batch {batch}")
  ax.set_xlabel("training seconds (evaluation excluded)")
  ax.set_ylabel("validation loss (nats/token)")
  ax.set_title("Batch size vs time to loss")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=120)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--out_dir", required=True)
  parser.add_argument("--config", default="default")
  parser.add_argument("--batches", default="8,16,32,64")
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--eval_every", type=int, default=20)
  parser.add_argument("--thresholds", default="2.5,2.3,2.15")
  parser.add_argument("--cpu_devices", type=int, default=2)
  args = parser.parse_args(argv)
  import jax
  if jax.config.jax_platforms in (None, "", "cpu") and args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from jaxdp.lm import train_and_evaluate
  from jaxdp.lm.config import load_preset
  from jaxdp.runtime.metrics import read_metrics

  thresholds = [float(t) for t in args.thresholds.split(",")]
  results = {}
  for batch in (int(b) for b in args.batches.split(",")):
    config = load_preset(args.config)
    config.global_batch_size, config.num_steps = batch, args.steps
    config.eval_every, config.eval_steps, config.checkpoint_every = args.eval_every, 4, 0
    workdir = os.path.join(args.out_dir, f"b{batch}")
    done = os.path.exists(os.path.join(workdir, "metrics.jsonl")) and any(
        r.get("step") == args.steps and "eval_loss" in r for r in read_metrics(workdir))
    print(f"batch {batch}: {workdir}{' (done before, reused)' if done else ''}", flush=True)
    if not done:
      train_and_evaluate(config, workdir, progress=False)
    results[batch] = summarize(read_metrics(workdir), batch * config.seq_len, thresholds)
  with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
    json.dump({str(b): r for b, r in results.items()}, f, indent=1)
  table = markdown(results, thresholds)
  with open(os.path.join(args.out_dir, "sweep.md"), "w") as f:
    f.write(table)
  plot(results, os.path.join(args.out_dir, "sweep.png"))
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
