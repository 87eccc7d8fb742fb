"""`jaxdp prepare` sources and tokenizers, and .bin token files read by train: the same text
through JSONL, Parquet, a saved `datasets` dataset and a .bin file gives the same token stream;
a Hugging Face tokenizer.json round-trips through prepare -> train -> generate; every document
ends with the end-of-text token and a literal "<|endoftext|>" in the text is ordinary text."""

import json
import os
import shutil

import jax
import numpy as np
import pytest

from jaxdp.data import Dataset, tokenfiles
from jaxdp.data import prepare as prep
from jaxdp.data.tokenizers import END_OF_TEXT, ByteTokenizer, HFTokenizer
from jaxdp.errors import JaxdpError
from jaxdp.lm.spec import data_spec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = open(os.path.join(ROOT, "jaxdp", "assets", "tinyshakespeare.txt"), encoding="utf-8").read()
LITERAL = f"a document that mentions {END_OF_TEXT} in its text, twice: {END_OF_TEXT}."
DOCUMENTS = [CORPUS[i * 900:(i + 1) * 900] for i in range(30)] + [LITERAL, "naïve café 日本語 🎉"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  """A byte-level BPE tokenizer.json made here with `tokenizers` (no download), with
  "<|endoftext|>" as a special token, as GPT-2's has."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([CORPUS[:100_000]], trainers.BpeTrainer(
      vocab_size=400, special_tokens=[END_OF_TEXT], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
  tok.save(str(path))
  return str(path)


def reference_stream(tokenizer_json):
  """Each document encoded on its own by `tokenizers` (special tokens as text) + the EOT id."""
  from tokenizers import Tokenizer
  tok = Tokenizer.from_file(tokenizer_json)
  tok.encode_special_tokens = True
  eot = tok.token_to_id(END_OF_TEXT)
  return np.concatenate([tok.encode(d, add_special_tokens=False).ids + [eot] for d in DOCUMENTS])


@pytest.fixture(scope="module")
def formats(tmp_path_factory, tokenizer_json):
  """The documents as JSONL, Parquet, a saved dataset and an .arrow file, each prepared."""
  import datasets
  import pyarrow as pa
  import pyarrow.parquet as pq
  folder = tmp_path_factory.mktemp("inputs")
  (folder / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in DOCUMENTS),
                                     encoding="utf-8")
  pq.write_table(pa.table({"body": DOCUMENTS, "n": list(range(len(DOCUMENTS)))}),
                 str(folder / "docs.parquet"), row_group_size=7)
  datasets.Dataset.from_dict({"body": DOCUMENTS}).save_to_disk(str(folder / "saved"))
  datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCUMENTS})}).save_to_disk(
      str(folder / "saved_dict"))
  inputs = {"jsonl": folder / "docs.jsonl", "parquet": folder / "docs.parquet",
            "saved": folder / "saved", "saved_dict": folder / "saved_dict"}
  out = {}
  for name, path in inputs.items():
    out[name] = str(tmp_path_factory.mktemp(name))
    prep.prepare([str(path)], out[name], tokenizer=tokenizer_json, text_field="body", progress=False)
  return out


def test_jsonl_parquet_and_saved_datasets_give_the_same_stream(formats, tokenizer_json):
  want = reference_stream(tokenizer_json)
  for name, out in formats.items():
    tokens, tokenizer = prep.open_prepared(out)
    np.testing.assert_array_equal(np.asarray(tokens), want, err_msg=name)
    assert isinstance(tokenizer, HFTokenizer) and tokenizer.vocab_size == 400
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))  # The tokenizer travels with the data.
  assert prep.read_manifest(formats["jsonl"])["num_documents"] == len(DOCUMENTS)


def test_literal_end_of_text_is_text_and_every_document_ends_with_the_token(formats):
  tokens, tokenizer = prep.open_prepared(formats["jsonl"])
  tokens = np.asarray(tokens)
  assert int((tokens == tokenizer.end_of_text).sum()) == len(DOCUMENTS)  # One per document only.
  ends = np.flatnonzero(tokens == tokenizer.end_of_text)
  assert ends[-1] == len(tokens) - 1
  pieces = np.split(tokens, ends[:-1] + 1)
  assert [tokenizer.decode(p[:-1]) for p in pieces] == DOCUMENTS  # The literal survives as text.


def test_byte_tokenizer_ends_documents_with_0xff(tmp_path):
  (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCUMENTS))
  prep.prepare([str(tmp_path / "in.jsonl")], str(tmp_path / "out"), progress=False)
  tokens, tokenizer = prep.open_prepared(str(tmp_path / "out"))
  assert isinstance(tokenizer, ByteTokenizer) and tokens.dtype == np.uint8
  want = b"".join(d.encode("utf-8") + b"\xff" for d in DOCUMENTS)
  assert bytes(np.asarray(tokens)) == want
  assert tokenizer.decode(tokens) == "".join(d + END_OF_TEXT for d in DOCUMENTS)


@pytest.mark.parametrize("header", [True, False], ids=["llm.c", "nanoGPT"])
def test_bin_token_file_is_read_directly_and_equals_the_prepared_stream(formats, tokenizer_json,
                                                                        tmp_path, tiny_config,
                                                                        header):
  want = reference_stream(tokenizer_json)
  path = tmp_path / "train.bin"
  tokenfiles.write_token_file(str(path), want, header=header)
  tokens = tokenfiles.read_token_file(str(path))
  assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
  np.testing.assert_array_equal(tokens, want)
  shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")  # Found beside the .bin.
  tiny_config.data.path = str(path)
  from_bin = Dataset(data_spec(tiny_config))
  tiny_config.data.path = formats["parquet"]
  from_prepared = Dataset(data_spec(tiny_config))
  assert from_bin.tokenizer.vocab_size == from_prepared.tokenizer.vocab_size == 400
  for step in (0, 3):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(from_bin.train(step)[key], from_prepared.train(step)[key])
  np.testing.assert_array_equal(from_bin.val(0)["inputs"], from_prepared.val(0)["inputs"])


def test_bin_folder_takes_val_files_as_the_validation_split(tmp_path, tokenizer_json, tiny_config):
  stream = reference_stream(tokenizer_json)
  folder = tmp_path / "shards"
  folder.mkdir()
  third = len(stream) // 3
  tokenfiles.write_token_file(str(folder / "data_train_000001.bin"), stream[:third])
  tokenfiles.write_token_file(str(folder / "data_train_000002.bin"), stream[third:2 * third])
  tokenfiles.write_token_file(str(folder / "data_val_000000.bin"), stream[2 * third:])
  tiny_config.data.path = str(folder)
  with pytest.raises(JaxdpError, match="config.data.tokenizer"):
    Dataset(data_spec(tiny_config))
  tiny_config.data.tokenizer = tokenizer_json
  dataset = Dataset(data_spec(tiny_config))
  seq = tiny_config.seq_len
  assert len(dataset.train_source) == (2 * third - 1) // seq  # Both train shards, as one stream.
  window = (third - 3) // seq  # A window that crosses the shard boundary.
  np.testing.assert_array_equal(dataset.train_source[window], stream[window * seq:window * seq + seq + 1])
  np.testing.assert_array_equal(dataset.val_source[0], stream[2 * third:2 * third + seq + 1])


def test_bad_bin_files_and_fields_get_clear_errors(tmp_path, formats, tokenizer_json):
  bad = tmp_path / "bad.bin"
  head = np.zeros(256, np.int32)
  head[:3] = 20240520, 1, 1000  # Claims 1000 tokens, holds 10.
  bad.write_bytes(head.tobytes() + np.arange(10, dtype=np.uint16).tobytes())
  with pytest.raises(JaxdpError, match="truncated or not an llm.c token file"):
    tokenfiles.read_token_file(str(bad))
  (tmp_path / "odd.bin").write_bytes(b"abc")
  with pytest.raises(JaxdpError, match="odd number of bytes"):
    tokenfiles.read_token_file(str(tmp_path / "odd.bin"))
  (tmp_path / "x.jsonl").write_text('{"text": "hi"}\n')
  with pytest.raises(JaxdpError, match="no string 'body' field.*--text_field"):
    prep.prepare([str(tmp_path / "x.jsonl")], str(tmp_path / "o1"), text_field="body", progress=False)
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"body": ["x"], "n": [1]}), str(tmp_path / "x.parquet"))
  with pytest.raises(JaxdpError, match=r"no column 'text' \(columns: body, n\)"):
    prep.prepare([str(tmp_path / "x.parquet")], str(tmp_path / "o2"), progress=False)
  with pytest.raises(JaxdpError, match="already tokenized; train on it directly"):
    prep.prepare([str(tmp_path / "odd.bin")], str(tmp_path / "o4"), progress=False)
  with pytest.raises(JaxdpError, match="--tokenizer=.*is not 'byte', 'bpe'"):
    prep.prepare([str(tmp_path / "x.jsonl")], str(tmp_path / "o3"), tokenizer="nope.json",
                 progress=False)


def test_rerun_with_a_tokenizer_file_is_a_noop_until_the_tokenizer_changes(tmp_path, tokenizer_json):
  (tmp_path / "in.txt").write_text(CORPUS[:5000])
  tok = tmp_path / "tokenizer.json"
  shutil.copy(tokenizer_json, tok)
  first = prep.prepare([str(tmp_path / "in.txt")], str(tmp_path / "out"), tokenizer=str(tok),
                       progress=False)
  again = prep.prepare([str(tmp_path / "in.txt")], str(tmp_path / "out"), tokenizer=str(tok),
                       progress=False)
  assert (first["up_to_date"], again["up_to_date"]) == (False, True)
  data = json.loads(tok.read_text())
  data["added_tokens"].append({"id": 400, "content": "<|extra|>", "single_word": False,
                               "lstrip": False, "rstrip": False, "normalized": False,
                               "special": True})
  tok.write_text(json.dumps(data))
  changed = prep.prepare([str(tmp_path / "in.txt")], str(tmp_path / "out"), tokenizer=str(tok),
                         progress=False)
  assert not changed["up_to_date"] and changed["tokenizer"]["vocab_size"] == 401


def test_a_tokenizer_without_an_end_of_text_token_gets_one(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "in.txt").write_text("hello world hello")
  prep.prepare([str(tmp_path / "in.txt")], str(tmp_path / "out"),
               tokenizer=str(tmp_path / "tokenizer.json"), progress=False)
  tokens, tokenizer = prep.open_prepared(str(tmp_path / "out"))
  assert tokenizer.vocab_size == 4 and tokenizer.end_of_text == 3
  np.testing.assert_array_equal(tokens, [0, 1, 0, 3])


def test_a_tiktoken_file_without_tiktoken_installed_gets_a_clear_error(tmp_path, monkeypatch):
  import sys
  monkeypatch.setitem(sys.modules, "tiktoken", None)  # As if not installed (it is optional).
  (tmp_path / "x.tiktoken").write_text("IQ== 0\n")
  (tmp_path / "in.txt").write_text("text")
  with pytest.raises(JaxdpError, match="needs the optional `tiktoken` package: pip install tiktoken"):
    prep.prepare([str(tmp_path / "in.txt")], str(tmp_path / "o"),
                 tokenizer=str(tmp_path / "x.tiktoken"), progress=False)


@pytest.mark.slow
def test_tokenizer_json_prepare_train_generate_and_a_moved_workdir(formats, tmp_path):
  from jaxdp.lm import load_for_inference, train_and_evaluate
  from jaxdp.lm.config import load_preset
  from jaxdp.models.sampling import generate
  config = load_preset("tiny_cpu")
  config.data.path = formats["jsonl"]
  config.num_steps, config.eval_every, config.checkpoint_every = 4, 0, 4
  workdir = tmp_path / "run"
  train_and_evaluate(config, str(workdir), devices=jax.devices()[:2], progress=False)
  moved = tmp_path / "elsewhere" / "run"
  shutil.move(str(workdir), str(moved))
  params, model, tokenizer = load_for_inference(str(moved))
  assert isinstance(tokenizer, HFTokenizer) and model.cfg.vocab_size == 400
  for text in (LITERAL, "ROMEO: naïve 🎉\n"):
    assert tokenizer.decode(tokenizer.encode(text)) == text
  sample = list(generate(params, model, tokenizer.encode("ROMEO:"), 6, temperature=0))
  assert len(sample) == 6 and isinstance(tokenizer.decode(sample), str)


def test_bench_loader_mode_times_prepared_and_bin_paths(formats, tokenizer_json, tmp_path):
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench", os.path.join(ROOT, "tools", "bench.py"))
  bench = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench)
  tokenfiles.write_token_file(str(tmp_path / "t.bin"), reference_stream(tokenizer_json))
  shutil.copy(tokenizer_json, tmp_path / "tokenizer.json")
  paths = [formats["jsonl"], str(tmp_path / "t.bin")]
  args, overrides = bench.parse_args(["--config", "tiny_cpu", "--loader_data", ",".join(paths),
                                      "--loader_batch", "4", "--loader_seq_len", "64", "--steps",
                                      "2", "--step_tokens_per_sec", "1000"])
  report = bench.loader_report(args, overrides)
  for path in paths:
    entry = report["paths"][path]
    assert entry["batches_per_sec"] > 0
    assert entry["tokens_per_sec"] == pytest.approx(entry["batches_per_sec"] * 4 * 64)
    assert entry["headroom"] == pytest.approx(entry["tokens_per_sec"] / 1000)


def test_progress_off_a_terminal_prints_plain_lines_with_tokens_per_second(capsys):
  bar = prep.Progress(True, total_bytes=100, every_s=0.0)  # stderr is captured: not a TTY.
  bar.update(1000, 50)
  bar.close()
  lines = capsys.readouterr().err.splitlines()
  assert lines[0].startswith("prepare: 1,000 tokens, ") and lines[0].endswith(" tokens/s")
  assert lines[-1].startswith("prepare: 1,000 tokens in ") and "\r" not in "".join(lines)
  prep.Progress(False, total_bytes=100).close()
  assert capsys.readouterr().err == ""


def test_token_ids_beyond_the_tokenizer_are_refused_at_start_naming_data_tokenizer(
    tmp_path, tokenizer_json, tiny_config):
  from jaxdp.data import pipeline
  tokens = np.arange(5000, dtype=np.uint16) % 300
  tokens[4321] = 499  # One id past a 400-id tokenizer.
  path = tmp_path / "data.bin"
  tokenfiles.write_token_file(str(path), tokens)
  tiny_config.data.path, tiny_config.data.tokenizer = str(path), tokenizer_json
  with pytest.raises(JaxdpError, match=r"hold id 499, but the tokenizer .* has \d+ ids; set "
                                       "config.data.tokenizer"):
    Dataset(data_spec(tiny_config))
  assert pipeline.largest_id(tokens, chunk=1000) == 499  # Found across chunks.
  tokens[4321] = 7
  tokenfiles.write_token_file(str(path), tokens)
  assert len(Dataset(data_spec(tiny_config)).train_source) > 0  # Every id within the vocabulary: accepted.
