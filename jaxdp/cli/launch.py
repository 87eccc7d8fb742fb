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
        "\"[i] \", and stops them all when one fails. Its own flags come before `--`."),
    trailer="-- train [train flags]", passthrough=True,
    no_config_hint="give train's flags after `--`: `jaxdp launch --nprocs 2 -- train --config ...`",
    flags=(
        c.integer("nprocs", None, "Local processes to start.", metavar="P", min=1, required=True),
        c.integer("cpu_devices", None, "Emulated CPU devices per process.", min=1,
                  default_text="as `jaxdp train`"),
    ),
)


def check_train_args(launched: list[str]) -> None:
  """Parses the launched train command line as `jaxdp train` will, so that a bad flag fails
  here, once, instead of in every process."""
  from jaxdp.cli import train
  rest = launched[1:]
  if c.wants_help(rest):
    raise JaxdpError("`jaxdp launch` starts training; for train's flags see `jaxdp train --help`")
  try:
    train.COMMAND.parse(rest)
  except JaxdpError as e:
    raise JaxdpError(f"after '--': {e}") from None


def run(args: types.SimpleNamespace) -> int:
  """Starts --nprocs local `jaxdp train` processes; returns the exit status launch reports."""
  from jaxdp.runtime.launch import check_command, launch
  check_command(args.nprocs, args.launched)  # `train` after `--`, no flags that launch sets.
  check_train_args(args.launched)
  return launch(args.nprocs, args.launched, args.cpu_devices)
