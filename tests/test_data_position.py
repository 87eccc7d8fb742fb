"""Issue 31 fault 3: the data position is the examples consumed, so a run whose global batch
changes (a resume with another global_batch_size, or config.batch_ramp) trains on every example
once: none skipped, none repeated. Tiny runs on one device; the ids trained on are recorded at
DataParallel.step (the batches the steps really took)."""

import jax
import numpy as np
import pytest

from jaxdp.data.schedule import DataSchedule, parse_ramp
from jaxdp.errors import JaxdpError
from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.parallel.data_parallel import DataParallel
from jaxdp.runtime.checkpoint import Checkpointer


def config(num_steps, global_batch_size, ramp=""):
  c = load_preset("tiny_cpu")
  c.num_steps, c.global_batch_size, c.batch_ramp = num_steps, global_batch_size, ramp
  c.eval_every, c.checkpoint_every, c.log_every, c.lr_decay_steps = 0, 3, 1, 6
  return c


@pytest.fixture
def trained_ids(monkeypatch):
  """The example ids of every step's batch, in order, as the steps received them."""
  seen: list[np.ndarray] = []
  step = DataParallel.step

  def recording(self, state, batch):
    seen.append(np.asarray(jax.device_get(batch["ids"])).ravel())
    return step(self, state, batch)
  monkeypatch.setattr(DataParallel, "step", recording)
  return seen


def train(workdir, c, **kwargs):
  return train_and_evaluate(c, str(workdir), devices=jax.devices()[:1], progress=False, **kwargs)


def meta(workdir, step):
  checkpoints = Checkpointer(str(workdir), create=False)
  try:
    return checkpoints.restore_meta(step)
  finally:
    checkpoints.close()


@pytest.mark.slow
def test_a_larger_global_batch_on_resume_continues_where_the_data_stopped(tmp_path, trained_ids):
  train(tmp_path, config(3, 8))
  assert meta(tmp_path, 3)["examples_seen"] == 24
  train(tmp_path, config(5, 16), allow_config_change=True)
  sizes = [len(ids) for ids in trained_ids]
  assert sizes == [8, 8, 8, 16, 16]
  consumed = np.concatenate(trained_ids)
  np.testing.assert_array_equal(np.sort(consumed), np.arange(56))  # Each example once.
  assert meta(tmp_path, 5)["examples_seen"] == 56
  assert meta(tmp_path, 5)["data_schedule"] == [[0, 0, 8], [3, 24, 16]]


@pytest.mark.slow
def test_a_batch_ramp_consumes_every_example_once_and_resumes_bitwise(tmp_path, trained_ids):
  ramp = "4:2,8:2"  # Steps 0-1 take 4 examples, 2-3 take 8, then global_batch_size 16.
  straight = train(tmp_path / "straight", config(6, 16, ramp))
  sizes = [len(ids) for ids in trained_ids]
  assert sizes == [4, 4, 8, 8, 16, 16]
  np.testing.assert_array_equal(np.sort(np.concatenate(trained_ids)), np.arange(56))
  trained_ids.clear()
  train(tmp_path / "resumed", config(3, 16, ramp))
  resumed = train(tmp_path / "resumed", config(6, 16, ramp))
  np.testing.assert_array_equal(np.sort(np.concatenate(trained_ids)), np.arange(56))
  assert meta(tmp_path / "resumed", 6)["examples_seen"] == 56
  for a, b in zip(jax.tree.leaves(straight["state"].params), jax.tree.leaves(resumed["state"].params)):
    a, b = np.asarray(a), np.asarray(b)
    assert np.array_equal(a.view(np.uint32), b.view(np.uint32))


def test_schedules_continue_from_the_position_reached():
  ramp = parse_ramp("4:2,8:2", 16)
  assert ramp.segments == ((0, 0, 4), (2, 8, 8), (4, 24, 16))
  assert [ramp.start(s) for s in range(6)] == [0, 4, 8, 16, 24, 40]
  assert ramp.continued(3, ramp) == ramp  # A plain resume changes nothing.
  changed = DataSchedule.constant(8).continued(3, ramp)  # A ramp added at step 3.
  assert changed.segments == ((0, 0, 8), (4, 32, 16))
  assert [changed.start(s) for s in range(6)] == [0, 8, 16, 24, 32, 48]
  for bad in ("8", "8:0", "x:2", "-4:2"):
    with pytest.raises(JaxdpError, match="config.batch_ramp=.* is not BATCH:STEPS"):
      parse_ramp(bad, 16)


def test_a_ramp_stage_that_cannot_be_split_is_refused_naming_it():
  from jaxdp.lm.config import validate
  c = config(6, 16, "4:2,6:2")
  with pytest.raises(JaxdpError, match=r"config.batch_ramp='4:2,6:2': a batch of 6 is not divisible "
                                       r"by data devices x grad_accum_steps .* multiples of 4"):
    validate(c, 4)
  validate(config(6, 16, "4:2,8:2"), 4)


def test_a_ramp_stage_larger_than_the_global_batch_is_refused_before_anything_is_written(capfd, tmp_path):
  """A "ramp" that would shrink to global_batch_size: refused in one line naming the field."""
  from cli_inprocess import run
  with pytest.raises(JaxdpError, match=r"config.batch_ramp='64:2': stage '64:2' takes 64 examples .* "
                                       r"more than config.global_batch_size=16"):
    parse_ramp("64:2", 16)
  parse_ramp("8:2,16:2", 16)  # Up to global_batch_size itself.
  workdir = tmp_path / "w"
  # No --cpu_devices in this process: setting up devices would fail the test, so the refusal
  # comes before any JAX work (the schema's check of the stage against global_batch_size).
  result = run(capfd, "train", "--config", "tiny_cpu", "--workdir", str(workdir),
               "--config.batch_ramp=8:1,64:2", "--config.global_batch_size=16")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0].startswith("jaxdp: error: config.batch_ramp='8:1,64:2': stage '64:2'"), lines
  assert "--config.global_batch_size=64 or more" in lines[0], lines
  assert not workdir.exists()


def test_a_ramp_stage_the_devices_cannot_split_is_one_line_naming_the_stage_and_a_ramp_that_works(
    capfd, tmp_path):
  from cli_inprocess import run
  workdir = tmp_path / "w"
  argv = ["train", "--config", "tiny_cpu", "--cpu_devices", "8", "--workdir", str(workdir),
          "--config.global_batch_size=32", "--config.grad_accum_steps=2"]
  result = run(capfd, *argv, "--config.batch_ramp=16:1,20:1")
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0] == ("jaxdp: error: config.batch_ramp='16:1,20:1': a batch of 20 is not divisible by "
                      "data devices x grad_accum_steps = 8 x 2 (stage '20:1'); use multiples of 16 "
                      "in every stage, e.g. --config.batch_ramp=16:1,16:1"), lines
  assert not workdir.exists()
  from jaxdp.lm.config import load_preset, validate
  c = load_preset("tiny_cpu")
  c.global_batch_size, c.grad_accum_steps, c.batch_ramp = 32, 2, "16:1,16:1"
  validate(c, 8)  # The advised ramp is accepted.
