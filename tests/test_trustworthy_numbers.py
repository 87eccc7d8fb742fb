"""Numbers you can trust: the logged learning rate is the one applied, the schedule's horizon
survives extending a run, fp16 that gives up halts like fp32, a halt's advice works when
followed, and early stopping keeps the best parameters.

Expected values are computed here from first principles (the schedule's formula, a NumPy SGD,
the loss-scale halvings), never read back from jaxdp. The language-model tests run the tiny_cpu
model with one block (what is checked here is the schedule, the loss scale and the halts, not
the model; one block compiles faster) on 2 devices, under dp (gpt) and zero3 (llama or gpt).
"""

import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.core import precision
from jaxdp.core import step as steps
from jaxdp.core.state import TrainState
from jaxdp.errors import JaxdpError
from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.metrics import read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK, WARMUP, MIN_RATIO = 3e-3, 5, 0.1  # tiny_cpu's learning rate, warmup and min_lr_ratio.
STRATEGY_MODEL = [("dp", "gpt"), ("zero3", "llama")]


def lm(strategy="dp", family="gpt", **fields):
  c = load_preset("tiny_cpu")
  c.strategy, c.model.family, c.model.n_layer = strategy, family, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 0
  for name, value in fields.items():
    c[name] = value
  return c


def devices():
  return jax.devices()[:2]


def train_lines(workdir):
  return [r for r in read_metrics(workdir) if "train_loss" in r]


def cosine_lr(i, horizon, peak=PEAK, warmup=WARMUP, ratio=MIN_RATIO):
  """The rate of update i (0-based) written out: linear warmup from peak / warmup, then cosine
  to ratio * peak at update `horizon`, then flat."""
  if i < warmup:
    return peak * (i + 1) / warmup
  t = min(max((i - warmup) / (horizon - warmup), 0.0), 1.0)
  return peak * ((1 - ratio) * 0.5 * (1 + math.cos(math.pi * t)) + ratio)


def restored_params_all_finite(workdir, config):
  """Each checkpoint on disk, restored: True where every parameter is finite."""
  target = build(config, devices()).abstract_state()
  checkpoints = Checkpointer(workdir, create=False)
  try:
    return {step: all(np.isfinite(np.asarray(x)).all()
                      for x in jax.tree.leaves(checkpoints.restore(step, target)[0].params))
            for step in checkpoints.all_steps()}
  finally:
    checkpoints.close()


# 1. The learning rate follows the updates applied, and the log shows that rate.

@pytest.mark.parametrize("strategy,family", STRATEGY_MODEL)
def test_logged_lr_is_the_rate_of_the_update_applied_when_fp16_skips(tmp_path, strategy, family):
  # 2^18 overflows float16's backward pass on some of the first steps: they apply no update.
  cfg = lm(strategy, family, precision="fp16", attention="reference", loss_scale_init=2.0 ** 18,
           num_steps=8)
  train_and_evaluate(cfg, str(tmp_path), devices=devices(), progress=False)
  lines = train_lines(str(tmp_path))
  assert [r["step"] for r in lines] == list(range(1, 9))
  skipped = [r["skipped_steps"] for r in lines]
  assert 0 < skipped[-1] < 8, skipped  # Some steps skipped, some applied.
  for before, r in zip([0] + skipped, lines):
    # Each step ran at the initial scale halved once per earlier skip (it doubles only after
    # 200 clean steps): the skip count agrees with the scale.
    assert r["loss_scale"] == 2.0 ** 18 / 2 ** before
    applied = r["step"] - r["skipped_steps"]
    expected = cosine_lr(applied - 1, horizon=8) if applied else 0.0  # Nothing applied: 0.
    assert r["lr"] == pytest.approx(expected, rel=1e-6), r
  # Not the rate of the step counter, which the old log showed.
  assert lines[-1]["lr"] != pytest.approx(cosine_lr(7, horizon=8), rel=1e-3)


@pytest.mark.parametrize("strategy", ["dp", "zero3"])
def test_fit_logs_the_rate_of_the_applied_update_when_a_step_is_skipped(tmp_path, strategy):
  """The generic API: the user's schedule, a NaN batch at step 2 skipped under nan_policy="skip"."""
  def schedule(i):
    return 0.01 * (i + 1)  # Update i (0-based) uses 0.01 (i + 1).
  dp = jaxdp.DataParallel(squared_error, optax.sgd(schedule), strategy=strategy,
                          devices=devices(), nan_policy="skip")
  good, bad = {"y": np.ones((8, 4), np.float32)}, {"y": np.full((8, 4), np.nan, np.float32)}
  jaxdp.fit(dp, init_w, lambda s: bad if s == 1 else good, workdir=str(tmp_path), num_steps=4,
            log_every=1, lr_schedule=schedule, progress=False)
  lines = train_lines(str(tmp_path))
  # Applied updates after steps 1..4: 1, 1 (step 2 dropped), 2, 3; the last one's rate each time.
  assert [r["lr"] for r in lines] == pytest.approx([0.01, 0.01, 0.02, 0.03])
  assert [r["skipped_steps"] for r in lines] == [0, 1, 1, 1]


@pytest.mark.parametrize("strategy,family", STRATEGY_MODEL)
def test_extending_a_finished_run_keeps_the_decay_horizon_and_says_so(tmp_path, capfd, strategy,
                                                                       family):
  workdir = str(tmp_path)
  cfg = lm(strategy, family, num_steps=6)
  assert cfg.lr_decay_steps is None  # The horizon defaults to num_steps: 6 here.
  train_and_evaluate(cfg, workdir, devices=devices(), progress=False)
  capfd.readouterr()
  train_and_evaluate(lm(strategy, family, num_steps=10), workdir, devices=devices(), progress=False)
  err = capfd.readouterr().err
  notices = [line for line in err.splitlines() if "config.lr_decay_steps" in line]
  assert len(notices) == 1 and "horizon, step 6" in notices[0], err
  lines = {r["step"]: r["lr"] for r in train_lines(workdir)}
  for step in range(1, 11):  # fp32: every step applies its update.
    assert lines[step] == pytest.approx(cosine_lr(step - 1, horizon=6), rel=1e-6), step
  assert lines[10] == pytest.approx(MIN_RATIO * PEAK)  # Decayed at 6, flat after.
  checkpoints = Checkpointer(workdir, create=False)
  assert checkpoints.restore_meta(10)["config"]["lr_decay_steps"] == 6  # Kept for later resumes.
  checkpoints.close()


# 2. fp16 whose loss scale is stuck at its floor halts under nan_policy, as fp32 does.

def tiny_state(scale, skips=0):
  return TrainState(step=jnp.int32(5), params={"w": jnp.ones(3)}, opt_state=(jnp.zeros(3),),
                    rng=jnp.zeros(2, jnp.uint32), consecutive_skips=jnp.int32(skips),
                    loss_scale=precision.initial_loss_scale("fp16", scale, period=100))


def test_fp16_overflow_counts_toward_nan_policy_only_at_the_floor_scale():
  update = lambda: ({"w": jnp.full(3, 2.0)}, (jnp.ones(3),), {})  # noqa: E731
  no, yes = jnp.bool_(False), jnp.bool_(True)
  # Above the floor: the usual overflow. Skipped, scale halved, not counted, step advances.
  s = steps.update_if_finite(tiny_state(4.0), no, update, 0, tiny_state(4.0).loss_scale, yes)
  assert (int(s.step), int(s.skipped_steps), int(s.consecutive_skips)) == (6, 1, 0)
  assert float(s.loss_scale.scale) == 2.0
  # At the floor (1.0), halving cannot help: counted, and with nan_policy="halt" (limit 0) the
  # state freezes (step, scale and parameters as they were) for the loop to halt.
  s = steps.update_if_finite(tiny_state(1.0), no, update, 0, tiny_state(1.0).loss_scale, yes)
  assert (int(s.step), int(s.skipped_steps), int(s.consecutive_skips)) == (5, 0, 1)
  assert float(s.loss_scale.scale) == 1.0 and float(s.params["w"][0]) == 1.0
  # nan_policy="skip" with 2 allowed: counted skips advance until the third in a row.
  s = tiny_state(1.0)
  for expected in [(6, 1, 1), (7, 2, 2), (7, 2, 3)]:
    s = steps.update_if_finite(s, no, update, 2, s.loss_scale, yes)
    assert (int(s.step), int(s.skipped_steps), int(s.consecutive_skips)) == expected
  # A non-finite loss (the forward pass: no scale helps) counts even above the floor.
  s = steps.update_if_finite(tiny_state(2.0 ** 15), no, update, 0, tiny_state(2.0 ** 15).loss_scale, no)
  assert int(s.consecutive_skips) == 1 and int(s.step) == 5
  # A finite step clears the count.
  s = steps.update_if_finite(tiny_state(1.0, skips=1), yes, update, 2, tiny_state(1.0).loss_scale, yes)
  assert int(s.consecutive_skips) == 0 and float(s.params["w"][0]) == 2.0


def overflowing_loss(params, batch, rng):
  """Finite forward (tanh(0) = 0) whose float16 backward overflows at any scale >= 1:
  d/dw tanh(w a^3) = a^3 = 8e6 at w = 0, a = 200, beyond float16's 65504."""
  del rng
  a = batch["a"].astype(params["w"].dtype)[:, None]
  y = jnp.tanh(params["w"][None, :] * a * a * a)
  return jnp.sum(y.astype(jnp.float32)), jnp.float32(batch["a"].shape[0])


def init_w(rng):
  del rng
  return {"w": jnp.zeros(4)}


OVERFLOW_BATCH = {"a": np.full(8, 200.0, np.float32)}


@pytest.mark.parametrize("strategy", ["dp", "zero3"])
def test_fp16_stuck_at_the_floor_scale_halts_and_saves_no_nonfinite_checkpoint(tmp_path, strategy):
  dp = jaxdp.DataParallel(overflowing_loss, optax.sgd(0.1), strategy=strategy, devices=devices(),
                          precision="fp16", loss_scale_init=4.0, nan_policy="halt")
  state = dp.init_state(init_w)
  for _ in range(4):
    state, metrics = dp.step(state, OVERFLOW_BATCH)
  # Scale 4 and 2: ordinary overflows (skipped, steps 1 and 2); at 1, the floor, the third
  # overflow is non-finite under nan_policy="halt": the state froze after step 2.
  assert int(state.step) == 2 and int(state.skipped_steps) == 2
  assert int(metrics["consecutive_skips"]) == 1 and float(state.loss_scale.scale) == 1.0
  np.testing.assert_array_equal(np.asarray(state.params["w"]), np.zeros(4))
  # Through fit: the one-line error at step 3, and every checkpoint written is finite.
  dp = jaxdp.DataParallel(overflowing_loss, optax.sgd(0.1), strategy=strategy, devices=devices(),
                          precision="fp16", loss_scale_init=4.0, nan_policy="halt")
  with pytest.raises(JaxdpError, match=r"non-finite loss or gradients at step 3 .*checkpoint 2"):
    jaxdp.fit(dp, init_w, lambda s: OVERFLOW_BATCH, workdir=str(tmp_path), num_steps=10,
              log_every=1, checkpoint_every=1, progress=False)
  checkpoints = Checkpointer(str(tmp_path), create=False)
  assert checkpoints.all_steps() == [1, 2]
  for step in checkpoints.all_steps():
    saved, _ = checkpoints.restore(step, dp.abstract_state(init_w))
    assert np.isfinite(np.asarray(saved.params["w"])).all()
  checkpoints.close()


def test_parameters_that_turn_infinite_are_never_checkpointed(tmp_path):
  # SGD at 1e38 on a gradient of 10: the parameters overflow float32 in the first update, whose
  # loss and gradients were finite; the save at that step must refuse and halt.
  def loss(params, batch, rng):
    del rng
    return jnp.sum(batch["x"] @ params["w"]), jnp.float32(batch["x"].shape[0])
  dp = jaxdp.DataParallel(loss, optax.sgd(1e38), devices=devices())
  batch = {"x": np.full((8, 4), 10.0, np.float32)}
  with pytest.raises(JaxdpError, match=r"non-finite parameters after step 1 .*not saved"):
    jaxdp.fit(dp, init_w, lambda s: batch, workdir=str(tmp_path), num_steps=4, log_every=4,
              checkpoint_every=1, progress=False)
  assert Checkpointer(str(tmp_path), create=False).all_steps() == []


def test_cli_fp16_run_that_gives_up_exits_2_with_one_line(tmp_path):
  """The reported run: fp16 at learning rate 1000 used to skip every step and exit 0."""
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "jaxdp.cli.main", "train", "--config", "tiny_cpu",
          "--cpu_devices", "2", "--workdir", workdir, "--progress=false",
          "--config.model.n_layer=1", "--config.precision=fp16", "--config.attention=reference",
          "--config.learning_rate=1000", "--config.nan_policy=halt", "--config.num_steps=30",
          "--config.checkpoint_every=2"]
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxdp: error:")]
  assert len(errors) == 1 and "non-finite loss or gradients at step" in errors[0], proc.stderr
  assert "grad_clip" not in errors[0]  # Clipping is on (1.0): not advice.
  config = lm(precision="fp16", attention="reference", learning_rate=1000.0)
  assert all(restored_params_all_finite(workdir, config).values())


@pytest.mark.parametrize("strategy,family", [("zero3", "llama")])
def test_fp16_run_that_gives_up_halts_in_process(tmp_path, strategy, family):
  cfg = lm(strategy, family, precision="fp16", attention="reference", learning_rate=1000.0,
           num_steps=30, checkpoint_every=2)
  with pytest.raises(JaxdpError, match="non-finite loss or gradients at step"):
    train_and_evaluate(cfg, str(tmp_path), devices=devices(), progress=False)
  halts = [r for r in read_metrics(str(tmp_path)) if r.get("event") == "nonfinite_halt"]
  assert len(halts) == 1 and halts[0]["step"] < 30
  assert all(restored_params_all_finite(str(tmp_path), cfg).values())


# 3. A halt's advice, followed, goes on past the bad step.

@pytest.mark.parametrize("strategy", ["dp", "zero3"])
def test_halt_advice_followed_trains_past_the_bad_step(tmp_path, strategy):
  # SGD at a peak rate of 3 without clipping: the loss drops, then spikes and overflows.
  cfg = lm(strategy, "gpt", optimizer="sgd", grad_clip=0.0, learning_rate=3.0, num_steps=20,
           checkpoint_every=2)
  workdir = str(tmp_path / "diverged")
  with pytest.raises(JaxdpError) as halted:
    train_and_evaluate(cfg, workdir, devices=devices(), progress=False)
  message = str(halted.value)
  bad = int(re.search(r"at step (\d+)", message).group(1))
  restore = re.search(r"--restore_from (\S+)", message).group(1)
  lr = float(re.search(r"--config\.learning_rate=([0-9.e+-]+)", message).group(1))
  assert lr == pytest.approx(0.3)  # 10x lower than the run's 3.
  assert "--config.grad_clip=1.0" in message  # Clipping was off: worth suggesting.
  # The advised checkpoint was followed by a sane loss (not over twice the lowest before it),
  # and is still on disk although keep_last=3 and the run went on for longer.
  advised = int(os.path.basename(restore))
  losses = {r["step"]: r["train_loss"] for r in train_lines(workdir)}
  assert losses[advised + 1] <= 2 * min(losses[s] for s in range(1, advised + 1))
  assert any(losses[s] > 10 * min(losses.values()) for s in losses if s < bad)  # It spiked.
  assert os.path.isdir(restore) and advised < bad - 1
  # Follow it: a fresh workdir, the advised checkpoint, the advised learning rate.
  follow = lm(strategy, "gpt", optimizer="sgd", grad_clip=0.0, learning_rate=lr, num_steps=20,
              checkpoint_every=2)
  result = train_and_evaluate(follow, str(tmp_path / "resumed"), devices=devices(),
                              progress=False, restore_from=restore)
  assert result["step"] == 20 > bad
  resumed = train_lines(str(tmp_path / "resumed"))
  assert resumed[0]["step"] == advised + 1
  assert all(np.isfinite(r["train_loss"]) for r in resumed)
  assert resumed[-1]["train_loss"] < losses[1]  # Below the untrained model's loss: it learns.


# 7. Early stopping keeps the best parameters.

def squared_error(params, batch, rng):
  del rng
  return jnp.sum((params["w"][None, :] - batch["y"]) ** 2), jnp.float32(batch["y"].shape[0])


@pytest.mark.parametrize("strategy", ["dp", "zero3"])
def test_early_stopping_keeps_the_parameters_of_the_best_evaluation(tmp_path, strategy):
  # SGD pulls w from 0 toward the train target 10; the eval target is 1, so the eval loss
  # falls, then rises once w passes 1. The best evaluation falls between checkpoints.
  lr, train_y, eval_y = 0.03, 10.0, 1.0
  train = {"y": np.full((8, 4), train_y, np.float32)}
  evals = [{"y": np.full((8, 4), eval_y, np.float32)}]
  dp = jaxdp.DataParallel(squared_error, optax.sgd(lr), strategy=strategy, devices=devices())
  result = jaxdp.fit(dp, init_w, lambda s: train, workdir=str(tmp_path), num_steps=50,
                     eval_batches=lambda: evals, eval_every=1, patience=2, checkpoint_every=0,
                     keep_last=1, log_every=1, progress=False)
  # The same run in NumPy: w <- w - lr * d/dw mean (w - 10)^2 = w - 2 lr (w - 10).
  w, eval_losses = 0.0, []
  for _ in range(result["step"]):
    w = w - 2 * lr * (w - train_y)
    eval_losses.append((w - eval_y) ** 2 * 4)  # Summed over the 4 coordinates.
  best_step = int(np.argmin(eval_losses)) + 1
  assert result["stop_reason"] == "early_stopping" and result["step"] == best_step + 2
  checkpoints = Checkpointer(str(tmp_path), create=False)
  kept = {s: checkpoints.eval_loss(s) for s in checkpoints.all_steps()}
  best = min((s for s in kept if kept[s] is not None), key=lambda s: kept[s])
  assert best == best_step
  state, _ = checkpoints.restore(best, dp.abstract_state(init_w))
  checkpoints.close()
  w_best = 0.0
  for _ in range(best_step):
    w_best = w_best - 2 * lr * (w_best - train_y)
  np.testing.assert_allclose(np.asarray(state.params["w"]), np.full(4, w_best), rtol=1e-5)
