"""`jaxdp prepare` and training from a prepared directory: round trip, determinism, errors, CLI."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxdp.data import Dataset
from jaxdp.data import prepare as prep
from jaxdp.errors import JaxdpError
from jaxdp.lm import build, load_for_inference, train_and_evaluate
from jaxdp.lm.spec import data_spec
from jaxdp.models.sampling import generate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = open(os.path.join(ROOT, "jaxdp", "assets", "tinyshakespeare.txt"), encoding="utf-8").read()
UNICODE = "naïve café — 日本語 🎉\r\n\ttabs  and   spaces \n\n"


def write_corpus(folder) -> list[str]:
  """A small directory: two text files (one nested, one with non-ASCII), a JSONL file and a file
  prepare must ignore. Returns the documents in the order prepare reads them (sorted paths)."""
  os.makedirs(folder / "nested", exist_ok=True)
  a, b = CORPUS[:40000], CORPUS[40000:70000] + UNICODE
  lines = [CORPUS[70000 + 400 * i:70400 + 400 * i] for i in range(10)]
  (folder / "a.txt").write_text(a, encoding="utf-8")
  (folder / "nested" / "b.md").write_text(b, encoding="utf-8")
  (folder / "c.jsonl").write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                          for i, t in enumerate(lines)), encoding="utf-8")
  (folder / "ignored.bin").write_bytes(b"\xff\xfe not text")
  return [a] + lines + [b]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
  """A BPE-512 preparation read in 8 KiB chunks, so the long text files are cut into pieces."""
  corpus = tmp_path_factory.mktemp("corpus")
  documents = write_corpus(corpus)
  out = str(tmp_path_factory.mktemp("prepared"))
  manifest = prep.prepare([str(corpus)], out, tokenizer="bpe", vocab_size=512,
                          chunk_bytes=8192, progress=False)
  return {"corpus": corpus, "documents": documents, "out": out, "manifest": manifest}


def prepared_config(config, path):
  config.data.path = path
  return config


def test_bpe_tokenizer_has_512_tokens_and_is_saved_with_the_data(prepared):
  manifest = prepared["manifest"]
  assert manifest["tokenizer"]["kind"] == "bpe"
  assert manifest["tokenizer"]["vocab_size"] == 512
  assert os.path.isfile(os.path.join(prepared["out"], "tokenizer.json"))
  assert manifest["dtype"] == "uint16"
  assert manifest["num_tokens"] == sum(i["tokens"] for i in manifest["inputs"])
  assert manifest["num_documents"] == len(prepared["documents"])
  tokens_file = os.path.join(prepared["out"], prep.TOKENS_FILE)
  assert prep.sha256_file(tokens_file) == manifest["sha256"]
  assert os.path.getsize(tokens_file) == 2 * manifest["num_tokens"]
  assert [os.path.basename(i["path"]) for i in manifest["inputs"]] == ["a.txt", "c.jsonl", "b.md"]


def test_prepared_stream_decodes_to_the_input_documents(prepared):
  tokens, tokenizer = prep.open_prepared(prepared["out"])
  assert len(tokens) == prepared["manifest"]["num_tokens"]
  expected = "".join(d + prep.END_OF_TEXT for d in prepared["documents"])
  assert tokenizer.decode(np.asarray(tokens)) == expected


@pytest.mark.parametrize("text", [UNICODE, "  leading and trailing  ", "", "a\n\n\nb", "x<y>&z 42"])
def test_bpe_round_trips_any_text(prepared, text):
  _, tokenizer = prep.open_prepared(prepared["out"])
  assert tokenizer.decode(tokenizer.encode(text)) == text


def test_prepared_stream_is_memory_mapped_and_chunking_changes_no_token(prepared, tmp_path):
  tokens, _ = prep.open_prepared(prepared["out"])
  assert isinstance(tokens, np.memmap)
  whole = prep.prepare([str(prepared["corpus"])], str(tmp_path / "whole"), tokenizer="bpe",
                       vocab_size=512, progress=False)  # Default 16 MiB chunks: files read whole.
  assert whole["num_tokens"] == prepared["manifest"]["num_tokens"]
  np.testing.assert_array_equal(prep.open_prepared(str(tmp_path / "whole"))[0], tokens)


def test_parallel_encoding_pieces_give_the_whole_documents_tokens(prepared):
  _, tokenizer = prep.open_prepared(prepared["out"])
  text = CORPUS[:300_000]
  pieces = prep._encoding_pieces(text)
  assert len(pieces) > 1 and "".join(pieces) == text
  np.testing.assert_array_equal(np.concatenate(tokenizer.encode_batch(pieces)),
                                tokenizer.encode(text))


def test_rerun_on_same_input_is_a_noop_and_a_changed_input_is_reprepared(tmp_path):
  corpus = tmp_path / "corpus"
  write_corpus(corpus)
  out = str(tmp_path / "out")
  first = prep.prepare([str(corpus)], out, progress=False)
  shard = os.path.join(out, prep.TOKENS_FILE)
  mtime = os.stat(shard).st_mtime_ns
  again = prep.prepare([str(corpus)], out, progress=False)
  assert (first["up_to_date"], again["up_to_date"]) == (False, True)
  assert os.stat(shard).st_mtime_ns == mtime
  (corpus / "a.txt").write_text("changed text " * 100, encoding="utf-8")
  changed = prep.prepare([str(corpus)], out, progress=False)
  assert not changed["up_to_date"]
  assert changed["num_tokens"] != first["num_tokens"]


@pytest.mark.parametrize("setup, message", [
    (lambda d: (d / "bad.txt").write_bytes(b"caf\xe9 au lait"), r"not valid UTF-8 \(byte 0xe9 at byte offset 3\)"),
    (lambda d: (d / "bad.txt").write_text("  \n"), "is empty"),
    (lambda d: (d / "bad.jsonl").write_text('{"body": "x"}\n'), "line 1 has no string 'text' field"),
    (lambda d: (d / "bad.jsonl").write_text("{not json\n"), "line 1 is not JSON"),
])
def test_bad_inputs_get_clear_errors(tmp_path, setup, message):
  setup(tmp_path)
  (name,) = [n for n in os.listdir(tmp_path)]
  with pytest.raises(JaxdpError, match=message):
    prep.prepare([str(tmp_path / name)], str(tmp_path / "out"), progress=False)
  assert not os.path.exists(tmp_path / "out" / prep.MANIFEST)


def test_missing_paths_and_unsafe_outputs_get_clear_errors(tmp_path, tiny_config):
  with pytest.raises(JaxdpError, match="does not exist"):
    prep.prepare([str(tmp_path / "nope.txt")], str(tmp_path / "out"), progress=False)
  (tmp_path / "text.txt").write_text("some text")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "precious.dat").write_text("keep me")
  with pytest.raises(JaxdpError, match="not empty and holds no manifest.json"):
    prep.prepare([str(tmp_path / "text.txt")], str(tmp_path / "busy"), progress=False)
  assert (tmp_path / "busy" / "precious.dat").read_text() == "keep me"
  with pytest.raises(JaxdpError, match="directory without manifest.json; prepare it first"):
    Dataset(data_spec(prepared_config(tiny_config, str(tmp_path / "busy"))))


def test_data_order_from_a_prepared_dir_is_the_same_for_1_2_4_devices_and_after_resume(
    prepared, tiny_config):
  config = prepared_config(tiny_config, prepared["out"])
  steps = range(0, 12, 3)

  def inputs_on(num_devices):
    trainer = build(config, jax.devices()[:num_devices])
    return [jax.device_get(trainer.train_batch(s)["inputs"]) for s in steps]

  reference = inputs_on(1)
  assert reference[0].max() > 255  # BPE ids, not bytes.
  for num_devices in (2, 4):
    for got, want in zip(inputs_on(num_devices), reference):
      np.testing.assert_array_equal(got, want)
  resumed = Dataset(data_spec(config))  # A restarted process opens the shards afresh and starts at step 6.
  for s, want in zip(steps, reference):
    if s >= 6:
      np.testing.assert_array_equal(resumed.train(s)["inputs"], want)


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
  """The tiny model trained 20 steps on the prepared data, on 2 devices."""
  from jaxdp.lm.config import load_preset
  config = prepared_config(load_preset("tiny_cpu"), prepared["out"])
  workdir = str(tmp_path_factory.mktemp("run"))
  result = train_and_evaluate(config, workdir, devices=jax.devices()[:2], progress=False)
  return {"workdir": workdir, "result": result}


def test_prepare_train_generate_end_to_end(prepared, trained):
  assert trained["result"]["step"] == 20
  assert trained["result"]["eval_loss"] < math.log(512)  # Below the uniform guess over the vocab.
  params, model, tokenizer = load_for_inference(trained["workdir"])
  assert model.cfg.vocab_size == 512 and tokenizer.vocab_size == 512
  prompt = tokenizer.encode("ROMEO:")
  sample = list(generate(params, model, prompt, 12, temperature=0.8, seed=3))
  assert len(sample) == 12 and all(0 <= t < 512 for t in sample)
  assert isinstance(tokenizer.decode(sample), str)


def test_cli_prepare_then_generate_uses_the_saved_tokenizer(prepared, trained, tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  cli = [sys.executable, "-m", "jaxdp.cli.main"]
  out = subprocess.run(cli + ["prepare", str(prepared["corpus"]), "--out", str(tmp_path / "p"),
                              "--tokenizer", "bpe", "--vocab_size", "300", "--noprogress"],
                       capture_output=True, text=True, env=env, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "prepared" in out.stdout and "vocab 300" in out.stdout
  assert prep.read_manifest(str(tmp_path / "p"))["tokenizer"]["vocab_size"] == 300
  sample = subprocess.run(cli + ["generate", "--workdir", trained["workdir"], "--prompt", "KING",
                                 "--max_new_tokens", "8", "--temperature", "0", "--cpu_devices", "1"],
                          capture_output=True, text=True, env=env, timeout=120)
  assert sample.returncode == 0, sample.stderr
  params, model, tokenizer = load_for_inference(trained["workdir"])
  greedy = list(generate(params, model, tokenizer.encode("KING"), 8, temperature=0))
  assert sample.stdout == "KING" + tokenizer.decode(greedy) + "\n"


def test_a_failed_or_interrupted_prepare_leaves_nothing_that_blocks_the_rerun(tmp_path):
  good = tmp_path / "good.jsonl"
  bad = tmp_path / "bad.jsonl"
  good.write_text('{"text": "first document"}\n{"text": "second one"}\n')
  bad.write_text('{"text": "fine"}\n' + '{"text": "padding text"}\n' * 20000 + "{not json\n")
  out = tmp_path / "out"
  with pytest.raises(JaxdpError, match="is not JSON"):
    prep.prepare([str(bad)], str(out), progress=False, chunk_bytes=4096)
  assert not out.exists()  # Created by the failed run, so removed with its files.
  out.mkdir()  # What an interrupted run leaves: its tokenizer and a partial token file.
  (out / "tokenizer.json").write_text("{}")
  (out / (prep.TOKENS_FILE + ".tmp")).write_bytes(b"\0" * 10)
  assert prep.prepare([str(good)], str(out), progress=False)["num_documents"] == 2
  with pytest.raises(JaxdpError, match="is a file; give a new or empty directory"):
    prep.prepare([str(good)], str(good), progress=False)
  dangling = tmp_path / "dangling"
  dangling.symlink_to(tmp_path / "missing")
  with pytest.raises(JaxdpError, match="is a symlink to .*which does not exist"):
    prep.prepare([str(good)], str(dangling), progress=False)
  assert not (tmp_path / "missing").exists()
