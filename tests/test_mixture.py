"""config.data.sources: a weighted mixture whose batch of step s is a function of (seed, s),
the same on 1/2/4 devices and after a restart, every source's windows once per its epoch, and a
realised mixture within 1% of the weights over 1000 batches (counted from the batches' content)."""

import collections
import json
import os

import jax
import numpy as np
import pytest

from jaxdp.data import Dataset
from jaxdp.data.mixture import Mixture, parse_sources, quantise
from jaxdp.errors import JaxdpError
from jaxdp.lm import build
from jaxdp.lm.config import validate
from jaxdp.lm.spec import data_spec

ALPHABETS = {"lower": b"abcdefghijklmnopqrstuvwxyz", "digits": b"0123456789",
             "upper": b"ABCDEFGHIJKLMNOPQRSTUVWXYZ"}


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
  """Three byte corpora with disjoint alphabets, so a row's source can be read off its bytes."""
  folder = tmp_path_factory.mktemp("mix")
  rng = np.random.default_rng(0)
  paths = {}
  for i, (name, alphabet) in enumerate(ALPHABETS.items()):
    path = folder / f"{name}.txt"
    path.write_bytes(bytes(rng.choice(list(alphabet), size=3000 + 1000 * i).astype(np.uint8)))
    paths[name] = str(path)
  return paths


def source_of(row: np.ndarray) -> str:
  (name,) = [n for n, a in ALPHABETS.items() if set(row.tolist()) <= set(a)]
  return name


@pytest.mark.parametrize("spec, message", [
    ("a", "is not PATH:WEIGHT"), ("a:-1", "positive weight"), ("a:x,b:1", "is not PATH:WEIGHT"),
    ("a:0.0001,b:1", "below the resolution"), ("a:inf", "positive weight"),
    ("a:0.5,./a:0.5", "names './a' twice")])
def test_malformed_sources_get_one_line_errors(spec, message):
  with pytest.raises(JaxdpError, match=message):
    parse_sources(spec)


def test_sources_and_path_together_are_refused(tiny_config, corpora):
  tiny_config.data.sources = f"{corpora['lower']}:1"
  tiny_config.data.path = corpora["digits"]
  with pytest.raises(JaxdpError, match="config.data.sources and config.data.path"):
    validate(tiny_config, 1)


def test_interleaving_gives_each_source_its_count_in_every_period():
  counts = quantise([0.7, 0.2, 0.1])
  assert counts.tolist() == [700, 200, 100]
  mixture = Mixture([0.5, 0.3, 0.2])
  located = [mixture.locate(j) for j in range(3 * mixture.period)]
  for source in range(3):
    indices = [i for s, i in located if s == source]
    # Each source's own stream advances one by one: 0, 1, 2, ... with no gaps or repeats.
    assert indices == list(range(3 * mixture.counts[source]))
  taken = np.zeros(3, int)
  for n, (s, _) in enumerate(located, start=1):
    taken[s] += 1
    np.testing.assert_array_equal(mixture.taken(n), taken)
    assert np.all(np.abs(taken - n * mixture.counts / mixture.period) < 3)  # Smooth at every n.


@pytest.mark.parametrize("weights", [(0.7, 0.3), (0.5, 0.3, 0.2)])
def test_realised_mixture_is_within_1_percent_of_the_weights_over_1000_batches(
    tiny_config, corpora, weights):
  names = list(ALPHABETS)[:len(weights)]
  tiny_config.data.sources = ",".join(f"{corpora[n]}:{w}" for n, w in zip(names, weights))
  tiny_config.global_batch_size = 8
  dataset = Dataset(data_spec(tiny_config))
  counted = collections.Counter()
  for step in range(1000):
    for row in dataset.train(step)["inputs"].reshape(8, -1):
      counted[source_of(row)] += 1
  total = 8000
  for name, weight in zip(names, weights):
    assert abs(counted[name] / total - weight) < 0.01, (name, counted[name] / total, weight)
  reported = dataset.realised_mixture(total)
  assert [reported[corpora[n]] for n in names] == [counted[n] / total for n in names]


def test_each_source_sees_every_window_once_per_its_epoch(tiny_config, corpora):
  tiny_config.data.sources = f"{corpora['lower']}:0.6,{corpora['digits']}:0.4"
  dataset = Dataset(data_spec(tiny_config))
  seen = collections.defaultdict(list)
  for step in range(60):
    for row in dataset.train(step)["inputs"].reshape(tiny_config.global_batch_size, -1):
      seen[source_of(row)].append(bytes(row.astype(np.uint8)))
  for i, name in enumerate(("lower", "digits")):
    source = dataset.train_sources[i]
    windows = [bytes(source[k][:-1].astype(np.uint8)) for k in range(len(source))]
    assert len(seen[name]) >= len(source)
    assert collections.Counter(seen[name][:len(source)]) == collections.Counter(windows)


def test_mixture_batches_are_the_same_on_1_2_4_devices_and_after_a_restart(tiny_config, corpora):
  tiny_config.data.sources = f"{corpora['lower']}:0.7,{corpora['upper']}:0.3"
  steps = (0, 3, 7)
  reference = None
  for n in (1, 2, 4):
    trainer = build(tiny_config, jax.devices()[:n])
    got = [np.asarray(jax.device_get(trainer.train_batch(s)["inputs"])) for s in steps]
    if reference is None:
      reference = got
    for a, b in zip(got, reference):
      np.testing.assert_array_equal(a, b)
  restarted = Dataset(data_spec(tiny_config))  # A new process resuming at step 7 needs nothing but 7.
  np.testing.assert_array_equal(restarted.train(7)["inputs"], reference[-1])
  tiny_config.seed = 1
  assert not np.array_equal(Dataset(data_spec(tiny_config)).train(0)["inputs"], reference[0])


def test_sources_with_different_tokenizers_are_refused(tiny_config, corpora, tmp_path):
  from jaxdp.data import prepare as prep
  prep.prepare([corpora["lower"]], str(tmp_path / "bpe"), tokenizer="bpe", vocab_size=300,
               progress=False)
  tiny_config.data.sources = f"{corpora['digits']}:0.5,{tmp_path / 'bpe'}:0.5"
  with pytest.raises(JaxdpError, match="has another tokenizer"):
    Dataset(data_spec(tiny_config))


@pytest.mark.slow
def test_training_reports_the_realised_mixture(tiny_config, corpora, tmp_path, capsys):
  from jaxdp.lm import train_and_evaluate
  tiny_config.data.sources = f"{corpora['lower']}:0.75,{corpora['digits']}:0.25"
  tiny_config.num_steps, tiny_config.eval_every, tiny_config.checkpoint_every = 5, 0, 5
  result = train_and_evaluate(tiny_config, str(tmp_path / "run"), devices=jax.devices()[:2],
                              progress=False)
  examples = 5 * tiny_config.global_batch_size
  assert result["data_mixture"] == Dataset(data_spec(tiny_config)).realised_mixture(examples)
  assert sum(result["data_mixture"].values()) == pytest.approx(1.0)
  events = [json.loads(line) for line in open(os.path.join(tmp_path, "run", "metrics.jsonl"))]
  (event,) = [e for e in events if e.get("event") == "data_mixture"]
  assert event["examples"] == examples and event["shares"] == result["data_mixture"]
  assert "data mixture over 80 examples" in capsys.readouterr().out


@pytest.mark.slow
def test_a_mixture_run_stopped_and_resumed_is_bitwise_the_uninterrupted_run(tiny_config, corpora,
                                                                             tmp_path):
  from jaxdp.lm import train_and_evaluate
  from jaxdp.runtime.metrics import read_metrics

  def run(workdir, num_steps):
    tiny_config.data.sources = f"{corpora['lower']}:0.6,{corpora['digits']}:0.4"
    tiny_config.num_steps, tiny_config.lr_decay_steps = num_steps, 6
    tiny_config.log_every, tiny_config.eval_every, tiny_config.checkpoint_every = 1, 0, 3
    return train_and_evaluate(tiny_config, str(workdir), devices=jax.devices()[:2], progress=False)

  run(tmp_path / "full", 6)
  run(tmp_path / "split", 3)
  resumed = run(tmp_path / "split", 6)
  assert resumed["step"] == 6

  def losses(workdir):
    return [(r["step"], r["train_loss"]) for r in read_metrics(str(workdir)) if "train_loss" in r]
  assert losses(tmp_path / "split") == losses(tmp_path / "full")
  assert resumed["data_mixture"] == Dataset(data_spec(tiny_config)).realised_mixture(6 * 16)


def test_a_missing_source_is_named_under_data_sources(tiny_config, corpora):
  from jaxdp.data import Dataset
  tiny_config.data.path = ""
  tiny_config.data.sources = f"{corpora['lower']}:0.7,nosuch/dir:0.3"
  with pytest.raises(JaxdpError, match="config.data.sources: 'nosuch/dir' does not exist"):
    Dataset(data_spec(tiny_config))
