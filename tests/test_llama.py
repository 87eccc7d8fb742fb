"""The Llama family: parameter count, grouped-query attention against a NumPy reference, rotary
base, causality, parallel equivalence, a short training run, and the config checks."""

import json
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import models
from jaxdp.analysis import verify
from jaxdp.errors import JaxdpError
from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset, validate
from jaxdp.models import common, llama
from jaxdp.models.common import ModelConfig

VOCAB, SEQ, D, H = 64, 16, 32, 4  # Head size K = D / H = 8.


def llama_cfg(**overrides) -> ModelConfig:
  fields = dict(vocab_size=VOCAB, seq_len=SEQ, n_layer=2, n_head=H, d_model=D, family="llama",
                n_kv_head=2, tie_embeddings=False)
  fields.update(overrides)
  return ModelConfig(**fields)


def tokens_of(seed=0, batch=2):
  return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (batch, SEQ)), jnp.int32)


def normal(seed, shape, std=1.0):
  """Test inputs drawn by NumPy (jax.random would compile a kernel per shape)."""
  return jnp.asarray(np.random.default_rng(seed).normal(0.0, std, shape), jnp.float32)


def random_params(init, *args, seed=0, std=0.02):
  """Parameters shaped as `init(key, *args)` returns them, drawn by NumPy (norm scales near 1,
  the rest N(0, std)). The init is traced, not run: a real init compiles a random-number kernel
  per shape, seconds of CPU here."""
  shapes = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), *args))
  leaves, tree = jax.tree.flatten_with_path(shapes)
  return jax.tree.unflatten(tree, [
      normal(seed + i, s.shape, std) + (1.0 if jax.tree_util.keystr(p).endswith("['scale']") else 0.0)
      for i, (p, s) in enumerate(leaves)])  # RMSNorm scales around 1, as initialised.


@pytest.fixture(scope="module")
def initialised():
  """(LanguageModel, params shaped by its init_fn): 4 query heads over 2 key/value heads.
  (A real init's count is checked from the train state in the training test below.)"""
  m = models.build(llama_cfg(n_kv_head=2))
  return m, random_params(m.init_fn, seed=1)


# ---------------------------------------------------------------- NumPy references (float64)

def np_rotary(x, theta):
  """Rotary positions over the last axis of x [B, T, H, K]: the pair (i, i + K/2) at position t
  rotated by the angle t * theta^(-2i/K)."""
  _, t, _, k = x.shape
  inv_freq = theta ** (-np.arange(0, k, 2, dtype=np.float64) / k)  # [K/2]
  angle = np.arange(t, dtype=np.float64)[:, None] * inv_freq[None, :]  # [T, K/2]
  sin, cos = np.sin(angle)[None, :, None, :], np.cos(angle)[None, :, None, :]
  x1, x2 = x[..., :k // 2], x[..., k // 2:]
  return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def np_gqa_attention(q, k, v):
  """Causal softmax attention, one (example, query head) at a time; query head h of H reads
  key/value head h // (H / G). q [B, T, H, K]; k, v [B, T, G, K] -> [B, T, H, K]."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, kd = q.shape
  per_group = h // k.shape[2]
  out = np.zeros_like(q)
  for i in range(b):
    for head in range(h):
      g = head // per_group
      scores = q[i, :, head] @ k[i, :, g].T / math.sqrt(kd)  # [T, T]
      scores[np.triu_indices(t, 1)] = -np.inf  # Query s sees keys 0..s only.
      probs = np.exp(scores - scores.max(axis=1, keepdims=True))
      probs /= probs.sum(axis=1, keepdims=True)
      out[i, :, head] = probs @ v[i, :, g]
  return out


def np_attention_block(p, x, cfg):
  """The Attention module's math from its parameters (kernels stored [out..., in])."""
  x = np.asarray(x, np.float64)
  wq, wk, wv, wo = (np.asarray(p[n], np.float64) for n in ("wq", "wk", "wv", "wo"))
  q = np_rotary(np.einsum("btd,hkd->bthk", x, wq), cfg.rope_theta)
  k = np_rotary(np.einsum("btd,gkd->btgk", x, wk), cfg.rope_theta)
  v = np.einsum("btd,gkd->btgk", x, wv)
  return np.einsum("bthk,dhk->btd", np_gqa_attention(q, k, v), wo)


# ---------------------------------------------------------------- (a) parameter count

def closed_form(n_kv_head: int, tied: bool) -> int:
  """Written out for VOCAB=64, D=32, H=4, K=8, 2 layers, mlp_ratio 4."""
  g = n_kv_head or H
  f = 88  # SwiGLU hidden: 2/3 * 4 * 32 = 85.3 -> 85, rounded up to a multiple of 8.
  attention = D * D + 2 * (g * 8 * D) + D * D  # wq [H,K,D], wk and wv [G,K,D], wo [D,H,K]
  mlp = 3 * f * D  # w_gate, w_up [F, D]; w_down [D, F]
  norms = 2 * D  # attn_norm, mlp_norm scales
  embeddings = VOCAB * D * (1 if tied else 2)  # embed, plus lm_head when untied
  return embeddings + 2 * (attention + mlp + norms) + D  # + the final norm


def test_swiglu_hidden_is_two_thirds_of_mlp_ratio_rounded_up_to_8():
  assert llama.mlp_hidden(llama_cfg()) == 88
  assert llama.mlp_hidden(llama_cfg(d_model=48, n_head=4)) == 128  # 2/3 * 192 = 128 exactly
  assert llama.mlp_hidden(llama_cfg(d_model=64, n_head=4, mlp_ratio=2)) == 88  # 85 -> 88


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("n_kv_head", [0, 1, 2])
def test_param_count_of_initialised_tree_matches_closed_forms(n_kv_head, tied):
  """The tree init_fn returns, traced (its shapes); the training test below checks the count of
  a real init (the run's start event) against the same closed form."""
  m = models.build(llama_cfg(n_kv_head=n_kv_head, tie_embeddings=tied))
  params = nn.unbox(jax.eval_shape(m.init_fn, jax.random.PRNGKey(0)))
  g = n_kv_head or H
  attn = params["block_0"]["attn"]
  assert attn["wq"].shape == (H, 8, D) and attn["wo"].shape == (D, H, 8)
  assert attn["wk"].shape == attn["wv"].shape == (g, 8, D)
  assert ("lm_head" in params) == (not tied)
  assert models.count_params(params) == m.param_count == closed_form(n_kv_head, tied)


# ---------------------------------------------------------------- (b) grouped-query attention

@pytest.mark.parametrize("groups", [1, 2, 4])
def test_gqa_kernels_match_numpy_reference(groups):
  """H=4 query heads over G key/value heads: reference einsum and jax.nn.dot_product_attention
  both equal the per-head NumPy loop (which fixes the head -> group mapping h // (H/G))."""
  q = normal(1, (2, SEQ, H, 8))
  k = normal(2, (2, SEQ, groups, 8))
  v = normal(3, (2, SEQ, groups, 8))
  expected = np_gqa_attention(q, k, v)
  np.testing.assert_allclose(common.reference_attention(q, k, v), expected, atol=2e-5)
  np.testing.assert_allclose(jax.nn.dot_product_attention(q, k, v, is_causal=True), expected,
                             atol=2e-5)
  np.testing.assert_allclose(common.attention(q, k, v, "xla"), expected, atol=2e-5)
  if 1 < groups < H:  # Grouping by h % G instead would read other key/value heads: not the same.
    wrong_k = jnp.tile(k, (1, 1, H // groups, 1))
    wrong_v = jnp.tile(v, (1, 1, H // groups, 1))
    assert np.abs(np_gqa_attention(q, wrong_k, wrong_v) - expected).max() > 1e-2


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_llama_attention_module_matches_numpy_gqa(implementation):
  cfg = llama_cfg(n_kv_head=2, attention=implementation)
  x = normal(4, (2, SEQ, D))
  module = llama.Attention(cfg)
  # Larger weights than at init: attention far from uniform.
  p = random_params(lambda key, x: module.init(key, x, True)["params"], x, seed=5, std=0.2)
  got = module.apply({"params": p}, x, True)
  expected = np_attention_block(p, x, cfg)
  assert np.abs(expected).max() > 1e-2
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_llama_logits_same_with_xla_and_reference_attention(initialised):
  tokens = tokens_of()
  xla, params = initialised
  assert xla.cfg.attention == "xla"
  ref = models.build(llama_cfg(n_kv_head=2, attention="reference"))
  np.testing.assert_allclose(xla.module.apply({"params": params}, tokens),
                             ref.module.apply({"params": params}, tokens), atol=2e-5)


# ---------------------------------------------------------------- (c) causality

@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_future_tokens_do_not_change_past_llama_logits(initialised, n_kv_head):
  if n_kv_head == 2:
    m, params = initialised
  else:
    m = models.build(llama_cfg(n_kv_head=n_kv_head))
    params = random_params(m.init_fn, seed=1)
  tokens = tokens_of()
  changed = tokens.at[:, 10:].set((tokens[:, 10:] + 1) % VOCAB)
  a = m.module.apply({"params": params}, tokens)
  b = m.module.apply({"params": params}, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=1e-6)
  assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-4


# ---------------------------------------------------------------- (d) rotary base

def test_rotary_default_base_is_10000_and_matches_numpy():
  x = normal(6, (2, SEQ, H, 8))
  expected = np_rotary(np.asarray(x, np.float64), 10000.0)
  np.testing.assert_allclose(common.rotary(x), expected, atol=1e-5)  # gpt's call: the default
  np.testing.assert_allclose(common.rotary(x, 10000.0), common.rotary(x), atol=0)
  np.testing.assert_allclose(common.rotary(x, 500.0), np_rotary(np.asarray(x, np.float64), 500.0),
                             atol=1e-5)
  assert np.abs(common.rotary(x, 500.0) - common.rotary(x)).max() > 1e-2


def test_rotary_scores_depend_only_on_relative_position():
  """The same q and k at every position: q_m . k_n is a function of m - n (the point of RoPE)."""
  q = jnp.broadcast_to(normal(7, (1, 1, 1, 8)), (1, SEQ, 1, 8))
  k = jnp.broadcast_to(normal(8, (1, 1, 1, 8)), (1, SEQ, 1, 8))
  for theta in (10000.0, 500.0):
    s = np.asarray(jnp.einsum("tk,sk->ts", common.rotary(q, theta)[0, :, 0],
                              common.rotary(k, theta)[0, :, 0]))
    np.testing.assert_allclose(s[1:, 1:], s[:-1, :-1], atol=1e-4)
    assert np.ptp(np.diagonal(s, -3)) < 1e-4 and np.ptp(s[0]) > 1e-2


def test_rope_theta_changes_llama_logits_but_not_position_zero(initialised):
  tokens = tokens_of()
  base, params = initialised
  assert base.cfg.rope_theta == 10000.0
  other = models.build(llama_cfg(n_kv_head=2, rope_theta=100.0))
  a = base.module.apply({"params": params}, tokens)
  b = other.module.apply({"params": params}, tokens)
  np.testing.assert_allclose(a[:, 0], b[:, 0], atol=1e-5)  # Angle 0 at position 0.
  assert np.abs(a[:, 1:] - b[:, 1:]).max() > 1e-3


def test_llama_rotary_with_theta_10000_is_gpts_rotary():
  """Llama's attention with rope_theta=10000 rotates q and k exactly as gpt's helper does: the
  module output equals attention written here with common.rotary called as gpt calls it
  by default (no base given)."""
  cfg = llama_cfg(n_kv_head=4, rope_theta=10000.0)
  x = normal(8, (1, SEQ, D))
  module = llama.Attention(cfg)
  p = random_params(lambda key, x: module.init(key, x, True)["params"], x, seed=9, std=0.2)
  q = jnp.einsum("btd,hkd->bthk", x, p["wq"])
  k = jnp.einsum("btd,hkd->bthk", x, p["wk"])
  v = jnp.einsum("btd,hkd->bthk", x, p["wv"])
  y = common.reference_attention(common.rotary(q), common.rotary(k), v)  # gpt's rotary call
  expected = jnp.einsum("bthk,dhk->btd", y, p["wo"])
  np.testing.assert_allclose(module.apply({"params": p}, x, True), expected,
                             rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))


# ---------------------------------------------------------------- (e) parallel equivalence

def tiny_llama_config():
  """tiny_cpu as a llama: 4 query heads over 2 key/value heads, untied head, one block."""
  c = load_preset("tiny_cpu")
  c.model.family, c.model.n_head, c.model.n_kv_head, c.model.tie_embeddings = "llama", 4, 2, False
  c.model.n_layer = 1
  return c


def test_llama_dp_on_4_devices_matches_one_device():
  """Data parallel over 4 devices = the one-device step, loss by loss (5 steps). The same
  config on a 2x2 (data x model) mesh under zero1 and zero3: tests/test_tensor_parallel.py."""
  results = verify.verify(tiny_llama_config(), jax.devices()[:4], 5,
                          cases=[verify.Case("dp", "dp")])
  assert results["dp"]["mesh"] == {"data": 4, "model": 1}
  assert results["dp"]["loss"] <= 1e-5, results
  assert results["dp"]["params"] <= verify.DEFAULT_TOLERANCE["params"], results


# ---------------------------------------------------------------- (f) a short training run

def test_llama_preset_trains_below_initial_loss(tmp_path):
  c = load_preset("llama")
  assert (c.model.family, c.model.n_kv_head, c.model.tie_embeddings) == ("llama", 2, False)
  c.num_steps, c.warmup_steps, c.log_every, c.eval_every, c.eval_steps = 30, 5, 10, 30, 2
  c.checkpoint_every, c.global_batch_size, c.seq_len = 0, 8, 64
  c.model.n_layer, c.model.d_model = 2, 64
  result = train_and_evaluate(c, str(tmp_path), devices=jax.devices()[:2], progress=False)
  assert result["step"] == 30 and result["stop_reason"] == "num_steps"
  assert np.isfinite(result["eval_loss"]) and result["eval_loss"] < math.log(256) - 1.0, result
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    start = next(r for r in map(json.loads, f) if r.get("event") == "start")
  expected = models.build(ModelConfig(vocab_size=256, seq_len=64, n_layer=2, n_head=4, d_model=64,
                                      family="llama", n_kv_head=2, tie_embeddings=False))
  assert start["params"] == expected.param_count


# ---------------------------------------------------------------- (g) config checks

@pytest.mark.parametrize("family,fields,named", [
    ("llama", {"positions": "learned"}, "config.model.positions"),
    ("llama", {"n_head": 4, "n_kv_head": 3}, "config.model.n_kv_head"),
    ("llama", {"n_kv_head": -1}, "config.model.n_kv_head"),
    ("llama", {"rope_theta": 0.0}, "config.model.rope_theta"),
    ("gpt", {"n_head": 4, "n_kv_head": 2}, "config.model.n_kv_head"),
])
def test_invalid_model_family_fields_are_named(family, fields, named):
  c = load_preset("tiny_cpu")
  c.model.family = family
  c.model.d_model = 32
  for k, v in fields.items():
    c.model[k] = v
  with pytest.raises(JaxdpError, match=named.replace(".", r"\.")) as e:
    validate(c, 8)
  assert "\n" not in str(e.value)


def test_kv_heads_not_divisible_by_mesh_model_is_named():
  c = tiny_llama_config()
  c.model.n_kv_head, c.mesh.model, c.strategy = 1, 2, "zero1"
  with pytest.raises(JaxdpError, match=r"config\.mesh\.model=2.*key/value heads 1"):
    validate(c, 8)
  c.model.n_kv_head = 2
  validate(c, 8)  # 4 query and 2 key/value heads split over model=2.
