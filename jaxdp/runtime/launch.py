"""`jaxdp launch --nprocs P [--cpu_devices D] [--max_restarts R [--min_nprocs M]] -- train ...`:
one run as P local processes.

It plays the part a cluster launcher (srun, mpirun) plays on many hosts: picks a free coordinator
port, starts `python -m jaxdp.cli.main train ... --coordinator --num_processes --process_id` P times,
prefixes every output line with "[i] ", and makes failures loud and final: when one process fails,
the others are stopped (SIGTERM, then SIGKILL), its error is repeated, and the launcher exits
with its status; a process ended by a signal (killed, or crashed) is a lost process, and the
launcher exits LOST_PROCESS_STATUS (3) for it, the status its peers give without a launcher
(runtime/heartbeat.py). SIGINT, SIGTERM and SIGUSR1 sent to the launcher are forwarded to every process, which
then stop after the same step, save one checkpoint and exit with config.preempt_exit_code; the
launcher waits up to PREEMPT_GRACE_S for that and exits with their common status. A process that
stops this way on its own (a signal sent to it alone) is not a failure: the others stop after
the same step too, and the launcher exits with their status.

Restarts (`max_restarts` R > 0): when a process fails (any exit other than success or a stop
on a signal, except status 2, bad input, which the same command would meet again), the
others are stopped first, then the whole run starts again, resuming from the workdir's last
checkpoint, at most R times; each restart prints one line saying which process failed, how,
and which restart it is. Every process sees its attempt as JAXDP_RESTART_COUNT (0 first).
The process count on a restart (`min_nprocs` M, default P: never fewer):
  * the attempt that failed saved a new checkpoint (it made progress; the fault looks
    transient): the same count as that attempt;
  * it saved none (it failed to start, or failed again before its first save: the fault looks
    persistent, a lost device or host): one process fewer, never fewer than M.
The global batch is the config's (config.global_batch_size), so fewer processes each take a
larger share of it; the run continues as the same run (bitwise, with
config.reduction="fixed_order", when the device count still divides its virtual shards).
A workdir the launcher cannot list (a remote URL) counts as no progress.

Orphans: the launcher holds the write end of a pipe whose read end every process watches in
a thread (`watch_launcher`). However the launcher ends (SIGKILL, a crash, a closed terminal),
the kernel closes that end, and each process stops within a second with one line and status
LAUNCHER_GONE_STATUS, saving nothing more (the last complete checkpoint stands; a save in
flight is discarded as orbax discards any incomplete one). A pipe rather than Linux's
parent-death signal (prctl PR_SET_PDEATHSIG): that signal is tied to the parent *thread*
that started the child and is Linux-only, and as SIGKILL it leaves no line saying why.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO

from jaxdp.errors import JaxdpError, clause
from jaxdp.runtime import heartbeat

SET_BY_LAUNCH = ("--coordinator", "--num_processes", "--process_id", "--cpu_devices")
STOP_GRACE_S = 5.0  # After SIGTERM, seconds a process gets to exit before SIGKILL.
POLL_S = 0.1
ROOT_CAUSE_WAIT_S = 1.0  # How long a first failure waits for a signal-killed peer to show.
PREEMPT_GRACE_S = 120.0  # After a signal, seconds the processes get to agree, save and exit.
PREEMPTED_LINE = "jaxdp: preempted:"  # What `jaxdp train` prints when it stopped and saved.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
RESTART_ENV = "JAXDP_RESTART_COUNT"  # Which attempt a process belongs to: 0, then 1 per restart.
LAUNCHER_FD_ENV = "JAXDP_LAUNCHER_FD"  # The pipe end a process watches for its launcher's end.
LAUNCHER_PID_ENV = "JAXDP_LAUNCHER_PID"
LAUNCHER_GONE_STATUS = 129  # 128 + SIGHUP, the signal for "the controlling process went away".
BAD_INPUT_STATUS = 2  # `jaxdp: error: ...`: a restart would meet the same refusal.
LOST_PROCESS_STATUS = heartbeat.EXIT_STATUS  # A process ended by a signal: the run lost it.


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


def check_command(nprocs: int, command: Sequence[str], max_restarts: int = 0,
                  min_nprocs: int | None = None) -> None:
  """Raises JaxdpError unless nprocs >= 1, max_restarts >= 0, 1 <= min_nprocs <= nprocs (when
  given), and `command` is a `train` command line without the flags that launch sets itself
  (SET_BY_LAUNCH).
  """
  if nprocs < 1:
    raise JaxdpError(f"--nprocs={nprocs} must be >= 1")
  if max_restarts < 0:
    raise JaxdpError(f"--max_restarts={max_restarts} must be >= 0 (0: no restarts)")
  if min_nprocs is not None and not 1 <= min_nprocs <= nprocs:
    raise JaxdpError(f"--min_nprocs={min_nprocs} must be between 1 and --nprocs={nprocs}")
  if min_nprocs is not None and min_nprocs < nprocs and max_restarts == 0:
    raise JaxdpError(f"--min_nprocs={min_nprocs} only applies on a restart; give "
                     "--max_restarts R > 0 too")
  if not command or command[0] != "train":
    raise JaxdpError("launch runs training: `jaxdp launch --nprocs P -- train [train flags]`"
                     + (f"; got {' '.join(command)!r} after '--'" if command else ""))
  for arg in command:
    if arg.split("=", 1)[0] in SET_BY_LAUNCH:
      raise JaxdpError(f"{arg!r} after '--' is set by launch; give --cpu_devices before '--' and "
                       "leave the others out")


class _Process:
  """One child: its Popen and a thread copying its output with the "[i] " prefix."""

  def __init__(self, index: int, cmd: list[str], out: IO[str], lock: threading.Lock,
               attempt: int = 0, watch_fd: int | None = None):
    self.index = index
    env = dict(os.environ, PYTHONUNBUFFERED="1", **{RESTART_ENV: str(attempt)})
    if watch_fd is not None:
      env.update({LAUNCHER_FD_ENV: str(watch_fd), LAUNCHER_PID_ENV: str(os.getpid())})
    # The child starts with the forwarded signals blocked (it inherits this thread's mask): one
    # forwarded while Python itself starts waits for jaxdp's handler (cli/main.py unblocks them)
    # instead of being a traceback from the interpreter's start-up.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
      self.popen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                                    pass_fds=() if watch_fd is None else (watch_fd,),
                                    start_new_session=True)  # Terminal signals reach only us.
    finally:
      signal.pthread_sigmask(signal.SIG_SETMASK, mask)
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
    """The process's own error message if it printed one, else its last line, marked as such
    (a process killed from outside says nothing: its last line is not the reason)."""
    self.reader.join(timeout=STOP_GRACE_S)
    errors = [l for l in self.tail if l.startswith("jaxdp: error") or "Error" in l.split(":")[0]]
    if errors:
      return errors[-1]
    return f"its last output: {self.tail[-1].strip()}" if self.tail else "(no output)"

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


def _blame(process: _Process) -> int:
  """Rank of an ended process as the cause of a failure, lowest first: killed by a signal from
  outside or a crash (SIGKILL, SIGSEGV, ...); bad input (status 2; its peers then lose their
  coordinator and abort); SIGABRT (JAX aborts a process whose peer is gone); any other status.
  """
  status = process.popen.returncode
  if status < 0:
    return 2 if status == -signal.SIGABRT else 0
  return 1 if status == BAD_INPUT_STATUS else 3


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


@dataclasses.dataclass
class _Outcome:
  """How one attempt ended: the launcher's exit status; for a failure, the line saying which
  process failed and how, and whether a restart may cure it."""
  status: int
  failure: str | None = None
  restartable: bool = False


def latest_checkpoint(workdir: str | None) -> int | None:
  """The newest committed checkpoint step in WORKDIR/checkpoints (orbax renames a step's
  directory to its number only once complete), None if none or the folder cannot be listed."""
  if workdir is None:
    return None
  try:
    names = os.listdir(os.path.join(workdir, "checkpoints"))
  except OSError:
    return None
  return max((int(n) for n in names if n.isdigit()), default=None)


def _forget_heartbeats(workdir: str | None) -> None:
  """Removes the heartbeat files a previous attempt's processes left in WORKDIR/hang
  (runtime/heartbeat.py): none of them is alive now, and a new process must not judge a peer
  by its predecessor's last heartbeat (a pid that is gone)."""
  directory = os.path.join(workdir or "", "hang")
  if workdir is None or not os.path.isdir(directory):
    return
  from jaxdp.runtime.lock import WorkdirLock
  try:
    with WorkdirLock(workdir):  # Refused while another run holds the workdir: leave its files.
      for name in os.listdir(directory):
        if name.startswith("heartbeat-") and name.endswith(".json"):
          os.remove(os.path.join(directory, name))
  except (JaxdpError, OSError):
    pass


def _without_restore_from(command: Sequence[str]) -> list[str]:
  """`command` without --restore_from (and its value): a restart resumes from the workdir."""
  out: list[str] = []
  skip = False
  for arg in command:
    if skip:
      skip = False
    elif arg == "--restore_from":
      skip = True
    elif not arg.startswith("--restore_from="):
      out.append(arg)
  return out


def launch(nprocs: int, command: Sequence[str], cpu_devices: int | None = None, *,
           out: IO[str] | None = None, max_restarts: int = 0, min_nprocs: int | None = None,
           workdir: str | None = None) -> int:
  """Runs `command` (a `train` command line) as `nprocs` local processes; returns the exit status.

  With `max_restarts` R > 0, a failed run is restarted from `workdir`'s last checkpoint up to R
  times, on fewer processes (down to `min_nprocs`) when the failed attempt saved nothing (see
  the module's docstring for the rule). `workdir` is the train command's --workdir (for that
  rule; None: every failure counts as one without progress).

  Raises:
    JaxdpError: a bad count (see `check_command`) or a command that is not `train`.
  """
  check_command(nprocs, command, max_restarts, min_nprocs)
  out = sys.stdout if out is None else out
  floor = nprocs if min_nprocs is None else min_nprocs
  received: list[int] = []
  previous = {s: signal.signal(s, lambda signum, _: received.append(signum)) for s in FORWARDED}
  # Only this process ever holds the write end (os.pipe's ends are not inherited; the read end is
  # passed explicitly), so the read end sees EOF the moment this process ends, however it ends.
  watch_read, watch_write = os.pipe()
  try:
    count, command = nprocs, list(command)
    initial = latest_checkpoint(workdir)
    for attempt in range(max_restarts + 1):
      before = latest_checkpoint(workdir)
      _forget_heartbeats(workdir)
      outcome = _attempt(count, command, cpu_devices, out, received, attempt, watch_read)
      if outcome.failure is None:
        return outcome.status
      if attempt == max_restarts or received or not outcome.restartable:
        why = ("" if not max_restarts else
               "; not restarted: bad input fails the same way again" if not outcome.restartable
               else "; not restarted: a signal stops the launcher" if received
               else f"; no restarts left (--max_restarts={max_restarts})")
        print(f"jaxdp launch: {clause(outcome.failure) if why else outcome.failure}{why}", file=sys.stderr,
              flush=True)
        return outcome.status
      after = latest_checkpoint(workdir)
      progressed = after is not None and (before is None or after > before)
      next_count = count if progressed else max(floor, count - 1)
      if after != initial:  # The run has saved checkpoints of its own: resume from those.
        command = _without_restore_from(command)
      where = f"step {after}" if after is not None else "the start (no checkpoint yet)"
      change = (f"; {'no new checkpoint since the last start: ' if not progressed else ''}"
                f"continuing on {next_count} process(es) instead of {count}"
                if next_count != count else "")
      print(f"jaxdp launch: restart {attempt + 1} of {max_restarts}: {clause(outcome.failure)}; "
            f"resuming from {where}{change}", file=sys.stderr, flush=True)
      count = next_count
    raise AssertionError("unreachable: the last attempt returns")
  finally:
    os.close(watch_write)
    os.close(watch_read)
    for s, handler in previous.items():
      signal.signal(s, handler)


def _attempt(nprocs: int, command: Sequence[str], cpu_devices: int | None, out: IO[str],
             received: list[int], attempt: int, watch_fd: int) -> _Outcome:
  """One start of the run as `nprocs` processes, until it ends; how it ended."""
  port = free_port()
  lock = threading.Lock()
  processes: list[_Process] = []
  try:
    for i in range(nprocs):
      processes.append(_Process(i, child_command(command, i, nprocs, port, cpu_devices), out, lock,
                                attempt, watch_fd))
    with lock:
      out.write(f"jaxdp launch: {nprocs} processes (pids "
                f"{', '.join(str(p.popen.pid) for p in processes)}), coordinator 127.0.0.1:{port}"
                + (f", restart {attempt}" if attempt else "") + "\n")
      out.flush()
    return _supervise(processes, nprocs, received)
  finally:
    for p in processes:
      if p.popen.poll() is None:
        p.popen.kill()
    for p in processes:
      p.popen.wait()
      if p.popen.stdout is not None:
        p.reader.join(timeout=STOP_GRACE_S)
        p.popen.stdout.close()


def _supervise(processes: list[_Process], nprocs: int, received: list[int]) -> _Outcome:
  """Watches `processes` until they end: stops them all on a failure or a received signal."""
  preempted_since: float | None = None
  while True:
    failed = next((p for p in processes if p.popen.poll() not in (None, 0) and not p.preempted()),
                  None)
    if failed is not None:
      # A peer's death makes the survivors fail too (a collective loses its partner), sometimes
      # before the dead process's status is visible: wait briefly, then blame the likeliest
      # cause rather than the first to notice (see _blame).
      deadline = time.monotonic() + ROOT_CAUSE_WAIT_S
      while time.monotonic() < deadline and not any(
          (p.popen.poll() or 0) < 0 for p in processes):
        time.sleep(POLL_S)
      failed = min((p for p in processes if p.popen.poll() not in (None, 0)),
                   key=lambda p: (_blame(p), p is not failed))
      message = f"{failed.describe_exit()}: {failed.error_line()}"
      others = [p for p in processes if p.popen.poll() is None]
      _stop(others)
      for p in processes:
        p.reader.join(timeout=STOP_GRACE_S)
      status = failed.popen.returncode
      return _Outcome(status if status > 0 else LOST_PROCESS_STATUS,
                      f"{clause(message)}; stopped the other {len(others)} process(es)",
                      restartable=status != BAD_INPUT_STATUS)
    if received:
      # Every process gets the signal, agrees on the step, saves and exits; give it time.
      _stop(processes, received[0], PREEMPT_GRACE_S)
      statuses = {p.popen.returncode for p in processes}
      print(f"jaxdp launch: {signal.Signals(received[0]).name} received; stopped all processes "
            f"(exit status {', '.join(map(str, sorted(statuses)))})", file=sys.stderr, flush=True)
      status = statuses.pop() if len(statuses) == 1 else -1
      return _Outcome(status if status > 0 else 128 + received[0])
    stopped = [p for p in processes if p.preempted()]
    if stopped:
      preempted_since = preempted_since or time.monotonic()
      live = [p for p in processes if p.popen.poll() is None]
      if live and time.monotonic() - preempted_since > PREEMPT_GRACE_S:
        _stop(live)
        print(f"jaxdp launch: process {stopped[0].index} stopped on a signal but "
              f"{len(live)} other(s) did not within {PREEMPT_GRACE_S:g} s; stopped them",
              file=sys.stderr, flush=True)
        return _Outcome(stopped[0].popen.returncode)
      if not live:
        for p in processes:
          p.reader.join()
        print(f"jaxdp launch: all {nprocs} processes stopped after a signal and saved "
              f"(exit status {stopped[0].popen.returncode}: resumable)", file=sys.stderr, flush=True)
        return _Outcome(stopped[0].popen.returncode)
    if all(p.popen.poll() == 0 for p in processes):
      for p in processes:
        p.reader.join()
      return _Outcome(0)
    time.sleep(POLL_S)


def watch_launcher() -> None:
  """In a process that `jaxdp launch` started: stops this process within a second once its
  launcher is gone, however it went (its end of the pipe in LAUNCHER_FD_ENV closes).

  Prints one line (to stderr, and to WORKDIR/jaxdp.log once `train` routes its log there) and
  exits with LAUNCHER_GONE_STATUS at once: no checkpoint is written (a save in flight is left
  incomplete, and orbax discards it on the next start), the workdir lock goes with the process.
  Call it once, early; a process without the variable (not launched) does nothing.
  """
  fd_text = os.environ.pop(LAUNCHER_FD_ENV, "")
  launcher = os.environ.pop(LAUNCHER_PID_ENV, "?")
  try:
    fd = int(fd_text)
    os.fstat(fd)
  except (ValueError, OSError):
    return

  def wait() -> None:
    try:
      while os.read(fd, 1):  # The launcher never writes: this returns b"" when it is gone.
        pass
    except OSError:
      pass
    _launcher_gone(launcher)

  threading.Thread(target=wait, name="jaxdp-launcher-watch", daemon=True).start()


def _launcher_gone(launcher: str) -> None:
  line = (f"jaxdp: error: the launcher (pid {launcher}) is gone; process pid {os.getpid()} stops "
          f"without saving (exit status {LAUNCHER_GONE_STATUS}); run the launch again to resume "
          "from the last checkpoint")
  try:
    os.write(2, (line + "\n").encode())
  except OSError:  # stderr was the launcher's pipe.
    pass
  if "jaxdp.runtime.logs" in sys.modules:  # `train` routed logging to WORKDIR/jaxdp.log.
    import logging
    if logging.getLogger().handlers:
      logging.getLogger("jaxdp.launch").error(line)
      from jaxdp.runtime import logs
      logs.release()  # Held before the run starts; os._exit skips the atexit that writes them.
  os._exit(LAUNCHER_GONE_STATUS)
