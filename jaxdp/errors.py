"""The one exception type users see: a bad input, named, with its fix.

The CLI prints `jaxdp: error: <message>` and exits 2 without a traceback; the library raises it.
"""

import errno
import os


class JaxdpError(Exception):
  """A user-facing error whose message names the offending field or path and how to fix it."""


def need(ok: bool, message: str) -> None:
  """Raises JaxdpError(message) unless `ok`: each check names its field and the fix.

  Raises:
    JaxdpError: `ok` is false.
  """
  if not ok:
    raise JaxdpError(message)


def os_reason(error: BaseException, path: str) -> str:
  """Why a write under `path` failed, in the OS's words.

  The first OSError reason in the exception chain (orbax and TensorBoard wrap or lose it);
  else "No space left on device" if the filesystem is nearly full; else the error's first line.
  """
  seen: BaseException | None = error
  hops = 0
  while seen is not None and hops < 20:
    if isinstance(seen, OSError) and seen.strerror:
      return seen.strerror
    seen, hops = seen.__cause__ or seen.__context__, hops + 1
  try:
    fs = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path))
    if fs.f_bavail * fs.f_frsize < 64 * 1024:  # Too little left for one write of a record batch.
      return os.strerror(errno.ENOSPC)
  except OSError:
    pass
  return (str(error).splitlines() or [type(error).__name__])[0][:200]
