"""Multi-process runs on this machine: 2 processes x 2 CPU devices with gloo collectives.

The slow tier (`-m multiprocess`): every test starts real JAX processes. One launched 2x2 run
(10 steps) is shared by the equivalence and checkpoint tests; the reference is one process with
4 devices, in this test process, trained straight through 15 steps.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdp import parallel
from jaxdp.lm import config as lm_config
from jaxdp.lm import train_and_evaluate
from jaxdp.runtime.launch import free_port
from jaxdp.runtime.metrics import read_metrics

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           JAX_PLATFORMS="cpu")
TOTAL_STEPS = 15  # The reference and the resumed runs; the launched run stops at 10.
TINY = ["--config", "tiny_cpu", "--config.log_every=1", f"--config.lr_decay_steps={TOTAL_STEPS}",
        "--progress=false"]
RTOL = 1e-5


def jaxdp_cli(*args):
  return [sys.executable, "-m", "jaxdp.cli.main", *args]


def losses(workdir):
  """{step: train_loss} and {step: eval_loss} from a run's metrics.jsonl."""
  records = read_metrics(workdir)
  train = {r["step"]: r["train_loss"] for r in records if "train_loss" in r}
  evals = {r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}
  return train, evals


def assert_close(got: dict, want: dict, steps):
  got, want = np.array([got[s] for s in steps]), np.array([want[s] for s in steps])
  print(f"steps {list(steps)}: max relative difference {np.max(np.abs(got / want - 1)):.2e}")
  np.testing.assert_allclose(got, want, rtol=RTOL)


def tiny_config(strategy, num_steps):
  c = lm_config.load_preset("tiny_cpu")
  c.log_every, c.lr_decay_steps, c.num_steps, c.strategy = 1, TOTAL_STEPS, num_steps, strategy
  return c


_references = {}


def reference(strategy, tmp_path_factory):
  """One process, 4 devices, 15 steps straight through: {step: loss} for train and eval."""
  if strategy not in _references:
    workdir = str(tmp_path_factory.mktemp(f"reference_{strategy}"))
    train_and_evaluate(tiny_config(strategy, TOTAL_STEPS), workdir, devices=jax.devices()[:4],
                       progress=False)
    _references[strategy] = losses(workdir)
  return _references[strategy]


_launched = {}


def launched(strategy, tmp_path_factory):
  """`jaxdp launch --nprocs 2 --cpu_devices 2 -- train` for 10 steps: (completed process, workdir)."""
  if strategy not in _launched:
    workdir = str(tmp_path_factory.mktemp(f"launched_{strategy}"))
    run = subprocess.run(
        jaxdp_cli("launch", "--nprocs", "2", "--cpu_devices", "2", "--", "train", *TINY,
                  "--config.num_steps=10", f"--config.strategy={strategy}", "--workdir", workdir),
        capture_output=True, text=True, env=ENV, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    _launched[strategy] = (run, workdir)
  return _launched[strategy]


@pytest.mark.parametrize("strategy", ["dp", "zero1"])
def test_two_processes_train_like_one_process_with_the_same_devices(strategy, tmp_path_factory):
  if strategy not in parallel.STRATEGIES:
    pytest.skip(f"strategy {strategy!r} is not on this branch (jaxdp.parallel.STRATEGIES="
                f"{parallel.STRATEGIES})")
  run, workdir = launched(strategy, tmp_path_factory)
  train, evals = losses(workdir)
  want_train, want_evals = reference(strategy, tmp_path_factory)
  assert_close(train, want_train, range(1, 11))
  assert_close(evals, want_evals, [10])
  # Each process's output is prefixed, and only process 0 writes the metrics (once per step).
  assert "[0] done: step 10" in run.stdout and "[1] done: step 10" in run.stdout
  assert [r["step"] for r in read_metrics(workdir) if "train_loss" in r] == list(range(1, 11))
  start = next(r for r in read_metrics(workdir) if r.get("event") == "start")
  assert start["num_devices"] == 4


@pytest.mark.parametrize("devices", [4, 2])
def test_checkpoint_of_two_processes_resumes_on_one_process(devices, tmp_path_factory, tmp_path):
  _, launched_workdir = launched("dp", tmp_path_factory)
  workdir = str(tmp_path / "resumed")
  shutil.copytree(launched_workdir, workdir)
  result = train_and_evaluate(tiny_config("dp", TOTAL_STEPS), workdir,
                              devices=jax.devices()[:devices], progress=False)
  assert result["step"] == TOTAL_STEPS
  records = read_metrics(workdir)
  assert any(r.get("event") == "resume" and r["step"] == 10 and r["num_devices"] == devices
             for r in records)
  train, _ = losses(workdir)
  want_train, _ = reference("dp", tmp_path_factory)
  assert_close(train, want_train, range(11, TOTAL_STEPS + 1))


def _wait_for(predicate, timeout_s, what):
  deadline = time.monotonic() + timeout_s
  while not predicate():
    assert time.monotonic() < deadline, f"timed out waiting for {what}"
    time.sleep(0.2)


def test_sigkill_of_one_process_stops_the_launcher_naming_it(tmp_path):
  workdir, log = str(tmp_path / "run"), tmp_path / "launch.out"
  with open(log, "w") as out:
    launcher = subprocess.Popen(
        jaxdp_cli("launch", "--nprocs", "2", "--cpu_devices", "2", "--", "train", *TINY,
                  "--config.num_steps=5000", "--config.eval_every=0", "--config.checkpoint_every=0",
                  "--workdir", workdir),
        stdout=out, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
  try:
    metrics = os.path.join(workdir, "metrics.jsonl")
    # Mid-run: after the first logged step.
    _wait_for(lambda: os.path.exists(metrics) and '"train_loss"' in open(metrics).read(), 240,
              "the first training step")
    pids = log.read_text().split("pids ", 1)[1].split(")", 1)[0].split(", ")
    os.kill(int(pids[1]), signal.SIGKILL)
    killed = time.monotonic()
    status = launcher.wait(timeout=60)
    detected_s = time.monotonic() - killed
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  output = log.read_text()
  print(f"launcher exited {detected_s:.2f} s after SIGKILL of process 1")
  assert status == 3  # A lost process (launch.LOST_PROCESS_STATUS), as its peers say without launch.
  assert detected_s < 30
  assert f"process 1 (pid {pids[1]}) was killed by SIGKILL" in output
  with pytest.raises(ProcessLookupError):
    os.kill(int(pids[0]), 0)  # The other process was stopped too.


def test_watchdog_ends_every_process_when_one_hangs_inside_a_step(tmp_path):
  port, timeout_s = free_port(), 5
  env = dict(ENV, JAXDP_TEST_HANG_AT_STEP="1:3")  # Process 1 stalls before step 3.
  started = time.monotonic()
  processes = [subprocess.Popen(
      jaxdp_cli("train", *TINY, "--cpu_devices=2", "--config.num_steps=20",
                f"--config.step_timeout_s={timeout_s}", "--workdir", str(tmp_path / "run"),
                f"--coordinator=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=180) for p in processes]
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  print(f"both processes exited {time.monotonic() - started:.1f} s after start")
  for i, (p, (_, stderr)) in enumerate(zip(processes, outputs)):
    print(next((l for l in stderr.splitlines() if "did not finish" in l), "(no watchdog line)"))
    assert p.returncode == 3, stderr[-3000:]
    assert (f"step 3 did not finish within config.step_timeout_s={timeout_s} s" in stderr
            and f"on process {i} of 2" in stderr), stderr[-3000:]
  train, _ = losses(str(tmp_path / "run"))
  assert max(train) == 2  # Steps 1 and 2 completed; nothing after the stall.


def test_unreachable_coordinator_fails_clearly_within_the_timeout(tmp_path):
  address = f"127.0.0.1:{free_port()}"  # Nothing listens there.
  started = time.monotonic()
  run = subprocess.run(
      jaxdp_cli("train", *TINY, "--cpu_devices=2", "--workdir", str(tmp_path), "--coordinator",
                address, "--num_processes=2", "--process_id=1", "--init_timeout_s=3"),
      capture_output=True, text=True, env=ENV, timeout=120)
  elapsed = time.monotonic() - started
  print(f"unreachable coordinator: exit {run.returncode} after {elapsed:.1f} s (timeout 3 s)")
  assert run.returncode == 2
  assert (f"could not join the run at coordinator {address} within --init_timeout_s=3 "
          "(nothing answers at that address)") in run.stderr, run.stderr[-3000:]
  assert 3 <= elapsed < 3 + 30  # The timeout, plus interpreter and JAX start-up.


def test_coordinator_port_in_use_is_a_clear_error(tmp_path):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    run = subprocess.run(
        jaxdp_cli("train", *TINY, "--cpu_devices=2", "--workdir", str(tmp_path),
                  f"--coordinator=127.0.0.1:{port}", "--num_processes=2", "--process_id=0",
                  "--init_timeout_s=10"),
        capture_output=True, text=True, env=ENV, timeout=120)
  assert run.returncode == 2
  assert f"jaxdp: error: --coordinator=127.0.0.1:{port}: port {port} is already in use" in run.stderr
