"""Time to target loss inside the run (jaxdp.runtime.targets.TargetLosses through jaxdp.fit)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.errors import JaxdpError
from jaxdp.runtime.metrics import read_metrics
from jaxdp.runtime.targets import TargetLosses, parse_targets

ROWS = 16


def init_fn(rng):
  return {"w": jax.random.normal(rng, (8, 1)) * 0.1}


def loss_fn(params, batch, rng):
  del rng
  err = (batch["x"] @ params["w"] - batch["y"]) ** 2
  return jnp.sum(err[:, 0] * batch["w"]), jnp.sum(batch["w"])


TRUE_W = np.linspace(-1, 1, 8).astype(np.float32)[:, None]


def batch_of(step):
  rs = np.random.RandomState(step)
  x = rs.randn(ROWS, 8).astype(np.float32)
  return {"x": x, "y": x @ TRUE_W, "w": np.ones(ROWS, np.float32)}


EVAL = [batch_of(10_000 + k) for k in range(2)]


def run(workdir, num_steps, targets):
  dp = jaxdp.DataParallel(loss_fn, optax.adam(0.05), mesh=jaxdp.make_mesh(jax.devices()[:2]))
  hook = TargetLosses(targets)
  result = jaxdp.fit(dp, init_fn, batch_of, workdir=str(workdir), num_steps=num_steps, eval_every=5,
                     log_every=5, checkpoint_every=10, progress=False, tokens_per_step=ROWS * 8,
                     eval_batches=lambda: iter(EVAL), hooks=[hook])
  return result, [r for r in read_metrics(str(workdir)) if r.get("event") == "target_reached"]


@pytest.fixture(scope="module")
def evals(tmp_path_factory):
  """The eval losses of a 40-step run (evaluated every 5 steps), to place targets between."""
  workdir = tmp_path_factory.mktemp("targets_probe")
  run(workdir, 40, [])
  return {r["step"]: r["eval_loss"] for r in read_metrics(str(workdir)) if "eval_loss" in r
          and "event" not in r}


def test_a_run_crossing_two_targets_logs_each_once_with_consistent_steps_and_tokens(tmp_path, evals,
                                                                                   capsys):
  steps = sorted(evals)
  # Two targets, each first reached at a known evaluation, and one never reached.
  high, low = evals[steps[1]], evals[steps[4]]
  assert evals[steps[0]] > high > low  # The probe's loss falls (else the test would be vacuous).
  result, lines = run(tmp_path / "run", 40, [low, high, 1e-9])
  assert [line["target"] for line in lines] == [high, low]
  for line, step in zip(lines, (steps[1], steps[4])):
    first = min(s for s in steps if evals[s] <= line["target"])
    assert line["step"] == first == step
    assert line["tokens"] == line["step"] * ROWS * 8
    assert 0 < line["productive_s"] <= line["wall_s"]
  assert lines[0]["wall_s"] <= lines[1]["wall_s"]
  assert result["targets_reached"] == lines
  summary = capsys.readouterr().out.split("jaxdp: done")[-1]  # The end-of-run summary.
  assert f"target eval_loss {high:g}: step {steps[1]}," in summary
  assert f"target eval_loss {low:g}: step {steps[4]}," in summary


def test_a_resumed_run_reports_only_the_targets_not_reached_before(tmp_path, evals):
  steps = sorted(evals)
  early, late = evals[steps[1]], evals[steps[6]]
  workdir = tmp_path / "run"
  _, first = run(workdir, 20, [early, late])
  assert [line["target"] for line in first] == [early]
  _, lines = run(workdir, 40, [early, late])
  assert [line["target"] for line in lines] == [early, late]  # The first one is not repeated.
  assert lines[1]["step"] == steps[6] and lines[1]["resumed"] is True


@pytest.mark.parametrize("text", ["2.0,abc", "nan", "-1", "0"])
def test_a_target_that_is_not_a_positive_loss_is_refused_by_field(text):
  with pytest.raises(JaxdpError, match="target_losses="):
    parse_targets(text)


def test_targets_are_sorted_high_to_low_without_repeats():
  assert parse_targets("1.6, 2.0,1.8,2.0") == (2.0, 1.8, 1.6)


def test_the_plot_stars_each_target_where_it_was_reached(tmp_path, evals):
  from jaxdp.analysis.viz import loss_figure, target_marks
  steps = sorted(evals)
  workdir = tmp_path / "run"
  run(workdir, 20, [evals[steps[1]]])
  assert target_marks(str(workdir)) == [(steps[1], evals[steps[1]])]
  eval_axes = loss_figure([str(workdir)]).axes[1]
  starred = [line for line in eval_axes.get_lines() if line.get_marker() == "*"]
  assert [(line.get_xdata()[0], line.get_ydata()[0]) for line in starred] == [(steps[1], evals[steps[1]])]


def test_config_target_losses_reach_the_built_in_run_metrics_and_summary(tmp_path, tiny_config, capsys):
  """config.target_losses through train_and_evaluate: a target every evaluation reaches is logged
  once, at the first evaluation; one no evaluation reaches is not logged."""
  from jaxdp.lm.run import train_and_evaluate
  tiny_config.num_steps, tiny_config.eval_every, tiny_config.log_every = 6, 3, 3
  tiny_config.target_losses = "100,0.001"
  workdir = str(tmp_path / "run")
  result = train_and_evaluate(tiny_config, workdir, devices=jax.devices()[:2], progress=False)
  lines = [r for r in read_metrics(workdir) if r.get("event") == "target_reached"]
  assert [(line["target"], line["step"]) for line in lines] == [(100.0, 3)]
  assert lines[0]["tokens"] == 3 * tiny_config.global_batch_size * tiny_config.seq_len
  assert result["targets_reached"] == lines
  assert "target eval_loss 100: step 3," in capsys.readouterr().out


def test_a_bad_config_target_is_refused_by_validation(tiny_config):
  from jaxdp.lm.config import validate
  tiny_config.target_losses = "2.0,x"
  with pytest.raises(JaxdpError, match=r"config.target_losses='2.0,x': 'x' is not a number"):
    validate(tiny_config, 2)
