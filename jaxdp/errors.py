"""The one exception type users see: a bad input, named, with its fix.

The CLI prints `jaxdp: error: <message>` and exits 2 without a traceback; the library raises it.
"""

from collections.abc import Iterator
import contextlib
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


def clause(text: str) -> str:
  """`text` without its closing punctuation (one of . ! ? ; : ,), so that "; ..." or ". Exiting."
  can follow it: a message taken from elsewhere (a process's error line, an exception's text)
  often ends in a sentence ("... Exiting.", "Aborting!"). An ellipsis ("waiting...") is kept."""
  text = text.rstrip()
  while text and text[-1] in ".!?;:," and not text.endswith(".."):
    text = text[:-1].rstrip()
  return text


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
  # Tensorstore's errors carry the OS's words inside their text ("RESOURCE_EXHAUSTED: ...").
  for words in ("No space left on device", "Disk quota exceeded", "Read-only file system",
                "Permission denied"):
    if words in str(error):
      return words
  try:
    fs = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path))
    if fs.f_bavail * fs.f_frsize < 64 * 1024:  # Too little left for one write of a record batch.
      return os.strerror(errno.ENOSPC)
  except OSError:
    pass
  return (str(error).splitlines() or [type(error).__name__])[0][:200]


# OS errors that mean the disk (or the bucket) refuses the write, not a bug: out of space or
# quota, read-only, or no permission.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
# The same, as tensorstore (under orbax) reports them: a ValueError whose text starts with the
# absl status code, e.g. "RESOURCE_EXHAUSTED: Error writing ...: No space left on device".
_DISK_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "No space left on device",
                  "Read-only file system", "Permission denied", "Disk quota exceeded")


class WriteFailed(JaxdpError):
  """A write jaxdp makes (checkpoint, metrics, TensorBoard, log, hang report, export, prepare)
  refused by the disk or bucket: out of space or quota, read-only, or no permission. Like every
  JaxdpError it is one line `jaxdp: error: ...` and exit status 2; what was written before is
  intact, and the same command resumes once the cause is fixed."""


def disk_error(error: BaseException) -> bool:
  """Whether `error` (or an exception it wraps) is a disk or bucket refusing a write."""
  seen: BaseException | None = error
  hops = 0
  while seen is not None and hops < 20:
    if isinstance(seen, OSError) and seen.errno in _DISK_ERRNOS:
      return True
    if not isinstance(seen, OSError) and any(s in str(seen) for s in _DISK_STATUSES):
      return True
    seen, hops = seen.__cause__ or seen.__context__, hops + 1
  return False


@contextlib.contextmanager
def writing(path: str, what: str, saved: str = "") -> Iterator[None]:
  """Around a write under `path`: a full, read-only or forbidden disk becomes one WriteFailed line
  naming `what` was being written, the path, the OS's reason and `saved` (what is intact, e.g.
  "the checkpoints up to step 8"); any other error passes through unchanged.

  Raises:
    WriteFailed: the write failed for lack of space or permission.
  """
  try:
    yield
  except WriteFailed:
    raise
  except Exception as e:  # noqa: BLE001 - only disk refusals are translated; the rest re-raised.
    if not disk_error(e):
      raise
    kept = f"; what was written before is intact ({saved})" if saved else ""
    raise WriteFailed(f"{what} {path!r} failed ({os_reason(e, path)}){kept}; free disk space or "
                      "fix the permissions (or write elsewhere), then run the same command again (a "
                      "run resumes from its last checkpoint)") from e


def atomic_write(path: str, data: str | bytes, what: str = "writing", saved: str = "") -> None:
  """Writes `data` to `path` whole or not at all: beside it under a temporary name, synced, then
  renamed over it, so a reader never sees half a file and a failed write leaves the old one.

  Raises:
    WriteFailed: the disk refused the write (out of space or quota, read-only, no permission);
      the temporary file is removed and `path` is as it was.
  """
  partial = f"{path}.partial-{os.getpid()}"
  with writing(path, what, saved):
    try:
      os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
      with open(partial, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
      os.replace(partial, path)
    finally:
      with contextlib.suppress(OSError):
        os.remove(partial)


def as_write_failed(error: BaseException) -> WriteFailed | None:
  """`error` as the one line a full, read-only or forbidden disk gets, or None if it is not one.

  The backstop for writes no `writing` block names (a library writing on jaxdp's behalf): the
  path is the one the OS error names, if any.
  """
  if isinstance(error, WriteFailed) or not disk_error(error):
    return None
  path = ""
  seen_: BaseException | None = error
  for _ in range(20):
    if seen_ is None:
      break
    if isinstance(seen_, OSError) and seen_.filename:
      path = os.fsdecode(seen_.filename)
      break
    seen_ = seen_.__cause__ or seen_.__context__
  if not path:
    return WriteFailed(f"a write failed ({os_reason(error, os.getcwd())}); free disk space or "
                       "fix the permissions (or write elsewhere), then run the same command again")
  try:  # A read refused (EACCES) arrives here too: the words fit both.
    with writing(path, "accessing"):
      raise error
  except WriteFailed as failed:
    return failed
  return None  # Unreachable: writing() translated the disk error above.
