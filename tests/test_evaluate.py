"""Downstream evaluation (`jaxdp evaluate`, jaxdp.lm.evaluate): HellaSwag-format multiple choice
and bits per byte, against plain computations written here (one item at a time, on one device)."""

import json
import math
import random

import cli_inprocess
import jax
import numpy as np
import optax
import pytest
from test_viz import scalars

from jaxdp.errors import JaxdpError
from jaxdp.lm import evaluate
from jaxdp.lm.eval_checkpoint import evaluate_workdir
from jaxdp.lm.run import load_for_inference
from jaxdp.models.common import lm_loss
from jaxdp.parallel import DataParallel
from jaxdp.parallel.scoring import replicate, row_losses
from jaxdp.runtime.metrics import read_metrics

WORDS = "the a cat dog sat ran on under mat tree quickly slowly red blue big small café über".split()


def sentence(rng: random.Random, low: int, high: int) -> str:
  return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 50-item HellaSwag-format file (4 endings; some contexts longer than the model's 32 tokens,
  so they are cut), a text file with multi-byte characters, and a tiny run trained 3 steps under
  zero3 on 2 devices with both files as config.eval_tasks, evaluating at steps 2 and 3."""
  from jaxdp.lm import train_and_evaluate
  from jaxdp.lm.config import load_preset
  root = tmp_path_factory.mktemp("evaluate")
  rng = random.Random(0)
  items = [{"ctx": sentence(rng, 1, 12), "endings": [sentence(rng, 1, 4) for _ in range(4)],
            "label": rng.randrange(4), "activity_label": "ignored"} for _ in range(50)]
  hellaswag = root / "hs_val.jsonl"
  hellaswag.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
  text = root / "notes.txt"
  text.write_text("\n".join(sentence(rng, 5, 15) + "." for _ in range(12)), encoding="utf-8")
  config = load_preset("tiny_cpu")
  config.num_steps, config.eval_every, config.checkpoint_every, config.eval_steps = 3, 2, 3, 1
  config.strategy = "zero3"
  config.eval_tasks = f"hellaswag:{hellaswag},text:{text}"
  workdir = str(root / "run")
  train_and_evaluate(config, workdir, devices=jax.devices()[:2], progress=False)
  return {"workdir": workdir, "items": items, "hellaswag": str(hellaswag), "text": str(text)}


def log_probs(params, module):
  """tokens [n] -> log-probabilities [n, V] of the next token: model.apply and log_softmax of
  one sequence on one device. Compiled once for seq_len tokens (a sequence is padded at its
  end, which a causal model's earlier positions never see), so the per-item loops stay fast."""
  seq_len = module.cfg.seq_len
  apply = jax.jit(lambda x: jax.nn.log_softmax(module.apply({"params": params}, x[None])[0]))

  def one(tokens):
    padded = np.zeros(seq_len, np.int32)
    padded[:len(tokens)] = tokens
    return np.asarray(apply(padded))[:len(tokens)]
  return one


def plain_choice_scores(params, module, tokenizer, items):
  """Per item: the log-likelihood (sum, and mean per token) of each ending after its context,
  one ending at a time, on one device."""
  seq_len = module.cfg.seq_len
  next_token = log_probs(params, module)
  out = []
  for item in items:
    context = list(tokenizer.encode(item["ctx"]))
    sums, means = [], []
    for ending in item["endings"]:
      ending_ids = list(tokenizer.encode(" " + ending))
      tokens = np.asarray(context + ending_ids)[-(seq_len + 1):]
      logp = next_token(tokens[:-1])
      scored = range(len(tokens) - 1 - len(ending_ids), len(tokens) - 1)
      total = float(sum(logp[j, tokens[j + 1]] for j in scored))
      sums.append(total)
      means.append(total / len(ending_ids))
    out.append((sums, means))
  return out


def test_hellaswag_accuracy_equals_a_plain_per_item_computation_on_1_and_4_devices(run):
  params, module, tokenizer = load_for_inference(run["workdir"])
  plain = plain_choice_scores(params, module, tokenizer, run["items"])
  labels = [item["label"] for item in run["items"]]
  acc = np.mean([int(np.argmax(s)) == y for (s, _), y in zip(plain, labels)])
  acc_norm = np.mean([int(np.argmax(m)) == y for (_, m), y in zip(plain, labels)])
  assert any(int(np.argmax(s)) != int(np.argmax(m)) for s, m in plain)  # The two scores differ.
  tasks = evaluate.parse_tasks(f"hellaswag:{run['hellaswag']}")
  for n in (1, 4):
    # 12 rows a batch: 200 rows make 17 batches, the last padded with 4 zero rows.
    step, metrics = evaluate_workdir(run["workdir"], tasks, devices=jax.devices()[:n],
                                              batch_size=12, write=False)
    assert step == 3
    assert metrics == {"hs_val/acc": acc, "hs_val/acc_norm": acc_norm, "hs_val/items": 50}, n
  # The scores behind the accuracies, row by row (item-major, endings in order).
  prepared = evaluate.prepare(tasks, tokenizer, module.cfg.seq_len)[0]
  dp = DataParallel(lm_loss(module), optax.identity(), devices=jax.devices()[:4])
  rows = row_losses(dp, replicate(jax.device_get(params), dp.mesh), prepared.rows, batch_size=8)
  np.testing.assert_allclose(-rows["loss_sum"], [x for s, _ in plain for x in s], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(-rows["loss_sum"] / rows["count"], [x for _, m in plain for x in m],
                             rtol=1e-5, atol=1e-5)


def plain_text_loss(params, module, tokenizer, text):
  """Mean token loss (nats) of the text after an end-of-text token, in windows of seq_len."""
  seq_len = module.cfg.seq_len
  next_token = log_probs(params, module)
  tokens = np.concatenate([[tokenizer.end_of_text], tokenizer.encode(text)])
  nats, count = 0.0, 0
  for start in range(0, len(tokens) - 1, seq_len):
    window = tokens[start:start + seq_len + 1]
    logp = next_token(window[:-1])
    nats -= float(np.sum(logp[np.arange(len(window) - 1), window[1:]]))
    count += len(window) - 1
  return nats / count, count


def test_bits_per_byte_is_the_eval_loss_in_bits_over_the_bytes(run):
  params, module, tokenizer = load_for_inference(run["workdir"])
  text = open(run["text"], encoding="utf-8").read()
  size = len(text.encode("utf-8"))
  assert size > len(text)  # Multi-byte characters: bytes, not characters, are counted.
  loss, tokens = plain_text_loss(params, module, tokenizer, text)
  # The eval loss of the same windows through DataParallel.evaluate, as training reports it.
  prepared = evaluate.prepare(evaluate.parse_tasks(f"text:{run['text']}"), tokenizer,
                              module.cfg.seq_len)[0]
  dp = DataParallel(lm_loss(module), optax.identity(), devices=jax.devices()[:4])
  n = len(prepared.rows["inputs"])
  padded = {k: np.concatenate([v, np.zeros((-n % 4,) + v.shape[1:], v.dtype)])
            for k, v in prepared.rows.items()}
  eval_loss = dp.evaluate(jax.device_get(params), [padded])
  np.testing.assert_allclose(eval_loss, loss, rtol=1e-5)
  _, metrics = evaluate_workdir(run["workdir"], evaluate.parse_tasks(f"text:{run['text']}"),
                                         devices=jax.devices()[:4], write=False)
  assert metrics["notes/tokens"] == tokens and metrics["notes/bytes"] == size
  np.testing.assert_allclose(metrics["notes/loss"], eval_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["notes/bpb"], eval_loss * tokens / (size * math.log(2)),
                             rtol=1e-5)
  np.testing.assert_allclose(metrics["notes/perplexity"], math.exp(eval_loss), rtol=1e-5)


def test_a_jsonl_text_file_is_one_document_per_line(run, tmp_path):
  params, module, tokenizer = load_for_inference(run["workdir"])
  documents = ["first document, über", "the second one"]
  path = tmp_path / "docs.jsonl"
  path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
  _, metrics = evaluate_workdir(run["workdir"], evaluate.parse_tasks(f"text:{path}"),
                                         devices=jax.devices()[:2], write=False)
  losses = [plain_text_loss(params, module, tokenizer, d) for d in documents]
  tokens = sum(c for _, c in losses)
  assert metrics["docs/tokens"] == tokens
  np.testing.assert_allclose(metrics["docs/loss"], sum(l * c for l, c in losses) / tokens, rtol=1e-5)


def test_config_eval_tasks_are_scored_at_each_evaluation_of_the_loop(run):
  """The loop's scores (zero3: parameters split over the devices) are those of `evaluate` on the
  checkpoint of the same step (parameters whole on every device)."""
  records = {r["step"]: r for r in read_metrics(run["workdir"]) if "hs_val/acc" in r}
  assert sorted(records) == [2, 3]
  _, expected = evaluate_workdir(
      run["workdir"], evaluate.parse_tasks(f"hellaswag:{run['hellaswag']},text:{run['text']}"),
      step=3, devices=jax.devices()[:4], write=False)
  assert records[3].keys() - {"step"} == expected.keys()
  for key, value in expected.items():
    assert records[3][key] == pytest.approx(value, rel=1e-5), key


def test_the_command_prints_and_appends_the_scores_to_metrics_and_tensorboard(run, capfd):
  expected = {}
  for spec in (f"hellaswag:{run['hellaswag']}", f"text:{run['text']}"):
    expected.update(evaluate_workdir(run["workdir"], evaluate.parse_tasks(spec),
                                              write=False)[1])
  result = cli_inprocess.run(capfd, "evaluate", "--workdir", run["workdir"], "--task",
                             f"hellaswag:{run['hellaswag']}", "--text", run["text"],
                             "--cpu_devices", "8")
  assert result.returncode == 0, result.stderr
  assert "hs_val: acc " in result.stdout and "bits per byte" in result.stdout
  record = read_metrics(run["workdir"])[-1]
  assert record.pop("step") == 3
  assert record.keys() == expected.keys()
  for key, value in expected.items():
    assert record[key] == pytest.approx(value, rel=1e-6), key
  events = scalars(run["workdir"])
  assert events["hs_val/acc_norm"][3] == pytest.approx(expected["hs_val/acc_norm"])
  assert events["notes/bpb"][3] == pytest.approx(expected["notes/bpb"], rel=1e-6)


def refused(capfd, *argv):
  """The one line `jaxdp: error: ...` of a refused `jaxdp evaluate`, after checking exit 2."""
  result = cli_inprocess.run(capfd, "evaluate", *argv, "--cpu_devices", "8")
  assert result.returncode == 2, (result.stdout, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error: "), result.stderr
  return lines[0]


BAD_ITEMS = {
    "malformed line": ('{"ctx": "a", "endings": ["b"], "label": 0}\n{"ctx": "a", "endings": [\n',
                       ["line 2: not valid JSON"]),
    "label out of range": ('{"ctx": "a", "endings": ["b", "c"], "label": 2}\n',
                           ["line 1", '"label" 2 is out of range for 2 endings', "0..1"]),
    "empty endings": ('\n{"ctx": "a", "endings": [], "label": 0}\n',
                      ["line 2", '"endings" must be a non-empty list']),
    "an empty ending": ('{"ctx": "a", "endings": ["b", ""], "label": 0}\n',
                        ["line 1", "endings[1]", "non-empty text"]),
    "no label": ('{"ctx": "a", "endings": ["b"]}\n', ["line 1", "no 'label'", "validation split"]),
    "a string label": ('{"ctx": "a", "endings": ["b"], "label": "0"}\n', ["line 1", "an integer"]),
    "not an object": ('[1, 2]\n', ["line 1", "a JSON list, not an object"]),
    "no items": ('\n\n', ["holds no items"]),
}


@pytest.mark.parametrize("case", sorted(BAD_ITEMS))
def test_a_bad_item_is_refused_in_one_line_naming_its_line(run, tmp_path, capfd, case):
  content, messages = BAD_ITEMS[case]
  path = tmp_path / "bad.jsonl"
  path.write_text(content)
  line = refused(capfd, "--workdir", run["workdir"], "--task", f"hellaswag:{path}")
  assert line.startswith(f"jaxdp: error: --task: {path}")
  for message in messages:
    assert message in line, line


def test_bad_arguments_are_refused_in_one_line(run, tmp_path, capfd):
  hs = run["hellaswag"]
  assert "--task: '/no/such.jsonl': no such file" in refused(
      capfd, "--workdir", run["workdir"], "--task", "hellaswag:/no/such.jsonl")
  assert "--text: '/no/such.txt': no such file" in refused(
      capfd, "--workdir", run["workdir"], "--text", "/no/such.txt")
  assert "needs a task" in refused(capfd, "--workdir", run["workdir"])
  assert "KIND one of hellaswag, text" in refused(capfd, "--task", f"mmlu:{hs}")
  assert "KIND one of hellaswag, text" in refused(capfd, "--task", hs)
  assert "both report as 'hs_val'" in refused(capfd, "--task", f"hellaswag:{hs}", "--text", hs)
  assert "has no checkpoints" in refused(capfd, "--workdir", str(tmp_path), "--task",
                                         f"hellaswag:{hs}")
  line = refused(capfd, "--workdir", run["workdir"], "--task", f"hellaswag:{hs}", "--step", "7")
  assert "--step=7: " in line and "has no checkpoint at that step; its checkpoints: " in line
  assert "--batch_size=0 is out of range" in refused(capfd, "--task", f"hellaswag:{hs}",
                                                     "--batch_size", "0")
  assert "takes no config" in refused(capfd, "--task", f"hellaswag:{hs}", "--config.seed=1")


def test_an_ending_longer_than_the_context_is_refused(run, tmp_path):
  params, module, tokenizer = load_for_inference(run["workdir"])
  path = tmp_path / "long.jsonl"
  path.write_text(json.dumps({"ctx": "a", "endings": ["b", "x" * 40], "label": 0}) + "\n")
  with pytest.raises(JaxdpError, match=r"line 1: endings\[1\] is 41 tokens, longer than the "
                                       r"model's context of 32"):
    evaluate.prepare(evaluate.parse_tasks(f"hellaswag:{path}"), tokenizer, module.cfg.seq_len)


def test_help_shows_the_flags(capfd):
  result = cli_inprocess.run(capfd, "evaluate", "--help")
  assert result.returncode == 0
  for text in ("--task=KIND:FILE[,...]", "--text=FILE[,...]", "--step=N  (default: the latest)",
               "--batch_size=N", "docs/evaluation.md"):
    assert text in result.stdout, text


def test_config_eval_tasks_is_checked_before_the_first_step(tmp_path, tiny_config):
  from jaxdp.lm import train_and_evaluate
  from jaxdp.lm.config import validate
  tiny_config.eval_tasks = "mmlu:x.jsonl"
  with pytest.raises(JaxdpError, match=r"config.eval_tasks: 'mmlu:x.jsonl' is not KIND:FILE"):
    validate(tiny_config, 8, "cpu")
  tiny_config.eval_tasks = "text:/no/such.txt"
  with pytest.raises(JaxdpError, match=r"config.eval_tasks: '/no/such.txt': no such file"):
    validate(tiny_config, 8, "cpu")
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"ctx": "a", "endings": ["b", "c"], "label": 5}\n')
  tiny_config.eval_tasks = f"hellaswag:{bad}"
  workdir = tmp_path / "run"
  with pytest.raises(JaxdpError, match=r"config.eval_tasks: .*bad.jsonl line 1: \"label\" 5 is "
                                       r"out of range"):
    train_and_evaluate(tiny_config, str(workdir), devices=jax.devices()[:2], progress=False)
  assert not workdir.exists()  # Refused before anything is written (no tokenizer/ either).
