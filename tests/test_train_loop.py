"""The loop: bitwise resume, bitwise reproducibility, early stopping, metrics format."""

import jax
import numpy as np
import pytest

from jaxdp.errors import JaxdpError
from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.metrics import read_metrics


def config(**overrides):
  c = load_preset("tiny_cpu")
  c.num_steps = 10
  c.lr_decay_steps = 10  # The schedule's horizon is fixed, so stopping early does not change it.
  c.log_every = 1
  c.eval_every = 5
  c.checkpoint_every = 5
  for k, v in overrides.items():
    c[k] = v
  return c


def final_params(workdir, cfg):
  trainer = build(cfg, jax.devices()[:2])
  ckpt = Checkpointer(workdir)
  state, _ = ckpt.restore(ckpt.latest_step(), trainer.abstract_state())
  ckpt.close()
  return jax.device_get(state.params)


def losses(workdir):
  return [(r["step"], r["train_loss"]) for r in read_metrics(workdir) if "train_loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  train_and_evaluate(config(), workdir, devices=jax.devices()[:2], progress=False)
  return workdir


def test_stop_and_resume_is_bitwise_identical(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  first = train_and_evaluate(config(num_steps=4, checkpoint_every=0), workdir,
                             devices=jax.devices()[:2], progress=False)
  assert first["step"] == 4
  second = train_and_evaluate(config(), workdir, devices=jax.devices()[:2], progress=False)
  assert second["step"] == 10
  assert losses(workdir) == losses(uninterrupted)
  for a, b in zip(jax.tree.leaves(final_params(workdir, config())),
                  jax.tree.leaves(final_params(uninterrupted, config()))):
    np.testing.assert_array_equal(a, b)
  events = [r.get("event") for r in read_metrics(workdir)]
  assert events.count("start") == 1 and events.count("resume") == 1


def test_same_seed_runs_are_bitwise_identical(uninterrupted, tmp_path):
  train_and_evaluate(config(), str(tmp_path), devices=jax.devices()[:2], progress=False)
  assert losses(str(tmp_path)) == losses(uninterrupted)


def test_metrics_lines_have_the_documented_fields(uninterrupted):
  records = read_metrics(uninterrupted)
  start = records[0]
  assert start["event"] == "start" and start["strategy"] == "dp" and start["num_devices"] == 2
  assert start["state_bytes_per_device"] > 0
  train = [r for r in records if "train_loss" in r]
  assert [r["step"] for r in train] == list(range(1, 11))
  for r in train:
    # 2 devices under dp: the gradient noise scale is estimated (docs/communication.md).
    assert set(r) == {"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", "comm_bytes_per_step",
                      "mfu", "step_time_s", "peak_memory_bytes", "data_wait_fraction",
                      "grad_noise_scale", "grad_noise_scale_examples", "goodput",
                      "host_step_time_s", "device_grad_norm"}
    assert len(r["host_step_time_s"]) == 1 and len(r["device_grad_norm"]) == 2
    assert r["tokens_per_sec"] > 0 and r["grad_norm"] > 0
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [5, 10]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]


def test_early_stopping_after_patience_evaluations_without_improvement(tmp_path):
  # A learning rate far below float32 resolution leaves the parameters (and eval loss) unchanged.
  cfg = config(learning_rate=1e-30, eval_every=2, patience=2, num_steps=20, lr_decay_steps=20)
  result = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1], progress=False)
  assert result["stop_reason"] == "early_stopping" and result["step"] == 6
  again = train_and_evaluate(cfg, str(tmp_path), devices=jax.devices()[:1], progress=False)
  assert again["step"] == 6 and again["stop_reason"] == "early_stopping"


def test_resume_refuses_a_changed_model(uninterrupted, tmp_path):
  import shutil
  workdir = str(tmp_path / "copy")
  shutil.copytree(uninterrupted, workdir)
  cfg = config(num_steps=12, lr_decay_steps=12)
  cfg.model.d_model = 64
  with pytest.raises(JaxdpError, match=r"model.d_model \(32 -> 64\)"):
    train_and_evaluate(cfg, workdir, devices=jax.devices()[:2], progress=False)


def test_record_evaluation_stops_after_patience_without_improvement():
  from jaxdp.runtime.loop import record_evaluation
  meta = {"best_eval_loss": None, "evals_without_improvement": 0}
  for loss, stops in [(3.0, False), (2.5, False), (2.6, False), (2.5, True)]:
    meta = record_evaluation(meta, loss, patience=2)
    assert bool(meta.get("stopped_early")) == stops
  assert meta["best_eval_loss"] == 2.5
  assert not record_evaluation({"best_eval_loss": 1.0, "evals_without_improvement": 9}, 2.0,
                               patience=0).get("stopped_early")
