"""The coordination service in a process of its own: process 0's death is a lost peer, not a crash.

JAX serves a run's coordinator (its coordination service: key-value store, barriers, heartbeats)
inside process 0. When process 0 dies, every other process's connection to the service breaks
and JAX ends them natively within about a second (SIGABRT, "Terminating process because the JAX
distributed service detected fatal errors"), long before jaxdp's heartbeat monitor
(runtime/heartbeat.py) can judge the loss and say which process was lost.

So in every multi-process run (`jaxdp launch`, srun, mpirun, a Kubernetes Job, one shell per
host), process 0 starts the service in a small child process (`serve`) at the coordinator address
and joins it as a client like every other process. When process 0 is killed, the service lives
on: the others see process 0's heartbeat stop, and the monitor ends them with exit 3 naming it,
before JAX's own heartbeat (set later by `heartbeat.jax_heartbeat_timeout_s`) gives up; under
`jaxdp launch` the launcher sees the death first, names it and stops the others. No process is
aborted natively.

The child holds no device and imports only jaxlib's service. It ignores the stop signals
(SIGINT, SIGTERM, SIGUSR1: the processes save a checkpoint together after one, through this very
service) and runs in its own session (Ctrl-C in a terminal does not reach it). It ends:
- after process 0's controlled exit (any status, even an error): process 0 says so on the
  child's stdin (`release`, at exit) and the child shuts the service down once process 0 is
  gone (its stdin closes), which is after JAX's shutdown barrier;
- after process 0's uncontrolled death (kill -9, a crash): once every other process has left,
  as their heartbeat files in WORKDIR/hang say (finished, failed, or a pid gone from this host),
  or at the latest `heartbeat.peer_timeout_s` + 15 s after process 0's death (time for the others
  to judge it lost), whichever comes first.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import sys
import time

from jaxdp.errors import JaxdpError
from jaxdp.runtime import heartbeat

RELEASE = "release"  # Process 0's word on the child's stdin: its exit is controlled.
READY = "ready"
POLL_S = 0.5  # How often the orphaned service looks at the heartbeat files.
START_TIMEOUT_S = 60.0  # The child prints READY within this (it imports jaxlib only).

_release_fd: int | None = None  # Process 0's end of the child's stdin.


def bind_address(port: int) -> str:
  """Where the service listens: every interface at `port`, as JAX's own default."""
  return f"[::]:{port}"


def start(port: int, num_processes: int, step_timeout_s: float, workdir: str | None) -> int:
  """Starts the service for a run of `num_processes` processes at `port` in a child process and
  returns its pid once it listens. Call it in process 0 only, before `jax.distributed.initialize`
  (which then must not start its own service: give it an unused `coordinator_bind_address`).

  `step_timeout_s`: config.step_timeout_s (0: unset), which sets JAX's coordination heartbeat
  and how long an orphaned service waits for the others (`heartbeat.peer_timeout_s` + 15 s);
  `workdir`: the run's workdir, whose heartbeat files end an orphaned service sooner and which
  keeps the service's own messages in WORKDIR/hang/coordinator.log (None: neither).

  Raises:
    JaxdpError: the child did not start listening within START_TIMEOUT_S (what it said is named).
  """
  global _release_fd
  linger_s = heartbeat.peer_timeout_s(step_timeout_s) + 15
  command = [sys.executable, "-m", "jaxdp.runtime.coordinator", str(port), str(num_processes),
             str(heartbeat.jax_heartbeat_timeout_s(step_timeout_s)), str(linger_s), workdir or ""]
  # Plain pipes and posix_spawn rather than subprocess.Popen: the child outlives every Python
  # object here on purpose, and Popen would warn at exit that it is still running. Its stderr is
  # not this process's: a pipe a caller reads to its end would stay open as long as the child.
  log = os.devnull
  if workdir:
    os.makedirs(os.path.join(workdir, heartbeat.HANG_DIR), exist_ok=True)
    log = os.path.join(workdir, heartbeat.HANG_DIR, "coordinator.log")
  stdin_read, stdin_write = os.pipe()
  stdout_read, stdout_write = os.pipe()
  actions = [(os.POSIX_SPAWN_DUP2, stdin_read, 0), (os.POSIX_SPAWN_DUP2, stdout_write, 1),
             (os.POSIX_SPAWN_OPEN, 2, log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)]
  pid = os.posix_spawn(sys.executable, command, dict(os.environ, PYTHONUNBUFFERED="1"),
                       file_actions=actions, setsid=True)
  os.close(stdin_read)
  os.close(stdout_write)
  said = _read_line(stdout_read, START_TIMEOUT_S)
  os.close(stdout_read)
  if said != READY:
    with contextlib.suppress(ProcessLookupError):
      os.kill(pid, signal.SIGKILL)
    os.close(stdin_write)
    raise JaxdpError(f"the coordinator service for port {port} did not start (it said "
                     f"{said!r}; its messages: {log}); check that the port is free and that "
                     "jaxlib imports")
  _release_fd = stdin_write
  # Registered after `import jax`, so it runs before JAX's own exit handler (the shutdown
  # barrier): the child waits for this process to be gone before it shuts the service down.
  atexit.register(release)
  # Process 0 lingers before an exit of its own until the others have left (Monitor.linger).
  heartbeat.AFTER_LINGER.append(release)
  return pid


def _read_line(fd: int, timeout_s: float) -> str:
  """The first line the child writes to `fd` within `timeout_s` ("" if none)."""
  import select
  deadline, text = time.monotonic() + timeout_s, b""
  while b"\n" not in text:
    ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
    chunk = os.read(fd, 4096) if ready else b""
    if not chunk:
      break
    text += chunk
  return text.decode(errors="replace").split("\n", 1)[0].strip()


def release() -> None:
  """Tells the service child that this process (process 0) is ending under control: the child
  shuts the service down once this process is gone. Idempotent; a no-op without a child."""
  global _release_fd
  fd, _release_fd = _release_fd, None
  if fd is None:
    return
  with contextlib.suppress(OSError):  # The child is gone already.
    os.write(fd, (RELEASE + "\n").encode())
  # The fd stays open: the child sees it close when this process is gone.


def _others_left(workdir: str, num_processes: int) -> bool:
  """Whether every process but 0 has left, by its heartbeat file: finished or failed, or its pid
  gone from this host. A process whose file is missing or on another host has not."""
  host = socket.gethostname()
  for index in range(1, num_processes):
    try:
      with open(os.path.join(workdir, heartbeat.HANG_DIR, f"heartbeat-{index}.json")) as f:
        record = json.load(f)
    except (OSError, ValueError):
      return False
    gone = record.get("host") == host and heartbeat.pid_state(int(record.get("pid", -1))) == "gone"
    if record.get("phase") not in heartbeat.DONE_PHASES and not gone:
      return False
  return True


def serve(port: int, num_processes: int, heartbeat_timeout_s: int, linger_s: float,
          workdir: str) -> None:
  """The child's main: serves until process 0 releases it and exits, or has died and the others
  have left or `linger_s` passed (see the module docstring)."""
  for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
    signal.signal(sig, signal.SIG_IGN)
  from jax._src.lib import _jax
  service = _jax.get_distributed_runtime_service(bind_address(port), num_processes,
                                                  heartbeat_timeout=heartbeat_timeout_s)
  print(READY, flush=True)
  word = sys.stdin.readline().strip()
  if word == RELEASE:
    sys.stdin.read()  # Until process 0 is gone: after its shutdown barrier.
  else:  # Process 0 died without a word: the others need the service to judge it lost.
    deadline = time.monotonic() + linger_s
    while time.monotonic() < deadline and not (workdir and _others_left(workdir, num_processes)):
      time.sleep(POLL_S)
  service.shutdown()
  os._exit(0)  # No interpreter teardown: nothing else to release.


if __name__ == "__main__":
  serve(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
