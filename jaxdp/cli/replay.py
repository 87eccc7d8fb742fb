"""`jaxdp replay`: re-run one step of a run from its checkpoints and report the loss of every row
of its global batch, worst first (jaxdp.lm.replay)."""

from __future__ import annotations

import json
import sys
import time
import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="replay",
    summary="Re-run one step of a run from its checkpoints: its loss, gradient norm, every row's loss.",
    description=(
        "Restores the latest checkpoint of --workdir at or before step --step - 1 (or the run's "
        "initial state, when the run started from its seed there), replays the steps in between "
        "on the batches the run used, runs step --step and prints its train_loss and grad_norm "
        "beside the logged ones, and the loss and token count of every row of its global batch, "
        "worst first. Steps are numbered as in metrics.jsonl: step N is the update from the state "
        "after N-1 steps. Runs on any device count the batch divides, one included; the loss "
        "equals the logged one bitwise under config.reduction=fixed_order, and within float32 "
        "rounding otherwise. See docs/troubleshooting.md."),
    no_config_hint="the config comes from the checkpoint in --workdir",
    step_dir_is_step=False,  # --step is the step to replay, not a checkpoint to read.
    flags=(
        c.string("workdir", "runs/default", "Run directory written by `jaxdp train`.",
                 metavar="DIR", path="run"),
        c.integer("step", None, "The step to replay, as metrics.jsonl numbers it.", metavar="S",
                  min=1, required=True),
        c.boolean("json", False, "Print one JSON object: step, train_loss, grad_norm and rows "
                  "[{row, loss, tokens}] in row order."),
        c.CPU_DEVICES,
        c.boolean("progress", True, "Report on stderr how many of the steps before --step are "
                  "replayed (a line every 2 s)."),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Prints the replayed step's losses (a table worst first, or JSON); exit 0."""
  c.setup_devices(args.cpu_devices)
  from jaxdp.lm.replay import replay_step
  result = replay_step(args.workdir, args.step, progress=_progress(args.progress))
  if args.json:
    print(json.dumps(result.to_json()))
    return 0
  for line in describe(result, args.workdir):
    print(line)
  return 0


def _progress(enabled: bool):
  """progress(done, total): a line on stderr at most every 2 s (and at the end) when enabled."""
  shown = [time.perf_counter()]

  def report(done: int, total: int) -> None:
    now = time.perf_counter()
    if enabled and (now - shown[0] >= 2.0 or done == total):
      shown[0] = now
      print(f"jaxdp replay: replayed {done}/{total} steps", file=sys.stderr, flush=True)
  return report


def describe(result, workdir: str) -> list[str]:
  """The text report: a header (checkpoint, steps replayed, devices, loss against the logged
  one) and one line per row of the global batch, worst first."""
  start = "the initial state" if result.from_step == 0 else f"checkpoint {result.from_step}"
  replayed = f"{result.replayed_steps} step{'s' if result.replayed_steps != 1 else ''}"
  devices = f"{result.num_devices} device{'s' if result.num_devices != 1 else ''}"
  lines = [f"jaxdp replay: step {result.step} of {workdir}, from {start} (replayed {replayed} "
           f"before it) on {devices}"]
  def against(replayed: float, logged: float | None) -> str:
    if logged is None:
      return "no train line logged this step alone"
    if logged == replayed or (logged != logged and replayed != replayed):
      return f"logged {logged:.9g}: equal"
    return (f"logged {logged:.9g}: differs by {replayed - logged:.3g}, float32 rounding of another "
            "reduction order; config.reduction=fixed_order makes it exact")
  lines.append(f"  train_loss {result.train_loss:.9g} ({against(result.train_loss, result.logged_train_loss)})")
  lines.append(f"  grad_norm {result.grad_norm:.9g} ({against(result.grad_norm, result.logged_grad_norm)})")
  if not result.applied:
    lines.append("  its update was not applied (a non-finite loss or gradient, an fp16 overflow, or a "
                 "loss spike under config.spike_policy='skip'); config.nan_policy='halt' stops the "
                 "run at a non-finite one")
  batch = "" if result.data_index in (None, result.step - 1) else \
      f" (batch {result.data_index} of the data: a rollback skipped batches before it)"
  lines.append(f"  {len(result.rows)} rows of the global batch{batch}, worst first:")
  lines.append(f"  {'row':>6}  {'loss':>10}  {'tokens':>7}  text")
  for r in result.worst_first():
    tokens = f"{r.tokens:g}"
    lines.append(f"  {r.row:>6}  {r.loss:>10.6f}  {tokens:>7}  {r.preview[:48]!r}")
  return lines
