"""`jaxdp launch --nprocs P [--cpu_devices D] -- train ...`: one run as P local processes.

It plays the part a cluster launcher (srun, mpirun) plays on many hosts: picks a free coordinator
port, starts `python -m jaxdp.cli.main train ... --coordinator --num_processes --process_id` P times,
prefixes every output line with "[i] ", and makes failures loud and final: when one process fails,
the others are stopped (SIGTERM, then SIGKILL), its error is repeated, and the launcher exits
non-zero. SIGINT, SIGTERM and SIGUSR1 sent to the launcher are forwarded to every process, which
then stop after the same step, save one checkpoint and exit with config.preempt_exit_code; the
launcher waits up to PREEMPT_GRACE_S for that and exits with their common status. A process that
stops this way on its own (a signal sent to it alone) is not a failure: the others stop after
the same step too, and the launcher exits with their status.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from jaxdp.errors import JaxdpError

SET_BY_LAUNCH = ("--coordinator", "--num_processes", "--process_id", "--cpu_devices")
STOP_GRACE_S = 5.0  # After SIGTERM, seconds a process gets to exit before SIGKILL.
POLL_S = 0.1
ROOT_CAUSE_WAIT_S = 1.0  # How long a first failure waits for a signal-killed peer to show.
PREEMPT_GRACE_S = 120.0  # After a signal, seconds the processes get to agree, save and exit.
PREEMPTED_LINE = "jaxdp: preempted:"  # What `jaxdp train` prints when it stopped and saved.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def free_port() -> int:
  """A TCP port on 127.0.0.1 that was free a moment ago (for the coordinator)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def child_command(command: Sequence[str], process_id: int, nprocs: int, port: int,
                  cpu_devices: int | None) -> list[str]:
  """The command line of process `process_id`."""
  cmd = [sys.executable, "-m", "jaxdp.cli.main", *command, f"--coordinator=127.0.0.1:{port}",
         f"--num_processes={nprocs}", f"--process_id={process_id}"]
  return cmd + ([f"--cpu_devices={cpu_devices}"] if cpu_devices is not None else [])


def check_command(nprocs: int, command: Sequence[str]) -> None:
  """Raises JaxdpError unless nprocs >= 1 and `command` is a `train` command line without the
  flags that launch sets itself (SET_BY_LAUNCH).
  """
  if nprocs < 1:
    raise JaxdpError(f"--nprocs={nprocs} must be >= 1")
  if not command or command[0] != "train":
    raise JaxdpError("launch runs training: `jaxdp launch --nprocs P -- train [train flags]`"
                     + (f"; got {' '.join(command)!r} after '--'" if command else ""))
  for arg in command:
    if arg.split("=", 1)[0] in SET_BY_LAUNCH:
      raise JaxdpError(f"{arg!r} after '--' is set by launch; give --cpu_devices before '--' and "
                       "leave the others out")


class _Process:
  """One child: its Popen and a thread copying its output with the "[i] " prefix."""

  def __init__(self, index: int, cmd: list[str], out: IO[str], lock: threading.Lock):
    self.index = index
    self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                  start_new_session=True)  # Terminal signals reach only us.
    self.tail: collections.deque[str] = collections.deque(maxlen=50)
    self._out, self._lock = out, lock
    self.reader = threading.Thread(target=self._copy, daemon=True)
    self.reader.start()

  def _copy(self) -> None:
    assert self.popen.stdout is not None  # Popen(stdout=PIPE) gives it a pipe.
    for raw in self.popen.stdout:
      # A progress bar redraws itself with "\r"; keep only its last state.
      parts = raw.decode("utf-8", errors="replace").rstrip("\n").split("\r")
      line = next((part for part in reversed(parts) if part.strip()), "")
      self.tail.append(line)
      with self._lock:
        self._out.write(f"[{self.index}] {line}\n")
        self._out.flush()

  def error_line(self) -> str:
    """The process's own error message if it printed one, else its last line."""
    self.reader.join(timeout=STOP_GRACE_S)
    errors = [l for l in self.tail if l.startswith("jaxdp: error") or "Error" in l.split(":")[0]]
    return (errors or list(self.tail) or ["(no output)"])[-1]

  def preempted(self) -> bool:
    """Whether the process exited after saving on a signal (it says so on its last lines)."""
    if self.popen.poll() in (None, 0):
      return False
    self.reader.join(timeout=STOP_GRACE_S)
    return any(line.startswith(PREEMPTED_LINE) for line in self.tail)

  def describe_exit(self) -> str:
    status = self.popen.returncode
    how = (f"was killed by {signal.Signals(-status).name}" if status < 0
           else f"exited with status {status}")
    return f"process {self.index} (pid {self.popen.pid}) {how}"


def _stop(processes: list[_Process], sig: int = signal.SIGTERM, grace_s: float = STOP_GRACE_S) -> None:
  """Sends `sig` to every live process, then SIGKILL to any still alive after `grace_s`."""
  for p in processes:
    if p.popen.poll() is None:
      p.popen.send_signal(sig)
  deadline = time.monotonic() + grace_s
  for p in processes:
    try:
      p.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
      p.popen.kill()
      p.popen.wait()


def launch(nprocs: int, command: Sequence[str], cpu_devices: int | None = None, *,
           out: IO[str] | None = None) -> int:
  """Runs `command` (a `train` command line) as `nprocs` local processes; returns the exit status."""
  check_command(nprocs, command)
  out = sys.stdout if out is None else out
  port = free_port()
  lock = threading.Lock()
  received: list[int] = []
  previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in FORWARDED}
  processes = [_Process(i, child_command(command, i, nprocs, port, cpu_devices), out, lock)
               for i in range(nprocs)]
  with lock:
    out.write(f"jaxdp launch: {nprocs} processes (pids "
              f"{', '.join(str(p.popen.pid) for p in processes)}), coordinator 127.0.0.1:{port}\n")
    out.flush()
  preempted_since: float | None = None
  try:
    while True:
      failed = next((p for p in processes if p.popen.poll() not in (None, 0) and not p.preempted()),
                    None)
      if failed is not None:
        # A peer's death makes the survivors fail too (a collective loses its partner), sometimes
        # before the dead process's status is visible: wait briefly, then blame a process that was
        # killed by a signal, if any, rather than the first to notice.
        deadline = time.monotonic() + ROOT_CAUSE_WAIT_S
        while time.monotonic() < deadline and not any(
            (p.popen.poll() or 0) < 0 for p in processes):
          time.sleep(POLL_S)
        failed = next((p for p in processes if (p.popen.poll() or 0) < 0), failed)
        message = f"{failed.describe_exit()}: {failed.error_line()}"
        others = [p for p in processes if p.popen.poll() is None]
        _stop(others)
        for p in processes:
          p.reader.join(timeout=STOP_GRACE_S)
        print(f"jaxdp launch: {message}; stopped the other {len(others)} process(es)",
              file=sys.stderr, flush=True)
        status = failed.popen.returncode
        return status if status > 0 else 128 - status
      if received:
        # Every process gets the signal, agrees on the step, saves and exits; give it time.
        _stop(processes, received[0], PREEMPT_GRACE_S)
        statuses = {p.popen.returncode for p in processes}
        print(f"jaxdp launch: {signal.Signals(received[0]).name} received; stopped all processes "
              f"(exit status {', '.join(map(str, sorted(statuses)))})", file=sys.stderr, flush=True)
        status = statuses.pop() if len(statuses) == 1 else -1
        return status if status > 0 else 128 + received[0]
      stopped = [p for p in processes if p.preempted()]
      if stopped:
        preempted_since = preempted_since or time.monotonic()
        live = [p for p in processes if p.popen.poll() is None]
        if live and time.monotonic() - preempted_since > PREEMPT_GRACE_S:
          _stop(live)
          print(f"jaxdp launch: process {stopped[0].index} stopped on a signal but "
                f"{len(live)} other(s) did not within {PREEMPT_GRACE_S:g} s; stopped them",
                file=sys.stderr, flush=True)
          return stopped[0].popen.returncode
        if not live:
          for p in processes:
            p.reader.join()
          print(f"jaxdp launch: all {nprocs} processes stopped after a signal and saved "
                f"(exit status {stopped[0].popen.returncode}: resumable)", file=sys.stderr, flush=True)
          return stopped[0].popen.returncode
      if all(p.popen.poll() == 0 for p in processes):
        for p in processes:
          p.reader.join()
        return 0
      time.sleep(POLL_S)
  finally:
    for p in processes:
      if p.popen.poll() is None:
        p.popen.kill()
    for s, handler in previous.items():
      signal.signal(s, handler)
