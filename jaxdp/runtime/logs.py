"""Library messages go to a log file in the workdir, not the terminal.

orbax, asyncio, tensorboardX and absl report through Python's `logging` (and unraisable
exceptions through `sys.unraisablehook`, failed threads through `threading.excepthook`); on a full disk that was hundreds of lines of
tracebacks burying jaxdp's own one-line error. `to_file(workdir)` sends all of it to
WORKDIR/jaxdp.log, so the terminal shows jaxdp's lines, and its error line is the last one.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings

LOG_FILE = "jaxdp.log"
_current: str | None = None


class _LazyFileHandler(logging.FileHandler):
  """Creates the workdir and the file only when there is something to log, so a run refused
  before it starts leaves no empty workdir behind."""

  def __init__(self, path: str):
    super().__init__(path, delay=True)

  def _open(self):
    os.makedirs(os.path.dirname(self.baseFilename), exist_ok=True)
    return super()._open()


def to_file(workdir: str) -> str:
  """Routes Python logging, warnings and unraisable-exception reports to WORKDIR/jaxdp.log."""
  global _current
  path = os.path.abspath(os.path.join(workdir, LOG_FILE))
  handler = _LazyFileHandler(path)
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
    logging.getLogger("jaxdp.thread").error(
        "exception in thread %s", getattr(args.thread, "name", "?"),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
  threading.excepthook = thread_failed
  _current = path
  return path


def current() -> str | None:
  """The log file in use, if `to_file` was called and something was written to it."""
  if _current and os.path.exists(_current) and os.path.getsize(_current) > 0:
    return _current
  return None
