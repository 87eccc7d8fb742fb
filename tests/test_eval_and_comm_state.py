"""Numbers you can trust: evaluation counts every validation window once, and per-device
communication state survives a change of device count (or is refused with the real cause).

Reference values are computed here independently of jaxdp's data and evaluation code: the
validation windows are cut from the corpus bytes by hand and the loss is a NumPy
cross-entropy of `module.apply` logits, one window at a time.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxdp import models
from jaxdp.data.pipeline import EvalBatches, WindowSource, builtin_corpus_path
from jaxdp.errors import JaxdpError
from jaxdp.lm import build, restore_checkpoint, train_and_evaluate
from jaxdp.lm.config import load_preset
from jaxdp.lm.spec import model_config
from jaxdp.parallel import DataParallel, example_weights
from jaxdp.runtime.checkpoint import Checkpointer

# 850 bytes, val_fraction 0.1: 85 validation tokens, (85 - 1) // 8 = 10 windows of 8 tokens.
SEQ_LEN, CORPUS_BYTES, VAL_WINDOWS = 8, 850, 10


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  text = open(builtin_corpus_path(), "rb").read()[:CORPUS_BYTES]
  path = tmp_path_factory.mktemp("corpus") / "c.txt"
  path.write_bytes(text)
  return str(path)


def eval_config(corpus, batch_size, strategy="dp", family="gpt", eval_steps=0):
  c = load_preset("tiny_cpu")
  c.data.path, c.seq_len, c.global_batch_size = corpus, SEQ_LEN, batch_size
  c.strategy, c.eval_steps = strategy, eval_steps
  c.model.family, c.model.n_layer, c.model.d_model, c.model.n_head = family, 1, 16, 2
  return c


def validation_windows(corpus):
  """The validation split's windows, cut from the corpus bytes (tail 10%)."""
  tokens = np.frombuffer(open(corpus, "rb").read(), np.uint8).astype(np.int32)
  val = tokens[len(tokens) - int(len(tokens) * 0.1):]
  n = (len(val) - 1) // SEQ_LEN
  return [val[i * SEQ_LEN:i * SEQ_LEN + SEQ_LEN + 1] for i in range(n)]


def exact_mean_loss(config, params, windows):
  """Token-weighted mean cross-entropy over `windows`, each once, by a plain loop."""
  module = models.build(model_config(config, 256)).module
  params = jax.device_get(params)
  total, count = 0.0, 0
  for w in windows:
    logits = np.asarray(module.apply({"params": params}, w[None, :-1]), np.float64)[0]
    top = logits.max(-1, keepdims=True)
    logz = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
    total += float(np.sum(logz - logits[np.arange(SEQ_LEN), w[1:]]))
    count += SEQ_LEN
  return total / count


def spread_params(params):
  """Parameters whose per-window losses differ clearly (init is close to uniform)."""
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.5 * jax.random.normal(k, x.shape, x.dtype)
                                      for x, k in zip(leaves, keys)])


def test_the_corpus_has_ten_validation_windows(corpus):
  windows = validation_windows(corpus)
  assert len(windows) == VAL_WINDOWS
  source = WindowSource(np.frombuffer(open(corpus, "rb").read(), np.uint8).astype(np.int32)[-85:],
                        SEQ_LEN)
  np.testing.assert_array_equal(source[9], windows[9])


@pytest.mark.parametrize("num_devices, strategy, batch_size, family", [
    (1, "dp", 3, "gpt"), (2, "dp", 4, "gpt"), (8, "dp", 8, "gpt"), (2, "zero3", 6, "llama"),
    (8, "zero3", 16, "gpt")])
def test_eval_loss_is_the_exact_mean_over_every_window_once(corpus, num_devices, strategy,
                                                            batch_size, family):
  # 10 windows in batches of 3, 4, 6, 8 or 16: every last batch is partial. The old evaluation
  # wrapped around and counted some windows twice.
  config = eval_config(corpus, batch_size, strategy, family)
  trainer = build(config, jax.devices()[:num_devices])
  params = spread_params(trainer.init_state().params)
  want = exact_mean_loss(config, params, validation_windows(corpus))
  got = trainer.evaluate(params)
  np.testing.assert_allclose(got, want, rtol=2e-6)
  assert trainer.dataset.val.num_batches == -(-VAL_WINDOWS // batch_size)


def test_eval_loss_does_not_depend_on_eval_steps_once_it_covers_the_split(corpus):
  windows = validation_windows(corpus)
  losses = {}
  for eval_steps in (0, 3, 4, 100):  # 3 x 4 rows >= 10 windows: the whole split each time.
    trainer = build(eval_config(corpus, 4, eval_steps=eval_steps), jax.devices()[:2])
    params = spread_params(trainer.init_state().params)
    losses[eval_steps] = trainer.evaluate(params)
  assert len(set(losses.values())) == 1, losses
  want = exact_mean_loss(trainer.config, params, windows)
  np.testing.assert_allclose(losses[0], want, rtol=2e-6)
  # A bound below the split: exactly its first eval_steps x batch windows.
  trainer = build(eval_config(corpus, 4, eval_steps=2), jax.devices()[:2])
  params = spread_params(trainer.init_state().params)
  np.testing.assert_allclose(trainer.evaluate(params),
                             exact_mean_loss(trainer.config, params, windows[:8]), rtol=2e-6)


def test_eval_batches_pad_with_zero_weight_rows_and_build_only_given_rows(corpus):
  tokens = np.frombuffer(open(corpus, "rb").read(), np.uint8).astype(np.int32)[-85:]
  batches = EvalBatches(WindowSource(tokens, SEQ_LEN), batch_size=4)
  assert len(batches) == 3
  ids = np.concatenate([batches.example_ids(k).ravel() for k in range(3)])
  weights = np.concatenate([batches(k)["weights"][0] for k in range(3)])
  assert sorted(ids[weights.sum(-1) > 0]) == list(range(VAL_WINDOWS))  # Each window once.
  assert (weights.sum(-1) == np.where(ids < VAL_WINDOWS, SEQ_LEN, 0)).all()
  last = batches(2)
  mine = batches(2, np.array([1, 3]))  # What a process holding rows 1 and 3 builds.
  for key in last:
    np.testing.assert_array_equal(mine[key], last[key][:, [1, 3]])
  with pytest.raises(IndexError):
    batches.example_ids(3)


def test_generic_evaluate_masks_a_padded_partial_batch():
  # The generic API: a loss over rows, 5 examples in batches of 4 (the last padded to 4 rows,
  # its padding weighted 0 with jaxdp.example_weights) equals the plain mean over the 5.
  x = np.arange(5, dtype=np.float32) + 1.0

  def loss_fn(params, batch, rng):
    del rng
    per_row = (params["w"] * batch["x"]) ** 2
    return (per_row * batch["weights"]).sum(), batch["weights"].sum()

  dp = DataParallel(loss_fn, optax.sgd(0.1), devices=jax.devices()[:2])
  state = dp.init_state(lambda rng: {"w": jnp.full((), 0.5, jnp.float32)})
  batches = [{"x": x[:4], "weights": example_weights(4, 4)},
             {"x": np.concatenate([x[4:], np.zeros(3, np.float32)]),
              "weights": example_weights(4, 1)}]
  np.testing.assert_allclose(dp.evaluate(state.params, batches), np.mean((0.5 * x) ** 2),
                             rtol=1e-6)


# --- Per-device communication state across device counts -----------------------------------

def comm_config(num_steps, **fields):
  c = load_preset("tiny_cpu")
  c.num_steps, c.lr_decay_steps, c.global_batch_size, c.eval_steps = num_steps, 4, 8, 1
  c.log_every, c.eval_every, c.checkpoint_every = 1, 0, 0
  c.model.n_layer, c.model.d_model = 1, 16
  for k, v in fields.items():
    c[k] = v
  return c


def restored(workdir, config, num_devices):
  checkpoints = Checkpointer(workdir, create=False)
  try:
    state, _ = restore_checkpoint(checkpoints, build(config, jax.devices()[:num_devices]))
  finally:
    checkpoints.close()
  return jax.device_get(state)


@pytest.fixture(scope="module")
def saved_on_2(tmp_path_factory):
  """(fields, workdir) -> workdir: a copy of comm_config(2, **fields) trained on 2 devices. Each
  method trains once for the module (the resume test and the refusal test of int8 and of stale
  start from the same run); every test gets its own copy, since it resumes or refuses it."""
  trained = {}

  def copy(fields, workdir):
    key = tuple(sorted(fields.items()))
    if key not in trained:
      trained[key] = str(tmp_path_factory.mktemp("comm_state") / "run")
      train_and_evaluate(comm_config(2, **fields), trained[key], devices=jax.devices()[:2],
                         progress=False)
    shutil.copytree(trained[key], workdir)
    return workdir
  return copy


@pytest.mark.parametrize("fields", [
    {"compression": "int8"},
    {"compression": "topk", "compression_ratio": 0.1, "momentum_correction": 0.9},
    {"sync": "stale", "staleness": 2},
    {"sync": "local_sgd", "sync_every": 4}],
    ids=["int8", "topk_ef_dgc", "stale", "local_sgd"])
def test_comm_state_saved_on_2_devices_resumes_on_4(saved_on_2, tmp_path, capfd, fields):
  workdir = saved_on_2(fields, str(tmp_path / "run"))
  saved = restored(workdir, comm_config(2, **fields), 2)
  capfd.readouterr()
  moved = restored(workdir, comm_config(4, **fields), 4)
  warning = capfd.readouterr().err
  for name in ("residual", "momentum"):
    if name in saved.comm:
      assert saved.comm[name].shape[0] == 2 and moved.comm[name].shape[0] == 4
      assert np.abs(saved.comm[name]).sum() > 0  # Something is owed: the test means something.
      np.testing.assert_allclose(moved.comm[name].mean(0), saved.comm[name].mean(0),
                                 rtol=1e-6, atol=1e-9)
      assert f"per-device {name}" in warning or "residual and momentum" in warning
  if "stale" in saved.comm:
    np.testing.assert_array_equal(saved.comm["stale"][0], saved.comm["stale"][1])
    for row in moved.comm["stale"]:
      np.testing.assert_array_equal(row, saved.comm["stale"][0])
  if "params" in saved.comm:
    differ = jax.tree.leaves(jax.tree.map(lambda r, a: bool(np.any(r[0] != a)),
                                          saved.comm["params"], saved.params))
    assert any(differ)  # Two local steps since the last average.
    for replica in range(4):
      jax.tree.map(lambda r, a, i=replica: np.testing.assert_array_equal(r[i], a),
                   moved.comm["params"], saved.params)
    jax.tree.map(lambda m, s: np.testing.assert_allclose(
        m, np.broadcast_to(s.mean(0) if np.issubdtype(s.dtype, np.floating) else s[0], m.shape),
        rtol=1e-6, atol=1e-9), moved.comm["opt_state"], saved.comm["opt_state"])
    assert "local_sgd" in warning and "last average" in warning
  jax.tree.map(np.testing.assert_array_equal, moved.params, saved.params)
  result = train_and_evaluate(comm_config(4, **fields), workdir, devices=jax.devices()[:4],
                              progress=False)
  assert result["step"] == 4 and np.isfinite(result["train_loss"])


@pytest.mark.parametrize("saved_fields, resumed_fields, cause", [
    ({"compression": "int8"}, {}, "residual"),
    ({"sync": "stale", "staleness": 2}, {"sync": "stale", "staleness": 1}, "staleness")])
def test_comm_state_of_another_method_is_refused_naming_the_cause(saved_on_2, tmp_path,
                                                                  saved_fields, resumed_fields,
                                                                  cause):
  # Changing the method with --allow_config_change used to read as a corrupt checkpoint: it was
  # moved aside and the run silently restarted from step 0.
  workdir = saved_on_2(saved_fields, str(tmp_path / "run"))
  with pytest.raises(JaxdpError, match=f"communication.*{cause}|{cause}.*communication") as e:
    train_and_evaluate(comm_config(4, **resumed_fields), workdir, devices=jax.devices()[:4],
                       progress=False, allow_config_change=True)
  assert "another model" not in str(e.value) and "settings" in str(e.value)
  assert not os.path.exists(os.path.join(workdir, "checkpoints.invalid"))
  assert Checkpointer(workdir, create=False).all_steps() == [2]
