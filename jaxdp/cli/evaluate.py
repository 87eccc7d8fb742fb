"""`jaxdp evaluate`: downstream scores of a run's checkpoint (HellaSwag-format multiple choice,
perplexity and bits per byte of text), data-parallel over every device."""

from __future__ import annotations

import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="evaluate",
    summary="Score a run's checkpoint on multiple-choice tasks and text (accuracy, bits per byte).",
    description=(
        "Loads a checkpoint of --workdir (the latest by default) and scores it on each task, the "
        "rows split over every device as in training: --task hellaswag:FILE.jsonl (one item per "
        "line, {\"ctx\", \"endings\", \"label\"}: acc picks the ending with the highest total "
        "log-likelihood, acc_norm the highest per token, as llm.c and nanoGPT report HellaSwag) "
        "and --text FILE (a text file, or .jsonl with a \"text\" field per line: loss in nats "
        "per token, perplexity, bits per byte). Prints one line per task and appends the "
        "metrics, named FILE_STEM/METRIC, at the checkpoint's step to the run's metrics.jsonl "
        "and TensorBoard events. Nothing is downloaded: give the files. See docs/evaluation.md."),
    no_config_hint="the model and its config come from the checkpoint in --workdir",
    resolve_before_run=False,
    flags=(
        c.string("workdir", "runs/default", "Run directory written by `jaxdp train`.",
                 metavar="DIR", path="run"),
        c.string("task", "", "Tasks as KIND:FILE, several joined by commas; KIND is hellaswag "
                 "(multiple choice, HellaSwag's JSONL) or text (same as --text).",
                 metavar="KIND:FILE[,...]", default_text="none"),
        c.string("text", "", "Text files to report perplexity and bits per byte on, joined by "
                 "commas (a .jsonl file: one document per line's \"text\").",
                 metavar="FILE[,...]", default_text="none"),
        c.integer("step", None, "Checkpoint step to evaluate.", min=0, default_text="the latest"),
        c.integer("batch_size", None, "Rows scored per global batch (one row is one ending of "
                  "an item, or one window of text), rounded up to a multiple of the devices.",
                  min=1, default_text="the run's global_batch_size"),
        c.CPU_DEVICES,
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Prints each task's scores and appends them to the run's metrics; exit 0."""
  import os

  from jaxdp.errors import JaxdpError
  from jaxdp.lm import evaluate
  tasks = evaluate.parse_tasks(args.task, "--task")
  tasks += evaluate.parse_tasks(",".join(f"text:{path}" for path in args.text.split(",")
                                         if path.strip()), "--text")
  if not tasks:
    raise JaxdpError("`jaxdp evaluate` needs a task: --task hellaswag:FILE.jsonl and/or "
                     "--text FILE")
  for i, task in enumerate(tasks):  # parse_tasks checked each flag alone.
    same = [t for t in tasks[:i] if t.name == task.name]
    if same:
      raise JaxdpError(f"{same[0].field} {same[0].path!r} and {task.field} {task.path!r} would "
                       f"both report as {task.name!r} (metrics are named after the file); "
                       "rename one of the files")
  for task in tasks:  # Read before any device work: a bad file fails at once, not after loading.
    (evaluate.read_choices if task.kind == "hellaswag" else evaluate.read_documents)(task)
  COMMAND.resolve_paths(args)  # --workdir in any form (jaxdp.runtime.paths), after the tasks.
  c.setup_devices(args.cpu_devices)
  import jax

  from jaxdp.lm.eval_checkpoint import evaluate_workdir
  step, metrics = evaluate_workdir(args.workdir, tasks, step=args.step, batch_size=args.batch_size)
  count = len(jax.devices())
  print(f"jaxdp evaluate: {args.workdir} step {step} on {count} device{'s' if count != 1 else ''}")
  for line in evaluate.summary(tasks, metrics):
    print(f"  {line}")
  print(f"  metrics appended to {os.path.join(args.workdir, 'metrics.jsonl')}")
  return 0
