"""The `jaxdp` command line: dispatch to a subcommand, one-line errors, --help and --version.

  jaxdp COMMAND [flags]        each subcommand (jaxdp/cli/COMMAND.py) accepts only its own flags
  jaxdp COMMAND --help         its flags, their defaults and valid ranges
  jaxdp --help | --version

Exit status: 0 done; 2 bad input, reported as one line `jaxdp: error: <message>` on stderr
(no traceback); 1 `verify` found a mismatch (or an unexpected failure, with its traceback);
3 a training step timed out (config.step_timeout_s); 75 `train` stopped by a signal after saving
a checkpoint (config.preempt_exit_code: resumable); 130 interrupted before anything was saved;
141 stdout was closed early (`jaxdp generate ... | head`): the output is cut short quietly,
and 141 = 128 + SIGPIPE is what a shell reports for tools like `cat` there.
"""

from __future__ import annotations

import os
import sys
import traceback
import types

from jaxdp.cli import (
  command,
  evaluate,
  export,
  fields,
  generate,
  inspect,
  launch,
  plan,
  plot,
  prepare,
  train,
  verify,
)
from jaxdp.errors import JaxdpError

MODULES: dict[str, types.ModuleType] = {m.COMMAND.name: m for m in (
    train, generate, evaluate, launch, prepare, plot, inspect, plan, verify, export)}
COMMANDS = tuple(MODULES)
BROKEN_PIPE_STATUS = 141


def version() -> str:
  """The installed package's version, "unknown" when it is not installed (a bare checkout)."""
  from importlib import metadata
  try:
    return metadata.version("jaxdp")
  except metadata.PackageNotFoundError:
    return "unknown"


def usage() -> str:
  """The text of `jaxdp --help`: every subcommand with its one-line summary."""
  width = max(map(len, COMMANDS))
  lines = ["usage: jaxdp COMMAND [flags]    (each command accepts only its own flags)", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {module.COMMAND.summary}" for name, module in MODULES.items()]
  lines += ["", "`jaxdp COMMAND --help` lists a command's flags with their defaults and valid "
                "ranges;",
            "`jaxdp train --help_config` lists every config field. `jaxdp --version` prints the "
            "version.", "",
            "Bad input ends with one line, `jaxdp: error: ...`, and exit status 2."]
  return "\n".join(lines)


def _dispatch(argv: list[str], state: types.SimpleNamespace) -> int:
  """Runs the command line `argv` (without the program name); returns the exit status."""
  if not argv or argv[0] in command.HELP_FLAGS:
    print(usage())
    return 0
  if argv[0] == "help":  # `jaxdp help train` is `jaxdp train --help`.
    return _dispatch([argv[1], "--help"], state) if len(argv) > 1 else _dispatch([], state)
  if argv[0] in ("--version", "-version", "-V"):
    print(f"jaxdp {version()}")
    return 0
  name = argv[0]
  if name not in MODULES:
    close = command.suggest(name, {c: [c] for c in COMMANDS})
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    if name.startswith("-"):
      raise JaxdpError(f"{name!r} before the command: flags go after it, `jaxdp COMMAND [flags]`; "
                       f"commands: {', '.join(COMMANDS)}")
    raise JaxdpError(f"unknown command {name!r}; {hint}commands: {', '.join(COMMANDS)}")
  module = MODULES[name]
  if command.wants_help(argv[1:]):
    print(module.COMMAND.help())
    return 0
  args = module.COMMAND.parse(argv[1:], others=[m.COMMAND for m in MODULES.values()])
  if getattr(args, "help_config", False):
    print(fields.describe(args.config, args.config_path, name))
    return 0
  state.args = args
  return module.run(args) or 0


def main(argv: list[str] | None = None) -> int:
  """`argv` is the full command line, program name first (default: sys.argv)."""
  argv = list(sys.argv if argv is None else argv)
  state = types.SimpleNamespace(args=None)

  def multiprocess() -> bool:  # `train` sets args.multiprocess once its process group forms.
    return bool(getattr(state.args, "multiprocess", False))

  try:
    status = _dispatch(argv[1:], state)
    sys.stdout.flush()  # Here, not at exit, so that a closed pipe is caught below.
    return status
  except JaxdpError as e:
    from jaxdp.runtime import logs
    log = logs.current()
    print(f"jaxdp: error: {e}" + (f" (library messages: {log})" if log else ""), file=sys.stderr)
    return _exit_now(2) if multiprocess() else 2
  except BrokenPipeError:
    return _stdout_gone()
  except KeyboardInterrupt as e:
    print(f"jaxdp: interrupted: {e}" if str(e) else "jaxdp: interrupted", file=sys.stderr)
    return _exit_now(130) if multiprocess() else 130
  except SystemExit as e:
    if not multiprocess():
      raise
    return _exit_now(e.code if isinstance(e.code, int) else 1)
  except BaseException:
    if not multiprocess():
      raise
    traceback.print_exc()
    return _exit_now(1)


def _stdout_gone() -> int:
  """The reader of stdout went away (`| head`): stop quietly.

  As the Python docs advise (library/signal, "Note on SIGPIPE"), stdout is pointed at devnull
  so that the interpreter's final flush of what is still buffered does not fail again.
  """
  try:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
  except (OSError, ValueError):  # No real file descriptor (e.g. a captured stdout in tests).
    pass
  return BROKEN_PIPE_STATUS


def _exit_now(status: int) -> int:
  """A failed process of a multi-process run exits at once: JAX's exit handler would wait for
  the other processes, which may be waiting for this one."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def run() -> None:
  """The console script `jaxdp`."""
  sys.exit(main())


if __name__ == "__main__":
  run()
