"""The batch-size advisor (`jaxdp plan --advise`): McCandlish et al.'s relations fitted to a run's
logged noise scale, step times per device count, the recommendation, and its refusals."""

import json
import math
import subprocess
import sys

import cli_inprocess
from conftest import cli_env
from hypothesis import given
from hypothesis import strategies as st
import pytest

from jaxdp.analysis import advise
from jaxdp.errors import JaxdpError


def _records(noise_by_step: dict[int, float], evals: dict[int, float]) -> list[dict]:
  """A run's metrics records: train lines with the logged noise scale, then evaluations."""
  lines = [{"step": s, "train_loss": 3.0, "grad_noise_scale_examples": b}
           for s, b in sorted(noise_by_step.items())]
  lines += [{"step": s, "eval_loss": loss} for s, loss in sorted(evals.items())]
  return sorted(lines, key=lambda r: r["step"])


RUN = _records({10: 1.0, 20: 2.0, 30: 4.0, 40: 6.0, 50: 100.0},
               {10: 3.2, 20: 2.9, 30: 2.6, 40: 2.4, 50: 2.3})


def test_the_fit_reproduces_the_reference_runs_steps_to_the_target():
  fit = advise.fit_noise_model(RUN, batch=16, target=2.5)
  assert fit.reference_steps == 40  # The first evaluation at or below 2.5.
  assert fit.steps(16) == pytest.approx(40)
  assert fit.examples(16) == pytest.approx(40 * 16)


def test_the_noise_scale_is_the_mean_over_the_last_quarter_of_the_steps_to_the_target():
  fit = advise.fit_noise_model(RUN, batch=16, target=2.5)
  assert fit.b_noise == pytest.approx((4.0 + 6.0) / 2)  # Steps 30..40; step 50 is after.
  assert fit.s_min == pytest.approx(40 / (1 + fit.b_noise / 16))
  assert fit.e_min == pytest.approx(fit.s_min * fit.b_noise)


def test_no_target_fits_the_runs_last_evaluation_loss():
  fit = advise.fit_noise_model(RUN, batch=16)
  assert (fit.target, fit.reference_steps) == (2.3, 50)


@given(b_noise=st.floats(0.1, 1e4), s_min=st.floats(1, 1e5), batch=st.floats(0.5, 1e5))
def test_predictions_lie_on_the_papers_steps_examples_tradeoff(b_noise, s_min, batch):
  fit = advise.NoiseFit(target=2.0, reference_batch=16, reference_steps=100, b_noise=b_noise,
                        s_min=s_min, e_min=s_min * b_noise)
  steps, examples = fit.steps(batch), fit.examples(batch)
  assert examples == pytest.approx(steps * batch, rel=1e-9)  # E = S x B.
  # (S / S_min - 1)(E / E_min - 1) = 1: McCandlish et al. 2018, eq. 2.11.
  assert (steps / s_min - 1) * (examples / fit.e_min - 1) == pytest.approx(1.0, rel=1e-6)
  assert fit.steps(2 * batch) < steps  # More rows per step, fewer steps ...
  assert fit.examples(2 * batch) > examples  # ... and more examples in all.


@pytest.mark.parametrize("records, target, words", [
    (RUN, 2.0, "--target=2 was never reached: the run's lowest evaluation loss is 2.3000"),
    ([r for r in RUN if "eval_loss" not in r], None, "logged no evaluation loss"),
    ([{k: v for k, v in r.items() if k != "grad_noise_scale_examples"} for r in RUN], 2.5,
     "logged no grad_noise_scale_examples before reaching the target"),
])
def test_a_run_the_model_cannot_be_fitted_to_is_refused_naming_why(records, target, words):
  with pytest.raises(JaxdpError, match=words.replace("(", r"\(")):
    advise.fit_noise_model(records, batch=16, target=target)


def test_the_recommendation_is_the_fewest_predicted_seconds_and_skips_indivisible_pairs():
  fit = advise.NoiseFit(target=2.0, reference_batch=16, reference_steps=100, b_noise=16.0,
                        s_min=50.0, e_min=800.0)
  times = [advise.StepTime("dp", 1, compute_s=0.010, comm_s=0.0, measured_s=0.010),
           advise.StepTime("dp", 4, compute_s=0.004, comm_s=0.002, measured_s=0.006)]
  result = advise.advise(fit, times, batches=[2, 16, 64], seq_len=32)
  pairs = {(r["global_batch"], r["devices"]) for r in result["rows"]}
  assert pairs == {(2, 1), (16, 1), (16, 4), (64, 1), (64, 4)}  # 4 does not divide 2.
  for r in result["rows"]:
    t = next(t for t in times if t.devices == r["devices"])
    assert r["step_s"] == pytest.approx(t.compute_s * r["global_batch"] / 16 + t.comm_s)
    assert r["seconds"] == pytest.approx(fit.steps(r["global_batch"]) * r["step_s"])
    assert r["tokens"] == pytest.approx(fit.examples(r["global_batch"]) * 32)
  best = min(result["rows"], key=lambda r: r["seconds"])
  assert result["recommendation"]["seconds"] == best["seconds"]
  assert f"global batch {best['global_batch']} on {best['devices']} device(s)" in (
      result["recommendation"]["reason"])
  with pytest.raises(JaxdpError, match="no candidate --batches"):
    advise.advise(fit, times[1:], batches=[2, 6], seq_len=32)


@pytest.mark.parametrize("argv, words", [
    (("--workdir", "w"), "--workdir belong(s) to --advise: add --advise"),
    (("--advise",), "--advise needs --workdir"),
    (("--advise", "--workdir", "/nonexistent/run"), "--workdir='/nonexistent/run': no such directory"),
    (("--advise", "--workdir", "w", "--batches", "8,x"), "--batches='8,x' must be positive"),
    (("--advise", "--workdir", "w", "--strategies", "dp,zero9"), "zero9 is not a strategy"),
    (("--advise", "--workdir", "w", "--target", "0"), "--target=0 is out of range"),
])
def test_advise_flags_are_refused_in_one_line(capfd, argv, words):
  done = cli_inprocess.run(capfd, "plan", "--config", "tiny_cpu", *argv)
  assert done.returncode == 2, done.stderr
  lines = done.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error: ") and words in lines[0], lines


def test_a_directory_without_a_runs_metrics_is_refused_in_one_line(capfd, tmp_path):
  done = cli_inprocess.run(capfd, "plan", "--config", "tiny_cpu", "--advise", "--workdir",
                           str(tmp_path))
  assert done.returncode == 2, done.stderr
  line, = done.stderr.strip().splitlines()
  assert line.startswith("jaxdp: error: ") and "holds no metrics.jsonl" in line, line


def test_a_config_whose_batch_differs_from_the_runs_is_refused(capfd, tiny_run):
  workdir, _ = tiny_run
  done = cli_inprocess.run(capfd, "plan", "--config", "tiny_cpu", "--config.global_batch_size=32",
                           "--advise", "--workdir", str(workdir))
  assert done.returncode == 2, done.stderr
  assert "trained about 512 tokens per step but this --config gives 1,024" in done.stderr


@pytest.mark.slow
def test_plan_advise_measures_each_device_count_and_recommends_a_candidate(tiny_run):
  workdir, _ = tiny_run
  done = subprocess.run(
      [sys.executable, "-m", "jaxdp.cli.main", "plan", "--config", "tiny_cpu", "--cpu_devices",
       "2", "--advise", "--workdir", str(workdir), "--device_counts", "1,2", "--strategies", "dp",
       "--repeats", "1", "--batches", "8,16", "--json"],
      capture_output=True, text=True, env=cli_env(), timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout)
  assert {(r["global_batch"], r["devices"]) for r in result["rows"]} == {
      (8, 1), (8, 2), (16, 1), (16, 2)}
  for r in result["rows"]:
    assert r["strategy"] == "dp" and r["step_s"] > 0 and math.isfinite(r["seconds"])
  fit = result["fit"]
  assert fit["reference_batch"] == 16 and fit["reference_steps"] == 2 and fit["b_noise"] > 0
  assert result["recommendation"]["seconds"] == min(r["seconds"] for r in result["rows"])
