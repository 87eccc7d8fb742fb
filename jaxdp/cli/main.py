"""The `jaxdp` command line: dispatch to a subcommand, one-line errors, --help and --version.

  jaxdp COMMAND [flags]        each subcommand (jaxdp/cli/COMMAND.py) accepts only its own flags
  jaxdp COMMAND --help         its flags, their defaults and valid ranges
  jaxdp --help | --version

Exit status: 0 done; 2 bad input, reported as one line `jaxdp: error: <message>` on stderr
(no traceback); 1 `verify` found a mismatch (or an unexpected failure, with its traceback);
3 a training step timed out (config.step_timeout_s); 75 `train` stopped by a signal after saving
a checkpoint (config.preempt_exit_code: resumable); 129 a process of `jaxdp launch` whose
launcher is gone (it stops without saving); 130 interrupted before anything was saved;
141 stdout was closed early (`jaxdp generate ... | head`): the output is cut short quietly,
and 141 = 128 + SIGPIPE is what a shell reports for tools like `cat` there.
"""

from __future__ import annotations

# Only what the interpreter has loaded already: this module's own import must be over in a
# moment, since a Ctrl-C before `run()` installs its handler is Python's traceback, not ours.
import functools
import os
import signal
import sys
import types

BROKEN_PIPE_STATUS = 141
INTERRUPTED_STATUS = 130
# The signals a parent may start jaxdp with blocked (`jaxdp launch` does, so that a signal
# forwarded during a worker's start-up waits for the handler below instead of meeting Python's
# start-up code); `run()` unblocks them once its handler is in place.
START_BLOCKED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


@functools.cache
def _modules() -> dict[str, types.ModuleType]:
  """Every subcommand's module by name, imported on first use (after `run()`'s handler)."""
  from jaxdp.cli import (
    evaluate,
    export,
    generate,
    inspect,
    launch,
    plan,
    plot,
    prepare,
    replay,
    stacks,
    train,
    verify,
  )
  return {m.COMMAND.name: m for m in (
      train, generate, evaluate, launch, prepare, plot, inspect, plan, verify, export, replay,
      stacks)}


def __getattr__(name: str) -> object:
  """MODULES (name -> subcommand module) and COMMANDS (their names), imported on first use."""
  if name == "MODULES":
    return _modules()
  if name == "COMMANDS":
    return tuple(_modules())
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def version() -> str:
  """The installed package's version, "unknown" when it is not installed (a bare checkout)."""
  from importlib import metadata
  try:
    return metadata.version("jaxdp")
  except metadata.PackageNotFoundError:
    return "unknown"


def usage() -> str:
  """The text of `jaxdp --help`: every subcommand with its one-line summary."""
  modules = _modules()
  width = max(map(len, modules))
  lines = ["usage: jaxdp COMMAND [flags]    (each command accepts only its own flags)", "",
           "commands:"]
  lines += [f"  {name:<{width}}  {module.COMMAND.summary}" for name, module in modules.items()]
  lines += ["", "`jaxdp COMMAND --help` lists a command's flags with their defaults and valid "
                "ranges;",
            "`jaxdp train --help_config` lists every config field. `jaxdp --version` prints the "
            "version.", "",
            "Bad input ends with one line, `jaxdp: error: ...`, and exit status 2."]
  return "\n".join(lines)


def _dispatch(argv: list[str], state: types.SimpleNamespace) -> int:
  """Runs the command line `argv` (without the program name); returns the exit status."""
  from jaxdp.cli import command
  if not argv or argv[0] in command.HELP_FLAGS:
    print(usage())
    return 0
  if argv[0] == "help":  # `jaxdp help train` is `jaxdp train --help`.
    return _dispatch([argv[1], "--help"], state) if len(argv) > 1 else _dispatch([], state)
  if argv[0] in ("--version", "-version", "-V"):
    print(f"jaxdp {version()}")
    return 0
  from jaxdp.errors import JaxdpError
  modules = _modules()
  commands = tuple(modules)
  name = argv[0]
  if name not in modules:
    close = command.suggest(name, {c: [c] for c in commands})
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    if name.startswith("-"):
      raise JaxdpError(f"{name!r} before the command: flags go after it, `jaxdp COMMAND [flags]`; "
                       f"commands: {', '.join(commands)}")
    raise JaxdpError(f"unknown command {name!r}; {hint}commands: {', '.join(commands)}")
  module = modules[name]
  if command.wants_help(argv[1:]):
    print(module.COMMAND.help())
    return 0
  args = module.COMMAND.parse(argv[1:], others=[m.COMMAND for m in modules.values()])
  if getattr(args, "help_config", False):
    from jaxdp.cli import fields
    print(fields.describe(args.config, args.config_path, name))
    return 0
  if module.COMMAND.resolve_before_run:  # Each run path in any form, or one line (runtime.paths).
    module.COMMAND.resolve_paths(args)
  state.args = args
  return module.run(args) or 0


def main(argv: list[str] | None = None) -> int:
  """`argv` is the full command line, program name first (default: sys.argv)."""
  argv = list(sys.argv if argv is None else argv)
  state = types.SimpleNamespace(args=None)

  def multiprocess() -> bool:  # `train` sets args.multiprocess once its process group forms.
    return bool(getattr(state.args, "multiprocess", False))

  from jaxdp.errors import JaxdpError
  try:
    status = _dispatch(argv[1:], state)
    sys.stdout.flush()  # Here, not at exit, so that a closed pipe is caught below.
    return status
  except JaxdpError as e:
    from jaxdp.runtime import logs
    logs.discard()  # A refusal before the run started writes nothing, not even the log.
    log = logs.current()
    print(f"jaxdp: error: {e}" + (f" (library messages: {log})" if log else ""), file=sys.stderr)
    return _exit_now(2) if multiprocess() else 2
  except BrokenPipeError:
    return _stdout_gone()
  except RuntimeError as e:
    if (refused := _disk_refused(e)) is not None:
      return _exit_now(refused) if multiprocess() else refused
    if "Unable to initialize backend" not in str(e) or multiprocess():
      raise
    # A platform whose plugin is installed but whose devices are absent (a CUDA plugin, no GPU).
    from jaxdp.cli import command
    print(f"jaxdp: error: {command.first_line(e)}; check the devices, or unset JAX_PLATFORMS "
          "(or give --cpu_devices N to run on the CPU)", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:
    print(f"jaxdp: interrupted: {e}" if str(e) else "jaxdp: interrupted", file=sys.stderr)
    return _exit_now(130) if multiprocess() else 130
  except SystemExit as e:
    if not multiprocess():
      raise
    return _exit_now(e.code if isinstance(e.code, int) else 1)
  except BaseException as e:
    if _from_interrupt(e):  # A library turned the KeyboardInterrupt into its own error.
      print("jaxdp: interrupted", file=sys.stderr)
      return _exit_now(130) if multiprocess() else 130
    if (refused := _disk_refused(e)) is not None:
      return _exit_now(refused) if multiprocess() else refused
    if not multiprocess():
      raise
    import traceback
    traceback.print_exc()
    return _exit_now(1)


def _disk_refused(error: BaseException) -> int | None:
  """A write that no `writing` block names, refused by a full, read-only or forbidden disk: its
  one line (errors.as_write_failed) and exit status 2; None for any other error."""
  from jaxdp.errors import as_write_failed
  failed = as_write_failed(error)
  if failed is None:
    return None
  print(f"jaxdp: error: {failed}", file=sys.stderr)
  return 2


def _from_interrupt(error: BaseException) -> bool:
  """Whether a KeyboardInterrupt is among the causes of `error` (an import that failed because
  of Ctrl-C is reported by some libraries as their own error)."""
  seen: BaseException | None = error
  for _ in range(20):  # A chain can loop; 20 is deeper than any seen.
    if seen is None:
      return False
    if isinstance(seen, KeyboardInterrupt):
      return True
    seen = seen.__cause__ or seen.__context__
  return False


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


def _interrupted_quietly(signum: int, frame: object) -> None:
  """SIGINT: one line and status 130, at once, wherever the main thread is.

  Python's own handler raises KeyboardInterrupt there instead: inside an import it is a
  traceback from a library's internals, inside a native extension's initialisation it has
  crashed the process (SIGSEGV) or become an ImportError, and inside JAX's garbage-collection
  callback it is swallowed ("Exception ignored in _xla_gc_callback") and the command goes on.
  A command with state to save installs its own handler (`train`: runtime/signals.py;
  `launch`: it forwards the signal to its processes).
  """
  del signum, frame
  try:
    os.write(2, b"jaxdp: interrupted\n")
  except OSError:  # stderr closed (a launcher that is gone): the status says it.
    pass
  os._exit(INTERRUPTED_STATUS)


def run() -> None:
  """The console script `jaxdp` (and `python -m jaxdp.cli.main`).

  Ctrl-C at any moment from here on ends it with status 130 and one line, no traceback:
  `_interrupted_quietly` handles SIGINT before, during (unless the command installed its own)
  and after the command (interpreter shutdown, JAX's exit handlers). START_BLOCKED signals a
  parent blocked are unblocked once it is in place, so one that came during Python's start-up
  is handled now. (Python's own start-up before this module runs, tens of milliseconds of the
  interpreter and the environment's .pth files, is beyond any package's reach.) A process
  started by `jaxdp launch` also watches its launcher and stops within a second of it going
  away, however it went (runtime/launch.py, `watch_launcher`).
  """
  signal.signal(signal.SIGINT, _interrupted_quietly)
  signal.pthread_sigmask(signal.SIG_UNBLOCK, START_BLOCKED)
  if os.environ.get("JAXDP_LAUNCHER_FD"):
    from jaxdp.runtime.launch import watch_launcher
    watch_launcher()
  status = main()
  signal.signal(signal.SIGINT, _interrupted_quietly)  # For the exit handlers that run next.
  sys.exit(status)


if __name__ == "__main__":
  run()
