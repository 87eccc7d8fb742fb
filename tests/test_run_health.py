"""Surviving a run at scale, in-process with a tiny linear model: per-device gradient norms and the
gradient-outlier flag, stragglers (the judgement, with a stand-in gather), loss-spike rollback
(bitwise equal to a run that never saw the batch, and reproduced by a resume from any
checkpoint), goodput shares and lost steps across a restart, and time-based checkpoints with a
fake clock."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.errors import JaxdpError
from jaxdp.runtime import health, loop_hooks
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.goodput import CATEGORIES
from jaxdp.runtime.hooks import LogWindow
from jaxdp.runtime.metrics import read_metrics
from jaxdp.runtime.options import FitOptions
from jaxdp.runtime.spikes import LossStats, data_index

ROWS, DIM = 16, 4
W_TRUE = np.arange(1, DIM + 1, dtype=np.float32) / DIM


def squared_error(params, batch, rng):
  del rng
  err = batch["x"] @ params["w"] - batch["y"]
  return jnp.sum(err ** 2), jnp.float32(batch["y"].shape[0])


def init_w(rng):
  del rng
  return {"w": jnp.zeros(DIM)}


def base_batch(index):
  rng = np.random.default_rng(index)
  x = rng.normal(size=(ROWS, DIM)).astype(np.float32)
  y = (x @ W_TRUE + 0.1 * rng.normal(size=ROWS)).astype(np.float32)
  return {"x": x, "y": y}


SPIKE_AT = 7  # The data index made adversarial.


def spiky_batch(index):
  batch = base_batch(index)
  if index == SPIKE_AT:
    batch["y"] = batch["y"] * 100.0
  return batch


def make_dp(devices=2, strategy="dp", lr=0.05):
  return jaxdp.DataParallel(squared_error, optax.sgd(lr), devices=jax.devices()[:devices],
                            strategy=strategy)


def events(workdir, name):
  return [r for r in read_metrics(str(workdir)) if r.get("event") == name]


def bits(tree):
  return [np.asarray(x).view(np.uint32) for x in jax.tree.leaves(tree)]


def same_bits(a, b):
  return all(np.array_equal(x, y) for x, y in zip(bits(a), bits(b), strict=True))


# --- per-device health ---------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", ["dp", "zero2"])
def test_a_device_fed_a_scaled_shard_is_flagged_as_a_gradient_outlier(tmp_path, strategy):
  def corrupted(index):  # Device 3 of 4 holds rows 12..15 of the one micro-batch.
    batch = base_batch(index)
    batch["x"][12:16] *= 10.0
    return batch
  dp = make_dp(4, strategy, lr=0.001)  # Small enough not to diverge on the scaled rows.
  jaxdp.fit(dp, init_w, corrupted, workdir=str(tmp_path), num_steps=6, log_every=2,
            health_window=2, progress=False)
  lines = [r for r in read_metrics(str(tmp_path)) if "train_loss" in r]
  assert all(len(r["device_grad_norm"]) == 4 and len(r["host_step_time_s"]) == 1 for r in lines)
  flagged = events(tmp_path, "grad_outlier")
  assert [(e["device"], e["process"]) for e in flagged] == [(3, 0)]  # Once, not at every line.
  assert flagged[0]["device_id"] == dp.mesh.devices[3, 0].id and flagged[0]["host"]
  assert not events(tmp_path, "straggler")  # One process: nothing to compare.


def test_a_clean_run_flags_nothing_and_device_norms_match_the_rows(tmp_path):
  dp = make_dp(4)
  # 4 rows per device make each step's norms noisy: judged over 6 steps (deterministic data).
  jaxdp.fit(dp, init_w, base_batch, workdir=str(tmp_path), num_steps=6, log_every=1,
            health_window=6, progress=False)
  assert not events(tmp_path, "grad_outlier")
  # Step 1 at w = 0: device d's mean gradient over its 4 rows is -2 x^T y / 4, by hand.
  first = next(r for r in read_metrics(str(tmp_path)) if r.get("step") == 1)
  batch = base_batch(0)
  want = [np.linalg.norm(-2 * batch["x"][4 * d:4 * d + 4].T @ batch["y"][4 * d:4 * d + 4] / 4)
          for d in range(4)]
  np.testing.assert_allclose(first["device_grad_norm"], want, rtol=1e-5)


def test_host_step_time_leaves_out_device_waits_and_writing_the_previous_line(monkeypatch):
  """Process 0 alone writes metrics.jsonl and TensorBoard: that time, like waiting for the
  devices, is not its own host time per step (else every healthy run flags process 0)."""
  monkeypatch.setattr(health, "gather_floats", lambda own: [own])
  hook = health.DeviceHealth(straggler_factor=0, outlier_factor=0, window=2)
  ctx = type("Ctx", (), {"device_wait_s": 0.0, "log_s": 0.0, "step": 4})()
  line: dict = {}
  ctx.device_wait_s, ctx.log_s = 0.5, 0.3  # Over a 1.0 s window of 4 steps.
  hook.on_log(ctx, line, LogWindow(1, 4, 1.0, [{}] * 4))
  assert line["host_step_time_s"] == [pytest.approx((1.0 - 0.5 - 0.3) / 4)]
  ctx.log_s = 0.4  # The next window: only the 0.1 s written since counts out.
  hook.on_log(ctx, line, LogWindow(5, 8, 1.0, [{}] * 4))
  assert line["host_step_time_s"] == [pytest.approx((1.0 - 0.0 - 0.1) / 4)]


def test_straggler_judgement_flags_the_slow_process_once_per_episode(monkeypatch):
  """The judgement of DeviceHealth with a stand-in all-gather: process 1 of 3 is slow for three
  lines, then recovers, then is slow again (a second episode). The first line (compilation and
  the first rendezvous, where process 0 waited 2 s for the others) is reported, never judged."""
  lines = iter([[2.0, 0.2, 0.001]] + [[0.001, t, 0.0012] for t in (0.2, 0.2, 0.001, 0.001, 0.2, 0.2)])
  monkeypatch.setattr(health, "gather_floats", lambda own: next(lines))
  written, said = [], []

  class Device:
    def __init__(self, i, p):
      self.id, self.process_index = i, p

  hook = health.DeviceHealth(straggler_factor=1.5, outlier_factor=0, window=2)
  hook.hosts, hook.devices = ["a", "b", "c"], [Device(i, i) for i in range(3)]
  ctx = type("Ctx", (), {"device_wait_s": 0.0, "log_s": 0.0, "step": 0,
                        "write": lambda self, r: written.append(r),
                         "say": lambda self, s: said.append(s)})()
  reported = []
  for step in range(1, 8):
    ctx.step = step
    line: dict = {}
    hook.on_log(ctx, line, LogWindow(step, step, 0.25, [{}]))
    reported.append(line["host_step_time_s"])
  assert reported[0] == [2.0, 0.2, 0.001]
  # The window of 2 is first full at line 3 (lines 2-3); lines 3-4 (4 still holds a slow line in
  # its window) are one episode, line 5 ends it, line 6 starts the next. Process 0's 2 s first
  # line never counted: judged, it would have named process 0.
  assert [(e["step"], e["process"], e["host"]) for e in written] == [(3, 1, "b"), (6, 1, "b")]
  assert "process 1 (host b" in said[0]


def test_the_slow_process_hook_reads_its_process_and_seconds(monkeypatch):
  monkeypatch.setenv(health.SLOW_ENV, "0:0.01")
  assert health.SlowForTests.from_env().seconds == 0.01
  monkeypatch.setenv(health.SLOW_ENV, "1:0.01")
  assert health.SlowForTests.from_env() is None


# --- loss spikes ---------------------------------------------------------------------------------

def test_data_index_skips_the_recorded_batches():
  assert [data_index(s, [2, 4]) for s in range(5)] == [0, 1, 3, 5, 6]
  assert [data_index(s, []) for s in range(3)] == [0, 1, 2]


def test_loss_stats_judge_a_spike_only_once_warm():
  stats = LossStats(window=3, sigmas=3.0)
  for loss in (1.0, 1.1, 0.9):
    assert not stats.is_spike(100.0) or stats.warm
    stats.update(loss)
  assert stats.warm and stats.is_spike(100.0) and not stats.is_spike(1.05)
  assert LossStats.from_dict(stats.to_dict(), 3, 3.0).to_dict() == stats.to_dict()


SPIKE_FIT = dict(num_steps=12, log_every=2, checkpoint_every=3, keep_last=10, progress=False,
                 spike_policy="rollback", spike_window=3, spike_sigmas=4.0)


@pytest.fixture(scope="module")
def spike_run(tmp_path_factory):
  """A rollback run over the spiky data, the 2-device step shared by every fit of this module."""
  dp = make_dp(2)
  workdir = tmp_path_factory.mktemp("spike")
  result = jaxdp.fit(dp, init_w, spiky_batch, workdir=str(workdir), **SPIKE_FIT)
  return dp, workdir, result


def test_rollback_returns_to_the_last_checkpoint_skips_the_batch_and_finishes(spike_run):
  dp, workdir, result = spike_run
  assert result["step"] == 12 and result["stop_reason"] == "num_steps"
  rollbacks = events(workdir, "rollback")
  # The loss of update 8 is measured on data index 7: back to checkpoint 6, index 7 skipped.
  assert [(e["step"], e["to_step"], e["skipped_batch"]) for e in rollbacks] == [(8, 6, SPIKE_AT)]
  checkpoints = Checkpointer(str(workdir), create=False)
  try:
    assert checkpoints.restore_meta(12)["skipped_batches"] == [SPIKE_AT]
    assert "skipped_batches" not in checkpoints.restore_meta(6)  # Saved before the spike.
  finally:
    checkpoints.close()
  # Bitwise the run that never saw the batch: the same steps over the data without index 7.
  reference = jaxdp.fit(dp, init_w, lambda s: base_batch(s if s < SPIKE_AT else s + 1),
                        workdir=str(workdir.parent / "reference"), num_steps=12, log_every=2,
                        progress=False)
  assert same_bits(result["state"].params, reference["state"].params)
  lost = events(workdir, "goodput")[-1]["seconds"]["lost"]
  assert lost > 0  # Steps 7 and 8, trained and thrown away.


@pytest.mark.parametrize("step", [3, 6, 9])
def test_a_resume_from_any_checkpoint_reproduces_the_rolled_back_run_bitwise(spike_run, tmp_path, step):
  dp, workdir, result = spike_run
  again = jaxdp.fit(dp, init_w, spiky_batch, workdir=str(tmp_path),
                    restore_from=os.path.join(str(workdir), "checkpoints", str(step)), **SPIKE_FIT)
  assert again["step"] == 12
  assert same_bits(again["state"].params, result["state"].params)


def test_too_many_rollbacks_in_a_window_halt_with_advice(tmp_path):
  def always_spiking(index):
    batch = base_batch(index)
    if index >= SPIKE_AT:
      batch["y"] = batch["y"] * 100.0
    return batch
  with pytest.raises(JaxdpError, match="after 1 rollbacks within 1000 steps.*resume with a lower "
                                      "learning rate.*spike_max_rollbacks \\(e.g. 3\\)"):
    jaxdp.fit(make_dp(2), init_w, always_spiking, workdir=str(tmp_path),
              **dict(SPIKE_FIT, spike_max_rollbacks=1))


def test_the_rollback_halt_advises_clipping_only_when_it_is_off():
  """The built-in app's halt names flags a resume of the same workdir takes (none of them
  run-defining); turning clipping on is advised only to a run that has it off."""
  from jaxdp.runtime.loop import HaltAdvice
  from jaxdp.runtime.spikes import SpikeRollback
  hook = SpikeRollback(sigmas=6.0, window=10, max_rollbacks=3, rollback_window=1000)
  clipped = hook._advice(HaltAdvice(learning_rate=3e-3, grad_clip=1.0))  # noqa: SLF001
  assert clipped == ("run the same command again with --config.learning_rate=0.0003 (10x lower), "
                     "or --config.spike_max_rollbacks=5 to go on rolling back")
  unclipped = hook._advice(HaltAdvice(learning_rate=3e-3, grad_clip=0.0))  # noqa: SLF001
  assert "--config.grad_clip=1.0 (clipping is off)" in unclipped
  from jaxdp.lm.builder import RUN_DEFINING_FIELDS
  assert not {"learning_rate", "grad_clip", "spike_max_rollbacks"} & set(RUN_DEFINING_FIELDS)


def test_spike_settings_out_of_range_are_refused():
  with pytest.raises(JaxdpError, match="spike_policy"):
    FitOptions(num_steps=1, spike_policy="skip")
  with pytest.raises(JaxdpError, match="straggler_factor"):
    FitOptions(num_steps=1, straggler_factor=0.5)


# --- goodput -------------------------------------------------------------------------------------

def test_goodput_shares_sum_to_one_and_a_restart_counts_its_lost_steps(tmp_path):
  dp = make_dp(2)
  first = jaxdp.fit(dp, init_w, base_batch, workdir=str(tmp_path), num_steps=5, log_every=1,
                    checkpoint_every=2, progress=False)
  shares = first["goodput"]
  assert set(shares) == set(CATEGORIES) and abs(sum(shares.values()) - 1) < 1e-9
  assert shares["productive"] > 0 and shares["compile"] > 0
  lines = [r for r in read_metrics(str(tmp_path)) if "train_loss" in r]
  assert all(0 < r["goodput"] <= 1 for r in lines)
  # The workdir's only run: its seconds are every run's seconds, to the last bit.
  only = events(tmp_path, "goodput")[-1]
  assert only["runs"] == 1 and only["all_runs_seconds"] == only["seconds"], only
  # A "kill" after step 5: only checkpoint 4 survives, so step 5 was trained for nothing.
  Checkpointer(str(tmp_path), create=False).set_aside(5)
  second = jaxdp.fit(dp, init_w, base_batch, workdir=str(tmp_path), num_steps=6, log_every=1,
                     checkpoint_every=2, progress=False)
  assert [e["step"] for e in events(tmp_path, "goodput_lost")] == [4]
  total = events(tmp_path, "goodput")[-1]
  assert total["runs"] == 2 and total["all_runs_seconds"]["lost"] > 0
  assert abs(sum(second["goodput_all_runs"].values()) - 1) < 1e-9


# --- time-based checkpoints ----------------------------------------------------------------------

def test_checkpoint_every_minutes_saves_at_train_lines_by_the_clock(tmp_path, monkeypatch):
  now = [0.0]

  def fake_clock():  # Each call is one minute later: every train line finds a minute passed.
    now[0] += 60.0
    return now[0]
  monkeypatch.setattr(loop_hooks, "minutes_clock", fake_clock)
  jaxdp.fit(make_dp(2), init_w, base_batch, workdir=str(tmp_path), num_steps=7, log_every=3,
            checkpoint_every=0, checkpoint_every_minutes=2.0, keep_last=10, progress=False)
  checkpoints = Checkpointer(str(tmp_path), create=False)
  # Start: 60 s. Line 3: 120 s, one minute since the start: no. Line 6: 180 s, two: a save
  # (which restarts the count at 240 s). Step 7, the last, always saves.
  assert checkpoints.all_steps() == [6, 7]
  checkpoints.close()


def test_skip_drops_exactly_the_spiking_update(tmp_path):
  """spike_policy="skip" in the step: the parameters equal, bitwise, those of a run whose spiking
  batch was made non-finite under nan_policy="skip" (the update dropped, the rest the same)."""
  def nan_batch(index):
    batch = base_batch(index)
    if index == SPIKE_AT:
      batch["y"] = batch["y"] * np.nan
    return batch
  spiky = jaxdp.DataParallel(squared_error, optax.sgd(0.05), devices=jax.devices()[:2],
                             spike_policy="skip", spike_sigmas=4.0, spike_window=3)
  skipped = jaxdp.fit(spiky, init_w, spiky_batch, workdir=str(tmp_path / "skip"), num_steps=10,
                      log_every=5, progress=False)
  nan_skips = jaxdp.DataParallel(squared_error, optax.sgd(0.05), devices=jax.devices()[:2],
                                 nan_policy="skip")
  reference = jaxdp.fit(nan_skips, init_w, nan_batch, workdir=str(tmp_path / "nan"), num_steps=10,
                        log_every=5, progress=False)
  assert same_bits(skipped["state"].params, reference["state"].params)
  assert int(skipped["state"].skipped_steps) == 1
  assert [e["step"] for e in events(tmp_path / "skip", "loss_spike_skipped")] == [SPIKE_AT + 1]
  line = next(r for r in read_metrics(str(tmp_path / "skip")) if r.get("step") == 10)
  assert line["skipped_steps"] == 1 and line["loss_spikes"] == 1
  # Without the spike the same run drops nothing.
  clean = jaxdp.fit(spiky, init_w, base_batch, workdir=str(tmp_path / "clean"), num_steps=10,
                    log_every=5, progress=False)
  assert int(clean["state"].skipped_steps) == 0


@pytest.mark.multiprocess
def test_a_process_slowed_on_purpose_is_flagged_as_a_straggler_by_index(tmp_path):
  """2 processes x 2 devices under `jaxdp launch`; process 1 sleeps before every step. Also the
  time-based checkpoints agreed across the processes."""
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]),
             JAX_PLATFORMS="cpu", **{health.SLOW_ENV: "1:1.0"})
  workdir = str(tmp_path / "run")
  run = subprocess.run(
      [sys.executable, "-m", "jaxdp.cli.main", "launch", "--nprocs", "2", "--cpu_devices", "2",
       "--", "train", "--config", "tiny_cpu", "--config.num_steps=8", "--config.log_every=2",
       "--config.eval_every=0", "--config.health_window=2", "--progress=false",
       # Every line is 0.001 minutes after the last save (by process 0's clock): both processes
       # must agree to save at each line, or the save's collectives would hang.
       "--config.checkpoint_every=0", "--config.checkpoint_every_minutes=0.001",
       "--config.keep_last=10", "--workdir", workdir],
      capture_output=True, text=True, env=env, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  lines = [r for r in read_metrics(workdir) if "train_loss" in r]
  assert all(len(r["host_step_time_s"]) == 2 for r in lines)
  # Process 1 sleeps 1 s a step; process 0 only waits (for the devices: not its own time).
  # Medians over the lines: one line of a loaded machine may stall process 0 too (0.7 s of host
  # time was seen on a 2-core machine running the suite beside it, and 1.6 s on CI's first line,
  # which waited for compilation), so the injected delay is larger than such a stall and one
  # stalled line cannot move the median.
  fast, slow = np.median([r["host_step_time_s"] for r in lines], axis=0)
  assert slow >= 1.0 and slow > 3 * fast, [r["host_step_time_s"] for r in lines]
  flagged = events(workdir, "straggler")
  # Once, at the first full window: lines 4 and 6. Line 2 (compilation and the collectives' first
  # rendezvous, where process 0 waits on the host) is never judged; on CI it once held 1.6 s of
  # process 0's time and hid the straggler until step 6.
  assert [(e["process"], e["step"]) for e in flagged] == [(1, 6)]
  assert flagged[0]["host"] and len(flagged[0]["devices"]) == 2
  assert "process 1 (host" in run.stdout + run.stderr
  checkpoints = Checkpointer(workdir, create=False)
  assert checkpoints.all_steps() == [2, 4, 6, 8]
  checkpoints.close()


def test_config_spike_skip_with_local_sgd_is_one_line():
  from jaxdp.lm import config as lm_config
  c = lm_config.load_preset("tiny_cpu")
  c.spike_policy, c.sync = "skip", "local_sgd"
  with pytest.raises(JaxdpError, match="config.spike_policy='skip' needs .*--config.spike_policy=rollback"):
    lm_config.validate(c, 2)
  c.spike_policy = "rollback"
  lm_config.validate(c, 2)
