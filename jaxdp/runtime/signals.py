"""Ctrl-C, SIGTERM and SIGUSR1 at any moment: recorded, then acted on at the next safe point.

Python's default SIGINT handler raises KeyboardInterrupt wherever the main thread happens to be,
including inside JAX's callbacks (where it is swallowed: "Exception ignored in _xla_gc_callback"
and the run goes on) and around native code (where it has crashed the process). Instead the
handler only records the signal; `check()` raises `Interrupted` at points where nothing is
half-done (before any state exists), and the training loop polls `pending()` after each step to
save and stop. A second signal while the first is pending exits at once, without saving.

With several processes, a signal may reach only one of them (a scheduler preempting one host,
SLURM's `--signal=USR1@120` to the batch step, Ctrl-C in one terminal), yet all must stop after
the same step to save one checkpoint together: `agreed_stop` decides that. It uses JAX's
preemption service (jax.distributed's coordination service picks the step: the largest step any
process has reached, plus one, `multihost_utils.reached_preemption_sync_point`): SIGTERM goes
straight to its notifier, and SIGINT/SIGUSR1 are recorded here and forwarded to it as SIGTERM.
Without the service, the flag is shared by an all-gather at each log step, which every process
reaches together.

A signal that arrives before the loop's handlers are installed (start-up, restore, compilation)
is only recorded: `agree_before_training` runs on every process right before the first step (a
key-value entry per process and a barrier through the coordinator), and when any process holds
a signal then, every process stops before training, nothing saved (exit 130). A signal recorded
while the loop's forwarding was not yet installed is forwarded to JAX's notifier at the next
step, so the processes still agree on a stop step. A run stopped this way exits with config.preempt_exit_code (75, EX_TEMPFAIL,
by default): "stopped and saved; run the same command to resume", distinct from success (0).
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import numpy as np

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
STOP_KEY = "jaxdp/stop_signal"  # Key-value store entry naming the signal and the process it hit.

_pending: str | None = None
_installed = False
_forward: int | None = None  # Also raise this signal on the first one (JAX's notifier).
_announced = False
_forwarded = False  # The pending signal reached JAX's notifier (forwarded, or SIGTERM itself).
_barriers = 0  # Barriers this process has entered (each needs its own name).
STOP_BEFORE_KEY = "jaxdp/stop_before_training/"


class Interrupted(KeyboardInterrupt):
  """A signal arrived before training started: nothing to save."""


def _handle(signum, frame) -> None:
  del frame
  global _pending, _forwarded
  if _pending is not None:
    print(f"jaxdp: {signal.Signals(signum).name} again: exiting now, without saving",
          file=sys.stderr, flush=True)
    os._exit(128 + signum)
  _pending = signal.Signals(signum).name
  if _forward is not None and _forward != signum:
    _forwarded = True
    os.kill(os.getpid(), _forward)


def install(signals: tuple[int, ...] = STOP_SIGNALS, forward: int | None = None) -> None:
  """Routes `signals` to the recording handler (from the main thread; idempotent); with
  `forward`, the first of them is also re-raised as that signal (for a native handler)."""
  global _installed, _forward
  if threading.current_thread() is threading.main_thread():
    for sig in signals:
      signal.signal(sig, _handle)
    _installed = True
    _forward = forward


def _preemption_service():
  """JAX's preemption sync manager when this process joined a multi-process run, else None."""
  import jax
  if jax.process_count() == 1:
    return None
  from jax._src import distributed
  return distributed.global_state.preemption_sync_manager


def for_the_loop() -> tuple[tuple[int, ...], int | None]:
  """(signals the training loop records, the signal to forward them as): all three in one
  process; with JAX's preemption service, SIGTERM stays with its notifier and the others are
  forwarded to it."""
  if _preemption_service() is None:
    return STOP_SIGNALS, None
  return (signal.SIGINT, signal.SIGUSR1), signal.SIGTERM


def agreed_stop(step: int, log_step: bool) -> str | None:
  """Whether every process stops after `step`: the signal's name (and where it came from) when
  they do, else None. Call it after every step on every process (the same steps everywhere)."""
  import jax
  global _announced
  if jax.process_count() == 1:
    return _pending
  from jax._src import distributed
  from jax.experimental import multihost_utils
  client = distributed.global_state.client
  assert client is not None  # process_count() > 1: this process joined a run.
  if _preemption_service() is not None:
    if _pending is not None and not _announced:
      _announced = True
      if not _forwarded:
        _forward_to_notifier()
      try:  # Names the signal for the other processes' logs; the first to arrive wins.
        client.key_value_set(STOP_KEY, f"{_pending} on process {jax.process_index()}")
      except Exception:  # noqa: BLE001 - another process's signal named it already.
        pass
    if not multihost_utils.reached_preemption_sync_point(step):
      return None
    try:
      return client.key_value_try_get(STOP_KEY)
    except Exception:  # noqa: BLE001 - not set: a SIGTERM that went straight to JAX's notifier.
      return "SIGTERM" if _pending is None else f"{_pending} on process {jax.process_index()}"
  if log_step:  # No preemption service: share the flag where every process is anyway.
    flags = multihost_utils.process_allgather(np.int32(_pending is not None))
    if np.any(flags):
      me, first = jax.process_index(), int(np.argmax(flags))
      return f"{_pending} on process {me}" if _pending else f"a signal on process {first}"
  return None


def _forward_to_notifier() -> None:
  """Hands a signal recorded before the loop's forwarding existed to JAX's notifier (which owns
  SIGTERM once the process group formed), so that the service picks the stop step."""
  global _forwarded
  _forwarded = True
  os.kill(os.getpid(), signal.SIGTERM)


def agree_before_training(timeout_s: float = 24 * 3600) -> str | None:
  """Whether any process holds a stop signal right before the first step: its name and process
  when one does (every process then stops before training), else None. Call it on every process
  at the same point; with one process it is `pending()`.

  The wait at the barrier is bounded by `timeout_s` (a lost peer is judged sooner by the
  heartbeats of runtime/heartbeat.py).
  """
  import jax
  global _barriers
  if jax.process_count() == 1:
    return _pending
  from jax._src import distributed
  client = distributed.global_state.client
  assert client is not None  # process_count() > 1: this process joined a run.
  _barriers += 1
  me = jax.process_index()
  client.key_value_set(f"{STOP_BEFORE_KEY}{_barriers}/{me}", _pending or "", allow_overwrite=True)
  client.wait_at_barrier(f"jaxdp_before_training_{_barriers}", int(timeout_s * 1000))
  held = sorted((int(key.rsplit("/", 1)[1]), value)
                for key, value in client.key_value_dir_get(f"{STOP_BEFORE_KEY}{_barriers}/") if value)
  if _pending is not None:
    return f"{_pending} on process {me}"
  return f"{held[0][1]} on process {held[0][0]}" if held else None


def installed() -> bool:
  """Whether the signal handlers are installed (by `install`)."""
  return _installed


def pending() -> str | None:
  """The name of the signal received and not yet acted on, if any."""
  return _pending


def clear() -> None:
  """Forgets a pending signal (after it was acted on)."""
  global _pending, _announced, _forwarded
  _pending, _announced, _forwarded = None, False, False


def check(where: str) -> None:
  """Raises Interrupted if a signal is pending; `where` says what had not started yet."""
  if _pending is not None:
    raise Interrupted(f"{_pending} {where}; nothing was saved")
