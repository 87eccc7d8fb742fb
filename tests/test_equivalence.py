"""N devices train exactly like one: shard_map and pmap against a plain reference loop."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp import parallel
from jaxdp.core.losses import cross_entropy_sum
from jaxdp.core.optimizer import make_optimizer
from jaxdp.data import Dataset
from jaxdp.lm import build
from jaxdp.lm.config import load_preset
from jaxdp.lm.spec import data_spec, model_config, optimizer_config
from jaxdp.models.gpt import GPT

STEPS = 10
RTOL = 1e-5


@pytest.fixture(scope="module")
def config():
  return load_preset("tiny_cpu")


@pytest.fixture(scope="module")
def reference_losses(config):
  """A plain single-device loop, written here without jaxdp.steps: mean loss, grad, update."""
  dataset = Dataset(data_spec(config))
  model = GPT(model_config(config, 256))
  tx = make_optimizer(optimizer_config(config))
  init_key = jax.random.split(jax.random.PRNGKey(config.seed))[0]  # jaxdp's split of the seed.
  params = nn.unbox(model.init(init_key, jnp.zeros((1, config.seq_len), jnp.int32))["params"])
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, inputs, targets):
    def loss_fn(p):
      logits = model.apply({"params": p}, inputs)
      total, count = cross_entropy_sum(logits, targets, jnp.ones(targets.shape))
      return total / count
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for s in range(STEPS):
    batch = dataset.train(s)
    params, opt_state, loss = step(params, opt_state, batch["inputs"].reshape(-1, config.seq_len),
                                   batch["targets"].reshape(-1, config.seq_len))
    losses.append(float(loss))
  return np.array(losses), params


def run_shard_map(config, num_devices):
  trainer = build(config, jax.devices()[:num_devices])
  state = trainer.init_state()
  losses = []
  for s in range(STEPS):
    state, metrics = trainer.train_step(state, trainer.train_batch(s))
    losses.append(float(metrics["train_loss"]))
  return np.array(losses), state.params


def assert_params_close(a, b, rtol):
  # atol: Adam divides by sqrt(v), so a coordinate whose gradient is ~0 turns float32
  # reduction-order noise into update noise of up to ~1e-3 of one step (lr=3e-3); 1e-5 is far
  # below any real divergence (a wrong gradient moves parameters by ~lr per step).
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=1e-5)


@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_shard_map_dp_matches_single_device_reference(config, reference_losses, num_devices):
  ref_losses, ref_params = reference_losses
  losses, params = run_shard_map(config, num_devices)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert_params_close(params, ref_params, rtol=1e-4)


def test_pmap_entry_matches_shard_map(config):
  n = 4
  trainer = build(config, jax.devices()[:n])
  pmapped = parallel.pmap_train_step(trainer.model.loss_fn, trainer.tx)
  host_state = jax.device_get(trainer.init_state())
  state = parallel.replicate(host_state, n)
  pmap_losses = []
  for s in range(STEPS):
    state, metrics = pmapped(state, parallel.split_for_pmap(trainer.dataset.train(s), n))
    # Every device must hold the same averaged result.
    assert np.all(np.asarray(metrics["train_loss"]) == np.asarray(metrics["train_loss"])[0])
    pmap_losses.append(float(metrics["train_loss"][0]))
  shard_losses, shard_params = run_shard_map(config, n)
  np.testing.assert_allclose(pmap_losses, shard_losses, rtol=RTOL)
  assert_params_close(parallel.unreplicate(state.params), shard_params, rtol=1e-5)


def test_dropout_masks_do_not_depend_on_device_count(config):
  cfg = config.copy_and_resolve_references()
  cfg.model.dropout = 0.1
  one, _ = run_shard_map(cfg, 1)
  four, _ = run_shard_map(cfg, 4)
  np.testing.assert_allclose(four, one, rtol=RTOL)
  no_dropout, _ = run_shard_map(config, 1)
  assert np.abs(one - no_dropout).max() > 1e-3  # Dropout really is on.
