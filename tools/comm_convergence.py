"""Convergence of every communication method at equal steps, under AdamW and SGD with momentum.

  python tools/comm_convergence.py [--devices 4] [--steps 300] [--config tiny_cpu]
                                   [--optimizers adamw,sgd] [--methods "NAME;..."] [--warmup 60]
                                   [--json docs/comm_convergence.json] [--doc docs/communication.md]

Each (optimizer, method) trains the same model on the same data for the same steps on emulated
CPU devices and is evaluated on the same validation windows. Bytes per step come from the
compiled train step's HLO (`exchange.stage_bytes`): the steady state, the warm-up's stages, and
their mean over the run as the schedule visits them. Time per step is tokens per step over the
median tokens/s of the run's log windows after the first (which holds compilation); on a shared
CPU it is indicative only. Results are written after every run (JSON, and the table between the
markers in --doc), so an interrupted sweep still leaves what it measured; a rerun skips the rows
already in the JSON for the same settings (--fresh retrains them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN, END = "<!-- comm_convergence:begin -->", "<!-- comm_convergence:end -->"


def methods(warmup: int, steps: int) -> list[tuple[str, dict, tuple[str, ...]]]:
  """(name, config overrides, optimizers it applies to). `warmup`: the warm-ups' steps; the long
  warm-up of frozen-variance Adam is a third of the run (0/1 Adam, Lu et al. 2022, reports that
  1-bit Adam's full-precision warm-up takes 15-25% of training)."""
  both = ("adamw", "sgd")
  topk = {"compression": "topk", "compression_ratio": 0.01}
  return [
      ("dense", {}, both),
      ("top-k 1% + EF", topk, both),
      ("top-k 1% + EF, DGC warm-up + local clip",
       dict(topk, compression_warmup_steps=warmup, local_grad_clip=1.0), both),
      ("top-k 1% + EF, frozen-variance Adam",
       dict(topk, compression_optimizer="frozen_variance", compression_warmup_steps=warmup),
       ("adamw",)),
      ("top-k 1% + EF, frozen-variance Adam, long warm-up",
       dict(topk, compression_optimizer="frozen_variance", compression_warmup_steps=max(1, steps // 3)),
       ("adamw",)),
      ("int8 + EF", {"compression": "int8"}, both),
      ("int8, frozen-variance Adam",
       {"compression": "int8", "compression_optimizer": "frozen_variance",
        "compression_warmup_steps": warmup}, ("adamw",)),
      ("PowerSGD r1 + EF", {"compression": "powersgd", "compression_rank": 1}, both),
      ("PowerSGD r4 + EF", {"compression": "powersgd", "compression_rank": 4}, both),
      ("bf16 + EF", {"compression": "bf16"}, both),
      ("random-k 1% + EF", {"compression": "randomk", "compression_ratio": 0.01}, both),
      ("local SGD H=4", {"sync": "local_sgd", "sync_every": 4}, both),
      ("DiLoCo H=16", {"sync": "local_sgd", "sync_every": 16, "diloco": True}, both),
  ]


OPTIMIZERS = {"adamw": {}, "sgd": {"optimizer": "sgd", "learning_rate": 0.3, "momentum": 0.9}}


def run_one(args, optimizer: str, name: str, overrides: dict) -> dict:
  import jax

  from jaxdp.lm import build, train_and_evaluate
  from jaxdp.lm.config import load_preset
  from jaxdp.parallel.exchange import bytes_per_step, mean_bytes_per_step, stage_bytes
  from jaxdp.runtime.metrics import read_metrics

  config = load_preset(args.config)
  config.num_steps = args.steps
  config.eval_every, config.eval_steps = 0, 8
  config.log_every = max(1, args.steps // 10)
  config.checkpoint_every = 0
  config.update(OPTIMIZERS[optimizer])
  config.update(overrides)
  devices = jax.devices()[:args.devices]
  trainer = build(config, devices)
  state = trainer.init_state()
  hlo = trainer.train_step.lower(state, trainer.train_batch(0)).compile().as_text()
  stages = stage_bytes(trainer.dp.comm, hlo)
  steady = bytes_per_step(trainer.dp.comm, hlo)
  mean = mean_bytes_per_step(trainer.dp.comm, hlo, args.steps)
  del trainer, state
  with tempfile.TemporaryDirectory() as workdir:
    result = train_and_evaluate(config, workdir, devices=devices, progress=False)
    records = read_metrics(workdir)
  lines = [m for m in records if "train_loss" in m]
  rates = [m["tokens_per_sec"] for m in lines[1:]] or [lines[0]["tokens_per_sec"]]
  tokens_per_step = config.global_batch_size * config.seq_len
  return {"optimizer": optimizer, "method": name, "overrides": overrides,
          "eval_loss": result["eval_loss"], "final_train_loss": lines[-1]["train_loss"],
          "bytes_steady": steady, "bytes_mean": mean,
          "bytes_warmup_stages": stages[:-1] if len(stages) > 1 else [],
          "seconds_per_step": tokens_per_step / statistics.median(rates),
          # B_simple over the run's log lines (absent where it cannot be estimated).
          "grad_noise_scale_examples": [m.get("grad_noise_scale_examples") for m in lines]}


def markdown(rows: list[dict], settings: dict) -> str:
  lines = [
      BEGIN, "", "## Convergence at equal steps: every method, AdamW and SGD with momentum", "",
      "<!-- Generated by tools/comm_convergence.py; re-run it to refresh. -->", "",
      f"Preset `{settings['config']}`, {settings['steps']} steps, {settings['devices']} emulated "
      f"CPU devices, seed 0 for every run; warm-ups (DGC, frozen variance) last "
      f"{settings['warmup']} steps. AdamW as the preset configures it; SGD: learning rate 0.3, "
      "momentum 0.9, the same schedule. Validation loss over 8 batches at the end; ratio = "
      "method / dense of the same optimizer. Bytes per device and step from the compiled "
      "step's HLO: steady = after any warm-up, run mean = averaged over the run's steps "
      "(warm-up included), warm-up stages listed separately. s/step on a shared 2-core machine "
      "is indicative only.", "",
      f"Command: `python tools/comm_convergence.py --steps {settings['steps']} --devices "
      f"{settings['devices']} --config {settings['config']} --warmup {settings['warmup']}`", ""]
  for optimizer in ("adamw", "sgd"):
    mine = [r for r in rows if r["optimizer"] == optimizer]
    if not mine:
      continue
    dense = next((r for r in mine if r["method"] == "dense"), None)
    lines += [f"### {optimizer}", "",
              "| method | val loss | vs dense | bytes/step (steady) | vs dense | run mean vs dense "
              "| warm-up stages (bytes/step) | s/step |",
              "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in mine:
      def rel(key, ref, r=r, dense=dense):
        return f"{r[key] / dense[ref]:.4f}" if dense else "n/a"
      loss_rel = f"{r['eval_loss'] / dense['eval_loss']:.3f}" if dense else "n/a"
      stages = ", ".join(f"{b:,.0f}" for b in r["bytes_warmup_stages"]) or "-"
      lines.append(f"| {r['method']} | {r['eval_loss']:.4f} | {loss_rel} | "
                   f"{r['bytes_steady']:,.0f} | {rel('bytes_steady', 'bytes_steady')} | "
                   f"{rel('bytes_mean', 'bytes_steady')} | {stages} | "
                   f"{r['seconds_per_step']:.3f} |")
    lines.append("")
  lines.append(END)
  return "\n".join(lines)


def write_doc(path: str, section: str) -> None:
  text = open(path).read() if os.path.exists(path) else ""
  if BEGIN in text and END in text:
    text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  with open(path, "w") as f:
    f.write(text)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--config", default="tiny_cpu")
  parser.add_argument("--optimizers", default="adamw,sgd")
  parser.add_argument("--methods", default="", help="Semicolon-separated method names (default all).")
  parser.add_argument("--warmup", type=int, default=0, help="Warm-up steps (default steps / 5).")
  parser.add_argument("--json", default=os.path.join(ROOT, "docs", "comm_convergence.json"))
  parser.add_argument("--doc", default=os.path.join(ROOT, "docs", "communication.md"))
  parser.add_argument("--fresh", action="store_true", help="Retrain rows already in --json.")
  args = parser.parse_args(argv)
  args.warmup = args.warmup or max(1, args.steps // 5)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)

  settings = {"config": args.config, "steps": args.steps, "devices": args.devices,
              "warmup": args.warmup}
  rows = []
  if os.path.exists(args.json) and not args.fresh:
    saved = json.load(open(args.json))
    if saved.get("settings") == settings:
      rows = saved["rows"]
  wanted = [m.strip() for m in args.methods.split(";") if m.strip()]
  for optimizer in args.optimizers.split(","):
    for name, overrides, applies in methods(args.warmup, args.steps):
      if optimizer not in applies or (wanted and name not in wanted):
        continue
      if any(r["optimizer"] == optimizer and r["method"] == name for r in rows):
        continue
      row = run_one(args, optimizer, name, overrides)
      rows.append(row)
      print(json.dumps(row), flush=True)
      order = {(o, m[0]): i for i, (o, m) in enumerate(
          (o, m) for o in ("adamw", "sgd") for m in methods(args.warmup, args.steps))}
      rows.sort(key=lambda r: order.get((r["optimizer"], r["method"]), 1 << 30))
      with open(args.json, "w") as f:
        json.dump({"settings": settings, "rows": rows}, f, indent=1)
      if args.doc:
        write_doc(args.doc, markdown(rows, settings))
  return 0


if __name__ == "__main__":
  sys.exit(main())
