"""Ctrl-C and SIGTERM at any moment: recorded, then acted on at the next safe point.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be,
including inside JAX's callbacks (where it is swallowed: "Exception ignored in _xla_gc_callback"
and the run goes on) and around native code (where it has crashed the process). Instead the
handler only records the signal; `check()` raises `Interrupted` at points where nothing is
half-done (before any state exists), and the training loop polls `pending()` after each step to
save and stop. A second signal while the first is pending exits at once, without saving.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_pending: str | None = None
_installed = False


class Interrupted(KeyboardInterrupt):
  """A signal arrived before training started: nothing to save."""


def _handle(signum, frame) -> None:
  del frame
  global _pending
  if _pending is not None:
    print(f"jaxdp: {signal.Signals(signum).name} again: exiting now, without saving",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)
  _pending = signal.Signals(signum).name


def install(signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
  """Routes `signals` to the recording handler (from the main thread; idempotent)."""
  global _installed
  if threading.current_thread() is threading.main_thread():
    for sig in signals:
      signal.signal(sig, _handle)
    _installed = True


def installed() -> bool:
  return _installed


def pending() -> str | None:
  """The name of the signal received and not yet acted on, if any."""
  return _pending


def clear() -> None:
  global _pending
  _pending = None


def check(where: str) -> None:
  """Raises Interrupted if a signal is pending; `where` says what had not started yet."""
  if _pending is not None:
    raise Interrupted(f"{_pending} {where}; nothing was saved")
