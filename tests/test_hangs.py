"""Hangs and lost peers (issues 27, 30 kinds 2 and 5, 31 fault 5), with real processes.

Each multi-process test starts 2 tiny `train` processes (tiny_cpu, 1 CPU device each) and does one
thing to one of them: freeze it (SIGSTOP), kill it, interrupt it during compilation, or make its
batch function raise. The unit tests at the top judge heartbeats without processes.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

from conftest import cli_env
import pytest

from jaxdp.runtime import heartbeat
from jaxdp.runtime.launch import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = cli_env(PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
TINY = ["train", "--config", "tiny_cpu", "--config.log_every=1", "--progress=false",
        "--config.num_steps=100000", "--config.eval_every=0", "--config.checkpoint_every=0"]
TIMEOUT_S = 10  # config.step_timeout_s of the runs that set it.


def cli(*args):
  return [sys.executable, "-m", "jaxdp.cli.main", *args]


# --- without processes -------------------------------------------------------------------------


def test_peer_timeout_defaults_and_jax_heartbeat_comes_after_it():
  assert heartbeat.peer_timeout_s(20) == 20
  assert heartbeat.peer_timeout_s(0) == heartbeat.DEFAULT_PEER_TIMEOUT_S == 60
  assert heartbeat.jax_heartbeat_timeout_s(20) == 80
  assert heartbeat.jax_heartbeat_timeout_s(0) == 120


class Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


def _peer(tmp_path, index, **status):
  record = dict(dict(process=index, pid=os.getpid(), host="elsewhere", seq=1, time=time.time(),
                     completed=4, dispatched=5, phase="step", phase_step=5,
                     phase_since=time.time()), **status)
  (tmp_path / "hang" / f"heartbeat-{index}.json").write_text(json.dumps(record))


def test_an_orphaned_coordinator_service_waits_until_every_other_process_has_left(tmp_path):
  """runtime/coordinator.py's judgement after process 0 died: each other process finished,
  failed, or gone from this host; a live one, one on another host or one with no heartbeat
  file yet keeps the service."""
  from jaxdp.runtime import coordinator
  (tmp_path / "hang").mkdir()
  here = socket.gethostname()
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  assert not coordinator._others_left(str(tmp_path), 3)  # No heartbeat files yet.
  _peer(tmp_path, 1, phase="finished")
  _peer(tmp_path, 2, host=here, pid=os.getpid())  # Alive, here.
  assert not coordinator._others_left(str(tmp_path), 3)
  _peer(tmp_path, 2, host="elsewhere", pid=gone.pid)  # Its pid is no proof on another host.
  assert not coordinator._others_left(str(tmp_path), 3)
  _peer(tmp_path, 2, host=here, pid=gone.pid)
  assert coordinator._others_left(str(tmp_path), 3)
  _peer(tmp_path, 2, host="elsewhere", phase="failed")
  assert coordinator._others_left(str(tmp_path), 3)


def test_a_peer_whose_heartbeat_stops_is_named_with_the_timeline_and_stacks(tmp_path, capsys):
  clock, exits = Clock(), []
  monitor = heartbeat.Monitor(str(tmp_path), 10.0, index=0, count=2, exit=exits.append,
                              clock=clock, beat_s=0.5)
  (tmp_path / "hang").mkdir()
  _peer(tmp_path, 1, seq=1)
  monitor.beat()
  clock.now = 5.0
  _peer(tmp_path, 1, seq=2)  # Alive: its counter moved.
  monitor.beat()
  clock.now = 14.0
  monitor.beat()
  assert exits == []  # 9 s without a heartbeat: not yet.
  clock.now = 15.5
  monitor.beat()
  assert exits == [heartbeat.EXIT_STATUS]
  err = capsys.readouterr().err
  assert "process 0 of 2 lost process 1 (pid" in err and "sent no heartbeat for 10 s" in err, err
  assert "process 1 (pid" in err and "last completed step 4, dispatched 5, in step 5" in err
  report = (tmp_path / "hang" / "process-0.txt").read_text()
  assert "timeline" in report and "Python stacks of every thread" in report
  assert "in test_a_peer_whose_heartbeat_stops" in report  # This thread's Python frame.


def test_a_previous_runs_files_in_the_workdir_are_ignored(tmp_path):
  clock, exits = Clock(), []
  monitor = heartbeat.Monitor(str(tmp_path), 10.0, index=0, count=2, exit=exits.append,
                              clock=clock, beat_s=0.5)
  monitor.run_id = "this-run"
  (tmp_path / "hang").mkdir()
  _peer(tmp_path, 1, pid=2**22 + 12345, host=heartbeat.socket.gethostname(), run="old-run")
  (tmp_path / "hang" / "error-1.json").write_text(json.dumps({"run": "old-run", "text": "boom"}))
  (tmp_path / "hang" / "request").write_text(json.dumps({"run": "old-run", "text": "hang"}))
  monitor.beat()
  clock.now = heartbeat.FAILURE_GRACE_S + 1
  monitor.beat()
  assert exits == [] and not (tmp_path / "hang" / "process-0.txt").exists()
  _peer(tmp_path, 1, run="this-run")
  monitor.beat()
  assert 1 in monitor._peers


def test_a_finished_peer_is_not_lost_and_a_failed_one_is_repeated(tmp_path, capsys):
  clock, exits = Clock(), []
  monitor = heartbeat.Monitor(str(tmp_path), 10.0, index=0, count=2, exit=exits.append,
                              clock=clock, beat_s=0.5)
  (tmp_path / "hang").mkdir()
  _peer(tmp_path, 1, phase="finished")
  monitor.beat()
  clock.now = 100.0
  monitor.beat()
  assert exits == []
  (tmp_path / "hang" / "error-1.json").write_text(json.dumps({"run": None,
                                                              "text": "ValueError: bad batch."}))
  monitor.beat()
  assert exits == []  # A grace period: this process may be failing the same way itself.
  clock.now += heartbeat.FAILURE_GRACE_S
  monitor.beat()
  assert exits == [heartbeat.EXIT_STATUS]
  # The peer's text ends a sentence: its period goes, so no "batch.; stopping".
  last = capsys.readouterr().err.strip().splitlines()[-1]
  assert last.endswith("failed: ValueError: bad batch; stopping process 0 of 2 too. Exiting."), last



def test_stop_sends_the_last_heartbeat_and_leaves_no_thread_inside_the_client(tmp_path):
  """A thread still inside a call into JAX's client when the interpreter exits is ended mid-call
  by CPython, and the client's C++ aborts the process ("FATAL: exception not rethrown"): a
  finished run once died by SIGABRT that way. stop() returns with the store's thread ended, its
  last call being the last heartbeat (phase "finished")."""

  class SlowClient:
    """A store whose every call takes 50 ms, with the calls recorded."""

    def __init__(self):
      self.calls, self.inside = [], 0

    def _call(self, name, *args):
      self.inside += 1
      time.sleep(0.05)
      self.calls.append((name, *args))
      self.inside -= 1

    def key_value_set(self, key, value, allow_overwrite=False):
      self._call("set", key, value)

    def key_value_dir_get(self, key):
      self._call("dir_get", key)
      return []

    def blocking_key_value_get(self, key, timeout_ms):
      return "run"

  client = SlowClient()
  monitor = heartbeat.Monitor(str(tmp_path), 10.0, index=1, count=2, client=client, beat_s=0.01,
                              exit=lambda status: None)
  monitor.start()
  time.sleep(0.3)  # The store's thread is busy: every beat queues a job.
  monitor.stop()
  assert not monitor._kv_thread.is_alive() and client.inside == 0
  last = client.calls[-1]
  assert last[0] == "set" and json.loads(last[2])["phase"] == "finished", last


def test_a_signal_held_before_the_first_step_stops_the_run_before_training(monkeypatch):
  from test_loop_hooks import context

  from jaxdp.runtime import loop_hooks, signals
  ctx, _ = context()
  hook = loop_hooks.Preemption()
  monkeypatch.setattr(signals, "_pending", "SIGINT")  # Arrived during compilation.
  try:
    with pytest.raises(signals.Interrupted, match="^SIGINT before the first step of this run; nothing was saved"):
      hook.on_start(ctx)
  finally:
    hook.close(ctx)
  assert signals.pending() is None  # Acted on.


# --- with processes ----------------------------------------------------------------------------


def _wait_for(predicate, timeout_s, what, processes=()):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    assert all(p.poll() is None for p in processes), f"a process ended while waiting for {what}"
    time.sleep(0.1)


def _first_step(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  return lambda: os.path.exists(path) and '"train_loss"' in open(path).read()


def _kill(processes):
  for p in processes:
    if p.poll() is None:
      os.kill(p.pid, signal.SIGCONT)
      p.kill()
      p.wait()


def _two_trains(tmp_path, *flags):
  """Two `train` processes joined without the launcher: [(Popen, log path)]."""
  port, workdir = free_port(), str(tmp_path / "run")
  started = []
  for i in range(2):
    log = tmp_path / f"process-{i}.log"
    with open(log, "w") as out:
      started.append((subprocess.Popen(
          cli(*TINY, *flags, "--cpu_devices=1", "--workdir", workdir,
              f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
          stdout=out, stderr=subprocess.STDOUT, env=ENV), log))
  return started, workdir


def _launch_to_first_step(tmp_path):
  """`jaxdp launch` of two tiny `train` processes (step_timeout_s=TIMEOUT_S), once its first step
  is logged: (launcher Popen, workdir, launcher log path, the workers' pids as strings)."""
  workdir, log = str(tmp_path / "run"), tmp_path / "launch.out"
  with open(log, "w") as out:
    launcher = subprocess.Popen(
        cli("launch", "--nprocs", "2", "--cpu_devices", "1", "--", *TINY,
            f"--config.step_timeout_s={TIMEOUT_S}", "--workdir", workdir),
        stdout=out, stderr=subprocess.STDOUT, env=ENV)
  try:
    _wait_for(_first_step(workdir), 300, "the first step", [launcher])
  except BaseException:
    _kill([launcher])
    raise
  pids = log.read_text().split("pids ", 1)[1].split(")", 1)[0].split(", ")
  return launcher, workdir, log, pids


@pytest.mark.multiprocess
@pytest.mark.slow
def test_launch_names_the_frozen_worker_and_keeps_the_others_stacks(tmp_path):
  launcher, workdir, log, pids = _launch_to_first_step(tmp_path)
  try:
    # On demand first: every process writes its stacks and the run goes on.
    asked = subprocess.run(cli("stacks", "--workdir", workdir, "--wait_s=60"), capture_output=True,
                           text=True, env=ENV, timeout=120)
    assert asked.returncode == 0, asked.stdout + asked.stderr
    for i in range(2):
      assert f"process {i}: {workdir}/hang/process-{i}.txt" in asked.stdout, asked.stdout
      assert "reason: SIGUSR2" in (tmp_path / "run" / "hang" / f"process-{i}.txt").read_text()
    assert launcher.poll() is None
    os.kill(int(pids[1]), signal.SIGSTOP)
    frozen = time.monotonic()
    status = launcher.wait(timeout=TIMEOUT_S + 120)
    took = time.monotonic() - frozen
  finally:
    _kill([_Pid(int(p)) for p in pids])
    _kill([launcher])
  output = log.read_text()
  print(f"launch exited {status} {took:.1f} s after SIGSTOP of process 1")
  last = "\n".join(output.strip().splitlines()[-2:])
  assert status == heartbeat.EXIT_STATUS and took < TIMEOUT_S + 60, output[-3000:]
  assert f"process 1 (pid {pids[1]}, host" in last and "frozen (stopped by a signal)" in last, last
  report = (tmp_path / "run" / "hang" / "process-0.txt").read_text()
  assert "jaxdp hang report: process 0 of 2" in report and "timeline" in report
  # Rewritten when the hang was judged (not the on-demand report), naming process 1.
  assert "reason: SIGUSR2" not in report and f"process 1 (pid {pids[1]}, host" in report
  assert 'File "' in report and "jaxdp/" in report  # Python frames of its threads.
  assert "SIGABRT" not in output and "Check failure" not in output


class _Pid:
  """A pid as _kill takes it (poll/kill/wait), for processes the launcher started."""

  def __init__(self, pid):
    self.pid = pid

  def poll(self):
    try:
      os.kill(self.pid, 0)
      return None
    except ProcessLookupError:
      return 0

  def kill(self):
    try:
      os.kill(self.pid, signal.SIGKILL)
    except ProcessLookupError:
      pass

  def wait(self):
    pass


@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("victim, sig, flags", [
    (0, signal.SIGSTOP, [f"--config.step_timeout_s={TIMEOUT_S}"]),  # The coordinator freezes.
    # The coordinator dies: its service lives on in its own process (runtime/coordinator.py),
    # where JAX's in-process service would have aborted process 1 natively within a second.
    (0, signal.SIGKILL, [f"--config.step_timeout_s={TIMEOUT_S}"]),
    (1, signal.SIGKILL, []),  # step_timeout_s unset: the default judges the peer.
    (1, signal.SIGSTOP, [f"--config.step_timeout_s={TIMEOUT_S}"]),
], ids=["coordinator_frozen", "coordinator_killed", "peer_killed_no_timeout", "peer_frozen"])
def test_a_lost_peer_ends_the_other_with_exit_3_naming_it(tmp_path, victim, sig, flags):
  started, workdir = _two_trains(tmp_path, *flags)
  processes = [p for p, _ in started]
  try:
    _wait_for(_first_step(workdir), 300, "the first step", processes)
    os.kill(processes[victim].pid, sig)
    lost = time.monotonic()
    survivor, log = started[1 - victim]
    status = survivor.wait(timeout=heartbeat.peer_timeout_s(TIMEOUT_S if flags else 0) + 120)
    took = time.monotonic() - lost
  finally:
    _kill(processes)
  output = log.read_text()
  print(f"process {1 - victim} exited {status} {took:.1f} s after {sig.name} of process {victim}")
  limit = (TIMEOUT_S if flags else heartbeat.DEFAULT_PEER_TIMEOUT_S) + 30
  assert status == heartbeat.EXIT_STATUS and took < limit, output[-3000:]
  assert f"lost process {victim} (pid {processes[victim].pid}, host" in output, output[-3000:]
  assert "Check failure" not in output and "JaxRuntimeError" not in output.split("lost")[0]
  assert (tmp_path / "run" / "hang" / f"process-{1 - victim}.txt").exists()
  # Process 0's coordinator service (a child of its own) ends once the others have left: nothing
  # holds the port for a rerun.
  _wait_for(lambda: not _services_of(workdir), 30, "the coordinator service to end", [])



@pytest.mark.multiprocess
@pytest.mark.slow
@pytest.mark.parametrize("victim, sig", [(0, signal.SIGSTOP), (0, signal.SIGKILL)],
                         ids=["coordinator_frozen", "coordinator_killed"])
def test_a_lost_worker_under_launch_ends_the_run_with_exit_3_naming_it(tmp_path, victim, sig):
  """The launcher's side of the cases above (process 1 frozen: the launch test above; process 1
  killed: tests/test_multihost.py). A killed worker is seen by the launcher first, a frozen one by
  its peer's heartbeat monitor; either way the run ends with the lost process's status, 3."""
  launcher, workdir, log, pids = _launch_to_first_step(tmp_path)
  try:
    os.kill(int(pids[victim]), sig)
    lost = time.monotonic()
    status = launcher.wait(timeout=TIMEOUT_S + 120)
    took = time.monotonic() - lost
  finally:
    _kill([_Pid(int(p)) for p in pids])
    _kill([launcher])
  output = log.read_text()
  print(f"launch exited {status} {took:.1f} s after {sig.name} of process {victim}")
  last = output.strip().splitlines()[-1]
  assert status == heartbeat.EXIT_STATUS and took < TIMEOUT_S + 30, output[-3000:]
  assert last.startswith("jaxdp launch: process "), last
  if sig == signal.SIGKILL:
    assert f"process {victim} (pid {pids[victim]}) was killed by SIGKILL" in last, last
  else:
    assert f"lost process {victim} (pid {pids[victim]}, host" in last and "frozen" in last, last
  assert "SIGABRT" not in output and "Check failure" not in output, output[-3000:]
  _wait_for(lambda: not _services_of(workdir), 30, "the coordinator service to end", [])


def _services_of(workdir):
  """Pids of the coordinator service processes (runtime/coordinator.py) serving `workdir`'s run."""
  found = []
  for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
      with open(f"/proc/{pid}/cmdline", "rb") as f:
        words = f.read().decode(errors="replace").split("\0")
    except OSError:
      continue
    if "jaxdp.runtime.coordinator" in words and workdir in words:
      found.append(int(pid))
  return found


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigint_during_compilation_stops_every_process(tmp_path):
  """To one worker (no launcher), then to the launcher: every process stops, 130 before the
  first step (or 75 after the agreed step when the signal lands after it)."""
  started, workdir = _two_trains(tmp_path)
  processes = [p for p, _ in started]
  try:
    _wait_for(lambda: all("process group described" in log.read_text() for _, log in started), 300,
              "the process group", processes)
    os.kill(processes[1].pid, signal.SIGINT)
    statuses = [p.wait(timeout=180) for p in processes]
  finally:
    _kill(processes)
  outputs = [log.read_text() for _, log in started]
  print(f"SIGINT to process 1 during start-up: exit statuses {statuses}")
  _assert_stopped_together(statuses, outputs)

  workdir, log = str(tmp_path / "launched"), tmp_path / "launch.out"
  with open(log, "w") as out:
    launcher = subprocess.Popen(cli("launch", "--nprocs", "2", "--cpu_devices", "1", "--", *TINY,
                                    "--workdir", workdir), stdout=out, stderr=subprocess.STDOUT,
                                env=ENV)
  try:
    _wait_for(lambda: log.read_text().count("process group described") == 2, 300,
              "the process group", [launcher])
    launcher.send_signal(signal.SIGINT)
    status = launcher.wait(timeout=200)
  finally:
    _kill([launcher])
  output = log.read_text()
  print(f"SIGINT to the launcher during start-up: exit status {status}")
  outputs = ["\n".join(line[4:] for line in output.splitlines() if line.startswith(f"[{i}] "))
             for i in range(2)]
  _assert_stopped_together([status, status], outputs)
  assert "Traceback" not in output, output[-3000:]


def _assert_stopped_together(statuses, outputs):
  assert len(set(statuses)) == 1 and statuses[0] in (130, 75), (statuses, outputs[0][-2000:])
  for out in outputs:
    if statuses[0] == 130:
      assert "before the first step of this run; every process stops" in out, out[-2000:]
    else:
      assert "stopped after step" in out, out[-2000:]
    assert "done: step 100000" not in out


FIT_WORKER = textwrap.dedent("""
    import sys, time
    import jax
    jax.config.update("jax_num_cpu_devices", 1)
    from jaxdp.runtime.distributed import initialize
    initialize(sys.argv[1], 2, int(sys.argv[2]), timeout_s=120)
    import jax.numpy as jnp, numpy as np, optax, jaxdp

    def init_fn(rng):
      return {"w": 0.01 * jax.random.normal(rng, (16, 4)), "b": jnp.zeros(4)}

    def loss_fn(params, batch, rng):
      logits = batch["x"] @ params["w"] + params["b"]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
      return losses.sum(), jnp.float32(losses.shape[0])

    def batches(step):
      if jax.process_index() == 1 and step == 3:
        print("RAISING", time.time(), flush=True)
        raise ValueError("batch 3 is broken on this process")
      rng = np.random.default_rng(step)
      return {"x": rng.normal(size=(8, 16)).astype(np.float32), "y": rng.integers(0, 4, 8)}

    jaxdp.fit(jaxdp.DataParallel(loss_fn, optax.sgd(0.1)), init_fn, batches,
              workdir=sys.argv[3], num_steps=1000, log_every=1, progress=False)
""")


@pytest.mark.multiprocess
@pytest.mark.slow
def test_fit_raising_on_one_process_ends_both_with_its_error(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(FIT_WORKER)
  address, workdir = f"127.0.0.1:{free_port()}", str(tmp_path / "run")
  processes = [subprocess.Popen([sys.executable, str(script), address, str(i), workdir],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
               for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in processes]
    ended = time.time()
  finally:
    _kill(processes)
  raised = float(outputs[1][0].split("RAISING ", 1)[1].split()[0])
  print(f"both processes ended {ended - raised:.1f} s after process 1 raised; statuses "
        f"{[p.returncode for p in processes]}")
  assert ended - raised < 30
  assert processes[1].returncode == 1 and "ValueError: batch 3 is broken" in outputs[1][1]
  assert processes[0].returncode == heartbeat.EXIT_STATUS, outputs[0][1][-3000:]
  assert "process 1 (pid" in outputs[0][1] and \
      "failed: ValueError: batch 3 is broken on this process" in outputs[0][1], outputs[0][1][-3000:]


def test_stacks_signals_no_stale_pid_of_a_finished_run(tmp_path, capfd):
  """A finished one-process run leaves .jaxdp.lock naming its pid; that pid may since be another
  program's, which SIGUSR2 would terminate: `jaxdp stacks` refuses instead."""
  import cli_inprocess

  from jaxdp.cli import stacks
  from jaxdp.runtime.lock import WorkdirLock
  other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    with open(tmp_path / ".jaxdp.lock", "w") as f:
      json.dump({"pid": other.pid, "host": socket.gethostname(), "since": "2026-01-01 00:00:00"}, f)
    done = cli_inprocess.run(capfd, "stacks", "--workdir", str(tmp_path), "--wait_s", "0")
    assert done.returncode == 2 and "no running jaxdp run found there" in done.stderr
    time.sleep(0.5)
    assert other.poll() is None  # Not signalled.
    # Likewise a heartbeat left by a killed multi-process run, whose pid was since reused.
    (tmp_path / "hang").mkdir()
    (tmp_path / "hang" / "heartbeat-0.json").write_text(json.dumps(
        {"process": 0, "pid": other.pid, "host": socket.gethostname(), "time": time.time() - 100,
         "phase": "step"}))
    done = cli_inprocess.run(capfd, "stacks", "--workdir", str(tmp_path), "--wait_s", "0")
    # One line: the error names the process and pid it found gone (nothing on stdout).
    assert done.returncode == 2 and done.stdout == "", done.stdout
    line, = done.stderr.strip().splitlines()
    assert f"no longer running (process 0 (pid {other.pid}) is gone)" in line, line
    time.sleep(0.5)
    assert other.poll() is None
    (tmp_path / "hang" / "heartbeat-0.json").unlink()
    with WorkdirLock(str(tmp_path)):  # A held lock is a live run: its holder (this process) is asked.
      assert [pid for _, pid, _ in stacks._targets(str(tmp_path))] == [os.getpid()]
  finally:
    other.kill()
    other.wait()
