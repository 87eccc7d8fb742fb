"""Trains the same model under each communication method and reports accuracy against bytes.

  python tools/comm_report.py [--devices 4] [--steps 200] [--config tiny_cpu] [--out docs]

Every method trains for the same steps on the same data on emulated CPU devices. Bytes per step
are what each device sends, counted from the collectives in the compiled train step's HLO (the
`comm_bytes_per_step` of the run's metrics); the ratio to dense divides two such measurements.
Writes OUT/communication.md (table + alpha-beta cost model) and OUT/communication.png.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

METHODS = [  # (name, config overrides)
    ("dense pmean", {}),
    ("ring", {"allreduce": "ring"}),
    ("ps", {"allreduce": "ps"}),
    ("top-k 1% + EF", {"compression": "topk", "compression_ratio": 0.01}),
    ("top-k 1%, no EF", {"compression": "topk", "compression_ratio": 0.01, "error_feedback": False}),
    ("top-k 1% + EF + mom. corr.", {"compression": "topk", "compression_ratio": 0.01,
                                    "momentum_correction": 0.9}),
    ("random-k 1% + EF", {"compression": "randomk", "compression_ratio": 0.01}),
    ("int8", {"compression": "int8"}),
    ("bf16", {"compression": "bf16"}),
    ("stale tau=1", {"sync": "stale", "staleness": 1}),
    ("stale tau=4", {"sync": "stale", "staleness": 4}),
    ("local SGD H=4", {"sync": "local_sgd", "sync_every": 4}),
    ("local SGD H=16", {"sync": "local_sgd", "sync_every": 16}),
    ("DiLoCo H=16", {"sync": "local_sgd", "sync_every": 16, "diloco": True}),
]


NOTES = """## Reading the table

- Top-k and random-k feed AdamW a sparse averaged gradient; Adam's per-coordinate scaling then
  moves rarely-sent coordinates little, and error feedback changes little with it. Error
  feedback's guarantee is for SGD: `tests/test_comm.py::test_topk_one_percent_with_error_feedback_tracks_dense`
  trains with plain SGD and prints the three validation losses (top-k 1% + EF within 5% of dense,
  without EF measurably worse).
- Random-k's indices come from a seed shared by all devices, so only values travel: half of
  top-k's payload, averaged by an all-reduce (2(N-1)/N) instead of an all-gather (N-1).
- Random-k draws k of d indices without replacement each step (a permutation of d on CPU), which
  is why its tokens/s is low here.
- int8 and bf16 are all-to-all reduce-scatters of encoded chunks summed in f32, then all-gathers
  of the re-encoded sums (bf16 travels as uint16 bits so XLA:CPU cannot widen it to f32).
- ps moves the same mean bytes per device as ring, but its server sends N-1 times as much as
  anyone: see the busiest-device column below.
"""


def alpha_beta_seconds(n: int, size: float, alpha: float, bandwidth: float) -> dict[str, float]:
  """All-reduce time of `size` bytes over n devices, each with one link of `bandwidth` B/s.

  ring: 2(N-1) latency steps, each moving size/N; ps: the server's link carries (N-1) messages
  in and (N-1) out, one after another; naive: every device sends its whole message to each of
  the N-1 others.
  """
  return {"ring": 2 * (n - 1) * (alpha + size / n / bandwidth),
          "ps": 2 * (n - 1) * (alpha + size / bandwidth),
          "naive": (n - 1) * (alpha + size / bandwidth)}


def alpha_beta_bytes(n: int, size: float) -> dict[str, float]:
  """Bytes sent per device (mean; the ps server's in brackets) by the same algorithms."""
  return {"ring": 2 * (n - 1) / n * size, "ps": 2 * (n - 1) / n * size, "ps server": (n - 1) * size,
          "naive": (n - 1) * size}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=4)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--config", default="tiny_cpu")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs"))
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, ROOT)
  import jax
  jax.config.update("jax_num_cpu_devices", args.devices)
  import jax.numpy as jnp
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P
  import numpy as np

  from jaxdp.lm import train_and_evaluate
  from jaxdp.lm.config import load_preset
  from jaxdp.parallel import collectives
  from jaxdp.parallel.hlo import collective_bytes
  from jaxdp.runtime.metrics import read_metrics

  rows = []
  for name, overrides in METHODS:
    config = load_preset(args.config)
    config.num_steps = args.steps
    config.eval_every = 0
    config.eval_steps = 8
    config.log_every = max(1, args.steps // 4)
    config.checkpoint_every = 0
    config.update(overrides)
    with tempfile.TemporaryDirectory() as workdir:
      result = train_and_evaluate(config, workdir, devices=jax.devices()[:args.devices],
                                  progress=False)
      records = read_metrics(workdir)
    lines = [m for m in records if "train_loss" in m]
    params = records[0]["params"]
    # The first log window includes compilation; tokens/s is the mean of the later windows.
    speed = float(np.mean([m["tokens_per_sec"] for m in lines[1:]] or [lines[0]["tokens_per_sec"]]))
    rows.append({"name": name, "eval_loss": result["eval_loss"],
                 "bytes": lines[-1]["comm_bytes_per_step"], "tokens_per_sec": speed})
    print(f"{name}: {rows[-1]}", flush=True)
  dense = rows[0]["bytes"]

  # Measured bytes of the three all-reduce algorithms on the dense gradient's size: ring and ps
  # are the trainer's; naive is an all-gather of every device's whole vector, then a local sum.
  mesh = Mesh(np.asarray(jax.devices()[:args.devices]), ("data",))
  def measured(fn):
    mapped = jax.jit(jax.shard_map(lambda x: fn(x[0])[None], mesh=mesh, in_specs=P("data"),
                                   out_specs=P("data"), check_vma=False))
    return collective_bytes(mapped.lower(jnp.zeros((args.devices, params))).compile().as_text())
  algorithms = {"ring": measured(lambda v: collectives.ring_allreduce_sum(v, "data")),
                "ps": measured(lambda v: collectives.ps_allreduce_sum(v, "data")),
                "naive": measured(lambda v: jax.lax.all_gather(v, "data").sum(0))}
  write_report(args, rows, dense, params, algorithms)


def write_report(args, rows, dense, params, algorithms) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  os.makedirs(args.out, exist_ok=True)
  n = args.devices
  size = 4 * params
  lines = [
      "# Communication: methods, accuracy and bytes", "",
      "<!-- Generated by tools/comm_report.py; re-run it to refresh. -->", "",
      f"Preset `{args.config}` ({params} parameters, AdamW as configured), {args.steps} steps, "
      f"{n} emulated CPU devices, same seed and data for every method. Validation loss over 8 "
      "batches at the end. Bytes per step: mean bytes each device sends per optimizer step, "
      "counted from the collectives of the compiled train step (`jaxdp.parallel.hlo.collective_bytes`): "
      "all-reduce 2(N-1)/N x payload, all-gather and all-to-all (N-1)/N x result, "
      "collective-permute its operand from each source. Local SGD's parameter average runs in a "
      "conditional branch, weighted 1/H. tokens/s on a shared 2-core CPU is indicative only.", "",
      "| method | val loss | bytes/step/device | ratio to dense | tokens/s |",
      "|---|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['name']} | {r['eval_loss']:.4f} | {r['bytes']:,.0f} | "
                 f"{r['bytes'] / dense:.4f} | {r['tokens_per_sec']:,.0f} |")
  lines += ["", NOTES.rstrip()]
  lines += [
      "", "## All-reduce algorithms: alpha-beta model beside measured bytes", "",
      f"Message: the dense gradient, {size:,} bytes (f32). Measured: the HLO of each algorithm "
      f"on {n} devices (naive = all-gather every device's vector, sum locally).", "",
      "| algorithm | model bytes/device | measured bytes/device (mean) | measured busiest device |",
      "|---|---:|---:|---:|"]
  model_bytes = alpha_beta_bytes(n, size)
  for name in ("ring", "ps", "naive"):
    m = algorithms[name]
    model = f"{model_bytes[name]:,.0f}" + (f" (server {model_bytes['ps server']:,.0f})"
                                          if name == "ps" else "")
    lines.append(f"| {name} | {model} | {m['bytes']:,.0f} | {m['max_device_bytes']:,.0f} |")
  alpha, bandwidth = 5e-6, 25e9
  lines += [
      "", f"Predicted all-reduce time, alpha = {alpha * 1e6:.0f} us per message, "
      f"beta = 1/({bandwidth / 1e9:.0f} GB/s) per device link:", "",
      "| message | N | ring | ps | naive |", "|---|---:|---:|---:|---:|"]
  for label, message in ((f"{size / 1e3:.0f} kB (this model)", size), ("400 MB (100M params)", 4e8)):
    for devices in (4, 8, 64):
      t = alpha_beta_seconds(devices, message, alpha, bandwidth)
      lines.append(f"| {label} | {devices} | {t['ring'] * 1e3:.3f} ms | {t['ps'] * 1e3:.3f} ms | "
                   f"{t['naive'] * 1e3:.3f} ms |")
  lines += ["", "Ring's bandwidth term stays 2 x size / B as N grows while its latency term grows "
            "as 2(N-1) alpha; the parameter server's link carries 2(N-1) whole messages, so it "
            "loses by a factor N on large messages; on small ones latency dominates everything.",
            "", "![accuracy against bytes](communication.png)", ""]
  path = os.path.join(args.out, "communication.md")
  # Sections other tools or authors maintain (<!-- name:begin --> ... <!-- name:end -->, e.g.
  # tools/comm_convergence.py's table) are carried over, not overwritten.
  old = open(path).read() if os.path.exists(path) else ""
  blocks = [m.group(0) for m in re.finditer(r"<!-- (\w+):begin -->.*?<!-- \1:end -->", old, re.S)]
  with open(path, "w") as f:
    f.write("\n".join(lines + [""] + blocks) + ("\n" if blocks else ""))

  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for r in rows:
    left.scatter(r["bytes"], r["eval_loss"])
    left.annotate(r["name"], (r["bytes"], r["eval_loss"]), fontsize=7, xytext=(3, 3),
                  textcoords="offset points")
  left.set_xscale("log")
  left.set_xlabel("bytes sent per step per device (from HLO)")
  left.set_ylabel(f"validation loss after {args.steps} steps")
  left.set_title(f"{n} devices, {args.config}")
  counts = [2, 4, 8, 16, 32, 64]
  for name in ("ring", "ps", "naive"):
    right.plot(counts, [alpha_beta_seconds(c, 4e8, alpha, bandwidth)[name] for c in counts],
               marker="o", label=name)
  right.set_xscale("log", base=2)
  right.set_yscale("log")
  right.set_xlabel("devices N")
  right.set_ylabel("all-reduce seconds (alpha-beta model)")
  right.set_title("400 MB gradient, 5 us, 25 GB/s")
  right.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "communication.png"), dpi=120)
  print(f"wrote {os.path.join(args.out, 'communication.md')} and communication.png")


if __name__ == "__main__":
  main()
