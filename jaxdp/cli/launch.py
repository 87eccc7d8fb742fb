"""`jaxdp launch --nprocs P -- train ...`: one training run as P local processes."""

from __future__ import annotations

import types

from jaxdp.cli import command as c
from jaxdp.errors import JaxdpError

COMMAND = c.Command(
    name="launch",
    summary="Run `train` as several local processes (--nprocs P -- train [train flags]).",
    description=(
        "Starts --nprocs processes of `jaxdp train` with the train flags given after `--`, joined "
        "as one multi-process run through a local coordinator; prefixes their output with "
        "\"[i] \", and stops them all when one fails. With --max_restarts R, a failed run "
        "starts again from its last checkpoint, up to R times; with --min_nprocs M, a restart "
        "after an attempt that saved no new checkpoint uses one process fewer, down to M (the "
        "global batch stays the config's). Exits with the failed process's status, or 3 when "
        "a process was lost (killed or crashed by a signal), as its peers would without the "
        "launcher. Its own flags come before `--`."),
    trailer="-- train [train flags]", passthrough=True,
    no_config_hint="give train's flags after `--`: `jaxdp launch --nprocs 2 -- train --config ...`",
    flags=(
        c.integer("nprocs", None, "Local processes to start.", metavar="P", min=1, required=True),
        c.integer("cpu_devices", None, "Emulated CPU devices per process.", min=1,
                  default_text="as `jaxdp train`"),
        c.integer("max_restarts", 0, "Times a failed run is restarted from its last checkpoint "
                  "(a process that exits with status 2, bad input, is not restarted).",
                  metavar="R", min=0),
        c.integer("min_nprocs", None, "Fewest processes a restart may use: after an attempt that "
                  "saved no new checkpoint, the next uses one process fewer, down to M.",
                  metavar="M", min=1, default_text="--nprocs (never fewer)"),
    ),
)


def check_train_args(launched: list[str]) -> types.SimpleNamespace:
  """Parses the launched train command line as `jaxdp train` will, so that a bad flag fails
  here, once, instead of in every process; returns the parsed train flags."""
  from jaxdp.cli import train
  rest = launched[1:]
  if c.wants_help(rest):
    raise JaxdpError("`jaxdp launch` starts training; for train's flags see `jaxdp train --help`")
  try:
    return train.COMMAND.parse(rest)
  except JaxdpError as e:
    raise JaxdpError(f"after '--': {e}") from None


def run(args: types.SimpleNamespace) -> int:
  """Starts --nprocs local `jaxdp train` processes; returns the exit status launch reports."""
  from jaxdp.runtime.launch import check_command, launch
  # `train` after `--`, no flags that launch sets, restart counts in range.
  check_command(args.nprocs, args.launched, args.max_restarts, args.min_nprocs)
  train_args = check_train_args(args.launched)
  return launch(args.nprocs, args.launched, args.cpu_devices, max_restarts=args.max_restarts,
                min_nprocs=args.min_nprocs, workdir=train_args.workdir)
