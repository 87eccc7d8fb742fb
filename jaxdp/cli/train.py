"""`jaxdp train`: train a model as the config says, checkpointing and logging to --workdir."""

from __future__ import annotations

import os
import types
from typing import Any

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="train",
    summary="Train a model as the config says; checkpoints and metrics go to --workdir.",
    description=(
        "Trains the model the config defines, on all visible devices (or --cpu_devices emulated "
        "ones), resuming from the latest checkpoint in --workdir if there is one. Checkpoints, "
        "metrics.jsonl and the config land in --workdir. For a multi-process run give "
        "--coordinator, --num_processes and --process_id to every process (or run under SLURM, "
        "Open MPI, a Kubernetes Indexed Job or mpi4py, read by JAX's cluster detection; or use "
        "`jaxdp launch`)."),
    config=True,
    flags=(
        c.string("workdir", "runs/default", "Directory for checkpoints and metrics.jsonl; a run "
                 "already there is resumed.", metavar="DIR", path="workdir"),
        c.CPU_DEVICES,
        c.string("coordinator", None, "HOST:PORT where process 0 serves the multi-process "
                 "coordinator.", metavar="HOST:PORT",
                 default_text="from the cluster, else one process"),
        c.integer("num_processes", None, "Processes in the run.", metavar="P", min=1,
                  default_text="from the cluster, else 1"),
        c.integer("process_id", None, "This process's index in the run (below --num_processes).",
                  metavar="I", min=0, default_text="from the cluster, else 0"),
        c.enum("cluster", "auto", ("auto", "none", "slurm", "ompi", "k8s", "mpi4py", "gketpu",
                                   "gcetpu"),
               "Which cluster environment describes the process group (JAX's cluster "
               "detection); auto takes the first present, mpi4py only when named; explicit "
               "flags override it."),
        c.real("init_timeout_s", 300.0, "Seconds to wait for every process to join before "
               "giving up.", metavar="S", min=0, min_open=True),
        c.PROGRESS,
        c.boolean("allow_config_change", False, "Resume even if run-defining config fields "
                  "changed since the checkpoint."),
        c.string("restore_from", None, "Resume from this checkpoint step directory "
                 "(WORKDIR/checkpoints/STEP) instead of the latest one in --workdir.",
                 metavar="DIR", default_text="the latest checkpoint in --workdir", path="step"),
    ),
)


def check_inputs_exist(config: Any) -> None:
  """The training data's local paths (config.data.path, each config.data.sources entry) exist:
  refused in one line naming the field and path before any device or JAX work, which a run
  would otherwise do first (the data is opened when the run is built)."""
  from jaxdp.data.mixture import parse_sources
  from jaxdp.data.sources import check_exists
  check_exists(config.data.path, "config.data.path")
  for path, _ in parse_sources(config.data.sources):
    check_exists(path, "config.data.sources entry")


def run(args: types.SimpleNamespace) -> int:
  """Joins the process group (if any), trains, prints where the metrics are.

  Sets `args.multiprocess` once the group has formed, so that the caller exits a failing
  process at once instead of waiting for its peers.
  """
  from jaxdp.runtime import logs, signals
  # Ctrl-C and SIGTERM are recorded from here on and acted on at safe points (see
  # runtime/signals.py): before any state exists the run exits cleanly, after it saves.
  signals.install()
  logs.to_file(args.workdir)  # Library messages go to WORKDIR/jaxdp.log, not the terminal.
  check_inputs_exist(args.config)
  from jaxdp.lm.preflight import check_paths
  # The workdir, config.checkpoint_dir and --restore_from, before anything is written (and, named
  # as the user gave them, again by train_and_evaluate for its other callers).
  check_paths(args.config, args.workdir, args.restore_from,
              restore_given=getattr(args, "restore_given", None))
  from jaxdp.runtime import checkpoint
  # Every process, before the group forms (after it, a peer's heartbeat files land in the workdir).
  checkpoint.check_storage(args.config.get("checkpoint_dir") or checkpoint.location(args.workdir))
  c.setup_devices(args.cpu_devices)
  if args.config.get("reduction") == "fixed_order":
    # The step's own programs get these per compilation; XLA_FLAGS covers the rest of the run
    # (XLA:GPU only reads it, once, when the backend starts: now, before any device is touched).
    from jaxdp.parallel.fixed_order import set_determinism_flags
    set_determinism_flags()
  from jaxdp.runtime import distributed  # Before any device is touched.
  step_timeout_s = float(args.config.get("step_timeout_s", 0) or 0)
  group = distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                                 args.init_timeout_s, cluster=args.cluster,
                                 step_timeout_s=step_timeout_s, workdir=args.workdir)
  args.multiprocess = group.num_processes > 1
  monitor = None
  if args.multiprocess:
    print(group.describe(), flush=True)
    from jaxdp.runtime import heartbeat
    # Lost peers are judged from here on, through building the model and compiling too.
    monitor = heartbeat.start(args.workdir, step_timeout_s)
  else:
    # One process stops here; several carry the signal to the barrier before the first step,
    # where every process learns of it and all stop together (signals.agree_before_training).
    signals.check("while the process group was forming")
  from jaxdp.lm import train_and_evaluate
  try:
    result = train_and_evaluate(args.config, args.workdir, progress=args.progress,
                                allow_config_change=args.allow_config_change,
                                restore_from=args.restore_from)
  except BaseException as e:
    if monitor is not None:
      monitor.failed(e)  # The other processes stop within a heartbeat, with this error.
      monitor.stop("failed" if monitor.failed_error else "finished")
      monitor.linger()  # Process 0 serves the coordinator: the others leave first.
    raise
  finally:
    if monitor is not None:
      monitor.stop("failed" if monitor.failed_error else "finished")
  loss = "none" if result["eval_loss"] is None else f"{result['eval_loss']:.4f}"
  print(f"done: step {result['step']}, eval_loss {loss}, stop reason "
        f"{result['stop_reason']}; metrics in {os.path.join(args.workdir, 'metrics.jsonl')}")
  if result["stop_reason"] == "preempted":
    # Every process prints it (`jaxdp launch` reads it as a clean stop, not a failure).
    code = args.config.get("preempt_exit_code", 75)
    print(f"jaxdp: preempted: stopped after step {result['step']} and saved a checkpoint; "
          f"exit status {code} (config.preempt_exit_code): run the same command to resume",
          flush=True)
    return code
  return 0
