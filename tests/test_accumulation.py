"""Gradient accumulation is token-weighted and equals one large batch."""

import functools

import jax
import numpy as np
import pytest

from jaxdp.core import step as steps
from jaxdp.lm import build
from jaxdp.lm.config import load_preset


@pytest.fixture(scope="module")
def trainer():
  return build(load_preset("tiny_cpu"), jax.devices()[:1])


def uneven_batch(trainer, step, accum):
  """A real batch with ragged padding: each row keeps a random prefix of its tokens."""
  batch = trainer.dataset.train(step)
  rows, seq_len = batch["inputs"].shape[1], batch["inputs"].shape[2]
  lengths = np.random.default_rng(step).integers(1, seq_len + 1, size=rows)
  batch["weights"] = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.float32)[None]
  return {k: v.reshape((accum, -1) + v.shape[2:]) for k, v in batch.items()}


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulation_equals_one_large_batch_with_uneven_tokens(trainer, accum):
  step_fn = jax.jit(functools.partial(steps.train_step, loss_fn=trainer.model.loss_fn, tx=trainer.tx))
  big = small = jax.device_get(trainer.init_state())
  for s in range(5):
    big, big_m = step_fn(big, uneven_batch(trainer, s, 1))
    small, small_m = step_fn(small, uneven_batch(trainer, s, accum))
    np.testing.assert_allclose(small_m["train_loss"], big_m["train_loss"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(small.params), jax.tree.leaves(big.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)


def test_token_weighting_is_not_a_mean_of_micro_batch_means(trainer):
  """Micro-batches with different token counts: the step loss is the mean over all tokens."""
  batch = uneven_batch(trainer, 0, 2)
  logits = jax.vmap(lambda x: trainer.model.module.apply({"params": trainer.init_state().params}, x))(
      batch["inputs"])
  import optax
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
  w = batch["weights"]
  token_mean = float((losses * w).sum() / w.sum())
  per_micro = (losses * w).sum(axis=(1, 2)) / w.sum(axis=(1, 2))
  step_fn = jax.jit(functools.partial(steps.train_step, loss_fn=trainer.model.loss_fn, tx=trainer.tx))
  _, metrics = step_fn(jax.device_get(trainer.init_state()), batch)
  np.testing.assert_allclose(float(metrics["train_loss"]), token_mean, rtol=1e-5)
  assert abs(float(per_micro.mean()) - token_mean) > 1e-4  # The two really differ on this batch.


def test_accumulation_on_devices_all_reduces_once(tiny_config):
  tiny_config.grad_accum_steps = 4
  trainer = build(tiny_config, jax.devices()[:4])
  batch = trainer.train_batch(0)
  hlo = trainer.train_step.lower(trainer.init_state(), batch).compile().as_text()
  # One all-reduce for gradients, loss and token count; none inside the accumulation loop.
  assert hlo.count("all-reduce(") + hlo.count("all-reduce-start(") == 1
