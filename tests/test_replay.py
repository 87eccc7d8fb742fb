"""`jaxdp replay` / `jaxdp.replay_step`: one step of a run re-run from its checkpoints, on the run's
device count and on others, its loss against the logged one and the loss of every row.

The default mode uses the session's `tiny_run` (2 devices, 2 steps, every step logged, one
checkpoint at the end: its steps replay from the initial state). The fixed-order reduction has
one 4-device run of its own (3 steps, checkpoints at 2 and 3, two micro-batches per step, dropout
on so that the rows' randomness is checked too), replayed on 1 device. ~30 s of CPU in all.
"""

import json
import math
import os
import shutil

import cli_inprocess
import jax
import numpy as np
import pytest

import jaxdp
from jaxdp.errors import JaxdpError
from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.lm.replay import ReplayResult, RowLoss, logged_steps
from jaxdp.runtime.metrics import read_metrics

# XLA's default optimisations: a step replayed on other devices, bitwise (tests/conftest.py).
pytestmark = pytest.mark.default_xla


def train_lines(workdir):
  return {r["step"]: r for r in read_metrics(workdir) if "train_loss" in r}


def bits(x):
  return np.float32(x).tobytes()


def weighted_mean(result):
  losses = np.array([r.loss for r in result.rows], np.float64)
  tokens = np.array([r.tokens for r in result.rows], np.float64)
  return float(np.sum(losses * tokens) / np.sum(tokens))


@pytest.fixture(scope="module")
def fixed_order4(tmp_path_factory):
  c = load_preset("tiny_cpu")
  c.num_steps, c.log_every, c.checkpoint_every, c.eval_steps = 3, 1, 2, 1
  c.grad_accum_steps, c.model.n_layer, c.model.dropout = 2, 1, 0.1
  c.reduction = "fixed_order"
  workdir = str(tmp_path_factory.mktemp("replay") / "run")
  train_and_evaluate(c, workdir, devices=jax.devices()[:4], progress=False)
  return workdir


def test_default_mode_on_the_run_s_devices_gives_the_logged_loss_bitwise(tiny_run):
  workdir = str(tiny_run[0])
  logged = train_lines(workdir)[2]
  # Step 2 is the update from the state after step 1; the run's only checkpoint is step 2, and
  # the run started from its seed here: from the initial state, step 1 is replayed first.
  steps = []
  result = jaxdp.replay_step(workdir, 2, devices=jax.devices()[:2], progress=lambda *a: steps.append(a))
  assert (result.step, result.from_step, result.replayed_steps, result.num_devices) == (2, 0, 1, 2)
  assert steps == [(1, 1)]
  # metrics.jsonl's JSON floats round-trip the float32 values the step computed.
  assert bits(result.train_loss) == bits(logged["train_loss"])
  assert bits(result.grad_norm) == bits(logged["grad_norm"])
  assert result.logged_train_loss == logged["train_loss"] and result.applied
  assert result.logged_grad_norm == logged["grad_norm"]
  # Every row of the global batch of 16, each seq_len tokens of weight 1.
  assert [r.row for r in result.rows] == list(range(16))
  assert all(r.tokens == 32 for r in result.rows) and len({r.loss for r in result.rows}) == 16
  assert weighted_mean(result) == pytest.approx(result.train_loss, rel=2e-6)


def test_a_fixed_order_run_on_4_devices_replays_bitwise_on_one(fixed_order4):
  lines = train_lines(fixed_order4)
  # Step 3 from checkpoint 2; step 2 from the initial state, replaying step 1 first.
  for step, start in ((3, 2), (2, 0)):
    result = jaxdp.replay_step(fixed_order4, step, devices=jax.devices()[:1])
    assert (result.from_step, result.replayed_steps, result.num_devices) == (start, step - 1 - start, 1)
    assert bits(result.train_loss) == bits(lines[step]["train_loss"]), (result.train_loss, lines[step])
    assert bits(result.grad_norm) == bits(lines[step]["grad_norm"])
    assert [r.row for r in result.rows] == list(range(16))  # Both micro-batches' rows.
    # The rows' own sums are added in another order than the tree's: equal within rounding.
    assert weighted_mean(result) == pytest.approx(result.train_loss, rel=2e-6)


def test_the_cli_prints_json_and_rows_worst_first(tiny_run, capfd):
  workdir = str(tiny_run[0])
  result = cli_inprocess.run(capfd, "replay", "--workdir", workdir, "--step", "2", "--json",
                             "--cpu_devices", "8", "--noprogress")
  assert result.returncode == 0, result.stderr
  out = json.loads(result.stdout)
  assert {"step", "train_loss", "grad_norm", "rows"} <= set(out) and out["step"] == 2
  assert out["from_step"] == 0 and out["replayed_steps"] == 1 and out["num_devices"] == 8
  assert [sorted(r) for r in out["rows"]] == [["loss", "row", "tokens"]] * 16
  # 8 devices add the sums in another order than the run's 2: equal within float32 rounding.
  logged = train_lines(workdir)[2]
  assert out["train_loss"] == pytest.approx(logged["train_loss"], rel=1e-6)
  assert out["grad_norm"] == pytest.approx(logged["grad_norm"], rel=1e-5)
  text = cli_inprocess.run(capfd, "replay", "--workdir", workdir, "--step", "2", "--cpu_devices", "8")
  assert text.returncode == 0, text.stderr
  lines = text.stdout.splitlines()
  assert lines[0] == (f"jaxdp replay: step 2 of {workdir}, from the initial state (replayed 1 step "
                      "before it) on 8 devices")
  # Each of the step's two numbers beside the one the run logged (8 devices: within rounding).
  assert lines[1].startswith("  train_loss ") and "(logged " in lines[1]
  assert lines[2].startswith("  grad_norm ") and f"(logged {logged['grad_norm']:.9g}" in lines[2]
  assert out["logged_grad_norm"] == logged["grad_norm"]
  rows = [line.split() for line in lines[5:]]
  assert len(rows) == 16
  losses = [float(r[1]) for r in rows]
  assert losses == sorted(losses, reverse=True)
  assert sorted(int(r[0]) for r in rows) == list(range(16))
  assert [r["loss"] for r in sorted(out["rows"], key=lambda r: -r["loss"])] == pytest.approx(losses,
                                                                                         abs=1e-6)


def refused(capfd, *argv):
  result = cli_inprocess.run(capfd, "replay", *argv, "--cpu_devices", "8")
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error:"), result.stderr
  return lines[0]


def test_steps_the_run_cannot_replay_are_refused_in_one_line(fixed_order4, tmp_path, capfd):
  beyond = refused(capfd, "--workdir", fixed_order4, "--step", "4")
  assert "beyond the run" in beyond and "reached step 3" in beyond and "between 1 and 3" in beyond
  assert "--step" in refused(capfd, "--workdir", fixed_order4, "--step", "0")
  with pytest.raises(JaxdpError, match="numbered from 1"):
    jaxdp.replay_step(fixed_order4, -1)
  # Checkpoints without the run's metrics (copied elsewhere, say): nothing shows the run started
  # from its seed there, so a step before the first kept checkpoint has nothing to start from.
  copy = str(tmp_path / "copy")
  shutil.copytree(fixed_order4, copy)
  os.remove(os.path.join(copy, "metrics.jsonl"))
  early = refused(capfd, "--workdir", copy, "--step", "2")
  assert "no checkpoint at or before step 1" in early and "give --step between 3 and 3" in early
  empty = refused(capfd, "--workdir", str(tmp_path / "nothing"), "--step", "2")
  assert "has no checkpoints" in empty


def test_logged_steps_reads_single_step_lines_and_the_run_s_start():
  records = [{"event": "start", "step": 0}, {"step": 1, "train_loss": 3.0},
             {"step": 2, "train_loss": 2.5}, {"step": 4, "train_loss": 2.0},  # Steps 3-4: a mean.
             {"event": "resume", "step": 2}, {"step": 3, "train_loss": 2.25},
             {"step": 3, "eval_loss": 2.6}, {"event": "nonfinite_halt", "step": 6}]
  single, highest, fresh = logged_steps(records)
  assert {s: r["train_loss"] for s, r in single.items()} == {1: 3.0, 2: 2.5, 3: 2.25}
  assert highest == 6 and fresh
  # A spike's rollback to step 2 (after the line of step 4): the run goes on from step 2.
  rolled = records[:4] + [{"event": "rollback", "step": 4, "to_step": 2, "skipped_batches": [3]},
                          {"step": 3, "train_loss": 2.2}, {"step": 4, "train_loss": 2.1}]
  assert {s: r["train_loss"] for s, r in logged_steps(rolled)[0].items()} == {1: 3.0, 2: 2.5, 3: 2.2,
                                                                             4: 2.1}
  # A spike skipped under spike_policy="skip" is an event carrying the step's loss, written just
  # before the step's own train line: that line still covers the step alone.
  skipped = [{"event": "start", "step": 0}, {"step": 1, "train_loss": 3.0},
             {"event": "loss_spike_skipped", "step": 2, "train_loss": 9.0},
             {"step": 2, "train_loss": 9.0, "grad_norm": 4.0}]
  assert logged_steps(skipped)[0][2] == {"step": 2, "train_loss": 9.0, "grad_norm": 4.0}
  assert logged_steps(records[1:])[2] is False


def test_rows_worst_first_put_non_finite_losses_first():
  rows = tuple(RowLoss(row=i, loss=loss, tokens=1.0) for i, loss in
               enumerate([1.0, math.nan, 3.0, math.inf, 2.0]))
  result = ReplayResult(step=1, train_loss=math.nan, grad_norm=math.nan, rows=rows, from_step=0,
                        replayed_steps=0, num_devices=1, applied=False)
  assert [r.row for r in result.worst_first()] == [1, 3, 2, 4, 0]
  row = result.to_json()["rows"][1]
  assert row["row"] == 1 and math.isnan(row["loss"]) and row["tokens"] == 1.0
