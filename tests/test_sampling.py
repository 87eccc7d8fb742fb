"""generate(): reproducible from a seed; top-k and top-p keep exactly the tokens they should."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp.models.common import ModelConfig
from jaxdp.models.gpt import GPT
from jaxdp.models.sampling import filter_logits, generate

VOCAB = 64


@pytest.fixture(scope="module")
def model_and_params():
  model = GPT(ModelConfig(vocab_size=VOCAB, seq_len=16, n_layer=1, n_head=2, d_model=16))
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 16), jnp.int32))["params"])
  # Scale the embedding up so the random model's next-token distribution is far from uniform.
  params = jax.tree.map(lambda x: x * 8 if x.ndim == 2 and x.shape[0] == VOCAB else x, params)
  return model, params


def sample(model_and_params, n=12, **kwargs):
  model, params = model_and_params
  return list(generate(params, model, np.array([1, 2, 3]), n, **kwargs))


def test_same_seed_gives_the_same_sample_and_another_seed_a_different_one(model_and_params):
  first = sample(model_and_params, temperature=1.0, seed=7)
  assert sample(model_and_params, temperature=1.0, seed=7) == first
  assert sample(model_and_params, temperature=1.0, seed=8) != first


def test_top_k_one_is_greedy(model_and_params):
  assert (sample(model_and_params, temperature=1.0, top_k=1, seed=5)
          == sample(model_and_params, temperature=0.0))


def test_sampled_tokens_lie_in_the_top_k_of_their_step(model_and_params):
  model, params = model_and_params
  prompt = [1, 2, 3]
  tokens = sample(model_and_params, n=10, temperature=2.0, top_k=3, seed=0)
  apply = jax.jit(model.apply)
  context = list(prompt)
  for token in tokens:
    window = np.zeros((1, 16), np.int32)
    window[0, :len(context)] = context  # Causal: padding after the context changes nothing.
    logits = np.asarray(apply({"params": params}, window)[0, len(context) - 1])
    assert token in np.argsort(-logits)[:3]
    context.append(token)


@pytest.mark.parametrize("top_k", [1, 5, 63, 64, 100])
def test_top_k_keeps_exactly_the_k_largest_logits(top_k):
  logits = jax.random.normal(jax.random.PRNGKey(top_k), (VOCAB,))
  kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, top_k, 1.0)))
  assert kept.sum() == min(top_k, VOCAB)
  assert set(np.flatnonzero(kept)) == set(np.argsort(-np.asarray(logits))[:min(top_k, VOCAB)])


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.999])
def test_top_p_keeps_the_smallest_most_likely_set_reaching_mass_p(top_p):
  logits = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (VOCAB,))) * 2
  filtered = np.asarray(filter_logits(jnp.asarray(logits), 1.0, 0, top_p))
  probs = np.exp(logits - logits.max())
  probs /= probs.sum()
  order = np.argsort(-probs)
  n_keep = int(np.searchsorted(np.cumsum(probs[order]), top_p) + 1)  # First prefix with mass >= p.
  assert set(np.flatnonzero(np.isfinite(filtered))) == set(order[:n_keep])
  np.testing.assert_allclose(filtered[order[:n_keep]], logits[order[:n_keep]], rtol=1e-6)


def test_temperature_scales_logits_before_filtering():
  logits = jnp.array([2.0, 1.0, 0.0, -1.0])
  np.testing.assert_allclose(filter_logits(logits, 0.5, 0, 1.0), logits / 0.5)
  # At a high temperature the distribution flattens, so top_p=0.5 needs two tokens, not one.
  assert np.isfinite(filter_logits(logits, 1.0, 0, 0.5)).sum() == 1
  assert np.isfinite(filter_logits(logits, 10.0, 0, 0.5)).sum() == 2
