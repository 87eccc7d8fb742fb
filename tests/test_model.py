"""The model: causal, attention kernels agree, both position encodings work."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.core.tree import count_params
from jaxdp.models.common import ModelConfig
from jaxdp.models.gpt import GPT


def make(positions="rope", attention="xla"):
  cfg = ModelConfig(vocab_size=256, seq_len=16, n_layer=2, n_head=2, d_model=32,
                    positions=positions, attention=attention)
  model = GPT(cfg)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 256)
  params = nn.unbox(model.init(jax.random.PRNGKey(1), tokens)["params"])
  return model, params, tokens


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_future_tokens_do_not_change_past_logits(positions):
  model, params, tokens = make(positions)
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % 256)
  a = model.apply({"params": params}, tokens)
  b = model.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-4


def test_xla_attention_matches_reference():
  model, params, tokens = make(attention="xla")
  ref_model, _, _ = make(attention="reference")
  np.testing.assert_allclose(model.apply({"params": params}, tokens),
                             ref_model.apply({"params": params}, tokens), atol=2e-5)


def test_output_head_is_tied_to_the_embedding():
  model, params, tokens = make()
  assert "lm_head" not in params and params["wte"]["embedding"].shape == (256, 32)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 16, 256) and logits.dtype == jnp.float32
  # 2 blocks x (qkv 32*96+96, proj 32*32+32, fc 32*128+128, proj 128*32+32, 2 LN x 64) + wte + ln_f
  assert count_params(params) == 2 * (3168 + 1056 + 4224 + 4128 + 128) + 256 * 32 + 64
