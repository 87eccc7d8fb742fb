"""One run per workdir: an advisory lock that a crashed run cannot leave stuck.

`fcntl.flock` on WORKDIR/.jaxdp.lock: the kernel drops it when the holding process exits for any
reason (crash, kill -9, power loss of a node releases it on the file server), so there is no
stale lock to delete by hand. The file records who holds it, for the refusal's message.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from jaxdp.errors import JaxdpError, os_reason

LOCK_FILE = ".jaxdp.lock"
# Locks this process holds, by path. A run that ended by an exception in this process (a
# notebook, a test) may not have released its lock; the same process may take it over, since
# one process trains one run at a time. Only another process's live lock refuses.
_held: dict[str, int] = {}


class WorkdirLock:
  """Held for a run's lifetime; a second run on the same workdir is refused with one line.

  Only process 0 of a multi-process run takes it (all processes share one workdir).
  """

  def __init__(self, workdir: str, enabled: bool = True):
    self.path = os.path.join(workdir, LOCK_FILE)
    self.enabled = enabled
    self._fd: int | None = None
    self._times: tuple[int, int] | None = None  # The file's (atime, mtime) in ns before this run.

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    key = os.path.realpath(self.path)
    if key in _held:
      os.close(_held.pop(key))  # Closing the descriptor drops this process's stale lock.
    try:
      before = os.stat(self.path)
      self._times = (before.st_atime_ns, before.st_mtime_ns)
    except OSError:
      self._times = None
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise JaxdpError(f"--workdir: cannot write {self.path!r} ({os_reason(e, self.path)}); pick "
                       "a writable --workdir") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = _read_holder(fd)
      os.close(fd)
      raise JaxdpError(
          f"--workdir={os.path.dirname(self.path)!r} is in use by another run ({holder}); wait "
          "for it to finish or stop it, or pick another --workdir") from None
    try:  # Who holds it, for the refusal's message; the lock itself needs no bytes.
      os.ftruncate(fd, 0)
      os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                               "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
      os.fsync(fd)
    except OSError:
      pass
    self._fd = fd
    _held[key] = fd
    return self

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      if _held.get(os.path.realpath(self.path)) == self._fd:
        del _held[os.path.realpath(self.path)]
        try:  # The holder's record goes with the lock: a run that ends leaves the file as empty
          os.ftruncate(self._fd, 0)  # as before it, and its times too (a refused resume leaves
          if self._times is not None:  # the workdir exactly as it was, mtimes included).
            os.utime(self._fd, ns=self._times)
        except OSError:
          pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
      self._fd = None


def _read_holder(fd: int) -> str:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    info = json.loads(os.read(fd, 4096).decode() or "{}")
    return f"pid {info['pid']} on {info['host']}, since {info['since']}"
  except (OSError, ValueError, KeyError):
    return "holder unknown"
