"""Heartbeats, lost peers and hang reports: a stuck multi-process run says who stopped and where.

Every process of a run publishes a heartbeat about once a second: its pid and host, the last step
it completed, the last step it dispatched and the phase its main thread is in (start-up,
compile, step, evaluation, checkpoint save/restore, barrier), with a counter that a live process
moves on. It goes to the coordinator's key-value store (`jaxdp/heartbeat/I`, JAX's distributed
client) and to `WORKDIR/hang/heartbeat-I.json` (so a frozen coordinator, whose store freezes with
it, is still judged on a shared or local workdir). A thread on each process reads the others'
heartbeats, in every phase (compilation, evaluation and checkpoint saves included), and ends the
process with exit status 3 and a message when:

- a peer's counter has not moved for `timeout_s` (frozen: SIGSTOP, a hung host), or its pid is
  gone on this host (killed), or the key-value store has not answered for `timeout_s` (the
  coordinator, process 0, is gone or frozen);
- a peer published an error (an exception ended its run, or it judged the run stuck itself):
  its error is repeated here, FAILURE_GRACE_S later (an error every process meets alike is better
  reported by each process itself). Such a peer's last heartbeat says "failed", so its exit is
  not judged a loss; process 0, whose exit takes the coordinator down (and JAX then aborts the
  processes still connected), waits for the others to leave first (`Monitor.linger`);
- this process has sat in one collective phase for `timeout_s` while a live peer sits in a
  different one (they can never meet).

Before exiting, each process that can still run writes `WORKDIR/hang/process-I.txt`: why, its
last completed step, its phase, the timeline of every process's last heartbeat as it saw them,
and the Python stacks of all its threads (faulthandler). The others are asked to do the same
(a `jaxdp/hang_request` key and the file `WORKDIR/hang/request`). SIGUSR2 (or `jaxdp stacks
--workdir W`, which sends it) writes the same report at any time without stopping the run.

`timeout_s` is config.step_timeout_s when set; for a multi-process run without it,
DEFAULT_PEER_TIMEOUT_S. JAX's own coordination heartbeat (which aborts the process natively when
it gives up) is set `JAX_HEARTBEAT_MARGIN_S` later by `jax_heartbeat_timeout_s`, so this fires
first.
"""

from __future__ import annotations

import atexit
from collections.abc import Callable, Iterator
import contextlib
import faulthandler
import glob
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
from typing import Any

from jaxdp.errors import clause, os_reason

HANG_DIR = "hang"
EXIT_STATUS = 3  # As the step watchdog's: the run cannot go on (a step, or a peer, is lost).
DEFAULT_PEER_TIMEOUT_S = 60.0  # Multi-process runs without config.step_timeout_s.
JAX_HEARTBEAT_MARGIN_S = 60  # JAX's coordination heartbeat gives up this long after ours.
KEY = "jaxdp/heartbeat/"
ERROR_KEY = "jaxdp/error/"
REQUEST_KEY = "jaxdp/hang_request"
RUN_KEY = "jaxdp/heartbeat_run/"  # + the monitor's ordinal: this run's id, set by process 0.
DONE_PHASES = ("finished", "failed")  # A peer that says so is never judged lost.
# Words of an error that a lost peer causes (a collective, a barrier or the store failing): such
# an error waits for the judgement of the peers before it is reported as this process's own.
COLLECTIVE_FAILURES = ("Gloo", "NCCL", "barrier", "DEADLINE_EXCEEDED", "UNAVAILABLE",
                       "coordination", "Connection reset")
FAILURE_GRACE_S = 3.0  # Seconds a peer's error waits before this process reports it.
KV_FINAL_S = 5.0  # How long stop() waits for the last heartbeat to reach the key-value store.

# This process's status, set by the main thread (cheap; read by the monitor's thread).
_status: dict[str, Any] = {"completed": None, "dispatched": None, "phase": "start-up",
                           "phase_step": None, "phase_since": time.time()}
_current: Monitor | None = None
# Called when process 0 has waited for the others before an exit of its own (Monitor.linger):
# a coordinator service of its own can end with it (runtime/coordinator.py).
AFTER_LINGER: list[Callable[[], None]] = []
_started = 0  # Monitors started by this process (the same sequence on every process).


def peer_timeout_s(step_timeout_s: float) -> float:
  """Seconds without a peer's heartbeat before it is judged lost: config.step_timeout_s when set
  (> 0), else DEFAULT_PEER_TIMEOUT_S."""
  return float(step_timeout_s) if step_timeout_s and step_timeout_s > 0 else DEFAULT_PEER_TIMEOUT_S


def jax_heartbeat_timeout_s(step_timeout_s: float) -> int:
  """The `heartbeat_timeout_seconds` to give jax.distributed.initialize: JAX's coordination
  service aborts a process (SIGABRT) once a peer misses heartbeats this long, so it must come
  after jaxdp's own judgement (peer_timeout_s plus a margin)."""
  return int(peer_timeout_s(step_timeout_s)) + JAX_HEARTBEAT_MARGIN_S


def set_phase(name: str, step: int | None = None) -> None:
  """Records the phase the main thread enters (shown in heartbeats and hang reports)."""
  _status.update(phase=name, phase_step=step, phase_since=time.time())


@contextlib.contextmanager
def phase(name: str, step: int | None = None, after: str = "step") -> Iterator[None]:
  """`with phase("evaluation", step):` marks the main thread in that phase, then in `after`."""
  set_phase(name, step)
  try:
    yield
  finally:
    set_phase(after, _status["completed"])


def dispatched(step: int) -> None:
  """Records that `step` was dispatched (its collective may now wait for the peers)."""
  _status.update(dispatched=step, phase="step", phase_step=step, phase_since=time.time())


def completed(step: int) -> None:
  """Records that `step` finished on this process's devices."""
  _status["completed"] = step


def current() -> Monitor | None:
  """The running monitor of this process, if any."""
  return _current


def pid_state(pid: int) -> str | None:
  """'gone', 'frozen' (stopped by a signal) or None (running or unknown) for a local pid."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      state = f.read().rsplit(")", 1)[1].split()[0]
  except FileNotFoundError:
    return "gone"
  except (OSError, IndexError):
    try:
      os.kill(pid, 0)
    except ProcessLookupError:
      return "gone"
    except OSError:
      pass
    return None
  return {"T": "frozen", "t": "frozen", "Z": "gone", "X": "gone"}.get(state)


class Monitor:
  """Publishes this process's heartbeat and judges its peers' (see the module docstring).

  `client`: JAX's distributed client (None: files only). `exit`: how the process ends
  (os._exit; tests replace it). `beat_s`: seconds between heartbeats.
  """

  def __init__(self, workdir: str, timeout_s: float, *, index: int = 0, count: int = 1,
               client: Any = None, beat_s: float | None = None, judge_phases: bool = True,
               exit: Callable[[int], Any] = os._exit, clock: Callable[[], float] = time.monotonic):
    self.workdir, self.timeout_s, self.index, self.count = workdir, timeout_s, index, count
    self.judge_phases = judge_phases  # Whether stranded() may fire (with step_timeout_s set).
    self.directory = os.path.join(workdir, HANG_DIR)
    self.client, self._exit, self._clock = client, exit, clock
    self.beat_s = beat_s if beat_s is not None else max(0.2, min(1.0, timeout_s / 10))
    self.host, self.pid = socket.gethostname(), os.getpid()
    self.report_failure = ""  # Why the last hang report could not be written (dump), one line.
    self._seq = 0
    self._started = clock()
    self._seen: dict[int, tuple[int, float]] = {}  # Peer -> (its counter, when it last moved).
    self._peers: dict[int, dict] = {}  # Peer -> its latest heartbeat.
    self._errors: dict[int, str] = {}
    self._kv_ok = clock()  # When the key-value store last answered.
    self._kv_jobs: queue.Queue = queue.Queue(maxsize=1)
    self._kv_results: dict[str, Any] = {}
    self._requests_done: set[str] = set()
    self._stop = threading.Event()
    self._fired = threading.Lock()
    self._wakeup: tuple[socket.socket, socket.socket] | None = None
    self._old_wakeup_fd = -1
    self._thread = threading.Thread(target=self._run, name="jaxdp-heartbeat", daemon=True)
    self._kv_thread = threading.Thread(target=self._kv_worker, name="jaxdp-heartbeat-kv",
                                       daemon=True)
    self.failed_error: str | None = None
    self._final = ""  # The last heartbeat, set by stop() for the store's thread to send.
    # Tells this run's heartbeats, errors and requests from a previous run's left in the workdir.
    self.run_id: str | None = None
    self._failure_seen = 0.0  # When a peer's error was first seen (0: none yet).

  # --- life cycle ---------------------------------------------------------------------------

  def start(self) -> Monitor:
    """Starts publishing and judging (a thread); registers SIGUSR2 (main thread only)."""
    global _current, _started
    _status.update(completed=None, dispatched=None, phase="start-up", phase_step=None,
                   phase_since=time.time())
    _started += 1
    if self.client is not None:
      key = f"{RUN_KEY}{_started}"
      try:
        if self.index == 0:
          self.run_id = f"{time.time_ns():x}-{self.pid}"
          self.client.key_value_set(key, self.run_id, allow_overwrite=True)
        else:
          self.run_id = self.client.blocking_key_value_get(key, 120_000)
      except Exception:  # noqa: BLE001 - no id: every record is taken as this run's.
        self.run_id = None
    if self.count > 1:
      try:
        os.makedirs(self.directory, exist_ok=True)
      except OSError:
        pass  # A read-only workdir: the key-value store still carries the heartbeats.
    if threading.current_thread() is threading.main_thread():
      # SIGUSR2 must be answered while the main thread is stuck in native code, where Python
      # signal handlers never run: the interpreter's C-level handler writes the signal's number
      # to the wakeup fd at once, and this monitor's thread reads it there.
      pair = socket.socketpair()
      pair[1].setblocking(False)
      try:
        signal.signal(signal.SIGUSR2, _ignore)
        self._old_wakeup_fd = signal.set_wakeup_fd(pair[1].fileno(), warn_on_full_buffer=False)
        if self._old_wakeup_fd != -1:  # Someone else's (an event loop): leave it to them.
          signal.set_wakeup_fd(self._old_wakeup_fd)
          raise ValueError
        self._wakeup = pair
      except (ValueError, OSError):
        for s in pair:
          s.close()
    self.beat()
    self._thread.start()
    if self.client is not None:
      self._kv_thread.start()
    _current = self
    return self

  def stop(self, phase: str = "finished") -> None:
    """Stops the thread after a last heartbeat saying `phase` (a peer that finished or failed
    is not judged lost when it goes quiet)."""
    global _current
    set_phase(phase, _status["completed"])
    self._final = json.dumps(self._record())
    self._stop.set()
    if self.count > 1:
      self._write(f"heartbeat-{self.index}.json", self._final)
    if self.client is not None and self._kv_thread.is_alive():
      # The last word reaches the store before this process goes, sent by the store's own
      # thread, which then ends. A thread still inside a call into JAX's client when the
      # interpreter exits is ended by CPython mid-call (pthread_exit), and the client's C++
      # then aborts the process ("FATAL: exception not rethrown"): a finished run died by
      # SIGABRT that way.
      with contextlib.suppress(queue.Full):
        self._kv_jobs.put_nowait(None)  # Wakes the thread if it waits for a job.
      self._kv_thread.join(timeout=KV_FINAL_S)
    if self._wakeup is not None and threading.current_thread() is threading.main_thread():
      with contextlib.suppress(ValueError, OSError):
        signal.set_wakeup_fd(-1)
    if _current is self:
      _current = None

  # --- heartbeats ---------------------------------------------------------------------------

  def _record(self) -> dict[str, Any]:
    self._seq += 1
    return dict(process=self.index, pid=self.pid, host=self.host, seq=self._seq, time=time.time(),
                run=self.run_id, **_status)

  def _pack(self, text: str) -> str:
    return json.dumps({"run": self.run_id, "text": text})

  def _unpack(self, value: str) -> str | None:
    """The text of an error or request of this run (None: another run's, or unreadable)."""
    try:
      packed = json.loads(value)
      ours = self.run_id is None or packed["run"] == self.run_id
      return str(packed["text"]) if ours else None
    except (ValueError, KeyError, TypeError):
      return None

  def _publish(self) -> dict[str, Any]:
    record = self._record()
    if self.count > 1:  # One process: `jaxdp stacks` finds its pid in the workdir lock.
      self._write(f"heartbeat-{self.index}.json", json.dumps(record))
    if self.client is not None:
      with contextlib.suppress(queue.Full):  # The store has not answered the last one yet.
        self._kv_jobs.put_nowait(json.dumps(record))
    return record

  def _write(self, name: str, text: str) -> None:
    path = os.path.join(self.directory, name)
    try:
      with open(path + ".tmp", "w") as f:
        f.write(text)
      os.replace(path + ".tmp", path)
    except OSError:
      pass  # Full or read-only disk: the heartbeat is best effort; the store still has it.

  def _kv_worker(self) -> None:
    """Talks to the key-value store on its own thread: a frozen coordinator blocks it, not the
    judgement (which then names the coordinator)."""
    while True:
      record = self._kv_jobs.get()
      if self._stop.is_set():  # stop(): send its last heartbeat, then end (see stop).
        with contextlib.suppress(Exception):
          self.client.key_value_set(KEY + str(self.index), self._final, allow_overwrite=True)
        return
      try:
        self.client.key_value_set(KEY + str(self.index), record, allow_overwrite=True)
        results = {"heartbeats": self.client.key_value_dir_get(KEY),
                   "errors": self.client.key_value_dir_get(ERROR_KEY),
                   "request": self.client.key_value_dir_get(REQUEST_KEY)}
        self._kv_results = results
        self._kv_ok = self._clock()
      except Exception:  # noqa: BLE001 - the coordinator is gone: judged by _kv_ok's age.
        time.sleep(self.beat_s)

  def refresh(self) -> None:
    """Reads the peers' latest heartbeats now (the thread does so every beat)."""
    self._gather()

  def _gather(self) -> None:
    """The peers' latest heartbeats and errors, from the store and the workdir."""
    found: dict[int, dict] = {}
    values = [v for _, v in self._kv_results.get("heartbeats", [])]
    for path in glob.glob(os.path.join(self.directory, "heartbeat-*.json")):
      with contextlib.suppress(OSError):
        with open(path) as f:
          values.append(f.read())
    for value in values:
      with contextlib.suppress(ValueError, KeyError, TypeError):
        record = json.loads(value)
        p = int(record["process"])
        if self.run_id is not None and record.get("run") != self.run_id:
          continue  # A previous run's heartbeat, left in the workdir.
        if p != self.index and (p not in found or record["seq"] > found[p]["seq"]):
          found[p] = record
    now = self._clock()
    for p, record in found.items():
      seq, _ = self._seen.get(p, (None, now))
      if seq != record["seq"] or record.get("pid") != self._peers.get(p, {}).get("pid"):
        self._seen[p] = (record["seq"], now)
      self._peers[p] = record
    errors = [(key.rsplit("/", 1)[1], value) for key, value in self._kv_results.get("errors", [])]
    for path in glob.glob(os.path.join(self.directory, "error-*.json")):
      with contextlib.suppress(OSError):
        with open(path) as f:
          errors.append((os.path.basename(path)[len("error-"):-len(".json")], f.read()))
    for index, value in errors:
      text = self._unpack(value)
      if text is not None and index.isdigit() and int(index) != self.index:
        self._errors.setdefault(int(index), text)

  # --- judgement ----------------------------------------------------------------------------

  def lost(self, after_s: float | None = None) -> dict[int, str]:
    """Peers judged to have stopped responding -> how (from their heartbeats, pids and the
    store's answers); `after_s`: the heartbeat age that counts (default timeout_s)."""
    now, found = self._clock(), {}
    after_s = self.timeout_s if after_s is None else after_s
    for p in range(self.count):
      if p == self.index:
        continue
      record = self._peers.get(p, {})
      if record.get("phase") in DONE_PHASES:
        continue
      state = pid_state(record["pid"]) if record.get("host") == self.host and "pid" in record \
          else None
      if state == "gone":
        found[p] = "exited or was killed (its pid is gone)"
        continue
      _, moved = self._seen.get(p, (None, self._started))
      if now - moved > after_s:
        found[p] = (f"is frozen (stopped by a signal): no heartbeat for {now - moved:.0f} s"
                    if state == "frozen" else f"sent no heartbeat for {now - moved:.0f} s")
    if self.client is not None and self.index != 0 and 0 not in found \
       and now - self._kv_ok > after_s:
      found[0] = f"serves the coordinator, which has not answered for {now - self._kv_ok:.0f} s"
    return found

  def stranded(self) -> dict[int, str]:
    """Live peers in a different collective phase from this process's, when this process has
    waited in its phase for timeout_s: they cannot meet."""
    mine = (_status["phase"], _status["phase_step"])
    # Steps are the step watchdog's (runtime/watchdog.py); start-up and compilation take as long
    # as they take on each process.
    if not self.judge_phases or mine[0] in ("start-up", "compile", "step") or time.time() - _status["phase_since"] <= self.timeout_s:
      return {}
    found = {}
    for p, record in self._peers.items():
      theirs = (record.get("phase"), record.get("phase_step"))
      if theirs != mine and record.get("phase") not in DONE_PHASES and \
         record["time"] - record.get("phase_since", record["time"]) > self.timeout_s:
        found[p] = f"in {describe_phase(*theirs)} while process {self.index} waits in " \
                   f"{describe_phase(*mine)}"
    return found

  def timeline(self) -> str:
    """One line per process: its last completed step, its phase and its heartbeat's age."""
    now, lines = self._clock(), []
    me = dict(process=self.index, pid=self.pid, host=self.host, **_status)
    for p in range(self.count):
      record = me if p == self.index else self._peers.get(p)
      if record is None:
        lines.append(f"  process {p}: no heartbeat seen")
        continue
      age = 0.0 if p == self.index else now - self._seen.get(p, (None, now))[1]
      in_phase = time.time() - record.get("phase_since", time.time()) if p == self.index \
          else record["time"] - record.get("phase_since", record["time"])
      lines.append(f"  process {p} (pid {record.get('pid')}, host {record.get('host')}): last "
                   f"completed step {record.get('completed')}, dispatched {record.get('dispatched')}"
                   f", in {describe_phase(record.get('phase'), record.get('phase_step'))} for "
                   f"{in_phase:.0f} s; heartbeat {age:.0f} s ago"
                   + (" (this process)" if p == self.index else ""))
    return "\n".join(lines)

  def names(self, found: dict[int, str]) -> str:
    """'process P (pid N, host H), which HOW; ...' for judged peers."""
    return "; ".join(f"{self.name(p)}, which {how}" for p, how in sorted(found.items()))

  def behind(self) -> dict[int, str]:
    """Peers that have not dispatched the step this process dispatched last (from their
    heartbeats): the ones a stuck collective waits for."""
    mine, now = _status["dispatched"], self._clock()
    found: dict[int, str] = {}
    if mine is None:
      return found
    for p, r in self._peers.items():
      if r.get("phase") in DONE_PHASES or (r.get("dispatched") or 0) >= mine:
        continue
      state = pid_state(r["pid"]) if r.get("host") == self.host and "pid" in r else None
      age = now - self._seen.get(p, (None, now))[1]
      found[p] = (f"has not reached step {mine} (its last heartbeat, {age:.0f} s ago: dispatched "
                  f"{r.get('dispatched')}, in {describe_phase(r.get('phase'), r.get('phase_step'))})"
                  + {"frozen": "; it is frozen (stopped by a signal)",
                     "gone": "; its pid is gone"}.get(state or "", ""))
    return found

  def name(self, p: int) -> str:
    """'process P (pid N, host H)' from its heartbeat."""
    record = self._peers.get(p, {})
    return f"process {p} (pid {record.get('pid', '?')}, host {record.get('host', '?')})"

  def beat(self) -> None:
    """One heartbeat: publish, gather, judge (the thread calls it every beat_s)."""
    self._publish()
    self._gather()
    self._answer_requests()
    if self._stop.is_set():
      return
    failed = {p: e for p, e in self._errors.items() if p != self.index}
    if failed:
      # A few seconds' grace: an error every process meets alike (a refused config) is better
      # reported by each process itself.
      self._failure_seen = self._failure_seen or self._clock()
    if failed and self._clock() - self._failure_seen >= FAILURE_GRACE_S:
      p, error = sorted(failed.items())[0]
      self.fire(f"{self.name(p)} failed: {clause(error)}; stopping process {self.index} of "
                f"{self.count} too", dump=False)
    lost = self.lost()
    if lost:
      self.fire(f"process {self.index} of {self.count} lost {self.names(lost)} (peer timeout "
                f"{self.timeout_s:g} s: config.step_timeout_s, or {DEFAULT_PEER_TIMEOUT_S:g} s "
                "when unset)")
    stranded = self.stranded()
    if stranded:
      names = "; ".join(f"{self.name(p)} is {how}" for p, how in sorted(stranded.items()))
      self.fire(f"process {self.index} of {self.count}: the processes stopped meeting: {names} "
                f"for over {self.timeout_s:g} s")

  def _wait(self) -> bool:
    """Waits a beat (answering SIGUSR2 meanwhile); False once stopped."""
    deadline = time.monotonic() + self.beat_s
    while not self._stop.is_set():
      left = deadline - time.monotonic()
      if left <= 0:
        return True
      if self._wakeup is None:
        self._stop.wait(left)
        continue
      if select.select([self._wakeup[0]], [], [], left)[0]:
        with contextlib.suppress(OSError):
          if signal.SIGUSR2 in self._wakeup[0].recv(256):
            path = self.dump("SIGUSR2 (a report on demand; the run goes on)")
            print(f"jaxdp: SIGUSR2: wrote {path}" if path else
                  f"jaxdp: warning: SIGUSR2: {self.report_failure}", file=sys.stderr, flush=True)
    return False

  def _run(self) -> None:
    while self._wait():
      try:
        self.beat()
      except Exception as e:  # noqa: BLE001 - the monitor must never take the run down itself.
        print(f"jaxdp: warning: heartbeat: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
    if self._wakeup is not None:
      for end in self._wakeup:
        end.close()

  # --- reports ------------------------------------------------------------------------------

  def dump(self, reason: str) -> str | None:
    """Writes WORKDIR/hang/process-I.txt (why, step, phase, timeline, every thread's Python
    stack); returns its path, or None when the disk refuses it (`report_failure` then says why,
    naming the path, in one line). The report is written beside its name and renamed, so a full
    disk never leaves half a report (an older one stays)."""
    path = os.path.join(self.directory, f"process-{self.index}.txt")
    partial = f"{path}.partial-{self.pid}"
    try:
      os.makedirs(self.directory, exist_ok=True)
      with open(partial, "w") as f:
        f.write(f"jaxdp hang report: process {self.index} of {self.count} (pid {self.pid}, host "
                f"{self.host}), {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\nreason: {reason}\n"
                f"last completed step: {_status['completed']}; phase: "
                f"{describe_phase(_status['phase'], _status['phase_step'])}\n"
                f"timeline (each process's last heartbeat, as process {self.index} saw it):\n"
                f"{self.timeline()}\n\nPython stacks of every thread (most recent call first):\n")
        f.flush()
        faulthandler.dump_traceback(file=f, all_threads=True)
        f.flush()
        os.fsync(f.fileno())
      os.replace(partial, path)
    except OSError as e:
      self.report_failure = f"the hang report {path!r} could not be written ({os_reason(e, path)})"
      with contextlib.suppress(OSError):
        os.remove(partial)
      return None
    return path

  def request_reports(self, reason: str) -> None:
    """Asks every process to write its report (through the store and the workdir)."""
    self._write("request", self._pack(reason))
    if self.client is not None:  # On a thread of its own: a frozen coordinator never answers.
      def ask():
        with contextlib.suppress(Exception):
          self.client.key_value_set(REQUEST_KEY + "/" + str(self.index), self._pack(reason),
                                    allow_overwrite=True)
      threading.Thread(target=ask, daemon=True).start()

  def _answer_requests(self) -> None:
    requests = [v for _, v in self._kv_results.get("request", [])]
    with contextlib.suppress(OSError):
      with open(os.path.join(self.directory, "request")) as f:
        requests.append(f.read())
    for reason in map(self._unpack, requests):
      if reason and reason not in self._requests_done:
        self._requests_done.add(reason)
        if self.dump(f"asked by another process: {reason}") is None:
          print(f"jaxdp: warning: {self.report_failure}", file=sys.stderr, flush=True)

  def fire(self, headline: str, dump: bool = True,
           exit: Callable[[int], Any] | None = None) -> None:
    """Reports `headline` with the timeline (and the stacks in the hang report), asks the other
    processes for theirs, and ends the process with EXIT_STATUS."""
    if not self._fired.acquire(blocking=False):
      return
    self._gather()
    report = None
    if dump:
      self.request_reports(f"process {self.index}: {headline}")
      self._requests_done.add(f"process {self.index}: {headline}")
      report = self.dump(headline)
    print(f"jaxdp: timeline (last completed step of each process):\n{self.timeline()}",
          file=sys.stderr, flush=True)
    self._publish_error(headline)
    where = (f"; stacks in {os.path.dirname(report)}/process-*.txt" if report else
             f"; {self.report_failure}" if dump else "")
    print(f"jaxdp: error: {clause(headline + where)}. Exiting.", file=sys.stderr, flush=True)
    self._stop.set()
    # Process 0 serves the coordinator; its exit ends the others' store at once: give them
    # time to write their reports and messages first.
    self.linger(FAILURE_GRACE_S + 2 * self.beat_s + 2)
    (exit or self._exit)(EXIT_STATUS)

  def failed(self, error: BaseException) -> None:
    """Called where an exception ends this process's run: with a lost peer behind it (a collective
    whose partner died), reports that peer and exits; else publishes the error so the others stop
    within a heartbeat, and makes this process skip JAX's shutdown barrier at exit (which would
    wait minutes for peers that are gone)."""
    if isinstance(error, KeyboardInterrupt) or self.count == 1 or self.failed_error is not None:
      return
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".rstrip(": ")
    if type(error).__name__ in ("JaxRuntimeError", "XlaRuntimeError") or any(
        word in text for word in COLLECTIVE_FAILURES):
      # A collective failed: if a peer is gone, that is the cause. Wait for the judgement, or
      # until every peer's heartbeat has moved twice (they live: the error is this process's).
      self._gather()
      before = {p: self._peers.get(p, {}).get("seq", -2) for p in range(self.count)}
      deadline = self._clock() + self.timeout_s + 2 * self.beat_s
      while self._clock() < deadline:
        lost = self.lost()
        if lost:
          self.fire(f"process {self.index} of {self.count} lost {self.names(lost)}; a "
                    f"collective failed with {text[:200]}")
          return
        if all(self._peers.get(p, {}).get("seq", -2) >= before[p] + 2
               for p in range(self.count) if p != self.index):
          break
        time.sleep(self.beat_s)
        self._gather()
    self._publish_error(text)
    self.stop("failed")
    atexit.register(_exit_without_shutdown_barrier, self)


  def _publish_error(self, text: str) -> None:
    """Tells the peers this process is ending with `text` (its last heartbeat says "failed", so
    that its exit is not judged a loss; they repeat `text` after FAILURE_GRACE_S)."""
    self.failed_error = text
    set_phase("failed", _status["completed"])
    self._publish()
    self._write(f"error-{self.index}.json", self._pack(text))
    if self.client is not None:
      def publish():
        with contextlib.suppress(Exception):
          self.client.key_value_set(ERROR_KEY + str(self.index), self._pack(text),
                                    allow_overwrite=True)
      publisher = threading.Thread(target=publish, daemon=True)
      publisher.start()
      publisher.join(timeout=max(2.0, 2 * self.beat_s))

  def linger(self, limit_s: float = 10.0) -> None:
    """On process 0 before it exits on its own (a stop before training, an error): waits, up to
    `limit_s`, until every peer has ended or said it is ending, since process 0's exit takes the
    coordinator down and JAX aborts (SIGABRT) a peer still connected to it."""
    if self.index != 0 or self.count == 1:
      return
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
      self._gather()
      lost = self.lost()  # Frozen or gone: nothing to wait for.
      pending = [p for p in range(self.count) if p != self.index and p not in lost
                 and self._peers.get(p, {}).get("phase") not in DONE_PHASES
                 and pid_state(self._peers.get(p, {}).get("pid", -1)) not in ("gone", "frozen")]
      if not pending:
        break
      time.sleep(0.1)
    # A peer that said it is ending still has to get out of its exit path.
    time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))
    for hook in AFTER_LINGER:
      hook()


def _exit_without_shutdown_barrier(monitor: Monitor) -> None:
  """At exit after a failure (registered after JAX's own exit handler, so it runs first)."""
  sys.stdout.flush()
  sys.stderr.flush()
  monitor.linger(FAILURE_GRACE_S + 10 * monitor.beat_s)  # The others read the error first.
  os._exit(1)


def _ignore(signum, frame) -> None:
  """SIGUSR2's Python handler: the monitor's thread answers it (from the wakeup fd)."""


def status() -> dict[str, Any]:
  """A copy of this process's status (last completed and dispatched step, phase)."""
  return dict(_status)


def describe_phase(name: Any, step: Any) -> str:
  """'step 5', 'evaluation (after step 4)', ... for a heartbeat's phase."""
  if name == "step":
    return f"step {step}" if step is not None else "a step"
  return f"{name}" + (f" (after step {step})" if step is not None else "")


def start(workdir: str, step_timeout_s: float) -> Monitor:
  """The process's monitor for a run in `workdir` (started; the running one if there is one):
  multi-process runs publish through JAX's distributed client."""
  if _current is not None and os.path.realpath(_current.workdir) == os.path.realpath(workdir):
    _current.timeout_s = peer_timeout_s(step_timeout_s)
    _current.judge_phases = bool(step_timeout_s and step_timeout_s > 0)
    return _current
  if _current is not None:
    _current.stop()
  import jax
  client = None
  if jax.process_count() > 1:
    from jax._src import distributed
    client = distributed.global_state.client
  return Monitor(workdir, peer_timeout_s(step_timeout_s), index=jax.process_index(),
                 count=jax.process_count(), client=client,
                 judge_phases=bool(step_timeout_s and step_timeout_s > 0)).start()


def live_pids(workdir: str) -> list[tuple[int, int, str]]:
  """(process, pid, host) of every heartbeat in WORKDIR/hang (for `jaxdp stacks`)."""
  found = []
  for path in sorted(glob.glob(os.path.join(workdir, HANG_DIR, "heartbeat-*.json"))):
    with contextlib.suppress(OSError, ValueError, KeyError):
      with open(path) as f:
        record = json.load(f)
      if record.get("phase") not in DONE_PHASES:
        found.append((int(record["process"]), int(record["pid"]), str(record["host"])))
  return found
