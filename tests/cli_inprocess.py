"""The `jaxdp` command line run inside an existing Python process instead of a fresh interpreter.

Tests use `run(capfd, *argv)` for command lines that are refused or answered before any device
or JAX work (parsing, ranges, --help): the same `main()` a subprocess runs, with the exit status
and what reached fd 1 and 2 (capfd also sees writes below Python), in milliseconds instead of an
interpreter start each. A command that would set up another device count than the test process's
fails the test instead: that process's emulated devices are fixed once, for every test in it.

Run as a script, `python tests/cli_inprocess.py COMMANDS.json RESULTS.jsonl` runs a list of
command lines (each a list of arguments after `jaxdp`) in order in this one process, in its
working directory, and appends one line `{"index", "returncode", "stderr", "seconds"}` per command to
RESULTS.jsonl (with its wall time, "seconds"); it stops at the first that fails. JAX fixes the emulated device count when its
backend starts, so a command asking for another count than the one already in use runs in a
fresh interpreter instead (the same command line, `python -m jaxdp.cli.main`).
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys

# JAX's refusal to change jax_num_cpu_devices once its backend has started.
_DEVICES_FIXED = "jax_num_cpu_devices config should be updated before backends"


def _main(argv: list[str]) -> int:
  from jaxdp.cli import main as cli
  try:
    return cli.main(["jaxdp", *argv])
  except SystemExit as e:  # argparse-style exits: status as a shell would report it.
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)


def _same_devices_only(setup):
  """`setup_devices` that lets through only this process's own device count (a no-op for JAX)."""
  def setup_devices(cpu_devices):
    import jax
    if cpu_devices is not None and cpu_devices == jax.config.jax_num_cpu_devices:
      return setup(cpu_devices)
    raise AssertionError(f"this command sets up --cpu_devices={cpu_devices}, not this process's "
                         f"{jax.config.jax_num_cpu_devices}: run it in a subprocess")
  return setup_devices


def run(capfd, *argv: str) -> subprocess.CompletedProcess:
  """`jaxdp *argv` in this process: (returncode, stdout, stderr) as a subprocess would give.

  For command lines answered before any device work, or run on exactly this process's emulated
  devices (--cpu_devices 8 under tests/conftest.py); AssertionError for any other device setup.
  capfd: pytest's fixture (output printed before is dropped; writes below Python are seen), or
  None for Python-level capture (in a fixture wider than one test).
  """
  from jaxdp.cli import command
  out, err = io.StringIO(), io.StringIO()
  if capfd is not None:
    capfd.readouterr()
  setup, command.setup_devices = command.setup_devices, _same_devices_only(command.setup_devices)
  try:
    if capfd is None:
      with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = _main(list(argv))
    else:
      code = _main(list(argv))
  finally:
    command.setup_devices = setup
  if capfd is not None:
    return subprocess.CompletedProcess(list(argv), code, *capfd.readouterr())
  return subprocess.CompletedProcess(list(argv), code, out.getvalue(), err.getvalue())


def _run_one(argv: list[str]) -> tuple[int, str]:
  """(exit status, stderr) of one command line: in this process, or a fresh one where the
  command needs a device count other than the one this process's JAX started with."""
  err = io.StringIO()
  try:
    with contextlib.redirect_stderr(err):
      return _main(argv), err.getvalue()
  except RuntimeError as e:
    if _DEVICES_FIXED not in str(e):
      raise
  done = subprocess.run([sys.executable, "-m", "jaxdp.cli.main", *argv], capture_output=True,
                        text=True, timeout=600)
  sys.stdout.write(done.stdout)
  return done.returncode, done.stderr


def run_all(commands: list[list[str]], results: str) -> int:
  """Runs `commands` in order, one line per command in `results`; 0 if every one exited 0."""
  import time
  for index, argv in enumerate(commands):
    start = time.perf_counter()
    code, stderr = _run_one(argv)
    with open(results, "a") as f:
      f.write(json.dumps({"index": index, "returncode": code, "stderr": stderr[-3000:],
                          "seconds": round(time.perf_counter() - start, 2)}) + "\n")
    if code != 0:
      return 1
  return 0


if __name__ == "__main__":
  import faulthandler
  # A native crash of one documented command (once: SIGSEGV inside a profiler trace, under load)
  # leaves the Python stacks of every thread in the runner's stderr, which the test shows.
  faulthandler.enable()
  with open(sys.argv[1]) as f:
    sys.exit(run_all(json.load(f), sys.argv[2]))
