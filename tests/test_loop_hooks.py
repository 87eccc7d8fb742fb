"""fit as a small loop plus hooks: the hook contract through `jaxdp.fit` (a user hook sees every
step once, in order, across a resume; may add fields, stop the run, ask for a checkpoint),
FitOptions against the old keywords, and each built-in hook on its own with a stand-in loop."""

import math
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.errors import JaxdpError
from jaxdp.runtime import hooks as hooks_lib
from jaxdp.runtime import loop_hooks
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.hooks import LogWindow, LoopContext
from jaxdp.runtime.loop import HaltAdvice, RunRecord
from jaxdp.runtime.metrics import read_metrics


def squared_error(params, batch, rng):
  del rng
  return jnp.sum((params["w"][None, :] - batch["y"]) ** 2), jnp.float32(batch["y"].shape[0])


def init_w(rng):
  del rng
  return {"w": jnp.zeros(4)}


def batch_of(step):
  """A different target every step, so each step's loss is its own."""
  return {"y": np.full((8, 4), 1.0 + 0.5 * step, np.float32)}


def dp(**kwargs):
  return jaxdp.DataParallel(squared_error, optax.sgd(0.05), devices=jax.devices()[:2], **kwargs)


def run_fit(workdir, num_steps, **kwargs):
  kwargs = dict(dict(log_every=1, checkpoint_every=2, progress=False), **kwargs)
  return jaxdp.fit(dp(), init_w, batch_of, workdir=str(workdir), num_steps=num_steps, **kwargs)


class LossRecorder(jaxdp.Hook):
  """Reads each step's loss on the device (a host sync per step: fine in a test)."""

  def __init__(self):
    self.seen = []

  def after_step(self, ctx, step, metrics):
    self.seen.append((step, float(metrics["train_loss"])))


def train_losses(workdir):
  return [(r["step"], r["train_loss"]) for r in read_metrics(str(workdir)) if "train_loss" in r]


# The contract through jaxdp.fit.

def test_a_user_hook_sees_every_step_once_in_order_across_a_resume(tmp_path):
  straight = LossRecorder()
  run_fit(tmp_path / "a", 6, hooks=[straight])
  first, second = LossRecorder(), LossRecorder()
  run_fit(tmp_path / "b", 3, hooks=[first])
  run_fit(tmp_path / "b", 6, hooks=[second])
  assert [s for s, _ in first.seen] == [1, 2, 3] and [s for s, _ in second.seen] == [4, 5, 6]
  assert first.seen + second.seen == straight.seen  # Bitwise: the resumed run is the same run.
  assert straight.seen == pytest.approx(train_losses(tmp_path / "a"), rel=1e-6)


def test_a_hook_added_field_is_written_on_every_train_line(tmp_path):
  class Doubled(jaxdp.Hook):
    def on_log(self, ctx, line, window):
      line["double_loss"] = 2 * line["train_loss"]
  run_fit(tmp_path, 4, log_every=2, hooks=[Doubled()])
  lines = [r for r in read_metrics(str(tmp_path)) if "train_loss" in r]
  assert [r["step"] for r in lines] == [2, 4]
  assert all(r["double_loss"] == 2 * r["train_loss"] for r in lines)


def test_a_hook_that_stops_the_run_ends_it_with_a_checkpoint_and_its_reason(tmp_path):
  class TargetLoss(jaxdp.Hook):
    def on_log(self, ctx, line, window):
      if line["train_loss"] < 10.0:
        ctx.stop("target_loss")
  losses = [loss for _, loss in (run_fit(tmp_path / "free", 8) and train_losses(tmp_path / "free"))]
  expected = next(i + 1 for i, loss in enumerate(losses) if loss < 10.0)
  assert expected < 8
  result = run_fit(tmp_path / "stopped", 8, checkpoint_every=0, hooks=[TargetLoss()])
  assert result["stop_reason"] == "target_loss" and result["step"] == expected
  assert Checkpointer(str(tmp_path / "stopped"), create=False).all_steps() == [expected]


def test_a_hook_may_ask_for_a_checkpoint_between_checkpoint_every_steps(tmp_path):
  result = run_fit(tmp_path, 5, checkpoint_every=0,
                   hooks=[hooks_lib.every(3, lambda ctx, step, metrics: ctx.request_checkpoint())])
  assert result["step"] == 5
  assert Checkpointer(str(tmp_path), create=False).all_steps() == [3, 5]


def test_every_calls_its_function_at_multiples_of_n_and_at_the_last_step(tmp_path):
  steps = []
  run_fit(tmp_path, 5, hooks=[hooks_lib.every(2, lambda ctx, step, metrics: steps.append(step))])
  assert steps == [2, 4, 5]
  with pytest.raises(ValueError, match="n must be >= 1"):
    hooks_lib.every(0, print)


def test_hooks_close_in_reverse_order_also_when_the_run_fails(tmp_path):
  closed = []

  class Closer(jaxdp.Hook):
    def __init__(self, name):
      self.name = name

    def close(self, ctx):
      closed.append(self.name)

  def failing(ctx, step, metrics):
    raise RuntimeError("boom")
  with pytest.raises(RuntimeError, match="boom"):
    run_fit(tmp_path / "failed", 4, hooks=[Closer("a"), Closer("b"), hooks_lib.every(2, failing)])
  assert closed == ["b", "a"]
  closed.clear()
  run_fit(tmp_path / "again", 2, hooks=[Closer("a"), Closer("b")])  # The lock was released.
  assert closed == ["b", "a"]


def test_on_end_sees_the_result_with_the_metrics_file_still_open(tmp_path):
  class Ender(jaxdp.Hook):
    def on_end(self, ctx, result):
      ctx.write({"step": result["step"], "event": "my_end", "reason": result["stop_reason"]})
  run_fit(tmp_path, 3, hooks=[Ender()])
  assert read_metrics(str(tmp_path))[-1] == {"step": 3, "event": "my_end", "reason": "num_steps"}


# FitOptions.

def test_fit_options_and_the_old_keywords_train_the_same_run(tmp_path):
  by_keywords = run_fit(tmp_path / "kw", 4, checkpoint_every=0)
  options = jaxdp.FitOptions(num_steps=4, log_every=1, progress=False)
  by_options = jaxdp.fit(dp(), init_w, batch_of, options, workdir=str(tmp_path / "opt"))
  assert by_options["train_loss"] == by_keywords["train_loss"]
  assert train_losses(tmp_path / "opt") == train_losses(tmp_path / "kw")
  # A keyword replaces the option of the same name.
  jaxdp.fit(dp(), init_w, batch_of, options, workdir=str(tmp_path / "override"), log_every=2)
  assert [s for s, _ in train_losses(tmp_path / "override")] == [2, 4]


def test_fit_refuses_an_unknown_keyword_or_no_num_steps(tmp_path):
  with pytest.raises(TypeError, match="unexpected keyword argument 'num_step'"):
    jaxdp.fit(dp(), init_w, batch_of, workdir=str(tmp_path), num_step=3)
  with pytest.raises(TypeError, match="num_steps"):
    jaxdp.fit(dp(), init_w, batch_of, workdir=str(tmp_path))


@pytest.mark.parametrize("field,value,bound", [("log_every", 0, ">= 1"), ("num_steps", -1, ">= 0"),
                                               ("keep_last", 0, ">= 1"), ("patience", -2, ">= 0")])
def test_a_bad_fit_option_is_one_line_naming_the_field(field, value, bound):
  fields = {"num_steps": 3, field: value}
  with pytest.raises(JaxdpError) as e:
    jaxdp.FitOptions(**fields)
  assert str(e.value) == f"FitOptions.{field}={value!r} must be {bound}"


# The halt's advice comes from the record, not from a config dict.

def test_halt_advice_names_flags_only_when_the_record_gives_them(tmp_path):
  nan = {"y": np.full((8, 4), np.nan, np.float32)}

  def halt_message(workdir, record):
    with pytest.raises(JaxdpError) as e:
      jaxdp.fit(dp(), init_w, lambda s: nan if s == 2 else batch_of(s), workdir=str(workdir),
                num_steps=4, log_every=1, checkpoint_every=1, progress=False, record=record)
    return str(e.value)
  plain = halt_message(tmp_path / "plain", None)
  assert "10x lower learning rate" in plain and "--config." not in plain
  flags = halt_message(tmp_path / "flags", RunRecord(advice=HaltAdvice(learning_rate=3.0, grad_clip=0.0)))
  assert "--config.learning_rate=0.3" in flags
  assert "gradient clipping is off: a fresh run with --config.grad_clip=1.0" in flags
  clipped = halt_message(tmp_path / "clipped", RunRecord(advice=HaltAdvice(learning_rate=3.0, grad_clip=1.0)))
  assert "--config.learning_rate=0.3" in clipped and "grad_clip" not in clipped


# Each built-in hook with a stand-in loop.

class FakeRun:
  def __init__(self):
    self.meta = {"best_eval_loss": None, "evals_without_improvement": 0}
    self.records, self.saved, self.checked = [], [], 0
    self.writer = types.SimpleNamespace(write=self.records.append)
    self.checkpoints = types.SimpleNamespace(check=self._check)

  def _check(self):
    self.checked += 1

  def halt_if_not_finite(self, state, pending=(), first_step=0):
    pass

  def save(self, state, eval_loss=None):
    self.saved.append((int(state.step), eval_loss))


def context(num_steps=10, eval_losses=None, data_size=2, **options):
  said = []
  evals = iter(eval_losses or [])
  fake_dp = types.SimpleNamespace(evaluate=lambda params, batches: next(evals), data_size=data_size,
                                  comm=jaxdp.CommConfig(), nan_policy="halt",
                                  grad_accum_steps=1, precision="fp32")
  ctx = LoopContext(dp=fake_dp, options=jaxdp.FitOptions(num_steps=num_steps, **options),
                    workdir="unused", record=RunRecord(), state=types.SimpleNamespace(step=0, params=None),
                    restored=False, run=FakeRun(),
                    eval_batches=(lambda: []) if eval_losses is not None else None)
  ctx.printer = said.append
  return ctx, said


def boundary(hooks, ctx, step):
  """The loop's end of a step for `hooks`: a fresh step, each at_boundary, in order."""
  ctx.step, ctx.state = step, types.SimpleNamespace(step=step, params=None)
  ctx.eval_loss, ctx.checkpoint_requested = None, False
  for hook in hooks:
    hook.at_boundary(ctx, step)


def test_evaluation_stops_after_patience_evaluations_without_a_new_best_and_checkpoints_bests():
  ctx, said = context(num_steps=20, eval_losses=[3.0, 2.0, 2.5, 2.1, 2.2], eval_every=2, patience=3)
  hooks = [loop_hooks.Evaluation(), loop_hooks.Checkpointing()]
  for step in range(1, 11):
    boundary(hooks, ctx, step)
    if ctx.stop_reason:
      break
  assert ctx.step == 10 and ctx.stop_reason == "early_stopping"
  # New bests (steps 2, 4) and the stop (step 10) are saved with their eval loss; others are not.
  assert ctx.run.saved == [(2, 3.0), (4, 2.0), (10, 2.2)]
  assert ctx.run.meta["best_eval_loss"] == 2.0 and ctx.run.meta["stopped_early"]
  assert said[-1] == "early stopping at step 10: no improvement in 3 evaluations"
  assert ctx.run.records[-1] == {"step": 10, "event": "early_stopping", "best_eval_loss": 2.0}


def test_checkpointing_saves_at_its_cadence_the_last_step_a_stop_and_a_request():
  ctx, _ = context(num_steps=7, checkpoint_every=3)
  hook = loop_hooks.Checkpointing()
  for step in range(1, 6):
    boundary([hook], ctx, step)
  ctx.request_checkpoint()
  hook.at_boundary(ctx, 5)
  boundary([hook], ctx, 6)
  ctx.stop("mine")
  hook.at_boundary(ctx, 6)
  boundary([hook], ctx, 7)
  assert [s for s, _ in ctx.run.saved] == [3, 5, 6, 6, 7]  # Run.save skips a step saved twice.
  hook.after_step(ctx, 7, {})
  assert ctx.run.checked == 1  # A failed background save is looked for after every step.


def test_preemption_asks_every_step_but_the_last_and_announces_the_stop_at_the_end():
  ctx, said = context(num_steps=5)
  hook = loop_hooks.Preemption()
  asked = []

  def should_stop(step, log_step):
    asked.append(step)
    hook.stops._name = "SIGTERM" if step == 3 else None
    return step == 3
  hook.stops.should_stop = should_stop
  for step in (1, 2, 3):
    boundary([hook], ctx, step)
  assert ctx.stop_reason == "preempted" and asked == [1, 2, 3]
  boundary([hook], ctx, 5)  # The last step: every process knows it alike, nothing to agree on.
  assert asked == [1, 2, 3]
  hook.on_end(ctx, {"step": 3, "stop_reason": "preempted"})
  assert ctx.run.records == [{"step": 3, "event": "preempted", "signal": "SIGTERM"}]
  assert said == ["SIGTERM: stopped after step 3 and saved a checkpoint; run the same command to resume"]


def test_preemption_installs_the_signal_handlers_for_the_run_only():
  import signal

  def before(signum, frame):  # The caller's own handler (not one an earlier test left behind).
    del signum, frame
  previous = signal.signal(signal.SIGTERM, before)
  try:
    ctx, _ = context()
    hook = loop_hooks.Preemption()
    hook.on_start(ctx)
    assert signal.getsignal(signal.SIGTERM) is not before
    hook.close(ctx)
    assert signal.getsignal(signal.SIGTERM) is before
  finally:
    signal.signal(signal.SIGTERM, previous)


def test_watchdog_fires_on_an_overdue_step_but_not_while_paused():
  now, exits = [0.0], []
  ctx, _ = context(step_timeout_s=5.0)
  hook = loop_hooks.Watchdog(5.0, exit=exits.append, clock=lambda: now[0])
  hook.on_start(ctx)
  try:
    done = types.SimpleNamespace(is_ready=lambda: True)
    stuck = types.SimpleNamespace(is_ready=lambda: False)
    hook.after_step(ctx, 1, {"train_loss": done})
    hook.watchdog.check()  # Step 1 finished at t=0: step 2's clock starts.
    hook.after_step(ctx, 2, {"train_loss": stuck})
    hook.on_pause(ctx)
    now[0] = 60.0
    hook.watchdog.check()
    assert exits == []  # Evaluation and checkpoints are not timed.
    hook.on_resume(ctx, 60.0)
    now[0] = 64.0
    hook.watchdog.check()
    assert exits == []
    now[0] = 66.0
    hook.watchdog.check()
    assert exits == [3]
  finally:
    hook.close(ctx)


def test_noise_scale_is_logged_when_estimated_and_its_absence_explained_once():
  ctx, said = context(data_size=1, tokens_per_step=64)
  ctx.rows_per_step = 8
  hook = loop_hooks.NoiseScale()
  plain = [{"train_loss": 1.0}]
  for step in (1, 2):
    line = {"step": step}
    hook.on_log(ctx, line, LogWindow(step, step, 1.0, plain))
    assert "grad_noise_scale" not in line
  assert said == [loop_hooks.noise_scale_unavailable(ctx.dp)] and "one data device" in said[0]
  line = {"step": 3}
  hook.on_log(ctx, line, LogWindow(3, 3, 1.0, [{"gns_g2": 2.0, "gns_trace": 8.0}]))
  assert line["grad_noise_scale"] == pytest.approx(4.0)
  assert line["grad_noise_scale_examples"] == pytest.approx(4.0 * 8 / 64)


def test_hardware_stats_adds_its_fields_to_the_line_and_times_the_data_wait():
  ctx, _ = context()
  watch = jaxdp.runtime.observe.StepWatch(jax.local_devices()[:1], jnp.float32, 1e6, 1234)
  hook = loop_hooks.HardwareStats(watch)
  assert list(hook.wrap_batches(ctx, iter([1, 2]))) == [1, 2]
  line = {"step": 4}
  hook.on_log(ctx, line, LogWindow(1, 4, 2.0, []))
  assert line["step_time_s"] == pytest.approx(0.5)
  assert 0.0 <= line["data_wait_fraction"] <= 1.0
  assert line["peak_memory_bytes"] > 0 and "mfu" in line


def test_progress_bar_prints_plain_lines_and_routes_messages_while_open(capsys):
  ctx, said = context(num_steps=4, progress=False)
  hook = loop_hooks.ProgressBar()
  hook.on_start(ctx)
  ctx.say("hello")
  hook.on_log(ctx, {"train_loss": 1.5, "tokens_per_sec": 1000.0}, LogWindow(1, 2, 1.0, []))
  hook.close(ctx)
  ctx.say("after")
  out = capsys.readouterr().out.splitlines()
  assert out == ["hello", "step 2/4: loss 1.5000, tok_s 1,000"]
  assert said == ["after"]  # Closed: the loop's own printer again.


def test_train_log_means_the_window_of_steps_since_the_last_line():
  ctx, _ = context(num_steps=4)
  ctx.run.note_losses = lambda first, fetched, state: None
  ctx.rows_per_step = 8
  log = loop_hooks.TrainLog(comm_bytes=10.0)
  log.on_start(ctx)
  for step, loss in ((1, 1.0), (2, 3.0)):
    log.after_step(ctx, step, {"train_loss": jnp.float32(loss), "grad_norm": jnp.float32(loss)})
  assert ctx.unlogged()[1] == 1 and len(ctx.unlogged()[0]) == 2
  ctx.step = 2
  line, window = log.window(ctx)
  assert (window.first_step, window.step, window.steps) == (1, 2, 2)
  assert line["train_loss"] == 2.0 and line["grad_norm"] == 2.0 and line["comm_bytes_per_step"] == 10.0
  assert log.pending == [] and log.first_step == 3


def test_the_test_hang_hook_is_installed_only_for_its_process(monkeypatch):
  monkeypatch.delenv(loop_hooks.HANG_ENV, raising=False)
  assert loop_hooks.HangForTests.from_env() is None
  monkeypatch.setenv(loop_hooks.HANG_ENV, f"{jax.process_index() + 1}:3")
  assert loop_hooks.HangForTests.from_env() is None
  monkeypatch.setenv(loop_hooks.HANG_ENV, f"{jax.process_index()}:3")
  hook = loop_hooks.HangForTests.from_env()
  assert hook.step == 3
  hook.seconds = 0.2
  ctx, _ = context()
  clock = __import__("time").perf_counter
  start = clock()
  hook.before_step(ctx, 1)  # Before step 2: no stall.
  assert clock() - start < 0.1
  hook.before_step(ctx, 2)  # Before step 3.
  assert clock() - start >= 0.2


def test_the_profile_hook_traces_its_window(tmp_path):
  result = run_fit(tmp_path, 4, profile_steps="1:3")
  assert result["step"] == 4
  traces = [f for _, _, files in os.walk(tmp_path / "profile") for f in files]
  assert any(f.endswith((".xplane.pb", ".trace.json.gz")) for f in traces), traces


def test_the_loop_has_no_host_sync_between_log_steps(tmp_path, monkeypatch):
  """jax.device_get (the loop's fetch of metrics) runs once per train line, not once per step."""
  calls = []
  real = jax.device_get

  def counting(x):
    calls.append(1)
    return real(x)
  run_fit(tmp_path / "warm", 2)  # Compile outside the count.
  monkeypatch.setattr(jax, "device_get", counting)
  run_fit(tmp_path / "counted", 8, log_every=4, checkpoint_every=0)
  logs = 2
  # One fetch per line, plus the applied-update count for lr (none here) and the final
  # save's finiteness check.
  assert len(calls) <= logs + 2, len(calls)
  assert not math.isnan(train_losses(tmp_path / "counted")[-1][1])
