"""What a training run checks before it writes anything (issue 31): every bad input is one line
naming the flag or field it came from, with a fix that works, and a refused run creates or
changes no file. `jaxdp train` and `train_and_evaluate` call the same functions:

  check_paths   the paths the run reads and writes (the workdir, config.checkpoint_dir,
                --restore_from and the checkpoints it would meet in the workdir); no device
                work, so the command line runs it before the process group forms.
  check_resume  the checkpoint the run would resume from against this config (a restored step
                already at config.num_steps, a config.init_from it would ignore); read from the
                checkpoint's meta, before the run is built.

The checkpoint's config against this one (the fields that define the run, those that shape its
arrays) is runtime.loop.check_record, which train_and_evaluate calls once the run is built,
before the workdir is touched.
"""

from __future__ import annotations

import os
from typing import Any

from jaxdp.errors import JaxdpError
from jaxdp.runtime import paths


def check_paths(config: Any, workdir: str, restore_from: str | None = None, *,
                restore_given: tuple[str, str] | None = None) -> None:
  """The run's paths, before anything is written.

  restore_given: (flag, value) the user gave the checkpoint to start from with, when not
    --restore_from itself (`jaxdp train --workdir RUN/checkpoints/2` sets both the run and the
    step): refusals about that step name it.

  Raises:
    JaxdpError: an unusable --workdir or config.checkpoint_dir (empty, a file, a dangling
      symlink, under a file, in a folder that refuses writes), a --restore_from that is no
      checkpoint step directory, or one whose step the workdir already has later checkpoints
      than (a run there would collide with them).
  """
  workdir = os.fspath(workdir)
  paths.check_directory_to_write(workdir, "--workdir", "a run directory")
  checkpoint_dir = config.get("checkpoint_dir") or ""
  if checkpoint_dir and not checkpoint_dir.startswith(paths.URL_SCHEMES):
    paths.check_directory_to_write(checkpoint_dir, "config.checkpoint_dir",
                                   "a folder for the checkpoints, or leave it unset "
                                   "(WORKDIR/checkpoints)")
  if restore_from is None:
    return
  if restore_given is None:  # Given as itself (a step directory as --workdir was checked then).
    paths.resolve_step(restore_from, "--restore_from")
  if not restore_from.startswith(paths.URL_SCHEMES):
    _refuse_later_checkpoints(config, workdir, restore_from,
                              restore_given or ("--restore_from", restore_from))


def _refuse_later_checkpoints(config: Any, workdir: str, restore_from: str,
                              given: tuple[str, str]) -> None:
  """A run from step S writes checkpoints S+k; a workdir that already holds later ones (or any
  of another run) would mix the two."""
  from jaxdp.runtime.checkpoint import is_url, location, step_directory
  found = step_directory(restore_from)
  mine = config.get("checkpoint_dir") or location(workdir)
  if found is None or is_url(mine) or not os.path.isdir(mine):
    return
  directory, step = found
  same = directory == os.path.abspath(mine)
  have = paths.step_folders(mine)
  later = [s for s in have if s > step or not same]
  if not later:
    return
  raise paths.later_checkpoints_error(restore_from, step, later, workdir=workdir,
                                     latest=have[-1], given=given)  # `later` is some of `have`.


def check_resume(config: Any, workdir: str, restore_from: str | None,
                 saved: tuple[int, dict] | None) -> None:
  """The checkpoint a run would resume from, `saved` (its step and meta, or None for a fresh
  start), against this config.

  Raises:
    JaxdpError: a --restore_from whose checkpoint cannot be read; one at or past
      config.num_steps into another workdir (which would train nothing and keep no checkpoint);
      a config.init_from other than the one the checkpoint's run started from (a resume never
      reads it).
  """
  from jaxdp.runtime.checkpoint import is_url, location, step_directory
  if restore_from and saved is None:
    raise JaxdpError(f"--restore_from={restore_from!r}: its checkpoint cannot be read (no "
                     "readable record of its run); pick another step (`jaxdp inspect` lists them)")
  if saved is None:
    return
  step, meta = saved
  if restore_from:
    found = step_directory(restore_from)
    mine = config.get("checkpoint_dir") or location(workdir)
    mine = mine.rstrip("/") if is_url(mine) else os.path.abspath(mine)
    if step >= config.num_steps and (found is None or found[0] != mine):
      raise JaxdpError(f"--restore_from={restore_from!r} is a checkpoint at step {step}, and "
                       f"config.num_steps={config.num_steps}: this run would train nothing and "
                       f"leave --workdir={workdir!r} without a checkpoint; raise "
                       f"--config.num_steps above {step} to train on from it")
  wanted = config.get("init_from") or ""
  started = (meta.get("config") or {}).get("init_from") or ""
  if wanted and not _same_init(wanted, started):
    was = f"config.init_from={started!r}" if started else "random weights (config.init_from='')"
    back = f"give --config.init_from={started}" if started else "drop --config.init_from"
    afresh = "give a fresh --workdir" + (" without --restore_from" if restore_from else "")
    raise JaxdpError(f"config.init_from={wanted!r} sets only a fresh run's first weights, but this "
                     f"run resumes its checkpoint at step {step}, which started from {was}; "
                     f"{afresh} to start from {wanted}, or {back} to resume")


def _same_init(a: str, b: str) -> bool:
  """The same hf:DIR, written alike or naming the same folder from here."""
  return a == b or (a.startswith("hf:") and b.startswith("hf:")
                    and os.path.realpath(a[3:]) == os.path.realpath(b[3:]))
