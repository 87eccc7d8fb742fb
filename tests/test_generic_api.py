"""Any model gets every jaxdp technique: a custom MLP with a custom loss, an NNX module and a
Linen module, under every strategy and device count, against plain optax loops written here."""

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxdp
from jaxdp.parallel import CommConfig
import jaxdp.runtime.checkpoint

STEPS = 10
RTOL = 1e-5
GLOBAL_BATCH = 32


def init_mlp(rng):
  """A plain-function model: a dict of arrays, no Flax."""
  k1, k2 = jax.random.split(rng)
  return {"w1": jax.random.normal(k1, (12, 24)) * 0.3, "b1": jnp.zeros(24),
          "w2": jax.random.normal(k2, (24, 3)) * 0.3}


def mlp(params, x):
  return jax.nn.relu(x @ params["w1"] + params["b1"]) @ params["w2"]


def huber_loss(params, batch, rng):
  """A custom, example-weighted regression loss: (sum of weighted Huber losses, sum of weights)."""
  del rng
  per_example = optax.huber_loss(mlp(params, batch["x"]), batch["y"]).sum(-1)
  return jnp.sum(batch["w"] * per_example), jnp.sum(batch["w"])


def make_batches(n=STEPS, seed=0):
  rs = np.random.RandomState(seed)
  return [{"x": rs.randn(GLOBAL_BATCH, 12).astype(np.float32),
           "y": rs.randn(GLOBAL_BATCH, 3).astype(np.float32),
           "w": rs.uniform(0.2, 2.0, GLOBAL_BATCH).astype(np.float32)} for _ in range(n)]


BATCHES = make_batches()


def tx():
  return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2, weight_decay=0.1))


def reference(init_fn, loss_fn, batches, seed=0):
  """A plain single-device optax loop: the weighted mean loss, its gradient, the update."""
  params = init_fn(jax.random.split(jax.random.PRNGKey(seed))[0])  # jaxdp's split of the seed.
  opt = tx()
  opt_state = opt.init(params)

  @jax.jit
  def step(params, opt_state, batch):
    def mean_loss(p):
      total, weight = loss_fn(p, batch, None)
      return total / weight
    loss, grads = jax.value_and_grad(mean_loss)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for batch in batches:
    params, opt_state, loss = step(params, opt_state, batch)
    losses.append(float(loss))
  return np.array(losses), params


@pytest.fixture(scope="module")
def mlp_reference():
  return reference(init_mlp, huber_loss, BATCHES)


def train(dp, init_fn, batches, seed=0):
  state = dp.init_state(init_fn, seed)
  losses = []
  for batch in batches:
    state, metrics = dp.step(state, batch)
    losses.append(metrics["train_loss"])
  return np.array(jax.device_get(losses)), state


def assert_same_params(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "zero3"])
@pytest.mark.parametrize("num_devices", [1, 2, 4, 8])
def test_custom_mlp_matches_a_plain_optax_loop(mlp_reference, strategy, num_devices):
  dp = jaxdp.DataParallel(huber_loss, tx(), strategy=strategy, devices=jax.devices()[:num_devices])
  losses, state = train(dp, init_mlp, BATCHES)
  ref_losses, ref_params = mlp_reference
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert_same_params(state.params, ref_params)
  assert int(state.step) == STEPS


@pytest.mark.parametrize("strategy", ["dp", "zero1", "zero2", "zero3"])
def test_custom_mlp_with_grad_accumulation_matches_one_large_batch(mlp_reference, strategy):
  dp = jaxdp.DataParallel(huber_loss, tx(), strategy=strategy, devices=jax.devices()[:2],
                          grad_accum_steps=4)
  losses, state = train(dp, init_mlp, BATCHES)
  np.testing.assert_allclose(losses, mlp_reference[0], rtol=RTOL)
  assert_same_params(state.params, mlp_reference[1])


def test_zero3_splits_the_custom_models_parameters():
  dp = jaxdp.DataParallel(huber_loss, tx(), strategy="zero3", devices=jax.devices()[:4])
  state = dp.init_state(init_mlp, 0)
  w1 = state.params["w1"]
  assert w1.addressable_shards[0].data.size == w1.size // 4


class NnxMLP(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(12, 24, rngs=rngs)
    self.fc2 = nnx.Linear(24, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc2(jax.nn.relu(self.fc1(x)))


GRAPHDEF = nnx.split(NnxMLP(nnx.Rngs(0)), nnx.Param)[0]


def nnx_init(rng):
  return nnx.split(NnxMLP(nnx.Rngs(rng)), nnx.Param)[1]


def nnx_loss(params, batch, rng):
  """The NNX module rebuilt from its parameter State: no branch in the step for NNX."""
  del rng
  per_example = optax.huber_loss(nnx.merge(GRAPHDEF, params)(batch["x"]), batch["y"]).sum(-1)
  return jnp.sum(batch["w"] * per_example), jnp.sum(batch["w"])


@pytest.mark.parametrize("strategy,num_devices", [("dp", 4), ("zero3", 4), ("zero1", 8)])
def test_nnx_model_matches_a_plain_optax_loop(strategy, num_devices):
  ref_losses, ref_params = reference(nnx_init, nnx_loss, BATCHES)
  dp = jaxdp.DataParallel(nnx_loss, tx(), strategy=strategy, devices=jax.devices()[:num_devices])
  losses, state = train(dp, nnx_init, BATCHES)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert_same_params(state.params, ref_params)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(24)(x)))


def linen_init(rng):
  return LinenMLP().init(rng, jnp.zeros((1, 12)))["params"]


def linen_loss(params, batch, rng):
  del rng
  per_example = optax.huber_loss(LinenMLP().apply({"params": params}, batch["x"]), batch["y"]).sum(-1)
  return jnp.sum(batch["w"] * per_example), jnp.sum(batch["w"])


@pytest.mark.parametrize("strategy", ["dp", "zero2"])
def test_linen_model_matches_a_plain_optax_loop(strategy):
  ref_losses, ref_params = reference(linen_init, linen_loss, BATCHES)
  dp = jaxdp.DataParallel(linen_loss, tx(), strategy=strategy, devices=jax.devices()[:4],
                          grad_accum_steps=2)
  losses, state = train(dp, linen_init, BATCHES)
  np.testing.assert_allclose(losses, ref_losses, rtol=RTOL)
  assert_same_params(state.params, ref_params)


def dropout_loss(params, batch, rng):
  """Dropout on the hidden layer, keyed per example by jaxdp.example_keys."""
  h = jax.nn.relu(batch["x"] @ params["w1"] + params["b1"])
  if rng is not None:
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 0.7, (h.shape[-1],)))(
        jaxdp.example_keys(rng, batch))
    h = jnp.where(keep, h / 0.7, 0.0)
  per_example = optax.huber_loss(h @ params["w2"], batch["y"]).sum(-1)
  return jnp.sum(batch["w"] * per_example), jnp.sum(batch["w"])


def test_randomness_is_keyed_by_example_not_device():
  one, _ = train(jaxdp.DataParallel(dropout_loss, tx(), devices=jax.devices()[:1]), init_mlp, BATCHES[:4])
  four, _ = train(jaxdp.DataParallel(dropout_loss, tx(), devices=jax.devices()[:4],
                                     grad_accum_steps=2), init_mlp, BATCHES[:4])
  np.testing.assert_allclose(four, one, rtol=RTOL)
  plain, _ = train(jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:1]), init_mlp, BATCHES[:4])
  assert np.abs(one - plain).max() > 1e-3  # The dropout really is on.


def fit(dp, workdir, num_steps, **kwargs):
  return jaxdp.fit(dp, init_mlp, lambda s: BATCHES[s % len(BATCHES)], workdir=str(workdir),
                   num_steps=num_steps, eval_batches=lambda: BATCHES[:2], eval_every=3,
                   checkpoint_every=3, log_every=1, progress=False, **kwargs)


def test_fit_resumes_a_custom_model_bitwise(tmp_path):
  straight = fit(jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2]), tmp_path / "a", 9)
  fit(jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2]), tmp_path / "b", 6)
  resumed = fit(jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2]), tmp_path / "b", 9)
  assert resumed["step"] == straight["step"] == 9
  assert resumed["train_loss"] == straight["train_loss"]
  assert resumed["eval_loss"] == straight["eval_loss"]
  a = jaxdp.runtime.checkpoint.Checkpointer(str(tmp_path / "a"), create=False)
  b = jaxdp.runtime.checkpoint.Checkpointer(str(tmp_path / "b"), create=False)
  dp = jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2])
  target = dp.abstract_state(init_mlp, 0)
  state_a, _ = a.restore(9, target)
  state_b, _ = b.restore(9, target)
  for x, y in zip(jax.tree.leaves(state_a), jax.tree.leaves(state_b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_custom_checkpoint_restores_on_another_device_count_and_strategy(tmp_path):
  fit(jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2]), tmp_path, 3)
  saved = jaxdp.runtime.checkpoint.Checkpointer(str(tmp_path), create=False)
  two = jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2])
  state_2, _ = saved.restore(3, two.abstract_state(init_mlp, 0))
  four = jaxdp.DataParallel(huber_loss, tx(), strategy="zero3", devices=jax.devices()[4:8])
  state_4, _ = saved.restore(3, four.abstract_state(init_mlp, 0))
  assert "data" in str(state_4.params["w1"].sharding.spec)
  for x, y in zip(jax.tree.leaves(state_2), jax.tree.leaves(state_4)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # And it trains on from there exactly as the 2-device dp run does.
  next_2, m2 = two.step(state_2, BATCHES[3])
  next_4, m4 = four.step(state_4, BATCHES[3])
  np.testing.assert_allclose(float(m4["train_loss"]), float(m2["train_loss"]), rtol=RTOL)




@pytest.mark.parametrize("comm", [None, CommConfig(sync="local_sgd", sync_every=2)])
def test_nan_policies_for_any_model_and_local_sgd(comm):
  bad = dict(BATCHES[1], x=np.full_like(BATCHES[1]["x"], np.inf))
  batches = [BATCHES[0], bad, BATCHES[2]]
  skip = jaxdp.DataParallel(huber_loss, optax.sgd(1e-2), devices=jax.devices()[:2], comm=comm,
                            nan_policy="skip")
  state = skip.init_state(init_mlp, 0)
  for batch in batches:
    state, metrics = skip.step(state, batch)
  assert int(metrics["skipped_steps"]) == 1 and int(state.step) == 3
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
  halt = jaxdp.DataParallel(huber_loss, optax.sgd(1e-2), devices=jax.devices()[:2], comm=comm,
                            nan_policy="halt")
  state = halt.init_state(init_mlp, 0)
  state, _ = halt.step(state, batches[0])
  good = jax.device_get(state.params)
  for batch in batches[1:]:
    state, metrics = halt.step(state, batch)
  # Halt: the state froze at the last good step, for the loop to save and stop.
  assert int(state.step) == 1 and int(metrics["consecutive_skips"]) > 0
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(good)):
    np.testing.assert_array_equal(np.asarray(x), y)


def test_bad_arguments_are_one_clear_error():
  with pytest.raises(jaxdp.JaxdpError, match="strategy='zero4' is not one of"):
    jaxdp.DataParallel(huber_loss, tx(), strategy="zero4")
  with pytest.raises(jaxdp.JaxdpError, match="precision='fp8'"):
    jaxdp.DataParallel(huber_loss, tx(), precision="fp8")
  dp = jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:4])
  with pytest.raises(jaxdp.JaxdpError, match="call init_state"):
    dp.step(None, BATCHES[0])
  state = dp.init_state(init_mlp, 0)
  odd = {k: v[:30] for k, v in BATCHES[0].items()}
  with pytest.raises(jaxdp.JaxdpError, match="not divisible by data devices"):
    dp.step(state, odd)


def test_out_of_memory_is_one_line_with_the_number_and_the_fixes():
  def exhausted(params, batch, rng):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 81604378624 "
                       "bytes.\nBufferAssignment OOM Debugging.\n" + "details\n" * 30)
  dp = jaxdp.DataParallel(exhausted, tx(), devices=jax.devices()[:2])
  with pytest.raises(jaxdp.JaxdpError) as error:
    dp.init_state(init_mlp, 0)
    dp.step(dp.init_state(init_mlp, 0), BATCHES[0])
  message = str(error.value)
  assert "\n" not in message and "81604378624 bytes" in message and "grad_accum_steps" in message
  other = jaxdp.DataParallel(lambda p, b, r: 1 / 0, tx(), devices=jax.devices()[:2])
  with pytest.raises(ZeroDivisionError):  # Any other error is left as it is.
    other.step(other.init_state(init_mlp, 0), BATCHES[0])


def test_a_step_too_big_for_memory_is_refused_before_it_runs():
  def outer_product_loss(params, batch, rng):  # A [192000, 192000] float32 temporary: ~137 GiB.
    h = jnp.tile(mlp(params, batch["x"]), (1, 64000))
    return jnp.sum(h.T @ h) * 0 + huber_loss(params, batch, rng)[0], jnp.sum(batch["w"])
  dp = jaxdp.DataParallel(outer_product_loss, tx(), devices=jax.devices()[:2])
  state = dp.init_state(init_mlp, 0)
  with pytest.raises(jaxdp.JaxdpError) as error:
    dp.step(state, BATCHES[0])
  message = str(error.value)
  assert "\n" not in message and "GiB per device" in message and "grad_accum_steps" in message
  assert not state.step.is_deleted()  # Refused before running: the state was not donated.
  fits = jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2])
  _, metrics = fits.step(fits.init_state(init_mlp, 0), BATCHES[0])
  assert np.isfinite(float(metrics["train_loss"]))  # A step that fits passes the same check.


@pytest.mark.parametrize("loss,message", [
    (lambda p, b, r: jnp.sum(mlp(p, b["x"])), "must return (loss_sum, weight_sum)"),
    (lambda p, b, r: (jnp.sum(mlp(p, b["x"]), -1), 1.0), "as scalars summed over the batch"),
])
def test_a_loss_that_breaks_the_contract_is_named(loss, message):
  dp = jaxdp.DataParallel(loss, tx(), devices=jax.devices()[:2])
  with pytest.raises(jaxdp.JaxdpError, match=message.replace("(", r"\(").replace(")", r"\)")):
    dp.step(dp.init_state(init_mlp, 0), BATCHES[0])


def test_a_python_int_weight_is_accepted():
  def loss(p, b, r):
    return huber_loss(p, dict(b, w=np.ones(b["x"].shape[0], np.float32)), r)[0], b["x"].shape[0]
  dp = jaxdp.DataParallel(loss, tx(), devices=jax.devices()[:2])
  _, metrics = dp.step(dp.init_state(init_mlp, 0), BATCHES[0])
  assert np.isfinite(float(metrics["train_loss"]))


def test_misuse_is_one_clear_error():
  with pytest.raises(jaxdp.JaxdpError, match="must be a list of JAX devices"):
    jaxdp.DataParallel(huber_loss, tx(), devices=2)
  bf16 = lambda rng: jax.tree.map(lambda x: x.astype(jnp.bfloat16), init_mlp(rng))  # noqa: E731
  with pytest.raises(jaxdp.JaxdpError, match="keep the master parameters in float32"):
    jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2]).init_state(bf16, 0)
  dp = jaxdp.DataParallel(huber_loss, tx(), devices=jax.devices()[:2])
  state = dp.init_state(init_mlp, 0)
  with pytest.raises(jaxdp.JaxdpError, match="give a dict of arrays"):
    dp.step(state, (BATCHES[0]["x"], BATCHES[0]["y"]))
  dp.step(state, BATCHES[0])
  with pytest.raises(jaxdp.JaxdpError, match="consumed by an earlier step"):
    dp.step(state, BATCHES[1])
  with pytest.raises(jaxdp.JaxdpError, match="pad it to a multiple of 2 rows with zero weights"):
    dp.evaluate(dp.init_state(init_mlp, 0).params,
                [{k: v[:31] for k, v in BATCHES[0].items()}])


def test_evaluate_needs_no_train_state(mlp_reference):
  _, params = mlp_reference
  dp = jaxdp.DataParallel(huber_loss, tx(), strategy="zero2", devices=jax.devices()[:4])
  total = sum(float(huber_loss(params, b, None)[0]) for b in BATCHES[:2])
  weight = sum(float(huber_loss(params, b, None)[1]) for b in BATCHES[:2])
  np.testing.assert_allclose(dp.evaluate(params, BATCHES[:2]), total / weight, rtol=1e-5)


def test_fit_resumes_an_nnx_model(tmp_path):
  def go(num_steps):
    return jaxdp.fit(jaxdp.DataParallel(nnx_loss, tx(), strategy="zero1", devices=jax.devices()[:2]),
                     nnx_init, lambda s: BATCHES[s % len(BATCHES)], workdir=str(tmp_path),
                     num_steps=num_steps, checkpoint_every=3, progress=False)
  go(3)
  resumed = go(6)
  ref_losses, _ = reference(nnx_init, nnx_loss, BATCHES[:6])
  assert resumed["step"] == 6
  # The final log line averages the steps since the resume: 4, 5 and 6.
  np.testing.assert_allclose(resumed["train_loss"], np.mean(ref_losses[3:6]), rtol=RTOL)


def test_generation_and_hugging_face_export_are_public_api():
  from jaxdp.lm import hf_export
  from jaxdp.models import sampling
  assert jaxdp.generate is sampling.generate and jaxdp.export_hf is hf_export.export
  assert {"generate", "export_hf"} <= set(jaxdp.__all__)
