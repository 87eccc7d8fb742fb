"""Deterministic input: every example once per epoch, order independent of device count."""

import collections
import re

import jax
import numpy as np
import pytest

from jaxdp.data import ByteTokenizer, Dataset, WindowSource, load_tokens, training_examples
from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.lm.spec import data_spec


@pytest.fixture
def small_corpus(tmp_path):
  path = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  path.write_bytes(bytes(rng.integers(32, 127, size=4000).astype(np.uint8)))
  return str(path)


def test_global_batch_is_a_pure_function_of_seed_and_step(tiny_config):
  a, b = Dataset(data_spec(tiny_config)), Dataset(data_spec(tiny_config))
  for step in (0, 7, 1000):
    for key in ("inputs", "targets", "ids"):
      np.testing.assert_array_equal(a.train(step)[key], b.train(step)[key])
  tiny_config.seed = 1
  assert not np.array_equal(Dataset(data_spec(tiny_config)).train(0)["inputs"], a.train(0)["inputs"])


@pytest.mark.parametrize("num_devices", [1, 2, 4])
def test_every_example_once_per_epoch_across_devices(tiny_config, small_corpus, num_devices):
  tiny_config.data.path = small_corpus
  trainer = build(tiny_config, jax.devices()[:num_devices])
  source = trainer.dataset.train_source
  epoch = len(source)
  batch_size = tiny_config.global_batch_size
  seen = []
  for step in range(-(-epoch // batch_size)):
    batch = trainer.train_batch(step)
    rows = []
    for shard in sorted(batch["inputs"].addressable_shards, key=lambda s: s.index[1].start):
      rows.extend(np.asarray(shard.data)[0])  # Each device's rows, in mesh order.
    seen.extend(bytes(r.astype(np.uint8)) for r in rows)
  first_epoch = seen[:epoch]
  expected = [bytes(source[i][:-1].astype(np.uint8)) for i in range(epoch)]
  assert collections.Counter(first_epoch) == collections.Counter(expected)


def test_device_rows_are_slices_of_the_same_global_batch(tiny_config):
  batches = {}
  for n in (1, 2, 4, 8):
    trainer = build(tiny_config, jax.devices()[:n])
    batches[n] = np.asarray(trainer.train_batch(3)["inputs"])
  for n in (2, 4, 8):
    np.testing.assert_array_equal(batches[n], batches[1])


def test_epochs_are_reshuffled(small_corpus):
  source = WindowSource(load_tokens(small_corpus), 32)
  examples = training_examples(source, seed=0)
  n = len(source)
  first = [bytes(examples[i]["inputs"].astype(np.uint8)) for i in range(n)]
  second = [bytes(examples[n + i]["inputs"].astype(np.uint8)) for i in range(n)]
  assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("packing", ["concat", "document"])
def test_batched_reads_equal_grains_per_example_chain_across_epochs(small_corpus, packing):
  from jaxdp.data.packing import example_fn
  from jaxdp.data.pipeline import ShuffledWindows
  tokens = load_tokens(small_corpus)
  tokens[::37] = 0xFF  # End-of-text marks, so document packing has several segments per row.
  source = WindowSource(tokens, 32)
  to_example = example_fn(packing, 0xFF)
  fast = ShuffledWindows(source, seed=3, to_example=to_example)
  chain = training_examples(source, seed=3, to_example=to_example)
  ids = np.arange(0, 3 * len(source) + 5, 7).reshape(-1, 1)[: 3 * (len(source) // 7)].reshape(3, -1)
  got = fast.examples(ids)
  for k in chain[0]:
    want = np.stack([chain[int(j)][k] for j in ids.ravel()]).reshape(ids.shape + (-1,))
    assert got[k].dtype == want.dtype
    np.testing.assert_array_equal(got[k], want)
    np.testing.assert_array_equal(fast[int(ids[1, 2])][k], chain[int(ids[1, 2])][k])


def test_validation_covers_its_first_eval_steps_batches_once(tiny_config):
  dataset = Dataset(data_spec(tiny_config))
  batches = dataset.val
  assert batches.num_batches == tiny_config.eval_steps
  ids = np.concatenate([batches.example_ids(k).ravel() for k in range(batches.num_batches)])
  np.testing.assert_array_equal(ids, np.arange(tiny_config.eval_steps * tiny_config.global_batch_size))
  tiny_config.eval_steps = 0  # The whole split, each window once, the last batch padded.
  whole = Dataset(data_spec(tiny_config)).val
  assert whole.num_windows == len(dataset.val_source)
  assert whole.num_batches == -(-len(dataset.val_source) // tiny_config.global_batch_size)


def test_byte_tokenizer_round_trips_unicode():
  tok = ByteTokenizer()
  text = "Wherefore art thou — Romeo? ✓"
  assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"   \n", "is empty"), (b"short", "fewer than config.seq_len+1")])
def test_bad_corpus_is_a_clear_error(tiny_config, tmp_path, content, message):
  path = tmp_path / "c.txt"
  path.write_bytes(content)
  tiny_config.data.path = str(path)
  with pytest.raises(JaxdpError, match=re.escape(message)):
    Dataset(data_spec(tiny_config))


def test_missing_corpus_is_a_clear_error(tiny_config):
  tiny_config.data.path = "/no/such/file.txt"
  with pytest.raises(JaxdpError, match="config.data.path='/no/such/file.txt' does not exist"):
    Dataset(data_spec(tiny_config))
