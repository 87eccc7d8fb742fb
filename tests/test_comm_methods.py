"""PowerSGD, DGC's warm-up and local clipping, and frozen-variance (1-bit) Adam: invariants,
bytes counted from HLO, and the dense-equivalence of the warm-up."""

import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.lm.config import load_preset, validate
from jaxdp.parallel import powersgd
from jaxdp.parallel.exchange import (
  CommConfig,
  density_at,
  dgc_densities,
  reduce_gradients,
  resize_comm_state,
  stage_bytes,
)
from jaxdp.parallel.hlo import collective_bytes
from jaxdp.runtime.checkpoint import Checkpointer


def mapped(fn, n, out_specs=P("data")):
  mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=out_specs,
                               check_vma=False))


SHAPES = {"w": (24, 16), "k": (6, 2, 5), "b": (16,)}  # A matrix, a 3-D kernel, a vector.


def tree_of(flat):
  out, start = {}, 0
  for name in sorted(SHAPES):  # ravel_pytree's order: sorted dict keys.
    size = math.prod(SHAPES[name])
    out[name] = flat[start:start + size].reshape(SHAPES[name])
    start += size
  return out


D = sum(math.prod(s) for s in SHAPES.values())


def exchange_rows(cfg, grads, state_rows, n):
  """reduce_gradients on n devices: grads [n, D] -> (applied [n, D], new state rows)."""
  def fn(g, state):
    out, _, _, new = reduce_gradients(tree_of(g[0]), g[0].sum(), jnp.float32(1), state,
                                      jax.random.PRNGKey(0), cfg, "data")
    return jax.flatten_util.ravel_pytree(out)[0][None], new
  mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=(P("data"), P("data")), check_vma=False))(grads, state_rows)


def powersgd_state(cfg, n):
  blocks = powersgd.plan_blocks([SHAPES[k] for k in sorted(SHAPES)], cfg.compression_rank)
  q = powersgd.initial_q(blocks, cfg.compression_rank)
  return {"residual": jnp.zeros((n, D)), "powersgd_q": jnp.broadcast_to(q, (n, q.size))}


# --- PowerSGD --------------------------------------------------------------------------------------

def test_powersgd_blocks_send_vectors_and_small_matrices_dense():
  blocks = powersgd.plan_blocks([(16,), (24, 16), (6, 2, 5), (3, 3)], 2)
  assert [b.low_rank for b in blocks] == [False, True, True, False]  # 2 (3 + 3) >= 9: dense.
  assert [(b.n, b.m) for b in blocks] == [(16, 1), (24, 16), (6, 10), (3, 3)]
  assert powersgd.q_size(blocks, 2) == 16 * 2 + 10 * 2


def test_powersgd_error_feedback_identity():
  """Per device and step: applied + new error == gradient + old error (Vogels et al., Alg. 2)."""
  n, cfg = 4, CommConfig(compression="powersgd", compression_rank=2)
  state = powersgd_state(cfg, n)
  for step in range(3):
    grads = jax.random.normal(jax.random.PRNGKey(step), (n, D))
    old = np.asarray(state["residual"])
    applied, state = exchange_rows(cfg, grads, state, n)
    applied, new, total = np.asarray(applied), np.asarray(state["residual"]), np.asarray(grads) + old
    assert (applied == applied[0]).all(), "devices disagree on the applied gradient"
    # Matrices: the applied P Q^T is what each device is credited with sending.
    np.testing.assert_allclose(applied[:, 16:] + new[:, 16:], total[:, 16:], atol=1e-5)
    assert np.abs(new[:, 16:]).max() > 0.1, "rank 2 dropped nothing: the test is vacuous"
    # The vector "b" (sorted keys: b, k, w) travels dense and exactly: no error, the plain mean.
    assert np.abs(new[:, :16]).max() == 0
    np.testing.assert_allclose(applied[0, :16], total[:, :16].mean(0), atol=1e-6)
  assert (np.asarray(state["powersgd_q"]) == np.asarray(state["powersgd_q"])[0]).all()


def test_powersgd_full_rank_reproduces_the_dense_mean():
  n, d = 4, 24 * 16 + 6 * 10
  blocks = [powersgd.Block(0, 24, 16, True), powersgd.Block(24 * 16, 6, 10, True)]
  rank = 16  # >= min(n, m) of both: full rank.
  x = jax.random.normal(jax.random.PRNGKey(7), (n, d))
  q = powersgd.initial_q(blocks, rank)
  got = mapped(lambda v: powersgd.compress_mean(v[0], q, blocks, rank, "data")[0][None],
               n)(x)
  np.testing.assert_allclose(np.asarray(got[0]), np.asarray(x.mean(0)), atol=1e-4)
  low = mapped(lambda v: powersgd.compress_mean(v[0], q, blocks, 1, "data")[0][None], n)(x)
  assert np.abs(np.asarray(low[0]) - np.asarray(x.mean(0))).max() > 0.1  # Rank 1 is lossy.


def test_powersgd_warm_start_converges_to_the_best_rank_r_approximation():
  """Repeated steps on the same matrix are power iterations: P Q^T -> the truncated SVD."""
  n, rank = 2, 2
  blocks = [powersgd.Block(0, 24, 16, True)]
  u, _ = np.linalg.qr(np.random.default_rng(3).normal(size=(24, 16)))
  v, _ = np.linalg.qr(np.random.default_rng(4).normal(size=(16, 16)))
  spectrum = np.array([10.0, 5.0] + [1.0 / (i + 1) for i in range(14)])  # A gap after rank 2.
  m = jnp.asarray((u * spectrum) @ v.T, jnp.float32)
  rows = jnp.broadcast_to(m.reshape(-1), (n, 24 * 16))
  q = powersgd.initial_q(blocks, rank)
  def one(v, q):
    approx, _, q = powersgd.compress_mean(v[0], q[0], blocks, rank, "data")
    return approx[None], q[None]
  step = mapped(one, n)
  q_rows = jnp.broadcast_to(q, (n, q.size))
  for _ in range(30):
    approx, q_rows = step(rows, q_rows)
  u, s, vt = np.linalg.svd(np.asarray(m))
  best = (u[:, :rank] * s[:rank]) @ vt[:rank]
  np.testing.assert_allclose(np.asarray(approx[0]).reshape(24, 16), best, atol=1e-3)


def exchange_hlo(cfg, grads, state) -> str:
  """The compiled HLO of reduce_gradients under cfg on len(grads) devices (grads: [n, D])."""
  n = grads.shape[0]

  def fn(g, s):
    out, loss, _, new = reduce_gradients(tree_of(g[0]), g[0].sum(), 1 + g[0, 0] ** 2, s,
                                         jax.random.PRNGKey(0), cfg, "data")
    return jax.flatten_util.ravel_pytree(out)[0][None], loss[None], new
  mesh = Mesh(np.asarray(jax.devices()[:n]), ("data",))
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("data"), P("data")),
                               out_specs=(P("data"), P("data"), P("data")), check_vma=False)
                 ).lower(grads, state).compile().as_text()


def test_powersgd_bytes_from_hlo_are_the_factors():
  n, rank = 4, 2
  cfg = CommConfig(compression="powersgd", compression_rank=rank)
  state = powersgd_state(cfg, n)
  hlo = exchange_hlo(cfg, jnp.zeros((n, D)), state)
  got = collective_bytes(hlo)
  factors = rank * (24 + 16) + rank * (6 + 10)  # P and Q of "w" and of "k" viewed [6, 10].
  payload = 4 * (factors + 16 + 2)  # f32 factors, the dense vector, the loss and token count.
  print(f"powersgd rank {rank}: {got['bytes']:.0f} bytes/device, by kind {got['by_kind']}")
  assert got["bytes"] == pytest.approx(2 * (n - 1) / n * payload)
  assert got["bytes"] < 0.3 * 2 * (n - 1) / n * 4 * (D + 2)  # Well under dense.


# --- DGC warm-up and local clipping ------------------------------------------------------------

def test_dgc_warmup_density_per_step():
  assert dgc_densities(0.01, 300) == (0.25, 0.0625, 0.015625, 0.01)
  assert dgc_densities(0.01, 0) == (0.01,)
  assert dgc_densities(0.5, 100) == (0.5,)  # Already denser than the first stage: no warm-up.
  cfg = CommConfig(compression="topk", compression_ratio=0.01, compression_warmup_steps=300)
  expected = [0.25] * 100 + [0.0625] * 100 + [0.015625] * 100 + [0.01] * 50
  assert [density_at(cfg, t) for t in range(350)] == expected
  # Four warm-up stages over 6 steps: step t is in stage floor(4 t / 6), then the target.
  short = CommConfig(compression="topk", compression_ratio=0.001, compression_warmup_steps=6)
  assert [density_at(short, t) for t in range(8)] == [
      0.25, 0.25, 0.0625, 0.015625, 0.015625, 0.00390625, 0.001, 0.001]


def test_dgc_warmup_sends_each_stages_k_and_its_bytes():
  n, steps = 2, 8
  cfg = CommConfig(compression="topk", compression_ratio=0.01, compression_warmup_steps=6,
                   error_feedback=False)
  stages = cfg.stages
  assert stages == (0.25, 0.0625, 0.015625, 0.01)
  state = {"count": jnp.zeros((n,), jnp.int32)}
  g = jax.random.normal(jax.random.PRNGKey(1), (1, D))
  grads = jnp.concatenate([g, g])  # Both devices pick the same indices: the mean has k entries.
  for t in range(steps):
    applied, state = exchange_rows(cfg, grads, state, n)
    k = max(1, round(density_at(cfg, t) * D))
    assert int((np.asarray(applied[0]) != 0).sum()) == k, t
  assert np.asarray(state["count"]).tolist() == [steps] * n
  hlo = exchange_hlo(cfg, grads, state)
  scalars = 2 * (n - 1) / n * 8
  want = [(n - 1) * max(1, round(d * D)) * 8 + scalars for d in stages]  # f32 values + s32 indices.
  assert stage_bytes(cfg, hlo) == pytest.approx(want)


def test_local_grad_clip_bounds_each_devices_share():
  n, limit = 4, 0.5
  cfg = CommConfig(compression="bf16", local_grad_clip=limit, error_feedback=False)
  grads = jax.random.normal(jax.random.PRNGKey(2), (n, D)) * jnp.array([0.01, 1, 10, 100])[:, None]
  applied, _ = exchange_rows(cfg, grads, {}, n)
  bound = limit * math.sqrt(n)
  g = np.asarray(grads)
  clipped = g * np.minimum(1, bound / np.linalg.norm(g, axis=1, keepdims=True))
  assert np.linalg.norm(clipped[0]) == pytest.approx(np.linalg.norm(g[0]), rel=1e-6)  # Untouched.
  np.testing.assert_allclose(np.asarray(applied[0]), clipped.mean(0), atol=2e-2 * bound)


# --- Frozen-variance Adam (1-bit Adam) ---------------------------------------------------------

WARMUP = 3


@pytest.fixture(scope="module")
def adam_pair():
  dense = build(load_preset("tiny_cpu"), jax.devices()[:4])
  config = load_preset("tiny_cpu")
  config.update(compression="topk", compression_optimizer="frozen_variance",
                compression_warmup_steps=WARMUP)
  return dense, build(config, jax.devices()[:4])


# Bitwise between two programs (frozen-variance Adam in its warm-up and dense Adam): XLA's
# default code generation, as users run it (tests/conftest.py).
@pytest.mark.default_xla
def test_frozen_variance_equals_dense_adam_bitwise_during_warmup_then_compresses(adam_pair):
  dense, frozen = adam_pair
  a, b = dense.init_state(), frozen.init_state()
  for i in range(WARMUP):
    a, _ = dense.train_step(a, dense.train_batch(i))
    b, _ = frozen.train_step(b, frozen.train_batch(i))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_array_equal(x, y)
  nu = [np.asarray(x) for x in jax.tree.leaves(b.opt_state[0].nu)]
  for i in range(WARMUP, WARMUP + 2):
    a, _ = dense.train_step(a, dense.train_batch(i))
    b, _ = frozen.train_step(b, frozen.train_batch(i))
  for x, y in zip(nu, jax.tree.leaves(b.opt_state[0].nu)):
    np.testing.assert_array_equal(x, y)  # The variance is frozen...
  assert any(np.abs(np.asarray(x) - np.asarray(y)).max() > 0 for x, y in
             zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))  # ...and the runs part.
  assert int(b.opt_state[0].count) == WARMUP + 2
  momentum = np.asarray(b.comm["adam_momentum"])
  assert (momentum == momentum[0]).all() and np.abs(momentum).max() > 0
  hlo = frozen.train_step.lower(b, frozen.train_batch(0)).compile().as_text()
  warm, steady = stage_bytes(frozen.dp.comm, hlo)
  dense_bytes = dense.comm_bytes_per_step(a)
  print(f"frozen variance: warm-up {warm:.0f} B/step (dense {dense_bytes:.0f}), then {steady:.0f}")
  # The dense step's all-reduce also carries each device's squared gradient norm (a float32 for
  # the noise scale's mean, and a float32 [4] with each device's own in its slot for
  # runtime/health.py's device_grad_norm: core/step.py), which the compressed exchange does not.
  assert warm == pytest.approx(dense_bytes - 2 * 3 / 4 * (4 + 4 * 4))
  assert steady < 0.05 * dense_bytes


def test_comm_state_of_new_methods_is_checkpointed_and_resized(tmp_path):
  config = load_preset("tiny_cpu")
  config.update(compression="powersgd", compression_rank=1)
  trainer = build(config, jax.devices()[:4])
  state = trainer.init_state()
  for i in range(2):
    state, _ = trainer.train_step(state, trainer.train_batch(i))
  q = np.asarray(state.comm["powersgd_q"])
  assert (q == q[0]).all() and state.comm["powersgd_q"].sharding.spec == P("data")
  checkpoints = Checkpointer(str(tmp_path))
  checkpoints.save(2, state, {"step": 2})
  checkpoints.wait()
  restored, _ = checkpoints.restore(2, trainer.abstract_state())
  checkpoints.close()
  np.testing.assert_array_equal(restored.comm["powersgd_q"], q)
  resized = resize_comm_state({"powersgd_q": state.comm["powersgd_q"],
                               "count": jnp.full((4,), 5, jnp.int32)}, state.params, 2)
  np.testing.assert_array_equal(resized["powersgd_q"], q[:2])
  assert np.asarray(resized["count"]).tolist() == [5, 5]


@pytest.mark.parametrize("fields,message", [
    ({"compression": "powersgd", "compression_rank": 0}, "config.compression_rank="),
    ({"compression": "topk", "compression_warmup_steps": -1}, "config.compression_warmup_steps="),
    ({"compression": "topk", "local_grad_clip": -1.0}, "config.local_grad_clip="),
    ({"compression": "topk", "compression_optimizer": "onebit"}, "config.compression_optimizer="),
    ({"compression": "topk", "compression_optimizer": "frozen_variance"},
     "compression_warmup_steps >= 1"),
    ({"compression": "topk", "compression_optimizer": "frozen_variance",
      "compression_warmup_steps": 5, "optimizer": "sgd"}, "config.optimizer=adamw"),
    ({"compression": "powersgd", "compression_optimizer": "frozen_variance",
      "compression_warmup_steps": 5}, "config.compression=topk"),
])
def test_new_fields_are_validated(fields, message):
  config = load_preset("tiny_cpu")
  config.update(fields)
  with pytest.raises(JaxdpError, match=message):
    validate(config, 4)


