"""A run directory in every form a user gives it: the workdir, its checkpoints/ folder or one
checkpoint step directory (WORKDIR/checkpoints/5), relative or absolute, through symlinks, with
spaces or non-ASCII characters. Every subcommand that takes a run resolves it here, so each
form works, and each impossible path (empty, a dangling symlink, a plain file, a path under a
file) is refused in one line, the same way everywhere. Imports no JAX.
"""

from __future__ import annotations

import dataclasses
import os
import shlex

from jaxdp.errors import JaxdpError

CHECKPOINTS = "checkpoints"


@dataclasses.dataclass(frozen=True)
class RunPath:
  """workdir: the run directory as the user wrote it, made to name the run itself.
  step: the checkpoint step the user pointed at (a step directory), else None.
  path: that step directory (else the workdir)."""
  workdir: str
  step: int | None = None
  path: str = ""


def _refuse_unusable(path: str, flag: str) -> None:
  """Raises JaxdpError for a path that can never be a directory: empty, a dangling symlink, a
  plain file, or a path through a file."""
  if not path or not path.strip():
    example = f", e.g. {flag}=runs/mine" if flag.startswith("--") else ""
    raise JaxdpError(f"{flag}={path!r} is empty; give a directory{example}")
  if "\0" in path:
    raise JaxdpError(f"{flag}={path!r} contains a NUL byte; give a directory path")
  if os.path.islink(path) and not os.path.exists(path):
    raise JaxdpError(f"{flag}={path!r} is a symlink to {os.readlink(path)!r}, which does not "
                     "exist; fix or remove the link, or give the directory itself")
  if os.path.exists(path) and not os.path.isdir(path):
    raise JaxdpError(f"{flag}={path!r} is a file, not a directory; give a run directory")
  parent = path
  while True:  # A path under a file (`notes.txt/run`) fails with ENOTDIR wherever it is used.
    parent = os.path.dirname(parent.rstrip(os.sep)) if parent.rstrip(os.sep) else ""
    if not parent:
      break
    if os.path.exists(parent) and not os.path.isdir(parent):
      raise JaxdpError(f"{flag}={path!r} is under {parent!r}, which is a file; give a path whose "
                       "parent folders are directories")
    if os.path.isdir(parent):
      break


def resolve_run(path: str, flag: str = "--workdir", *, must_exist: bool = True) -> RunPath:
  """The run directory that `path` names (see the module docstring).

  must_exist: the run must exist (inspect, generate, export, evaluate, plot); False for
    `train`, whose workdir is created.

  Raises:
    JaxdpError: one line naming `flag`: an unusable path, or (must_exist) no such directory.
  """
  _refuse_unusable(path, flag)
  if not os.path.isdir(path):
    if must_exist:
      raise JaxdpError(f"{flag}={path!r}: no such directory, so it has no checkpoints/; give "
                       f"a run directory, or train first with `jaxdp train --workdir "
                       f"{shlex.quote(path)}`")
    return RunPath(path, None, path)
  stripped = path.rstrip(os.sep) or path
  real = os.path.realpath(stripped)
  name, parent = os.path.basename(real), os.path.dirname(real)
  if name.isdigit() and os.path.basename(parent) == CHECKPOINTS:
    workdir = os.path.dirname(os.path.dirname(os.path.abspath(stripped))) \
        if os.path.basename(os.path.dirname(os.path.abspath(stripped))) == CHECKPOINTS \
        else os.path.dirname(parent)
    return RunPath(_as_given(workdir, stripped), int(name), stripped)
  if name == CHECKPOINTS and not os.path.isdir(os.path.join(real, CHECKPOINTS)):
    workdir = os.path.dirname(os.path.abspath(stripped)) \
        if os.path.basename(os.path.abspath(stripped)) == CHECKPOINTS else parent
    return RunPath(_as_given(workdir, stripped), None, stripped)
  return RunPath(path, None, path)


def _as_given(workdir: str, given: str) -> str:
  """`workdir` relative when the user gave a relative path (messages then read as typed)."""
  return workdir if os.path.isabs(given) else os.path.relpath(workdir)
