"""config.data.packing: "concat" windows are what they always were; "document" windows carry
segment ids and positions, and both models keep attention inside a document."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdp import models
from jaxdp.data import Dataset
from jaxdp.data.packing import document_fields
from jaxdp.lm.spec import data_spec
from jaxdp.models.common import ModelConfig, reference_attention, segment_mask

EOT = 7
T = 24


def test_document_fields_restart_at_every_end_of_text():
  inputs = np.array([3, 4, EOT, 5, 6, 6, EOT, EOT, 2], np.int32)
  segment_ids, positions = document_fields(inputs, EOT)
  # Written out: a segment starts at the window's start and at each end-of-text token.
  want_seg, want_pos, seg, pos = [], [], 0, 0
  for i, t in enumerate(inputs):
    if i and t == EOT:
      seg, pos = seg + 1, 0
    want_seg.append(seg)
    want_pos.append(pos)
    pos += 1
  np.testing.assert_array_equal(segment_ids, want_seg)
  np.testing.assert_array_equal(positions, want_pos)
  assert segment_ids.dtype == positions.dtype == np.int32


def _window(doc_b):
  """Three documents in one window: A, then EOT + B, then EOT + C, then padding to T."""
  a = [1, 2, 3, 4, 5]
  c = [9, 10, 11, 12, 13, 14, 15]
  tokens = a + [EOT] + doc_b + [EOT] + c
  tokens += [20] * (T - len(tokens))
  return np.asarray(tokens, np.int32), len(a), len(a) + 1 + len(doc_b)


MODELS = [("gpt", "rope"), ("gpt", "learned"), ("llama", "rope")]


@pytest.fixture(scope="module", params=MODELS, ids=["gpt-rope", "gpt-learned", "llama"])
def model(request):
  family, positions = request.param
  cfg = ModelConfig(vocab_size=32, seq_len=T, n_layer=2, n_head=4, d_model=32, family=family,
                    positions=positions, n_kv_head=2 if family == "llama" else 0)
  built = models.build(cfg)
  params = jax.tree.map(lambda x: getattr(x, "value", x), built.init_fn(jax.random.PRNGKey(0)),
                        is_leaf=lambda x: hasattr(x, "value"))
  apply = jax.jit(lambda p, t, s, q: built.module.apply({"params": p}, t, segment_ids=s, positions=q))
  plain = jax.jit(lambda p, t: built.module.apply({"params": p}, t))
  return built, params, apply, plain


def _logits(model, tokens):
  _, params, apply, _ = model
  seg, pos = document_fields(tokens, EOT)
  return np.asarray(apply(params, tokens[None], seg[None], pos[None]))[0]


def test_changing_one_document_changes_no_logit_of_another(model):
  one, a_end, b_end = _window([16, 17, 18, 19])
  two, a_end2, b_end2 = _window([21, 22, 23, 24])
  assert (a_end, b_end) == (a_end2, b_end2)
  x, y = _logits(model, one), _logits(model, two)
  np.testing.assert_array_equal(x[:a_end], y[:a_end])  # Document A: before B, unchanged anyway.
  np.testing.assert_array_equal(x[b_end:], y[b_end:])  # EOT + C (and the tail) after B.
  assert not np.allclose(x[a_end + 1:b_end], y[a_end + 1:b_end])  # B itself did change.
  # Without segment ids (concat packing) the same change reaches C: the mask is what stops it.
  _, params, _, plain = model
  px, py = np.asarray(plain(params, one[None]))[0], np.asarray(plain(params, two[None]))[0]
  assert not np.allclose(px[b_end:], py[b_end:])


def test_a_document_inside_a_window_gives_its_logits_at_the_window_start(model):
  """Positions restart per document: document C (with its EOT) in the middle of a window has the
  logits it has at the start of a window of its own."""
  tokens, _, b_end = _window([16, 17, 18, 19])
  packed = _logits(model, tokens)
  alone = np.concatenate([tokens[b_end:], np.full(b_end, 20, np.int32)])
  np.testing.assert_allclose(packed[b_end:], _logits(model, alone)[:T - b_end], rtol=1e-5,
                             atol=1e-5)


def test_xla_attention_takes_the_segment_mask_like_the_reference():
  q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (2, T, 4, 8)) for i in range(3))
  tokens = np.stack([_window([16, 17])[0], _window([16, 17, 18, 19, 20, 21])[0]])
  mask = segment_mask(jnp.asarray(np.stack([document_fields(t, EOT)[0] for t in tokens])))
  want = reference_attention(q, k, v, mask)
  got = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # And it differs from plain causal attention (the mask does something).
  assert not np.allclose(reference_attention(q, k, v), want, atol=1e-3)


def test_loss_with_document_batches_and_dropout(model):
  """The loss function passes segment ids and positions on both paths (with and without dropout)."""
  built, params, _, _ = model
  tokens = np.stack([_window([16, 17])[0], _window([18])[0]])
  seg, pos = zip(*(document_fields(t, EOT) for t in tokens))
  batch = {"inputs": jnp.asarray(tokens), "targets": jnp.asarray(np.roll(tokens, -1, 1)),
           "weights": jnp.ones(tokens.shape, jnp.float32), "ids": jnp.arange(2, dtype=jnp.int32),
           "segment_ids": jnp.asarray(np.stack(seg)), "positions": jnp.asarray(np.stack(pos))}
  loss, weight = built.loss_fn(params, batch, None)
  logits = built.module.apply({"params": params}, batch["inputs"],
                              segment_ids=batch["segment_ids"], positions=batch["positions"])
  want = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1).sum()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert float(weight) == tokens.size
  dropout = models.build(ModelConfig(**{**built.cfg.__dict__, "dropout": 0.1}))
  loss_d, _ = dropout.loss_fn(params, batch, jax.random.PRNGKey(1))
  assert np.isfinite(float(loss_d)) and float(loss_d) != float(loss)


def _reference_windows(tokens, seq_len):
  return [tokens[i * seq_len:i * seq_len + seq_len + 1] for i in range((len(tokens) - 1) // seq_len)]


def test_concat_batches_are_todays_windows_and_document_batches_add_two_fields(tiny_config, tmp_path):
  import grain
  path = tmp_path / "corpus.txt"
  path.write_bytes(bytes(np.random.default_rng(0).integers(32, 127, size=6000).astype(np.uint8)))
  tiny_config.data.path = str(path)
  concat = Dataset(data_spec(tiny_config))
  tiny_config.data.packing = "document"
  document = Dataset(data_spec(tiny_config))
  # The reference: the file's bytes cut into windows of seq_len + 1 (the tail held out), in the
  # order of grain's per-epoch shuffle, B per step.
  raw = np.frombuffer(path.read_bytes(), np.uint8).astype(np.int32)
  train = raw[:len(raw) - int(len(raw) * tiny_config.data.val_fraction)]
  windows = _reference_windows(train, tiny_config.seq_len)
  order = grain.MapDataset.range(len(windows)).shuffle(seed=tiny_config.seed).repeat()
  batch_size = tiny_config.global_batch_size
  for step in (0, 5):
    got = concat.train(step)
    assert set(got) == {"inputs", "targets", "weights", "ids"}
    picked = [windows[order[j]] for j in range(step * batch_size, (step + 1) * batch_size)]
    np.testing.assert_array_equal(got["inputs"].reshape(batch_size, -1), [w[:-1] for w in picked])
    np.testing.assert_array_equal(got["targets"].reshape(batch_size, -1), [w[1:] for w in picked])
    assert got["inputs"].dtype == np.int32
    doc = document.train(step)
    assert set(doc) == set(got) | {"segment_ids", "positions"}
    for key in got:
      np.testing.assert_array_equal(doc[key], got[key])
    # Bytes never include 0xFF (the byte tokenizer's end of text): one segment per window.
    np.testing.assert_array_equal(doc["segment_ids"], 0)
    np.testing.assert_array_equal(doc["positions"],
                                  np.broadcast_to(np.arange(tiny_config.seq_len), doc["positions"].shape))
  val = document.val(0)
  assert {"segment_ids", "positions"} <= set(val)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_training_with_document_packing_on_2_devices_with_accumulation(tiny_config, tmp_path, family):
  """Segment ids and positions travel through the sharded, accumulated step and evaluation; the
  first step's loss equals the loss function on the same global batch on one device."""
  import json

  from jaxdp.data import prepare as prep
  from jaxdp.lm import build
  corpus = open(prep.__file__.replace("data/prepare.py", "assets/tinyshakespeare.txt")).read()
  lines = [corpus[i:i + 50 + i % 70] for i in range(0, 60000, 150)]  # Short documents.
  (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines))
  prep.prepare([str(tmp_path / "docs.jsonl")], str(tmp_path / "p"), progress=False)
  tiny_config.data.path, tiny_config.data.packing = str(tmp_path / "p"), "document"
  tiny_config.model.family, tiny_config.grad_accum_steps = family, 2
  trainer = build(tiny_config, jax.devices()[:2])
  host = trainer.dataset.train(0)
  assert host["segment_ids"].max() > 0  # Several documents per window.
  state = trainer.init_state()
  params = jax.device_get(state.params)
  params = jax.tree.map(lambda x: getattr(x, "value", x), params, is_leaf=lambda x: hasattr(x, "value"))
  flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in host.items()}
  loss_sum, weight_sum = trainer.model.loss_fn(params, flat, None)
  state, metrics = trainer.train_step(state, trainer.train_batch(0))
  np.testing.assert_allclose(float(metrics["train_loss"]), float(loss_sum / weight_sum), rtol=1e-5)
  assert np.isfinite(trainer.evaluate(state.params))
