"""GPU-specific code paths, run by tools/gpu_check.sh on a machine with an NVIDIA GPU (marker
`gpu`; every test skips on other backends): cuDNN attention, bf16/fp16 on tensor cores, the
optimizer state offloaded to pinned host memory, the allocator's memory statistics, the datasheet
peak, and ZeRO-2's reduce-scatter when more than one GPU is visible.

Run: JAX_PLATFORMS=cuda,cpu python -m pytest -m gpu tests/test_gpu.py
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.lm import build, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.models.common import attention, reference_attention
from jaxdp.runtime import observe, peaks
from jaxdp.runtime.metrics import read_metrics

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs an NVIDIA GPU "
                                 "(JAX_PLATFORMS=cuda,cpu)")]


def gpus():
  return [d for d in jax.devices() if d.platform == "gpu"]


def small_config(**fields):
  c = load_preset("tiny_cpu")
  c.model.n_layer, c.model.d_model, c.model.n_head, c.seq_len = 2, 128, 4, 128
  c.global_batch_size, c.warmup_steps = 8, 2
  for name, value in fields.items():
    setattr(c, name, value)
  return c


def losses_of(config, devices, steps: int = 4):
  trainer = build(config, devices)
  state = trainer.init_state()
  out = []
  for i in range(steps):
    state, metrics = trainer.dp.step(state, trainer.train_batch(i))
    out.append(metrics)
  return [float(m["train_loss"]) for m in jax.device_get(out)], state, trainer


def test_cudnn_attention_matches_the_reference_forward_and_backward():
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 256, 4, 64)), jnp.bfloat16) for _ in range(3))

  def loss(fn, q, k, v):
    return jnp.sum(fn(q, k, v).astype(jnp.float32) ** 2)
  cudnn = lambda q, k, v: attention(q, k, v, "cudnn")  # noqa: E731
  ref = lambda q, k, v: reference_attention(q.astype(jnp.float32), k.astype(jnp.float32),  # noqa: E731
                                            v.astype(jnp.float32))
  np.testing.assert_allclose(np.asarray(jax.jit(cudnn)(q, k, v), np.float32),
                             np.asarray(ref(q, k, v)), atol=3e-2, rtol=3e-2)
  g_cudnn = jax.jit(jax.grad(lambda *a: loss(cudnn, *a), argnums=(0, 1, 2)))(q, k, v)
  g_ref = jax.grad(lambda *a: loss(ref, *a), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_cudnn, g_ref):
    scale = float(jnp.max(jnp.abs(b)))
    assert float(jnp.max(jnp.abs(a.astype(jnp.float32) - b))) < 0.05 * scale


@pytest.mark.parametrize("attention_impl", ["xla", "cudnn"])
def test_bf16_training_tracks_fp32(attention_impl):
  fp32, _, _ = losses_of(small_config(), gpus()[:1])
  bf16, _, _ = losses_of(small_config(precision="bf16", attention=attention_impl), gpus()[:1])
  np.testing.assert_allclose(bf16, fp32, rtol=0.02)


def test_fp16_with_loss_scaling_trains_without_skips():
  losses, state, _ = losses_of(small_config(precision="fp16", num_steps=10), gpus()[:1], steps=10)
  assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
  assert int(state.skipped_steps) == 0


def test_offloaded_optimizer_state_lives_in_pinned_host_memory_and_changes_nothing():
  on_device, _, _ = losses_of(small_config(strategy="zero1"), gpus()[:1])
  offloaded, state, _ = losses_of(small_config(strategy="zero1", offload_optimizer=True), gpus()[:1])
  kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state) if hasattr(x, "sharding")}
  assert kinds == {"pinned_host"}
  np.testing.assert_allclose(offloaded, on_device, rtol=1e-6)


def test_allocator_statistics_and_datasheet_peak():
  devices = gpus()[:1]
  assert observe.allocator_peak_bytes(devices) is not None
  peak = peaks.step_peak(devices, jnp.bfloat16)
  if peaks.datasheet_peak_flops(devices[0].device_kind, jnp.bfloat16) is not None:
    assert peak.source == "datasheet"
  else:  # An unknown GPU: a timed matmul, named as such.
    assert peak.source == "measured" and peak.flops_per_sec > 0


def test_a_run_logs_allocator_memory_and_mfu_on_gpu(tmp_path):
  config = small_config(precision="bf16", num_steps=6, log_every=3, eval_every=0)
  train_and_evaluate(config, str(tmp_path), devices=gpus()[:1], progress=False)
  records = read_metrics(str(tmp_path))
  start = next(r for r in records if r.get("event") == "start")
  assert start["peak_memory_source"] == "memory_stats"
  for line in (r for r in records if "train_loss" in r):
    assert 0 < line["mfu"] < 1 and line["peak_memory_bytes"] > 0


def test_zero2_reduce_scatters_gradients_over_two_gpus():
  if len(gpus()) < 2:
    pytest.skip("one GPU: nothing to scatter")
  config = small_config(strategy="zero2")
  trainer = build(config, gpus()[:2])
  text = trainer.train_step.lower(trainer.abstract_state(), trainer.train_batch(0)).compile().as_text()
  assert "reduce-scatter" in text
