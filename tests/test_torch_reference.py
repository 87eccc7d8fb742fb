"""The PyTorch reference of tools/bench.py --compare torch implements jaxdp's model and update.

Given the same weights it has the same parameter count and the same loss at initialisation, and
trained on the same batches with the same AdamW settings it follows jaxdp's losses step by step:
otherwise the benchmark would compare two different things.
"""

import os
import sys

from flax.core import meta
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import torch_reference as ref  # noqa: E402

from jaxdp.core.optimizer import OptimizerConfig, make_optimizer  # noqa: E402
from jaxdp.models import ModelConfig, build  # noqa: E402
from jaxdp.parallel import DataParallel, make_mesh  # noqa: E402

CFG = ModelConfig(family="gpt", n_layer=2, n_head=4, d_model=32, vocab_size=65, seq_len=16)
OPT = dict(learning_rate=3e-3, weight_decay=0.1, b1=0.9, b2=0.99, warmup_steps=3, decay_steps=8,
           min_lr_ratio=0.1)


def batches(steps: int, rows: int = 4):
  rng = np.random.default_rng(0)
  for _ in range(steps):
    # Counting sequences from random starts: learnable, so a few steps move the loss.
    tokens = (rng.integers(0, CFG.vocab_size, (rows, 1)) + np.arange(CFG.seq_len + 1)) % CFG.vocab_size
    weights = np.ones((rows, CFG.seq_len), np.float32)
    weights[-1, CFG.seq_len // 2:] = 0  # Padding must be weighted out the same way.
    yield {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
           "weights": weights, "ids": np.arange(rows, dtype=np.int32)}


def to_torch(batch):
  return {k: torch.from_numpy(v if v.dtype == np.float32 else v.astype(np.int64)) for k, v in batch.items()}


def test_same_weights_give_the_same_parameter_count_and_initial_loss():
  model = build(CFG)
  params = meta.unbox(model.init_fn(jax.random.PRNGKey(0)))
  torch_model = ref.GPT(ref.GPTShape.of(CFG))
  assert ref.param_count(torch_model) == model.param_count == sum(x.size for x in jax.tree.leaves(params))
  ref.load_jaxdp_params(torch_model, params)
  batch = next(batches(1))
  loss_sum, weight_sum = model.loss_fn(params, {k: jnp.asarray(v) for k, v in batch.items()}, None)
  jax_loss = float(loss_sum / weight_sum)
  with torch.no_grad():
    torch_loss = float(ref.loss_fn(torch_model, to_torch(batch)))
  assert abs(jax_loss - torch_loss) < 1e-3 * abs(jax_loss), (jax_loss, torch_loss)


def test_its_own_initialisation_has_jaxdps_scale():
  """A fresh reference (torch's random draw) starts at the same loss as a fresh jaxdp model: both
  draw N(0, 0.02), so the initial loss is near log(V) in both, and the kernels' spread matches."""
  torch.manual_seed(0)
  torch_model = ref.GPT(ref.GPTShape.of(CFG))
  std = float(torch_model.blocks[0].fc.weight.std())
  assert abs(std - 0.02) < 0.002
  assert float(torch_model.blocks[0].ln1.weight.mean()) == 1.0
  assert float(torch_model.blocks[0].qkv.bias.abs().max()) == 0.0


def test_trained_on_the_same_batches_it_follows_jaxdps_losses():
  """Same weights, batches, AdamW, decay mask, clipping and schedule: the same losses per step
  (to float32 rounding accumulated over 8 steps)."""
  model = build(CFG)
  tx = make_optimizer(OptimizerConfig(name="adamw", schedule="cosine", grad_clip=1.0, **OPT))
  dp = DataParallel(model.loss_fn, tx, mesh=make_mesh(jax.devices()[:1]))
  state = dp.init_state(model.init_fn, seed=0)
  torch_model = ref.GPT(ref.GPTShape.of(CFG))
  ref.load_jaxdp_params(torch_model, meta.unbox(jax.device_get(state.params)))
  optimizer, schedule = ref.make_optimizer(torch_model, **OPT)
  jax_losses, torch_losses = [], []
  for batch in batches(8):
    state, metrics = dp.step(state, batch)
    jax_losses.append(float(metrics["train_loss"]))
    loss = ref.loss_fn(torch_model, to_torch(batch))
    optimizer.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    torch_losses.append(float(loss.detach()))
  np.testing.assert_allclose(torch_losses, jax_losses, rtol=1e-4)
  # The losses moved: the comparison is of training, not of a constant.
  assert jax_losses[-1] < jax_losses[0] - 0.05


def test_a_model_the_reference_does_not_implement_is_refused_by_field():
  with pytest.raises(ValueError, match="positions"):
    ref.GPTShape.of(ModelConfig(family="gpt", n_layer=1, n_head=2, d_model=8, vocab_size=10,
                                seq_len=4, positions="learned"))
