"""Batch size vs time to loss: trains one run per global batch size, then tabulates and plots.

  python tools/batch_sweep.py --out_dir runs/sweep [--batches 8,16,32,64] [--steps 200]
                              [--thresholds 2.5,2.3,2.15] [--cpu_devices 2] [--config PRESET]
                              [--advise_from 16]

Each run is `jaxdp train` on the preset with only the batch size changed (plus the step count and
evaluation cadence given here). Time to a loss is training time: the steps taken until the first
evaluation at or below it, times tokens/step over the run's median tokens/s (evaluation
excluded), so the table shows what a batch size costs. Writes sweep.json, sweep.md (the table)
and sweep.png (evaluation loss against training seconds) into --out_dir (with --advise_from also
advice.png); runs already finished
there are reused, not retrained.

With --advise_from B, the batch-size advisor of `jaxdp plan --advise` (jaxdp/analysis/advise.py:
McCandlish et al. 2018's S = S_min (1 + B_noise / B), fitted to the run at batch B alone) predicts
every other batch's steps to each threshold, and the table sets them beside the measured steps
with the relative error. The measured step is the first evaluation at or below the threshold, so
it is known to within --eval_every steps.
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


def advice_check(records_of: dict[int, list[dict]], results: dict[int, dict], reference: int,
                 thresholds: list[float]) -> list[dict]:
  """Per threshold and batch: the steps the advisor predicts from the reference run alone, the
  steps measured, and the relative error (None where either side did not reach it)."""
  from jaxdp.analysis.advise import fit_noise_model
  from jaxdp.errors import JaxdpError
  rows = []
  for threshold in thresholds:
    try:
      fit = fit_noise_model(records_of[reference], reference, threshold)
    except JaxdpError as e:
      rows.append({"threshold": threshold, "error": str(e)})
      continue
    for batch, r in sorted(results.items()):
      measured = r["reached"][str(threshold)]
      predicted = fit.steps(batch)
      rows.append({"threshold": threshold, "global_batch": batch, "b_noise": fit.b_noise,
                   "predicted_steps": predicted,
                   "measured_steps": None if measured is None else measured["step"],
                   "relative_error": None if measured is None else
                   (predicted - measured["step"]) / measured["step"]})
  return rows


def advice_markdown(rows: list[dict], reference: int) -> str:
  lines = [f"| eval loss <= | global batch | predicted steps (from batch {reference}) | measured steps "
           "| error |", "|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "error" in r:
      lines.append(f"| {r['threshold']} | - | {r['error']} | - | - |")
      continue
    measured = "not reached" if r["measured_steps"] is None else r["measured_steps"]
    error = "-" if r["relative_error"] is None else f"{r['relative_error']:+.0%}"
    lines.append(f"| {r['threshold']} | {r['global_batch']} | {r['predicted_steps']:.0f} | "
                 f"{measured} | {error} |")
  return "\n".join(lines) + "\n"


def plot_advice(rows: list[dict], reference: int, out: str) -> None:
  """Predicted steps to each threshold (lines, from the reference run alone) and measured steps
  (points) against the global batch."""
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for threshold in sorted({r["threshold"] for r in rows if "error" not in r}):
    mine = [r for r in rows if r["threshold"] == threshold and "error" not in r]
    line, = ax.plot([r["global_batch"] for r in mine], [r["predicted_steps"] for r in mine],
                    label=f"eval loss <= {threshold}: predicted")
    measured = [r for r in mine if r["measured_steps"] is not None]
    ax.plot([r["global_batch"] for r in measured], [r["measured_steps"] for r in measured], "o",
            color=line.get_color(), label="measured")
  ax.set_xscale("log", base=2)
  ax.set_xlabel("global batch (sequences)")
  ax.set_ylabel("steps to the loss")
  ax.set_title(f"Batch-size advisor (fitted to batch {reference}) vs the sweep")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(out, dpi=120)


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
  parser.add_argument("--advise_from", type=int, default=0,
                      help="check the advisor's predictions from the run at this batch")
  args = parser.parse_args(argv)
  import jax
  if jax.config.jax_platforms in (None, "", "cpu") and args.cpu_devices:
    jax.config.update("jax_num_cpu_devices", args.cpu_devices)
  from jaxdp.lm import train_and_evaluate
  from jaxdp.lm.config import load_preset
  from jaxdp.runtime.metrics import read_metrics

  thresholds = [float(t) for t in args.thresholds.split(",")]
  results, records_of = {}, {}
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
    records_of[batch] = read_metrics(workdir)
    results[batch] = summarize(records_of[batch], batch * config.seq_len, thresholds)
  out = {str(b): r for b, r in results.items()}
  table = markdown(results, thresholds)
  if args.advise_from:
    if args.advise_from not in results:
      parser.error(f"--advise_from={args.advise_from} is not one of --batches")
    out["advice_check"] = advice_check(records_of, results, args.advise_from, thresholds)
    table += "\n" + advice_markdown(out["advice_check"], args.advise_from)
    plot_advice(out["advice_check"], args.advise_from, os.path.join(args.out_dir, "advice.png"))
  with open(os.path.join(args.out_dir, "sweep.json"), "w") as f:
    json.dump(out, f, indent=1)
  with open(os.path.join(args.out_dir, "sweep.md"), "w") as f:
    f.write(table)
  plot(results, os.path.join(args.out_dir, "sweep.png"))
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
