"""metrics.jsonl of a stopped and resumed run is the uninterrupted run's (issue 30, kind 7).

With log_every > 1 a checkpoint falls inside a train line's window: the checkpoint carries the
window's per-step metrics (and the noise-scale averages), so the first line after a resume is
the mean over the same steps; lines a killed attempt logged after its last checkpoint are
dropped on resume and logged again, never twice. Compared: every deterministic field of every
train and eval line (DETERMINISTIC); left out are the wall-clock ones (tokens_per_sec, mfu,
step_time_s, data_wait_fraction, goodput, per-device step times).
"""

import os
import signal
import subprocess
import sys

import jax
import pytest

from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime import loop
from jaxdp.runtime.hooks import Hook
from jaxdp.runtime.metrics import read_metrics

OVERRIDES = {"num_steps": 12, "lr_decay_steps": 12, "log_every": 5, "eval_every": 6,
             "checkpoint_every": 3}
DETERMINISTIC = ("step", "train_loss", "grad_norm", "lr", "eval_loss", "comm_bytes_per_step",
                 "grad_noise_scale", "grad_noise_scale_examples", "skipped_steps")


def config(**overrides):
  c = load_preset("tiny_cpu")
  for k, v in {**OVERRIDES, **overrides}.items():
    c[k] = v
  return c


def lines(workdir):
  """The train and eval lines, deterministic fields only, in order (events left out)."""
  return [{k: r[k] for k in DETERMINISTIC if k in r} for r in read_metrics(workdir)
          if "event" not in r and ("train_loss" in r or "eval_loss" in r)]


def train(workdir, **overrides):
  return train_and_evaluate(config(**overrides), workdir, devices=jax.devices()[:2], progress=False)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  train(workdir)
  found = lines(workdir)
  assert [r["step"] for r in found if "train_loss" in r] == [5, 10, 12]
  assert "grad_noise_scale" in found[0]  # The carried averages are part of the comparison.
  return found


class _At(Hook):
  """Calls `action` after update `step` (the first attempt only)."""

  def __init__(self, step, action):
    self.step, self.action = step, action

  def after_step(self, ctx, step, metrics):
    if step == self.step:
      self.action()


def interrupted(monkeypatch, step, action):
  """fit runs with an extra hook that calls `action` after update `step`."""
  original = loop.builtin_hooks

  def with_hook(ctx, user, log, *rest):
    return original(ctx, list(user) + [_At(step, action)], log, *rest)
  monkeypatch.setattr(loop, "builtin_hooks", with_hook)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_inside_a_log_window_resumes_to_the_same_metrics(reference, tmp_path, monkeypatch,
                                                                   signum):
  """SIGTERM (a scheduler) or SIGINT (a notebook's interrupt of jaxdp.fit) after step 7: the run
  saves step 7 (steps 6-7 not logged yet) and the resume logs step 10 over steps 6-10."""
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as patch:
    interrupted(patch, 7, lambda: os.kill(os.getpid(), signum))
    assert train(workdir)["stop_reason"] == "preempted"
  assert train(workdir)["step"] == 12
  assert lines(workdir) == reference


def test_an_exception_after_a_logged_step_does_not_log_it_twice(reference, tmp_path, monkeypatch):
  """KeyboardInterrupt raised after step 11 (line 10 logged, last checkpoint 9): the resume drops
  line 10 and logs it again from the carried steps 6-9, once."""
  workdir = str(tmp_path / "run")

  def interrupt():
    raise KeyboardInterrupt
  with monkeypatch.context() as patch:
    interrupted(patch, 11, interrupt)
    with pytest.raises(KeyboardInterrupt):
      train(workdir)
  assert [r["step"] for r in lines(workdir) if "train_loss" in r] == [5, 10]
  train(workdir)
  assert lines(workdir) == reference


@pytest.mark.slow
@pytest.mark.multiprocess
def test_kill_9_after_a_logged_step_leaves_each_step_logged_once(tmp_path):
  """`jaxdp train` SIGKILLed before update 11 (line 10 logged, last checkpoint 9), then resumed:
  metrics.jsonl equals an uninterrupted CLI run's (same backend setup, so bitwise comparable)."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def cli(workdir, **env):
    args = [sys.executable, "-m", "jaxdp.cli.main", "train", "--config", "tiny_cpu", "--cpu_devices",
            "2", "--workdir", workdir, "--progress=false"]
    args += [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    return subprocess.run(args, env=dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", **env),
                          capture_output=True, text=True, timeout=600)
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "run")
  assert cli(reference).returncode == 0
  killed = cli(workdir, JAXDP_TEST_DIE_AT_STEP="0:11")
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
  assert [r["step"] for r in lines(workdir) if "train_loss" in r] == [5, 10]
  resumed = cli(workdir)
  assert resumed.returncode == 0, resumed.stderr[-2000:]
  assert lines(workdir) == lines(reference)
