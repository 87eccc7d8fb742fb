"""`jaxdp stacks --workdir W`: every process of the run in W writes its stacks, now."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import time
import types

from jaxdp.cli import command as c
from jaxdp.errors import JaxdpError

COMMAND = c.Command(
    name="stacks",
    summary="Ask a running run's processes for their Python stacks (into WORKDIR/hang/).",
    description=(
        "Sends SIGUSR2 to every process of the run training in --workdir on this host (found "
        "from the heartbeats in WORKDIR/hang/, or the workdir lock of a one-process run); each "
        "writes WORKDIR/hang/process-I.txt: its last completed step, its phase, the timeline of "
        "every process's last heartbeat and the Python stacks of all its threads. The run goes "
        "on. Processes on other hosts are named, with the command to run there."),
    flags=(
        c.string("workdir", None, "The run's directory.", metavar="DIR", required=True,
                 path="run"),
        c.real("wait_s", 10.0, "Seconds to wait for the reports to appear.", metavar="S", min=0),
    ),
)


def _targets(workdir: str) -> list[tuple[int, int, str]]:
  """(process, pid, host) of the run's live processes."""
  from jaxdp.runtime import heartbeat
  found = heartbeat.live_pids(workdir)
  if found:
    return found
  try:
    with open(os.path.join(workdir, ".jaxdp.lock")) as f:
      # The file outlives its run; only a held lock names a live run. Its recorded pid may since
      # belong to another program, which SIGUSR2 would terminate.
      try:
        fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
      except OSError:
        holder = json.load(f)
        return [(0, int(holder["pid"]), str(holder["host"]))]
      return []
  except (OSError, ValueError, KeyError, TypeError):
    return []


def _started_after_heartbeat(workdir: str, process: int, pid: int) -> bool:
  """Whether local `pid` started after process `process` last published its heartbeat: the run
  was killed without a clean exit and another program has the pid now (SIGUSR2 would terminate
  it). False when either time is unknown (no /proc, no heartbeat file)."""
  from jaxdp.runtime import heartbeat
  try:
    with open(os.path.join(workdir, heartbeat.HANG_DIR, f"heartbeat-{process}.json")) as f:
      beat = float(json.load(f)["time"])
    with open("/proc/stat") as f:
      boot = next(float(line.split()[1]) for line in f if line.startswith("btime "))
    with open(f"/proc/{pid}/stat") as f:  # Field 22, after the parenthesised command name.
      ticks = float(f.read().rsplit(")", 1)[1].split()[19])
  except (OSError, ValueError, KeyError, TypeError, IndexError, StopIteration):
    return False
  return boot + ticks / os.sysconf("SC_CLK_TCK") > beat + 1.0


def run(args: types.SimpleNamespace) -> int:
  """Signals the run's processes on this host and lists the reports they wrote; exit 0, or 2 when
  no running process of the run is found."""
  from jaxdp.runtime import heartbeat
  workdir, here = args.workdir, socket.gethostname()
  targets = _targets(workdir)
  if not targets:
    raise JaxdpError(f"--workdir={workdir!r}: no running jaxdp run found there (no heartbeats in "
                     f"{os.path.join(workdir, heartbeat.HANG_DIR)!r}, no held workdir lock)")
  def stamp(process: int) -> tuple[int, int] | None:
    # A report counts once it differs from what was there before the signal (file times are
    # kernel-tick coarse: comparing them with the clock can miss a report written at once).
    try:
      st = os.stat(os.path.join(workdir, heartbeat.HANG_DIR, f"process-{process}.txt"))
      return st.st_mtime_ns, st.st_size
    except OSError:
      return None
  before = {process: stamp(process) for process, _, _ in targets}
  asked, started = [], time.time()
  # Held until at least one process was asked: a run none of whose processes can be asked is one
  # error line that names each process's state.
  said: list[str] = []
  gone: list[str] = []
  for process, pid, host in targets:
    if host != here:
      said.append(f"process {process} (pid {pid}) runs on host {host}: run `kill -USR2 {pid}` there")
      continue
    try:
      if _started_after_heartbeat(workdir, process, pid):
        raise ProcessLookupError
      os.kill(pid, signal.SIGUSR2)
      asked.append(process)
    except ProcessLookupError:
      gone.append(f"process {process} (pid {pid})")
      said.append(f"process {process} (pid {pid}) is gone")
    except PermissionError:
      said.append(f"process {process} (pid {pid}): not allowed to signal it (another user)")
  if not asked and all(host == here for _, _, host in targets):
    if len(gone) == len(targets):
      raise JaxdpError(f"--workdir={workdir!r}: the run there is no longer running ({', '.join(gone)} "
                       f"{'is' if len(gone) == 1 else 'are'} gone); the reports of its last failure, "
                       f"if any, are in {os.path.join(workdir, heartbeat.HANG_DIR)!r}")
    raise JaxdpError(f"--workdir={workdir!r}: no process of the run could be asked ({'; '.join(said)}); "
                     "run `jaxdp stacks` as the user that started it")
  for line in said:
    print(line)
  deadline = started + args.wait_s
  for process in asked:
    path = os.path.join(workdir, heartbeat.HANG_DIR, f"process-{process}.txt")
    while time.time() < deadline and stamp(process) in (None, before[process]):
      time.sleep(0.1)
    time.sleep(0.2)  # The report is written in two parts (status, then the stacks).
    fresh = stamp(process) not in (None, before[process])
    print(f"process {process}: {path}" if fresh else
          f"process {process}: no report within {args.wait_s:g} s (frozen, or stuck holding "
          "Python's lock)")
  return 0
