"""Optimizers, learning-rate schedules and the weight-decay mask (jaxdp/core/optimizer.py), and
the optimizer fields of the config (jaxdp/config.py)."""

import math

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp.core.optimizer import (
  OPTIMIZERS,
  SCHEDULES,
  OptimizerConfig,
  decay_mask,
  learning_rate_schedule,
  make_optimizer,
)
from jaxdp.errors import JaxdpError
import jaxdp.lm.config
import jaxdp.lm.spec
import jaxdp.models

# Learning rates that move each rule clearly on a 4x4 quadratic within a few steps.
QUADRATIC_LR = {"adamw": 0.1, "sgd": 0.05, "lion": 0.1, "adafactor": 0.1, "muon": 0.3}


def rates(cfg, steps):
  schedule = learning_rate_schedule(cfg)
  return np.array([float(schedule(i)) for i in steps])


def quadratic_params():
  return {"dense": {"kernel": jnp.arange(16.0).reshape(4, 4) / 8 - 1, "bias": jnp.ones(4)}}


def quadratic_loss(params):
  return sum(jnp.sum((x - 0.5) ** 2) for x in jax.tree.leaves(params))


def model_params(family, **kwargs):
  """The built-in model's parameters as shapes: the mask reads only paths and ranks, and
  eval_shape traces the init in a fraction of a second where running it eagerly takes ~10 s."""
  m = jaxdp.models.build(jaxdp.models.ModelConfig(vocab_size=64, seq_len=8, n_layer=1, n_head=2,
                                                  d_model=16, family=family, **kwargs))
  return nn.unbox(jax.eval_shape(m.init_fn, jax.random.PRNGKey(0)))


def named(tree):
  """{'a/b/c': leaf} of a pytree, for readable assertions."""
  return {"/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path): x
          for path, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_muon_offered_exactly_when_optax_has_it():
  has_muon = hasattr(optax, "muon") or hasattr(getattr(optax, "contrib", None), "muon")
  assert ("muon" in OPTIMIZERS) == has_muon
  assert OPTIMIZERS[:4] == ("adamw", "sgd", "lion", "adafactor")


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_lowers_a_quadratic(name):
  cfg = OptimizerConfig(name=name, learning_rate=QUADRATIC_LR[name], schedule="constant",
                        weight_decay=0.01, grad_clip=10.0)
  tx = make_optimizer(cfg)
  params = quadratic_params()

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(quadratic_loss)(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params)
  losses = []
  for _ in range(5):
    params, state, loss = step(params, state)
    losses.append(float(loss))
  final = float(quadratic_loss(params))
  assert all(math.isfinite(x) for x in losses + [final])
  assert final < 0.8 * losses[0], (name, losses, final)


def test_warmup_starts_above_zero_and_peaks_at_its_last_step():
  cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=4, decay_steps=100)
  np.testing.assert_allclose(rates(cfg, range(5)), [0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-6)


def test_no_warmup_starts_at_the_peak():
  for schedule in SCHEDULES:
    cfg = OptimizerConfig(learning_rate=0.5, warmup_steps=0, decay_steps=10, schedule=schedule)
    assert rates(cfg, [0])[0] == pytest.approx(0.5)


def test_horizon_inside_warmup_stays_in_warmup():
  # A run shorter than its warmup (lr_decay_steps = num_steps <= warmup_steps) must work.
  for decay_steps in (0, 3, 8):
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=8, decay_steps=decay_steps, min_lr_ratio=0.1)
    np.testing.assert_allclose(rates(cfg, range(8)), np.arange(1, 9) / 8, rtol=1e-6)
    # Past both warmup and horizon the decay is over.
    assert rates(cfg, [8, 20]) == pytest.approx([0.1, 0.1])


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_first_update_moves_the_parameters(name):
  peak, warmup = 0.5, 10
  cfg = OptimizerConfig(name=name, learning_rate=peak, warmup_steps=warmup, decay_steps=100,
                        momentum=0.0)
  tx = make_optimizer(cfg)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  grads = {"w": jnp.array([0.5, -1.0, 2.0])}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)["w"]
  lr0 = peak * 1 / warmup  # peak * (i + 1) / warmup_steps at i = 0.
  g = np.asarray(grads["w"])
  # Adam's first step is g / (|g| + eps) after bias correction; SGD's is g.
  direction = g / (np.abs(g) + 1e-8) if name == "adamw" else g
  np.testing.assert_allclose(new, np.asarray(params["w"]) - lr0 * direction, rtol=1e-6)
  assert not np.allclose(new, params["w"])


def test_schedule_values_closed_form():
  peak, ratio, warmup, horizon = 2.0, 0.1, 2, 12
  low = peak * ratio
  steps = [0, 1, 2, 4, 7, 12, 30]
  warm = [peak * 1 / 2, peak * 2 / 2]
  t = [(i - warmup) / (horizon - warmup) for i in (2, 4, 7, 12)]
  expected = {
      "cosine": warm + [low + (peak - low) * 0.5 * (1 + math.cos(math.pi * x)) for x in t] + [low],
      "linear": warm + [peak - (peak - low) * x for x in t] + [low],
      "constant": warm + [peak] * 5,
  }
  for schedule, values in expected.items():
    cfg = OptimizerConfig(learning_rate=peak, warmup_steps=warmup, decay_steps=horizon,
                          min_lr_ratio=ratio, schedule=schedule)
    np.testing.assert_allclose(rates(cfg, steps), values, rtol=1e-5, err_msg=schedule)
  # wsd: peak until the last 25% of 12 steps (from step 9), then linear to the minimum at 12.
  cfg = OptimizerConfig(learning_rate=peak, warmup_steps=warmup, decay_steps=horizon,
                        min_lr_ratio=ratio, schedule="wsd", decay_fraction=0.25)
  wsd = warm + [peak, peak, peak, peak, peak - (peak - low) * 1 / 3, low, low]
  np.testing.assert_allclose(rates(cfg, [0, 1, 2, 4, 7, 9, 10, 12, 30]), wsd, rtol=1e-5)


def test_cosine_after_warmup_matches_the_previous_optax_schedule():
  cfg = OptimizerConfig(learning_rate=3e-3, warmup_steps=5, decay_steps=40, min_lr_ratio=0.1)
  old = optax.warmup_cosine_decay_schedule(0.0, 3e-3, 5, 40, 3e-4)
  steps = range(5, 50)
  np.testing.assert_allclose(rates(cfg, steps), [float(old(i)) for i in steps], rtol=1e-6)


def test_wsd_shape():
  cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay_steps=100, decay_fraction=0.2,
                        min_lr_ratio=0.0, schedule="wsd")
  lr = rates(cfg, range(110))
  assert np.all(np.diff(lr[:10]) > 0)  # Warmup rises...
  np.testing.assert_allclose(lr[9:81], 1.0, rtol=1e-6)  # ...to a stable plateau up to step 80...
  np.testing.assert_allclose(np.diff(lr[80:101]), -1 / 20, rtol=1e-4)  # ...then a straight decay
  np.testing.assert_allclose(lr[100:], 0.0, atol=1e-7)  # to the minimum, where it stays.


def test_schedule_under_jit():
  for schedule in SCHEDULES:
    cfg = OptimizerConfig(learning_rate=1.0, warmup_steps=3, decay_steps=20, schedule=schedule)
    fn = learning_rate_schedule(cfg)
    jitted = jax.jit(fn)
    for i in (0, 2, 5, 19, 25):
      assert float(jitted(jnp.int32(i))) == pytest.approx(float(fn(i)), rel=1e-6)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_decay_mask_of_the_built_in_models(family):
  params = model_params(family)
  mask = named(decay_mask(params))
  assert set(mask) == set(named(params))
  for path, decayed in mask.items():
    last = path.split("/")[-1]
    norm = any("norm" in n or n.startswith("ln") for n in path.split("/"))
    if last in ("bias", "scale") or norm:
      assert decayed is False, path
    else:
      # kernel, embedding, wq..wo, w_gate/w_up/w_down: every remaining parameter is a matrix.
      assert decayed is True, path
  if family == "gpt":
    assert mask["block_0/attn/qkv/bias"] is False  # Rank 3, but a bias.
    assert mask["block_0/attn/qkv/kernel"] is True
    assert mask["wte/embedding"] is True
    assert mask["ln_f/scale"] is False and mask["block_0/ln1/bias"] is False
  else:
    assert mask["embed/embedding"] is True and mask["block_0/mlp/w_gate"] is True
    assert mask["block_0/attn/wq"] is True
    assert mask["norm/scale"] is False and mask["block_0/attn_norm/scale"] is False


def test_decay_mask_learned_positions_head_and_exclude():
  params = model_params("gpt", positions="learned")
  assert named(decay_mask(params))["wpe"] is True
  assert named(decay_mask(params, exclude=("WPE",)))["wpe"] is False
  assert named(decay_mask(params, exclude=("wpe",)))["wte/embedding"] is True
  assert named(decay_mask(model_params("llama", tie_embeddings=False)))["lm_head"] is True


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_its_state_for_the_built_in_models(name):
  # Rank-3 and rank-4 kernels, rank-3 biases, an untied head: shapes that a rule (Muon's
  # matrices, Adafactor's factoring) or the mask could trip on.
  tx = make_optimizer(OptimizerConfig(name=name, weight_decay=0.1, grad_clip=1.0))
  for params in (model_params("gpt", positions="learned"), model_params("llama", tie_embeddings=False)):
    state = jax.eval_shape(tx.init, params)
    updates, _ = jax.eval_shape(tx.update, params, state, params)
    assert jax.tree.structure(updates) == jax.tree.structure(params)
    assert all(u.shape == p.shape for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params)))


def test_decay_mask_nnx_state_ignores_the_value_attribute():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.fc = nnx.Linear(3, 4, rngs=rngs)
      self.norm = nnx.LayerNorm(4, rngs=rngs)

  _, state = nnx.split(Net(nnx.Rngs(0)), nnx.Param)
  mask = named(decay_mask(state))
  assert mask == {"fc/bias/value": False, "fc/kernel/value": True, "norm/bias/value": False,
                  "norm/scale/value": False}


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_weight_decay_shrinks_decayed_params_with_zero_gradient(name):
  lr, wd = 0.1, 0.5
  cfg = OptimizerConfig(name=name, learning_rate=lr, schedule="constant", weight_decay=wd)
  tx = make_optimizer(cfg)
  params = quadratic_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # Decoupled: p <- p - lr * wd * p, whatever the rule does with a zero gradient.
  np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"] * (1 - lr * wd),
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(new["dense"]["bias"], params["dense"]["bias"], rtol=1e-6)


def test_user_decay_mask_replaces_the_default():
  cfg = OptimizerConfig(name="sgd", learning_rate=0.1, schedule="constant", weight_decay=0.5)
  tx = make_optimizer(cfg, decay_mask=lambda p: jax.tree.map(lambda x: x.ndim == 1, p))
  params = quadratic_params()
  zeros = jax.tree.map(jnp.zeros_like, params)
  new = optax.apply_updates(params, tx.update(zeros, tx.init(params), params)[0])
  np.testing.assert_allclose(new["dense"]["kernel"], params["dense"]["kernel"])
  np.testing.assert_allclose(new["dense"]["bias"], params["dense"]["bias"] * 0.95, rtol=1e-6)


def test_optimizer_config_rejects_out_of_range_values():
  with pytest.raises(JaxdpError, match=r"OptimizerConfig.grad_clip=-1"):
    OptimizerConfig(grad_clip=-1)
  with pytest.raises(JaxdpError, match=r"OptimizerConfig.name='adam'"):
    OptimizerConfig(name="adam")


def test_config_maps_to_optimizer_config():
  config = jaxdp.lm.config.load_preset("tiny_cpu")
  config.optimizer, config.schedule, config.decay_exclude = "sgd", "wsd", "wpe, embedding"
  cfg = jaxdp.lm.spec.optimizer_config(config)
  assert (cfg.name, cfg.schedule, cfg.decay_exclude) == ("sgd", "wsd", ("wpe", "embedding"))
  assert cfg.decay_steps == config.num_steps and cfg.warmup_steps == config.warmup_steps
  assert cfg.grad_clip == config.grad_clip and cfg.momentum == config.momentum


def test_validate_optimizer_accepts_the_presets_and_short_runs():
  config = jaxdp.lm.config.load_preset("tiny_cpu")
  jaxdp.lm.config.validate_optimizer(config)
  config.num_steps = 2  # Shorter than the warmup: it just stays in warmup.
  jaxdp.lm.config.validate_optimizer(config)
  jaxdp.lm.config.validate(config, 8)


@pytest.mark.parametrize("field,value,message", [
    ("grad_clip", -1.0, "config.grad_clip=-1.0 must be >= 0; set config.grad_clip=0"),
    ("optimizer", "adam", "config.optimizer='adam' is not one of adamw, sgd"),
    ("schedule", "step", "config.schedule='step' is not one of"),
    ("momentum", 1.0, "config.momentum=1.0 must be in [0, 1)"),
    ("decay_fraction", 0.0, "config.decay_fraction=0.0 must be in (0, 1]"),
    ("b2", 1.0, "config.b2=1.0 must be in [0, 1)"),
    ("weight_decay", -0.1, "config.weight_decay=-0.1 must be >= 0"),
    ("min_lr_ratio", 1.5, "config.min_lr_ratio=1.5 must be in [0, 1]"),
])
def test_validate_optimizer_names_the_field(field, value, message):
  config = jaxdp.lm.config.load_preset("tiny_cpu")
  config[field] = value
  with pytest.raises(JaxdpError) as error:
    jaxdp.lm.config.validate_optimizer(config)
  assert message in str(error.value)
