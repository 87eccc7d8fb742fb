"""Hybrid sharding with one replica group per process: 2 processes x 2 CPU devices, zero3 within
each process, gradients reduced across them, equals dp on 1 process x 4 devices (multiprocess)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.metrics import read_metrics

pytestmark = pytest.mark.multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           JAX_PLATFORMS="cpu")
STEPS = 8


def train_losses(workdir):
  return {r["step"]: r["train_loss"] for r in read_metrics(workdir) if "train_loss" in r}


def test_one_replica_group_per_process_trains_like_dp(tmp_path):
  workdir = str(tmp_path / "hybrid")
  run = subprocess.run(
      [sys.executable, "-m", "jaxdp.cli.main", "launch", "--nprocs", "2", "--cpu_devices", "2",
       "--", "train", "--config", "tiny_cpu", "--config.log_every=1", f"--config.num_steps={STEPS}",
       "--config.eval_every=0", "--config.checkpoint_every=0", "--config.strategy=zero3",
       "--config.mesh.replica=2", "--progress=false", "--workdir", workdir],
      capture_output=True, text=True, env=ENV, timeout=300)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert "process group described by the --coordinator" in run.stdout
  config = load_preset("tiny_cpu")
  config.num_steps, config.log_every, config.eval_every, config.checkpoint_every = STEPS, 1, 0, 0
  reference = str(tmp_path / "dp")
  train_and_evaluate(config, reference, devices=jax.devices()[:4], progress=False)
  got, want = train_losses(workdir), train_losses(reference)
  np.testing.assert_allclose([got[s] for s in range(1, STEPS + 1)],
                             [want[s] for s in range(1, STEPS + 1)], rtol=1e-5)
  start = next(r for r in read_metrics(workdir) if r.get("event") == "start")
  assert start["num_devices"] == 4 and start["strategy"] == "zero3"
  # Each device held half of the ZeRO state: zero3 split within its process's 2 devices.
  dp_start = next(r for r in read_metrics(reference) if r.get("event") == "start")
  assert start["state_bytes_per_device"] < 0.6 * dp_start["state_bytes_per_device"]
  assert Checkpointer(workdir, create=False).all_steps() == [STEPS]
