"""Loss curves of one or several runs from their metrics.jsonl: `jaxdp plot`.

Pure up to the figure: `loss_figure` returns a matplotlib Figure (no pyplot, no global state);
`save_loss_plot` writes it as a PNG. Targets reached (config.target_losses) are starred on the eval
panel at the step of the evaluation that first reached them.
"""

from __future__ import annotations

from collections.abc import Sequence
import io
import math
import os

from jaxdp.errors import JaxdpError, atomic_write
from jaxdp.runtime.metrics import read_metrics

CURVES = (("train_loss", "train loss"), ("eval_loss", "eval loss"))


def run_label(workdir: str) -> str:
  """A run's name in the legend: the workdir's last path component."""
  return os.path.basename(os.path.normpath(workdir)) or workdir


def loss_curves(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """{"train_loss": (steps, values), "eval_loss": ...}; a step logged twice (a resumed run
  repeating steps after its last checkpoint) keeps its latest value."""
  if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
    raise JaxdpError(f"plot: {workdir!r} has no metrics.jsonl; give the --workdir of a run "
                     "(`jaxdp train --workdir DIR` writes it)")
  records = read_metrics(workdir)
  curves = {}
  for field, _ in CURVES:
    # null: a non-finite value (runtime.metrics.json_line), drawn as a gap.
    by_step = {r["step"]: math.nan if r[field] is None else r[field] for r in records
               if field in r and "event" not in r}
    steps = sorted(by_step)
    curves[field] = (steps, [by_step[s] for s in steps])
  if not any(steps for steps, _ in curves.values()):
    raise JaxdpError(f"plot: {workdir!r}/metrics.jsonl holds no train_loss or eval_loss yet; "
                     "wait for the run's first log line (config.log_every)")
  return curves


def target_marks(workdir: str) -> list[tuple[int, float]]:
  """(step, target) of each "target_reached" event of the run (runtime/targets.py), in order."""
  return [(r["step"], r["target"]) for r in read_metrics(workdir)
          if r.get("event") == "target_reached"]


def loss_figure(workdirs: Sequence[str], labels: Sequence[str] | None = None):
  """A figure with a train-loss and an eval-loss panel, one line per run, labelled by run."""
  from matplotlib.figure import Figure
  if not workdirs:
    raise JaxdpError("plot: give at least one WORKDIR")
  labels = list(labels) if labels is not None else [run_label(w) for w in workdirs]
  if len(set(labels)) < len(labels):  # Same basename in different folders: use the paths.
    labels = [os.path.normpath(w) for w in workdirs]
  curves = [loss_curves(w) for w in workdirs]
  figure = Figure(figsize=(11, 4), layout="constrained")
  for axes, (field, title) in zip(figure.subplots(1, len(CURVES)), CURVES):
    for label, run, workdir in zip(labels, curves, workdirs):
      steps, values = run[field]
      if steps:
        line, = axes.plot(steps, values, marker="o" if len(steps) < 3 else None, label=label)
        if field == "eval_loss":  # Where each target eval loss was first reached.
          for step, target in target_marks(workdir):
            axes.plot([step], [target], marker="*", markersize=12, color=line.get_color())
            axes.annotate(f"{target:g}", (step, target), textcoords="offset points", xytext=(4, 4),
                          fontsize=8, color=line.get_color())
    axes.set_title(title)
    axes.set_xlabel("step")
    axes.set_ylabel("loss (nats/token)")
    axes.grid(alpha=0.3)
    if axes.get_lines():
      axes.legend()
  return figure


def save_loss_plot(workdirs: Sequence[str], out: str) -> str:
  """Writes the loss figure of `workdirs` to the PNG `out`; returns its path."""
  if not out.lower().endswith(".png"):
    raise JaxdpError(f"plot: --out={out!r} must name a .png file")
  parent = os.path.dirname(out)
  while parent and not os.path.isdir(parent):  # Else makedirs fails on it with a traceback.
    if os.path.lexists(parent):
      raise JaxdpError(f"plot: --out={out!r} is under {parent!r}, which is a file or a dangling "
                       "symlink, not a directory; give a path whose parent folders are directories")
    parent = os.path.dirname(parent)
  figure = loss_figure(workdirs)
  buffer = io.BytesIO()  # Rendered first, then written whole: a full disk leaves no half image.
  figure.savefig(buffer, format="png", dpi=100)
  atomic_write(out, buffer.getvalue(), "plot: writing --out")
  return out
