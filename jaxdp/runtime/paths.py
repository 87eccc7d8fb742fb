"""A run directory in every form a user gives it: the workdir, its checkpoints/ folder or one
checkpoint step directory (WORKDIR/checkpoints/5), relative or absolute, through symlinks, with
spaces or non-ASCII characters. Every subcommand that takes a run resolves it here, so each
form works, and each impossible path (empty, a dangling symlink, a plain file, a path under a
file) is refused in one line, the same way everywhere. The other paths commands take are checked
here too, before anything is written: a checkpoint step to start from (`resolve_step`), a
directory or a file to write (`check_directory_to_write`, `check_file_to_write`). Imports no JAX.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import shlex

from jaxdp.errors import JaxdpError

CHECKPOINTS = "checkpoints"
URL_SCHEMES = ("s3://", "gs://")  # Object storage (runtime.checkpoint.is_url), told apart without JAX.
STEP_RECORD = "meta"  # The item every checkpoint step holds its run's record in (checkpoint.py).


@dataclasses.dataclass(frozen=True)
class RunPath:
  """workdir: the run directory as the user wrote it, made to name the run itself.
  step: the checkpoint step the user pointed at (a step directory), else None.
  path: that step directory (else the workdir)."""
  workdir: str
  step: int | None = None
  path: str = ""


def refuse_empty(path: str | None, flag: str, what: str = "a directory",
                 example: str = "runs/mine", otherwise: str = "") -> None:
  """Raises JaxdpError for an empty or blank path: every path flag and field refuses it the same
  way (an empty --restore_from would otherwise mean "none" and start afresh). `otherwise`: a
  second fix, e.g. leaving an optional flag out.

  Raises:
    JaxdpError: `path` is '' or only spaces.
  """
  if path is not None and not path.strip():
    shown = f", e.g. {flag}={example}" if flag.startswith("--") and example else ""
    raise JaxdpError(f"{flag}={path!r} is empty; give {what}{shown}"
                     + (f", or {otherwise}" if otherwise else ""))


def _refuse_unusable(path: str, flag: str, what: str = "a run directory") -> None:
  """Raises JaxdpError for a path that can never be a directory: empty, a dangling symlink, a
  plain file, or a path through a file. `what` is the directory the flag wants."""
  refuse_empty(path, flag)
  if "\0" in path:
    raise JaxdpError(f"{flag}={path!r} contains a NUL byte; give a directory path")
  if os.path.islink(path) and not os.path.exists(path):
    raise JaxdpError(f"{flag}={path!r} is a symlink to {os.readlink(path)!r}, which does not "
                     "exist; fix or remove the link, or give the directory itself")
  if os.path.exists(path) and not os.path.isdir(path):
    raise JaxdpError(f"{flag}={path!r} is a file; give {what}")
  _refuse_under_a_file(path, flag)


def _refuse_under_a_file(path: str, flag: str) -> None:
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


def check_directory_to_write(path: str, flag: str, what: str = "a directory") -> None:
  """A directory a command creates (or writes into): refused in one line, before anything is
  written, when it can never be one (`_refuse_unusable`) or cannot be created (its nearest
  existing parent is not writable).

  Raises:
    JaxdpError: naming `flag`, as `_refuse_unusable`, or a parent that refuses writes.
  """
  _refuse_unusable(path, flag, what)
  if os.path.isdir(path):
    return
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    read_only = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    raise JaxdpError(f"{flag}={path!r} cannot be created: {parent!r} is "
                     f"{'on a read-only file system' if read_only else 'not writable by this user'}"
                     f"; give {what} in a folder you can write")


def check_file_to_write(path: str, flag: str) -> None:
  """A file a command writes (plot's --out): refused in one line when it can never be one
  (empty, an existing directory, a dangling symlink, under a file).

  Raises:
    JaxdpError: naming `flag`.
  """
  refuse_empty(path, flag, "a file path", "")
  if os.path.islink(path) and not os.path.exists(path):
    raise JaxdpError(f"{flag}={path!r} is a symlink to {os.readlink(path)!r}, which does not "
                     "exist; fix or remove the link, or give the file itself")
  if os.path.isdir(path):
    raise JaxdpError(f"{flag}={path!r} is a directory; give a file path in it, e.g. "
                     f"{flag}={shlex.quote(os.path.join(path, 'out.png'))}")
  _refuse_under_a_file(path, flag)


def unused_path(path: str) -> str:
  """`path`, or `path`-2, -3, ...: the first that does not exist."""
  candidate, n = path, 1
  while os.path.lexists(candidate):
    n += 1
    candidate = f"{path}-{n}"
  return candidate


def later_checkpoints_error(restore_from: str, step: int, later: Sequence[int], *,
                            workdir: str | None = None, latest: int | None = None,
                            given: tuple[str, str] | None = None) -> JaxdpError:
  """The refusal of a run from checkpoint `step` (the step directory `restore_from`) into a
  workdir whose checkpoint folder holds `later` steps (later ones, or any of another run): the
  new run's saves would collide with them. Its fix names a fresh workdir beside `workdir` (when
  known) and, with `latest`, the plain resume of the workdir's own latest step. `given`: the
  (flag, value) the user named the checkpoint with, when not --restore_from itself.
  One wording for the train pre-flight (lm/preflight.py) and fit's own restore (runtime/loop.py).
  """
  flag, value = given or ("--restore_from", restore_from)
  listed = ", ".join(map(str, later))
  if flag == "--restore_from":
    where = f"--workdir={workdir!r}" if workdir else "--workdir"
    head = f"--restore_from={value!r}: {where} already has checkpoints at steps {listed}"
  else:
    head = (f"{flag}={value!r} is checkpoint step {step} of the run in {workdir!r}, which already "
            f"has later checkpoints (steps {listed})")
  fresh = shlex.quote(unused_path(f"{workdir.rstrip(os.sep)}-from-{step}")) if workdir else "NEW_DIR"
  fix = (f"to continue from step {step}, give a new workdir: --workdir {fresh} --restore_from "
         f"{shlex.quote(restore_from)}")
  if workdir and latest is not None:
    fix += f" (or --workdir {shlex.quote(workdir)} alone to resume its latest step, {latest})"
  return JaxdpError(f"{head}; {fix}")


def step_folders(folder: str, *, with_record: bool = False) -> list[int]:
  """The checkpoint steps in a local checkpoint folder, ascending: its numeric subfolders (with
  `with_record`, only those holding their run's record, i.e. a step a save wrote); [] when
  `folder` is not a directory."""
  names = os.listdir(folder) if os.path.isdir(folder) else ()
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(
      os.path.join(folder, n, STEP_RECORD) if with_record else os.path.join(folder, n)))


def resolve_step(path: str, flag: str = "--restore_from") -> str:
  """A checkpoint step directory to start from (train's --restore_from): DIR/<step>, local or
  s3:// / gs:// (a bucket is checked where it is read). Returns `path` as given.

  Raises:
    JaxdpError: one line naming `flag`: an unusable path, no such directory, a run or its
      checkpoints/ folder (not one step), or a step that is not there; the steps that are there
      are named, with the latest as the example to give.
  """
  refuse_empty(path, flag, "a checkpoint step directory", "WORKDIR/checkpoints/STEP")
  if path.startswith(URL_SCHEMES):
    return path
  _refuse_unusable(path, flag, "a checkpoint step directory (WORKDIR/checkpoints/STEP)")
  stripped = path.rstrip(os.sep) or path
  name = os.path.basename(stripped)
  if name.isdigit() and os.path.isdir(stripped):
    return path
  # Not a step directory: the steps of the folder it names (a run, its checkpoints/, or the
  # folder of a missing step), so that the advice is a path that works.
  folder = os.path.dirname(stripped) if name.isdigit() else stripped
  if os.path.isdir(os.path.join(folder, CHECKPOINTS)):
    folder = os.path.join(folder, CHECKPOINTS)
  steps = step_folders(folder, with_record=True)
  if name.isdigit() and os.path.isdir(folder):
    why = f"{folder!r} has no checkpoint step {name}"
  elif not os.path.exists(stripped):
    why = "no such directory"
  else:
    why = "not a checkpoint step directory"
  fix = (f"give one of its steps ({', '.join(map(str, steps))}), e.g. "
         f"{flag}={shlex.quote(os.path.join(folder, str(steps[-1])))}" if steps else
         "give WORKDIR/checkpoints/STEP of a trained run (`jaxdp inspect WORKDIR` lists its "
         "steps)")
  raise JaxdpError(f"{flag}={path!r}: {why}; {fix}")


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
