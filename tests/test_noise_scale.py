"""The gradient noise scale against a closed form: a quadratic loss with known gradient covariance.

Per example e the loss is 0.5 |w - x_e|^2 with x_e ~ N(mu, Sigma), so its gradient w - x_e has
mean G = w - mu and covariance Sigma: |G|^2 and tr(Sigma), hence B_simple = tr(Sigma) / |G|^2,
are known exactly. The learning rate is 0, so G stays put while the step's estimators are
averaged over many batches (each step's estimate is unbiased, so their mean must converge).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp.core.noise import NoiseScaleEMA, noise_terms
from jaxdp.parallel import DataParallel, make_mesh

DIM, BATCH, STEPS = 64, 32, 150
RNG = np.random.default_rng(0)
MU = RNG.normal(size=DIM).astype(np.float32)
W0 = (MU + 2.0 * RNG.normal(size=DIM) / math.sqrt(DIM)).astype(np.float32)  # |G|^2 about 4.
STD = RNG.uniform(0.5, 1.5, size=DIM).astype(np.float32)  # Sigma = diag(STD^2).
G2 = float(np.sum((W0 - MU) ** 2))
TRACE = float(np.sum(STD ** 2))


def loss_fn(params, batch, rng):
  del rng
  return 0.5 * jnp.sum((params["w"] - batch["x"]) ** 2), jnp.float32(batch["x"].shape[0])


def estimates(strategy, devices, accum, replica=1):
  where = ({"mesh": make_mesh(jax.devices()[:devices], data=devices // replica, replica=replica)}
           if replica > 1 else {"devices": jax.devices()[:devices]})
  dp = DataParallel(loss_fn, optax.sgd(0.0), strategy=strategy, grad_accum_steps=accum, **where)
  state = dp.init_state(lambda rng: {"w": jnp.asarray(W0)})
  data = np.random.default_rng(1)
  g2, trace = [], []
  for _ in range(STEPS):
    x = (MU + STD * data.normal(size=(BATCH, DIM))).astype(np.float32)
    state, metrics = dp.step(state, {"x": x})
    g2.append(float(metrics["gns_g2"]))
    trace.append(float(metrics["gns_trace"]))
  return np.array(g2), np.array(trace)


def test_noise_terms_are_the_papers_estimators():
  # Exact expectations plugged in: |G_b|^2 = |G|^2 + tr/b recovers both terms.
  g2, trace = noise_terms(jnp.float32(4 + 64 / 8), jnp.float32(4 + 64 / 32), 8.0, 32.0)
  assert float(g2) == pytest.approx(4.0) and float(trace) == pytest.approx(64.0)
  assert np.isnan(float(noise_terms(jnp.float32(1), jnp.float32(1), 8.0, 8.0)[0]))


@pytest.mark.parametrize("strategy,devices,accum", [
    ("dp", 4, 1),     # Each device's share against the global batch.
    ("dp", 1, 4),     # One device: the accumulation's micro-batches against their sum.
    ("zero1", 4, 2),  # A jit strategy: micro-batches of the global batch.
    ("zero2", 4, 1),  # A jit strategy, one micro-batch: each device's rows of the global batch.
    ("zero3", 2, 1),
])
def test_noise_scale_matches_the_closed_form(strategy, devices, accum):
  g2, trace = estimates(strategy, devices, accum)
  print(f"{strategy} x{devices} accum {accum}: |G|^2 {g2.mean():.3f} (true {G2:.3f}), "
        f"tr {trace.mean():.2f} (true {TRACE:.2f}), B_simple {trace.mean() / g2.mean():.2f} "
        f"(true {TRACE / G2:.2f})")
  assert g2.mean() == pytest.approx(G2, rel=0.1)
  assert trace.mean() == pytest.approx(TRACE, rel=0.1)
  ema = NoiseScaleEMA(decay=0.98)
  for a, b in zip(g2, trace):
    ema.update(a, b)
  assert ema.b_simple == pytest.approx(TRACE / G2, rel=0.1)


def test_no_second_batch_size_gives_nan():
  g2, trace = estimates("dp", 1, 1)
  assert np.isnan(g2).all() and np.isnan(trace).all()
  ema = NoiseScaleEMA()
  for a, b in zip(g2, trace):
    ema.update(a, b)
  assert not ema.available and math.isnan(ema.b_simple)


@pytest.mark.parametrize("replica", [1, 2])  # 2: a hybrid mesh, 2 replica groups of 2.
def test_zero_with_one_micro_batch_measures_each_devices_rows_as_dp_does(replica):
  # The same 4 devices, the same batches: ZeRO's per-device groups must be dp's per-device shares.
  zero_g2, zero_trace = estimates("zero3", 4, 1, replica)
  dp_g2, dp_trace = estimates("dp", 4, 1)
  np.testing.assert_allclose(zero_g2, dp_g2, rtol=1e-4)
  np.testing.assert_allclose(zero_trace, dp_trace, rtol=1e-4)


def test_grouped_gradients_sum_to_the_whole_batchs_gradient():
  from jaxdp.core.step import accumulate_gradients
  x = (MU + STD * np.random.default_rng(2).normal(size=(1, BATCH, DIM))).astype(np.float32)
  params = {"w": jnp.asarray(W0)}
  whole = accumulate_gradients(loss_fn, params, {"x": x}, None)
  grads, loss, count, group_sq = accumulate_gradients(loss_fn, params, {"x": x}, None,
                                                      micro_sq=True, groups=4)
  np.testing.assert_allclose(grads["w"], whole[0]["w"], rtol=1e-5)
  assert float(loss) == pytest.approx(float(whole[1]), rel=1e-6) and float(count) == BATCH
  rows = x[0].reshape(4, BATCH // 4, DIM)
  expected = sum(float(np.sum((W0 - r).mean(axis=0) ** 2)) for r in rows)
  assert float(group_sq) == pytest.approx(expected, rel=1e-5)
  with pytest.raises(ValueError, match="groups=3"):
    accumulate_gradients(loss_fn, params, {"x": x}, None, micro_sq=True, groups=3)


@pytest.mark.parametrize("devices,comm,names", [
    (1, None, ["one data device", "grad_accum_steps > 1"]),
    (4, {"compression": "int8"}, ["compression='int8'", "4 devices", "grad_accum_steps > 1",
                                  "compression='none'"]),
    (2, {"sync": "local_sgd", "sync_every": 2}, ["sync='local_sgd'", "2 devices"]),
])
def test_the_unavailable_note_names_this_runs_cause_and_the_fix(devices, comm, names):
  from jaxdp.parallel.exchange import CommConfig
  from jaxdp.runtime.loop import noise_scale_unavailable
  dp = DataParallel(loss_fn, optax.sgd(0.0), devices=jax.devices()[:devices],
                    comm=CommConfig(**comm) if comm else None)
  line = noise_scale_unavailable(dp)
  assert line.startswith("note: grad_noise_scale is unavailable: ") and "\n" not in line
  for name in names:
    assert name in line, (name, line)


@pytest.mark.parametrize("devices,accum,precision", [(2, 1, "fp16"), (1, 2, "fp16"), (2, 1, "fp32")])
def test_the_note_of_a_run_that_estimates_but_skipped_every_step_names_the_skips(devices, accum,
                                                                                 precision):
  # Issue 31 fault 6: a dense run under fp16 whose every step overflowed was told its exchange
  # "()" never forms the dense mean gradient.
  from jaxdp.runtime.loop import noise_scale_unavailable
  dp = DataParallel(loss_fn, optax.sgd(0.0), devices=jax.devices()[:devices],
                    grad_accum_steps=accum, precision=precision)
  line = noise_scale_unavailable(dp, steps=5, skipped=5)
  assert "()" not in line and "None" not in line and "\n" not in line
  assert "5 of its 5 steps so far were skipped" in line, line
  assert ("fp16 overflow" in line) == (precision == "fp16")
  assert "gradient exchange" not in line and "grad_accum_steps > 1" not in line


def test_every_unavailable_note_names_something():
  # The kind: no note interpolates an empty list or a None.
  from jaxdp.parallel.exchange import CommConfig
  from jaxdp.runtime.loop import noise_scale_unavailable
  for devices in (1, 2):
    for accum in (1, 2):
      for comm in (None, CommConfig(compression="int8"), CommConfig(allreduce="ring")):
        dp = DataParallel(loss_fn, optax.sgd(0.0), devices=jax.devices()[:devices],
                          grad_accum_steps=accum, comm=comm)
        for skipped in (0, 3):
          line = noise_scale_unavailable(dp, steps=3, skipped=skipped)
          assert "()" not in line and "None" not in line and "''" not in line, line
