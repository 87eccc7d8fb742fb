"""Communication methods: collectives against psum, compression invariants, sync modes, bytes."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from jaxdp.core import step as steps
from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.lm.config import load_preset, validate
from jaxdp.lm.spec import comm_config
from jaxdp.parallel import DataParallel, collectives
from jaxdp.parallel.exchange import CommConfig, bytes_per_step, reduce_gradients
from jaxdp.parallel.hlo import collective_bytes
from jaxdp.runtime.checkpoint import Checkpointer

SGD = optax.sgd(0.5)  # Plain SGD: the optimizer error feedback's guarantees are stated for.


def mapped(fn, n, out_specs=P("data")):
  mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=out_specs,
                               check_vma=False))


@pytest.mark.parametrize("n", [2, 4, 8])
@pytest.mark.parametrize("method", ["ring", "ps"])
def test_allreduce_equals_psum(n, method):
  fn = {"ring": collectives.ring_allreduce_sum, "ps": collectives.ps_allreduce_sum}[method]
  for size in (1, 13, 64, 1001):  # 13 and 1001 are not divisible by 2, 4 or 8.
    x = jax.random.normal(jax.random.PRNGKey(size), (n, size))
    got = mapped(lambda v: fn(v[0], "data")[None], n)(x)
    want = mapped(lambda v: jax.lax.psum(v[0], "data")[None], n)(x)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-6)
    assert (np.asarray(got) == np.asarray(got)[0]).all(), "devices disagree"


def test_topk_keeps_exactly_k_per_device():
  v = jax.random.normal(jax.random.PRNGKey(0), (4, 1000))
  k = collectives.num_kept(0.01, 1000)
  sent = mapped(lambda x: collectives.densify(*collectives.topk_select(x[0], k), 1000)[None], 4)(v)
  assert k == 10
  assert ((np.asarray(sent) != 0).sum(axis=1) == k).all()
  for row, full in zip(np.asarray(sent), np.asarray(v)):  # ...and they are the largest.
    assert np.abs(row).max() > 0 and np.sort(np.abs(full))[-k] == np.abs(row[row != 0]).min()


def test_sparse_mean_is_correct_when_devices_pick_different_indices():
  v = jax.random.normal(jax.random.PRNGKey(1), (4, 50))
  def fn(x):
    values, indices = collectives.topk_select(x[0], 5)
    return collectives.sparse_mean(values, indices, 50, "data")[None]
  got = np.asarray(mapped(fn, 4)(v))
  dense = [np.asarray(collectives.densify(*collectives.topk_select(row, 5), 50)) for row in v]
  picked = [set(np.flatnonzero(d)) for d in dense]
  assert len(set.union(*picked)) > 5, "the test needs devices to pick different indices"
  np.testing.assert_allclose(got[0], np.mean(dense, axis=0), atol=1e-6)


def test_error_feedback_transmitted_plus_residual_equals_raw_sum():
  n, shape, num_steps = 4, (37, 5), 6
  cfg = CommConfig(compression="topk", compression_ratio=0.05)
  raw = jax.random.normal(jax.random.PRNGKey(2), (num_steps, n) + shape)
  def fn(grads):  # grads [1, steps, ...] on each device.
    residual = {"residual": jnp.zeros((1, np.prod(shape)))}
    applied = jnp.zeros(shape)
    for t in range(num_steps):
      g, _, tokens, residual = reduce_gradients({"w": grads[0, t]}, jnp.float32(0), jnp.float32(1),
                                                residual, jax.random.PRNGKey(t), cfg, "data")
      applied = applied + g["w"]
    return applied[None], residual["residual"]
  applied, residual = mapped(fn, n)(jnp.moveaxis(raw, 1, 0))
  # Per step the applied gradient is the mean over devices of what they sent, so summed over
  # steps: applied + mean residual == mean over devices of the raw gradient sums.
  lhs = np.asarray(applied[0]).reshape(-1) + np.asarray(residual).mean(axis=0)
  np.testing.assert_allclose(lhs, np.asarray(raw.sum(0).mean(0)).reshape(-1), atol=1e-5)
  assert np.abs(np.asarray(residual)).max() > 0.1, "nothing was left behind: the test is vacuous"


def test_randomk_error_obeys_bound():
  """Biased random-k (kept entries unscaled): E||C(g) - g||^2 = (d - k)/d ||g||^2 exactly."""
  d, k, seeds = 1000, 100, 4000
  g = jax.random.normal(jax.random.PRNGKey(3), (d,))
  def error(key):
    idx = collectives.randomk_indices(key, d, k)
    return jnp.sum((collectives.densify(g[idx], idx, d) - g) ** 2)
  errors = np.asarray(jax.vmap(error)(jax.random.split(jax.random.PRNGKey(4), seeds)))
  bound = (d - k) / d * float(jnp.sum(g ** 2))
  stderr = errors.std() / np.sqrt(seeds)
  print(f"random-k: mean error {errors.mean():.3f}, bound {bound:.3f}, stderr {stderr:.3f}")
  assert errors.mean() <= bound + 3 * stderr
  assert errors.mean() >= bound - 3 * stderr  # It is an equality in expectation.
  topk_error = float(jnp.sum((collectives.densify(*collectives.topk_select(g, k), d) - g) ** 2))
  assert topk_error <= bound  # Top-k is never worse than random-k's expectation.


@pytest.mark.parametrize("codec,tol", [("bf16", 1e-2), ("int8", 2e-2)])
def test_quantized_mean_is_close_to_mean(codec, tol):
  v = jax.random.normal(jax.random.PRNGKey(5), (4, 3000))
  got = mapped(lambda x: collectives.quantized_mean(x[0], codec, "data")[0][None], 4)(v)
  err = np.abs(np.asarray(got[0]) - np.asarray(v.mean(0))).max()
  assert err < tol * np.abs(np.asarray(v)).max()
  assert (np.asarray(got) == np.asarray(got)[0]).all()


# --- Bytes: counted from HLO, against what each method is designed to send -----------------------

def reduce_bytes(cfg: CommConfig, n: int, d: int) -> float:
  def fn(g):
    # Loss and token count computed from the data, so XLA cannot fold their reduction away.
    grads, loss, tokens, _ = reduce_gradients({"w": g[0]}, g[0].sum(), 1 + g[0, 0] ** 2,
                                              {"residual": jnp.zeros((1, d))}, jax.random.PRNGKey(0),
                                              cfg, "data")
    return grads["w"][None], loss[None]
  hlo = mapped(fn, n, (P("data"), P("data"))).lower(jnp.zeros((n, d))).compile().as_text()
  return collective_bytes(hlo)


def test_counted_bytes_match_collective_payloads():
  n, d = 4, 4096
  k = collectives.num_kept(0.01, d)
  scalars = 2 * (n - 1) / n * 8  # The pmean of (loss sum, token count) that rides along.
  expected = {
      CommConfig(): 2 * (n - 1) / n * (4 * d + 8),
      CommConfig(allreduce="ring"): 2 * (n - 1) * 4 * -(-(d + 2) // n),
      CommConfig(compression="topk"): (n - 1) * k * (4 + 4) + scalars,  # f32 values + s32 indices.
      CommConfig(compression="randomk"): 2 * (n - 1) / n * 4 * k + scalars,  # Values only.
      CommConfig(compression="bf16"): 2 * (n - 1) / n * 2 * d + scalars,
      # int8 payload plus one f32 scale per 256 entries, in both phases.
      CommConfig(compression="int8"): 2 * (n - 1) / n * (d + 4 * d // collectives.INT8_CHUNK) + scalars,
  }
  for cfg, want in expected.items():
    got = reduce_bytes(cfg, n, d)
    print(f"{cfg.allreduce}/{cfg.compression}: {got['bytes']:.0f} bytes/device, by kind {got['by_kind']}")
    assert got["bytes"] == pytest.approx(want), cfg
  dense = expected[CommConfig()]
  assert expected[CommConfig(compression="topk")] < 0.05 * dense  # Top-k 1%: well under dense.
  ps = reduce_bytes(CommConfig(allreduce="ps"), n, d)
  # The server sends the sum to N-1 devices; on average, 2(N-1)/N of the message per device.
  assert ps["max_device_bytes"] == pytest.approx((n - 1) * 4 * (d + 2))
  assert ps["bytes"] == pytest.approx(2 * (n - 1) / n * 4 * (d + 2))


# --- Training: the real step under each method (compiled once per module) -----------------------

def sgd_trainer(n=4, **fields):
  config = load_preset("tiny_cpu")
  config.eval_steps = 8  # Less noisy validation loss for the comparisons.
  config.update(fields)
  trainer = build(config, jax.devices()[:n])
  # The config's model, data, mesh and communication method, with plain SGD as the optimizer.
  dp = DataParallel(trainer.model.loss_fn, SGD, strategy="dp", mesh=trainer.mesh,
                    grad_accum_steps=config.grad_accum_steps, precision=config.precision,
                    comm=comm_config(config), nan_policy=config.nan_policy,
                    max_consecutive_skips=config.max_consecutive_skips)
  trainer = dataclasses.replace(trainer, dp=dp)
  trainer.abstract_state()  # Builds the layout, state shardings and compiled steps.
  assert trainer.tx is SGD and trainer.dp.comm == comm_config(config)
  return trainer


def run(trainer, num_steps):
  state = trainer.init_state()
  for i in range(num_steps):
    state, _ = trainer.train_step(state, trainer.train_batch(i))
  return state


@pytest.fixture(scope="module")
def dense():
  return sgd_trainer()


@pytest.fixture(scope="module")
def topk_ef():
  return sgd_trainer(compression="topk", compression_ratio=0.01, error_feedback=True)


def test_dense_step_matches_single_device_reference(dense):
  state = dense.init_state()
  batch = dense.train_batch(0)
  got, _ = dense.train_step(state, batch)
  reference = jax.jit(functools.partial(steps.train_step, loss_fn=dense.model.loss_fn, tx=SGD,
                                        compute_dtype=dense.dp.compute_dtype))
  want, _ = reference(jax.device_get(dense.init_state()), jax.device_get(batch))
  for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_topk_one_percent_with_error_feedback_tracks_dense(dense, topk_ef):
  num_steps = dense.config.num_steps
  no_ef = sgd_trainer(compression="topk", compression_ratio=0.01, error_feedback=False)
  losses = {name: t.evaluate(run(t, num_steps).params)
            for name, t in (("dense", dense), ("topk1%+EF", topk_ef), ("topk1% no EF", no_ef))}
  print(f"val loss after {num_steps} SGD steps on 4 devices: {losses}")
  assert losses["topk1%+EF"] <= 1.05 * losses["dense"]
  assert losses["topk1% no EF"] > 1.02 * losses["topk1%+EF"]


def test_residual_is_checkpointed_and_restored(topk_ef, tmp_path):
  state = run(topk_ef, 3)
  assert np.abs(np.asarray(state.comm["residual"])).max() > 0
  assert state.comm["residual"].sharding.spec == P("data")
  checkpoints = Checkpointer(str(tmp_path))
  checkpoints.save(3, state, {"step": 3})
  checkpoints.wait()
  restored, _ = checkpoints.restore(3, topk_ef.abstract_state())
  checkpoints.close()
  np.testing.assert_array_equal(restored.comm["residual"], state.comm["residual"])
  assert restored.comm["residual"].sharding.spec == P("data")


# Bitwise between two programs (the stale exchange at staleness 0 and the dense one): XLA's
# default code generation, as users run it (tests/conftest.py).
@pytest.mark.default_xla
def test_stale_zero_equals_every_step_exactly(dense):
  stale = sgd_trainer(sync="stale", staleness=0)
  a, b = run(dense, 3), run(stale, 3)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_array_equal(x, y)


def test_local_sgd_every_step_equals_dense_sgd_and_bytes_fall_by_h(dense):
  local = sgd_trainer(sync="local_sgd", sync_every=1)
  a, b = run(dense, 3), run(local, 3)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  state = local.init_state()
  hlo_1 = local.train_step.lower(state, local.train_batch(0)).compile().as_text()
  counted = collective_bytes(hlo_1)
  params_bytes = 4 * sum(x.size for x in jax.tree.leaves(state.params))
  assert counted["conditional_bytes"] == pytest.approx(1.5 * params_bytes)  # The average, pmean.
  per_step = {h: bytes_per_step(CommConfig(sync="local_sgd", sync_every=h), hlo_1) for h in (1, 8)}
  always = counted["bytes"] - counted["conditional_bytes"]
  print(f"local_sgd bytes/step: H=1 {per_step[1]:.0f}, H=8 {per_step[8]:.0f} (metrics {always:.0f})")
  # Between syncs only one pmean of four float32 scalars travels: the three metrics (loss sum,
  # token count, gradient norm) and the finiteness vote of the NaN policy, on 4 devices.
  n = local.mesh.size
  assert always == pytest.approx(2 * (n - 1) / n * 4 * 4)
  assert per_step[8] - always == pytest.approx((per_step[1] - always) / 8)
  dense_bytes = dense.comm_bytes_per_step(dense.init_state())
  assert per_step[1] == pytest.approx(dense_bytes, rel=1e-3)


def test_comm_config_errors_name_the_field():
  config = load_preset("tiny_cpu")
  for field, value in (("allreduce", "tree"), ("compression", "fp4"), ("compression_ratio", 0.0),
                       ("sync", "async"), ("sync_every", 0), ("staleness", -1)):
    bad = load_preset("tiny_cpu")
    bad[field] = value
    with pytest.raises(JaxdpError, match=f"config.{field}="):
      validate(bad, 4)
  config.sync, config.compression = "local_sgd", "topk"
  with pytest.raises(JaxdpError, match="config.sync='local_sgd'"):
    validate(config, 4)
