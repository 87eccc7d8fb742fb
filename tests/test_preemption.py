"""Preemption agreed across processes, and restarting on another process count (multiprocess tier).

One `jaxdp launch --nprocs 2 --cpu_devices 2` run gets SIGTERM on process 1 only, mid-run: both
processes stop after the same step, write one checkpoint together and exit with the agreed status.
Its checkpoint is then resumed as 2 processes (bitwise equal to an uninterrupted 2-process run),
as 1 process x 4 devices and as 4 processes x 1 device (equal within 1e-5: another reduction
order), each to EXTRA steps past the stop: the multi-process ones through `jaxdp launch`, the
single process in this one, on 4 of its devices (`jaxdp launch` onto one process, resuming a
2-process checkpoint, is tests/test_launch_restarts.py's restart onto fewer processes).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.metrics import read_metrics

# XLA's default optimisations: resumes on another process count (tests/conftest.py).
pytestmark = [pytest.mark.multiprocess, pytest.mark.default_xla]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="0")  # Built at import: see above.
DECAY = 40  # A fixed learning-rate horizon: num_steps differs between the runs compared.
EXTRA = 3  # Steps each resumed run trains past the preempted step.
OVERRIDES = {"log_every": 1, "lr_decay_steps": DECAY, "eval_every": 0, "checkpoint_every": 0}
TRAIN = ["train", "--config", "tiny_cpu", *[f"--config.{k}={v}" for k, v in OVERRIDES.items()],
         "--progress=false"]
PREEMPTED_STATUS = 75  # configs/default.py preempt_exit_code.


def launch(nprocs, cpu_devices, workdir, *flags, **popen):
  return [sys.executable, "-m", "jaxdp.cli.main", "launch", "--nprocs", str(nprocs),
          "--cpu_devices", str(cpu_devices), "--", *TRAIN, "--workdir", workdir, *flags]


def run(nprocs, cpu_devices, workdir, *flags):
  started = time.monotonic()
  done = subprocess.run(launch(nprocs, cpu_devices, workdir, *flags), capture_output=True,
                        text=True, env=ENV, timeout=300)
  print(f"launch --nprocs {nprocs} x {cpu_devices} devices: {time.monotonic() - started:.1f} s")
  return done


def train_losses(workdir):
  return {r["step"]: r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r}


def final_state(workdir, step):
  checkpoints = Checkpointer(workdir, create=False)
  config = load_preset("tiny_cpu")
  state, _ = checkpoints.restore(step, build(config, jax.devices()[:4]).abstract_state())
  checkpoints.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
  """(launcher's completed output, exit status, workdir, step it stopped after)."""
  workdir = str(tmp_path_factory.mktemp("preempted"))
  log = os.path.join(workdir + "_launch.out")
  with open(log, "w") as out:
    launcher = subprocess.Popen(launch(2, 2, workdir, "--config.num_steps=100000"), stdout=out,
                                stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
  try:
    deadline = time.monotonic() + 240
    while max(train_losses(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl"))
              else {}, default=0) < 3:
      assert launcher.poll() is None and time.monotonic() < deadline, open(log).read()[-3000:]
      time.sleep(0.2)
    pids = open(log).read().split("pids ", 1)[1].split(")", 1)[0].split(", ")
    os.kill(int(pids[1]), signal.SIGTERM)  # Process 1 only.
    status = launcher.wait(timeout=120)
  finally:
    if launcher.poll() is None:
      os.killpg(launcher.pid, signal.SIGKILL)
  output = open(log).read()
  steps = {int(i): int(s) for i, s in re.findall(r"\[(\d)\] jaxdp: preempted: stopped after step (\d+)",
                                                 output)}
  assert steps, output[-3000:]
  return output, status, workdir, steps


@pytest.fixture(scope="module")
def uninterrupted(preempted, tmp_path_factory):
  """An uninterrupted 2-process run to EXTRA steps past the preempted one."""
  stop = preempted[3][0]
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  done = run(2, 2, workdir, f"--config.num_steps={stop + EXTRA}")
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  return workdir, stop + EXTRA


def test_sigterm_to_one_process_stops_all_after_the_same_step(preempted):
  output, status, workdir, steps = preempted
  print(f"stopped after steps {steps}, launcher status {status}")
  assert set(steps) == {0, 1} and steps[0] == steps[1], output[-3000:]
  assert status == PREEMPTED_STATUS, output[-3000:]
  assert "all 2 processes stopped after a signal and saved" in output
  assert Checkpointer(workdir, create=False).all_steps() == [steps[0]]  # One checkpoint, together.
  events = [r for r in read_metrics(workdir) if r.get("event") == "preempted"]
  assert len(events) == 1 and events[0]["step"] == steps[0]
  assert events[0]["signal"] in ("SIGTERM", "SIGTERM on process 1")
  assert max(train_losses(workdir)) == steps[0]


def test_preempted_run_resumes_bitwise_as_the_uninterrupted_run(preempted, uninterrupted, tmp_path):
  _, _, stopped_workdir, steps = preempted
  reference, last = uninterrupted
  workdir = str(tmp_path / "resumed")
  shutil.copytree(stopped_workdir, workdir)
  done = run(2, 2, workdir, f"--config.num_steps={last}")
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  got, want = train_losses(workdir), train_losses(reference)
  assert [got[s] for s in range(1, last + 1)] == [want[s] for s in range(1, last + 1)]
  for a, b in zip(jax.tree.leaves(final_state(workdir, last)),
                  jax.tree.leaves(final_state(reference, last)), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("nprocs,cpu_devices", [(1, 4), (4, 1)])
def test_checkpoint_of_two_processes_resumes_on_another_process_count(
    preempted, uninterrupted, tmp_path, nprocs, cpu_devices):
  _, _, stopped_workdir, steps = preempted
  reference, last = uninterrupted
  workdir = str(tmp_path / "resumed")
  shutil.copytree(stopped_workdir, workdir)
  if nprocs == 1:  # In this process (`jaxdp train` runs the same train_and_evaluate): no start-up.
    config = load_preset("tiny_cpu")  # The launches' config.
    for key, value in {**OVERRIDES, "num_steps": last}.items():
      config[key] = value
    result = train_and_evaluate(config, workdir, devices=jax.devices()[:cpu_devices],
                                progress=False)
    assert result["step"] == last
  else:
    done = run(nprocs, cpu_devices, workdir, f"--config.num_steps={last}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  records = read_metrics(workdir)
  assert any(r.get("event") == "resume" and r["step"] == steps[0] and r["num_devices"] == 4
             for r in records)
  got, want = train_losses(workdir), train_losses(reference)
  resumed = range(steps[0] + 1, last + 1)  # The data position: the steps after the checkpoint.
  np.testing.assert_allclose([got[s] for s in resumed], [want[s] for s in resumed], rtol=1e-5)
