"""Mixed precision, fp16 loss scaling, rematerialisation, attention kernels and compile-once.

The fp32 and fp16 runs are whole 20-step `train_and_evaluate` runs on 2 devices, shared by the
tests below through module fixtures; the fp32 run also records every XLA compilation.
"""

import dataclasses
import functools
import logging
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import models
from jaxdp.core import precision
from jaxdp.core import step as steps
from jaxdp.errors import JaxdpError
from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.models import ModelConfig
from jaxdp.runtime.checkpoint import Checkpointer
from jaxdp.runtime.metrics import read_metrics

COMPILED = re.compile(r"Finished XLA compilation of (\S+)")


def tiny(**fields):
  config = load_preset("tiny_cpu")
  config.attention = "reference"  # fp16 needs it on CPU; every run here uses it so they compare.
  for name, value in fields.items():
    config[name] = value
  return config


class CompileLog(logging.Handler):
  """Collects the names of the functions XLA compiles (from jax_log_compiles)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.names = []

  def emit(self, record):
    match = COMPILED.search(record.getMessage())
    if match:
      self.names.append(match.group(1))


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fp32"))
  log = CompileLog()
  logger = logging.getLogger("jax")
  logger.addHandler(log)
  try:
    with jax.log_compiles(True):
      result = train_and_evaluate(tiny(), workdir, devices=jax.devices()[:2], progress=False)
  finally:
    logger.removeHandler(log)
  return result, log.names


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("fp16"))
  return train_and_evaluate(tiny(precision="fp16"), workdir, devices=jax.devices()[:2],
                            progress=False), workdir


def test_no_recompilation_after_first_step(fp32_run):
  result, compiled = fp32_run
  assert result["step"] == 20
  # 20 train steps and 2 evaluations: each step function is compiled exactly once.
  assert compiled.count("jit(train_step)") == 1, compiled
  assert compiled.count("jit(eval_step)") == 1, compiled


def test_fp16_loss_scaling_trains_within_2_percent_of_fp32(fp32_run, fp16_run):
  (fp32, _), (fp16, _) = fp32_run, fp16_run
  assert fp16["step"] == fp32["step"] == 20
  assert abs(fp16["eval_loss"] - fp32["eval_loss"]) <= 0.02 * fp32["eval_loss"]


def test_fp16_loss_scale_is_in_metrics_and_checkpoint(fp16_run):
  _, workdir = fp16_run
  train_lines = [m for m in read_metrics(workdir) if "train_loss" in m]
  assert all({"loss_scale", "skipped_steps"} <= set(m) for m in train_lines)
  config = tiny(precision="fp16")
  trainer = build(config, jax.devices()[:2])
  checkpoints = Checkpointer(workdir, create=False)
  state, _ = checkpoints.restore(20, trainer.abstract_state())
  checkpoints.close()
  assert state.loss_scale.dynamic and state.loss_scale.period == config.loss_scale_period
  assert float(state.loss_scale.scale) == train_lines[-1]["loss_scale"]
  assert int(state.skipped_steps) == train_lines[-1]["skipped_steps"]


def plain_step(trainer):
  """The plain global step (no mesh) of `trainer`'s loss, optimizer and precision, jitted."""
  return jax.jit(functools.partial(steps.train_step, loss_fn=trainer.model.loss_fn, tx=trainer.tx,
                                   compute_dtype=trainer.dp.compute_dtype))


@pytest.fixture(scope="module")
def fp16_single_device():
  """A jitted single-device fp16 step (period 2, so growth is visible), its state and a batch."""
  config = tiny(precision="fp16", loss_scale_period=2, loss_scale_init=1024.0)
  trainer = build(config, jax.devices()[:1])
  step = plain_step(trainer)
  batch = jax.tree.map(jnp.asarray, trainer.dataset.train(0))
  return step, trainer.init_state(), batch


def test_injected_overflow_halves_scale_and_skips_exactly_that_update(fp16_single_device):
  step, state, batch = fp16_single_device
  # A scale of 2^40 is finite in float32 but overflows float16 in the backward pass.
  injected = state.replace(loss_scale=state.loss_scale.replace(scale=jnp.asarray(2.0 ** 40)))
  overflowed, metrics = step(injected, batch)
  assert np.isfinite(float(metrics["train_loss"])) and not np.isfinite(float(metrics["grad_norm"]))
  assert float(overflowed.loss_scale.scale) == 2.0 ** 39
  assert int(overflowed.skipped_steps) == int(metrics["skipped_steps"]) == 1
  assert int(overflowed.step) == 1
  for old, new in zip(jax.tree.leaves((state.params, state.opt_state)),
                      jax.tree.leaves((overflowed.params, overflowed.opt_state))):
    np.testing.assert_array_equal(np.asarray(old), np.asarray(new))


def test_clean_steps_update_and_double_the_scale_after_period(fp16_single_device):
  step, state, batch = fp16_single_device  # loss_scale_init 1024, period 2.
  good, metrics = step(state, batch)
  assert np.isfinite(float(metrics["grad_norm"])) and int(good.skipped_steps) == 0
  assert float(good.loss_scale.scale) == 1024.0 and int(good.loss_scale.good_steps) == 1
  assert int(good.opt_state[1][0].count) == 1  # Adam took the step (lr is 0 in warmup step 0).
  grown, _ = step(good, batch)
  assert float(grown.loss_scale.scale) == 2048.0 and int(grown.loss_scale.good_steps) == 0
  assert not np.array_equal(np.asarray(grown.params["wte"]["embedding"]),
                            np.asarray(state.params["wte"]["embedding"]))


def test_next_loss_scale_never_goes_below_one():
  scale = precision.initial_loss_scale("fp16", init=1.0, period=5)
  assert float(precision.next_loss_scale(scale, jnp.asarray(False)).scale) == 1.0


def run_steps(config, num_steps: int):
  """(first step's loss, validation loss after num_steps) with the plain jitted step, 1 device."""
  trainer = build(config, jax.devices()[:1])
  step = plain_step(trainer)
  state, losses = trainer.init_state(), []
  for i in range(num_steps):
    state, metrics = step(state, jax.tree.map(jnp.asarray, trainer.dataset.train(i)))
    losses.append(float(metrics["train_loss"]))
  return losses, trainer.evaluate(state.params)


def test_bf16_matches_fp32_within_1_percent():
  """bf16 has an 8-bit mantissa (~0.4% per rounding); over 6 steps the losses agree to 1%."""
  fp32_losses, fp32_eval = run_steps(tiny(), 6)
  bf16_losses, bf16_eval = run_steps(tiny(precision="bf16"), 6)
  np.testing.assert_allclose(bf16_losses, fp32_losses, rtol=0.01)
  assert abs(bf16_eval - fp32_eval) <= 0.01 * fp32_eval


def remat_memory_and_gradients(remat: str, trainer, batch):
  """(compiled temp bytes, loss sum, gradient sums) of one tiny batch with `remat`, 1 device."""
  model = models.build(dataclasses.replace(trainer.model.cfg, remat=remat))
  assert model.module.cfg.remat == remat
  params = trainer.init_state().params
  grad_fn = jax.jit(functools.partial(steps.accumulate_gradients, model.loss_fn))
  compiled = grad_fn.lower(params, batch, jax.random.PRNGKey(0)).compile()
  grads, loss, _ = compiled(params, batch, jax.random.PRNGKey(0))
  return compiled.memory_analysis().temp_size_in_bytes, loss, grads


def test_remat_lowers_compiled_memory_but_not_the_loss():
  trainer = build(tiny(), jax.devices()[:1])
  batch = jax.tree.map(jnp.asarray, trainer.dataset.train(0))
  temp_none, loss_none, grads_none = remat_memory_and_gradients("none", trainer, batch)
  for remat in ("block", "full"):
    temp, loss, grads = remat_memory_and_gradients(remat, trainer, batch)
    assert temp < temp_none, (remat, temp, temp_none)
    np.testing.assert_allclose(float(loss), float(loss_none), rtol=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_none)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_xla_attention_matches_reference():
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 32), 0, 256)
  logits = {}
  for attention in ("xla", "reference"):
    model = models.build(ModelConfig(256, 32, 2, 2, 32, attention=attention))
    params = nn.unbox(model.init_fn(jax.random.PRNGKey(0)))
    logits[attention] = model.module.apply({"params": params}, tokens)
  np.testing.assert_allclose(logits["xla"], logits["reference"], rtol=1e-5, atol=1e-5)


def test_cudnn_attention_on_cpu_is_a_clear_error():
  config = tiny()
  config.attention = "cudnn"
  with pytest.raises(JaxdpError, match="attention='cudnn' needs a GPU"):
    build(config, jax.devices()[:1])


def test_fp16_with_xla_attention_on_cpu_is_a_clear_error():
  config = tiny(precision="fp16")
  config.attention = "xla"
  with pytest.raises(JaxdpError, match="config.attention=reference"):
    build(config, jax.devices()[:1])
