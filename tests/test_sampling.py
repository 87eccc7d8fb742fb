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


# ---- Decoding from a key/value cache -----------------------------------------------------------

CACHED_MODELS = {"gpt-rope": dict(family="gpt", positions="rope"),
                 "gpt-learned": dict(family="gpt", positions="learned"),
                 "llama-gqa": dict(family="llama", n_head=4, n_kv_head=2, tie_embeddings=False)}


@pytest.fixture(scope="module", params=list(CACHED_MODELS))
def decisive_model(request):
  """A random model whose weights are scaled up, so that its greedy continuations vary and its
  top logits are far apart (a near-uniform random model would make argmax ties of rounding)."""
  from jaxdp.models import build
  cfg = ModelConfig(**{**dict(vocab_size=VOCAB, seq_len=16, n_layer=2, n_head=2, d_model=32),
                       **CACHED_MODELS[request.param]})
  model = build(cfg)
  params = nn.unbox(jax.jit(model.init_fn)(jax.random.PRNGKey(1)))
  params = jax.tree.map(lambda x: x * 10 if x.ndim >= 2 else x, params)
  return model.module, params


@pytest.mark.slow  # Compiles a prefill per prompt length and sampling setting: ~10 s each.
@pytest.mark.parametrize("prompt_len", [3, 16, 20])  # Inside, exactly filling, past the context.
def test_cached_generation_equals_uncached_token_for_token(decisive_model, prompt_len):
  """Greedy and sampled: past seq_len both slide the window, so every case is covered."""
  model, params = decisive_model
  prompt = np.arange(prompt_len) % VOCAB
  for kwargs in (dict(temperature=0.0), dict(temperature=1.0, top_k=8, seed=3)):
    cached = list(generate(params, model, prompt, 24, cache=True, **kwargs))
    uncached = list(generate(params, model, prompt, 24, cache=False, **kwargs))
    assert cached == uncached
  assert len(set(uncached)) > 3  # The model is not stuck on one token: the check has teeth.


def test_prefill_and_decode_steps_give_the_full_forward_logits(decisive_model):
  """The cache's logits at each position, one token at a time after a 5-token prefill, are
  those of the plain forward pass over the whole sequence."""
  from jaxdp.models.common import CACHE, init_cache
  model, params = decisive_model
  tokens = np.random.RandomState(0).randint(0, VOCAB, (1, 16)).astype(np.int32)
  full = np.asarray(model.apply({"params": params}, tokens))[0]  # [T, V]
  apply = jax.jit(lambda c, t: model.apply({"params": params, CACHE: c}, t, mutable=[CACHE]))
  logits, variables = apply(init_cache(model.cfg, 1, 16), tokens[:, :5])
  got = [np.asarray(logits[0])]
  for t in range(5, 16):
    logits, variables = apply(variables[CACHE], tokens[:, t:t + 1])
    got.append(np.asarray(logits[0]))
  np.testing.assert_allclose(np.concatenate(got), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
  assert int(variables[CACHE]["block_0"]["attn"]["index"]) == 16
  assert variables[CACHE]["block_1"]["attn"]["k"].shape == (1, 16, model.cfg.kv_heads,
                                                            model.cfg.head_size)
