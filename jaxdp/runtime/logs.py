"""Library messages go to a log file in the workdir, not the terminal.

orbax, asyncio, tensorboardX and absl report through Python's `logging` (and unraisable
exceptions through `sys.unraisablehook`, failed threads through `threading.excepthook`); on a full disk that was hundreds of lines of
tracebacks burying jaxdp's own one-line error. `to_file(workdir)` sends all of it to
WORKDIR/jaxdp.log, so the terminal shows jaxdp's lines, and its error line is the last one.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import warnings

from jaxdp.errors import disk_error

LOG_FILE = "jaxdp.log"
_MAX_HELD = 20_000  # Log records held before the run starts (see `release`).
_current: str | None = None
_handler: _LazyFileHandler | None = None


class _LazyFileHandler(logging.FileHandler):
  """Creates the workdir and the file only when there is something to log, so a run refused
  before it starts leaves no empty workdir behind."""

  def __init__(self, path: str):
    super().__init__(path, delay=True)
    # Records held in memory until logs.release(): a run refused before it starts (a resume whose
    # config changed, found only after the checkpoint's metadata is read) writes nothing.
    self.held: list[logging.LogRecord] | None = []

  def emit(self, record: logging.LogRecord) -> None:
    if self.held is None:
      super().emit(record)
      return
    self.held.append(record)
    if len(self.held) > _MAX_HELD:  # Bounded memory: a long start-up logs to the file as usual.
      self.write_held()

  def write_held(self) -> None:
    # Not `release`: logging.Handler's release() frees its lock.
    held, self.held = self.held, None
    for record in held or ():
      super().emit(record)

  def _open(self):
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()

  def handleError(self, record: logging.LogRecord) -> None:
    """A log write the disk refused: kept for `take_failure` (the run's next metrics write ends
    it with one line), instead of logging's traceback on the terminal."""
    error = sys.exc_info()[1]
    if error is not None and disk_error(error):
      _failures.append((self.baseFilename, error))


# Disk refusals that happened where nothing could raise them to the user (a logging handler, a
# background thread): (the path written, the error), oldest first.
_failures: list[tuple[str, BaseException]] = []


def take_failure() -> tuple[str, BaseException] | None:
  """The oldest write refused by the disk in the log file or a background thread since the last
  call ((path, error); the path may be "" when the error names none), or None."""
  if not _failures:
    return None
  failure = _failures[0]
  _failures.clear()
  return failure


def to_file(workdir: str) -> str:
  """Routes Python logging, warnings and unraisable-exception reports to WORKDIR/jaxdp.log."""
  global _current, _handler
  path = os.path.abspath(os.path.join(workdir, LOG_FILE))
  handler = _handler = _LazyFileHandler(path)
  atexit.unregister(release)  # Once, however often to_file is called.
  atexit.register(release)  # A crash before the run starts still leaves its messages.
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
  root = logging.getLogger()
  for old in list(root.handlers):
    root.removeHandler(old)
  root.addHandler(handler)
  root.setLevel(logging.INFO)
  # JAX's INFO line that each absent backend (TPU, CUDA) could not start says nothing about the
  # run, and alone it would create the workdir (for its log) of a run refused at validation.
  logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
  try:  # absl installs its own handler on first use; keep it off the terminal too.
    from absl import logging as absl_logging
    # ABSLHandler writes through its PythonHandler; it has no setStream of its own.
    absl_logging.get_absl_handler().python_handler.setStream(open(os.devnull, "w"))  # noqa: SIM115
    absl_logging.use_python_logging(quiet=True)
  except Exception:  # noqa: BLE001 - absl missing or changed: Python logging still goes to file.
    pass
  # A log file on a full or read-only disk must not print logging's own tracebacks instead.
  logging.raiseExceptions = False
  logging.captureWarnings(True)
  warnings.simplefilter("default")

  def unraisable(info) -> None:
    logging.getLogger("jaxdp.unraisable").error(
        "%s: %s", info.err_msg or "Exception ignored", info.exc_value,
        exc_info=(info.exc_type, info.exc_value, info.exc_traceback))
  sys.unraisablehook = unraisable

  def thread_failed(args) -> None:  # E.g. TensorBoard's writer thread on a full disk.
    if args.exc_value is not None and disk_error(args.exc_value):
      _failures.append((os.fsdecode(getattr(args.exc_value, "filename", None) or ""),
                        args.exc_value))
    logging.getLogger("jaxdp.thread").error(
        "exception in thread %s", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
  threading.excepthook = thread_failed
  _current = path
  return path


def release() -> None:
  """Writes the log records held since `to_file`, and from now on each as it comes: called once
  the run has passed its last refusal (runtime/loop.fit, after the resume check)."""
  if _handler is not None:
    _handler.write_held()


def discard() -> None:
  """Drops the records held since `to_file` (a refused run writes nothing); a no-op once
  released."""
  if _handler is not None and _handler.held is not None:
    _handler.held = []


def current() -> str | None:
  """The log file in use, if `to_file` was called and something was written to it."""
  if _handler is not None and _handler.held is not None:
    return None  # Nothing of this run's is in it (yet).
  if _current and os.path.exists(_current) and os.path.getsize(_current) > 0:
    return _current
  return None
