"""The tokenizer across the Hugging Face boundary: every id a tokenizer gives is a row of the model.

`jaxdp export` writes a tokenizer that transformers (AutoTokenizer) and `jaxdp prepare
--tokenizer OUT/tokenizer.json` read with the exported vocab_size's ids (a byte run's end-of-text
is its id 255, not a 257th id); export -> prepare --tokenizer -> train --config.init_from=hf:OUT
works for a byte and a BPE run; every piece of advice of a vocabulary mismatch, run as printed
(the user's own input files and output folder filled in), makes the next run start; and a
Hugging Face checkpoint with padded embeddings (fewer tokenizer ids than vocab_size) is
accepted, one with more ids than rows refused with a fix that works. Tiny models, one step each.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import cli_inprocess
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from test_huggingface import perturbed, relative_error, torch_logits, train  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers.convert_slow_tokenizer import bytes_to_unicode  # noqa: E402

from jaxdp.data import tokenizers as toks  # noqa: E402
from jaxdp.data.prepare import open_prepared, prepare  # noqa: E402
from jaxdp.lm import hf_export, hf_import, load_for_inference  # noqa: E402
from jaxdp.lm.config import load_preset  # noqa: E402
from jaxdp.lm.spec import model_config  # noqa: E402
from jaxdp.models import build  # noqa: E402

pytestmark = pytest.mark.slow

# One step of tiny_cpu's gpt with GPT-2's positions on this process's 8 emulated devices.
TRAIN = ("train", "--config", "tiny_cpu", "--config.model.positions=learned", "--cpu_devices", "8",
         "--noprogress", "--config.num_steps=1", "--config.eval_every=0", "--config.eval_steps=1")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """A corpus, BPE data prepared from it (300 ids), and a one-step byte run and BPE run, each
  exported with `jaxdp export`'s library call."""
  root = tmp_path_factory.mktemp("hf_tokenizer")
  corpus = root / "corpus.txt"
  corpus.write_text(open(os.path.join(os.path.dirname(__file__), "..", "jaxdp", "assets",
                                      "tinyshakespeare.txt")).read()[:20000])
  prepare([str(corpus)], str(root / "bpe_data"), tokenizer="bpe", vocab_size=300, progress=False)
  out = {"root": root, "corpus": str(corpus), "bpe_data": str(root / "bpe_data")}
  for kind, data in (("byte", ""), ("bpe", out["bpe_data"])):
    workdir = train(root / f"{kind}_run", data=data, steps=1, positions="learned")
    hf_export.export(workdir, str(root / f"hf_{kind}"))
    out[kind] = (workdir, str(root / f"hf_{kind}"))
  return out


def refused(result) -> str:
  """The one error line of a refused command (exit status 2)."""
  assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
  (line,) = result.stderr.strip().splitlines()
  assert line.startswith("jaxdp: error: "), line
  return line


def started(result) -> None:
  assert result.returncode == 0, result.stderr[-3000:]
  assert "done: step 1" in result.stdout + result.stderr


def follow(advice: str, capfd, files: str, new_data: str) -> list[str]:
  """Runs each command the advice quotes (`...`) as printed, with the user's YOUR_FILES and
  NEW_DATA filled in; returns the flags it says to train with."""
  for quoted in re.findall(r"`([^`]+)`", advice):
    argv = [{"YOUR_FILES": files, "NEW_DATA": new_data}.get(a, a) for a in shlex.split(quoted)]
    if argv[0] == "jaxdp":
      done = cli_inprocess.run(capfd, *argv[1:])
    else:
      assert argv[0] == "python", quoted
      done = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                            timeout=300)
    assert done.returncode == 0, (quoted, done.stderr[-3000:])
  flags = shlex.split(advice.rsplit("train with ", 1)[1])
  assert flags and all(f.startswith("--config.") for f in flags), advice
  return [f.replace("NEW_DATA", new_data) for f in flags]


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_transformers_and_prepare_read_the_exported_tokenizer_with_the_models_rows(exports, kind):
  """The ids transformers' AutoTokenizer has, the ids `jaxdp prepare --tokenizer` reads, the
  exported vocab_size and the model's rows are one number; the end-of-text id is the run's."""
  workdir, out = exports[kind]
  _, module, run_tokenizer = load_for_inference(workdir)
  config = json.load(open(os.path.join(out, "config.json")))
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  ours = toks.from_spec(os.path.join(out, "tokenizer.json"))
  model = transformers.AutoModelForCausalLM.from_pretrained(out)
  rows = model.get_input_embeddings().weight.shape[0]
  assert len(theirs) == ours.vocab_size == config["vocab_size"] == rows == run_tokenizer.vocab_size
  assert ours.end_of_text == run_tokenizer.end_of_text == theirs.eos_token_id
  assert config["eos_token_id"] == run_tokenizer.end_of_text
  text = "ROMEO: Ünïcödé ✓ 日本 ÿ"
  ids = run_tokenizer.encode(text).tolist()
  assert ours.encode(text).tolist() == ids == theirs.encode(text, add_special_tokens=False)
  assert theirs.decode(ids) == text


def test_a_byte_runs_export_prepares_and_trains_back_following_the_advice(exports, capfd, tmp_path):
  """The reported fault: BPE data into the byte export is refused; the advice, run as printed,
  prepares byte-level data with the export's tokenizer (256 ids, the byte tokenizer's tokens)
  and the run then starts from the export. An export written before end-of-text was declared
  (the byte alphabet alone) prepares the same tokens."""
  _, out = exports["byte"]
  line = refused(cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "refused"),
                                   f"--config.init_from=hf:{out}",
                                   f"--config.data.path={exports['bpe_data']}"))
  assert "the run's tokenizer has 300 ids but" in line and "vocab_size=256" in line, line
  assert f"--tokenizer {os.path.join(out, 'tokenizer.json')}" in line, line
  data = str(tmp_path / "data")
  flags = follow(line, capfd, exports["corpus"], data)
  tokens, tokenizer = open_prepared(data)
  assert tokenizer.vocab_size == 256
  expected = np.append(toks.ByteTokenizer().encode(open(exports["corpus"]).read()), 255)
  np.testing.assert_array_equal(tokens, expected)
  started(cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "run"),
                            f"--config.init_from=hf:{out}", *flags))
  # The byte alphabet with no end-of-text token, as earlier exports wrote it (GPT-2's byte
  # table from transformers).
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  table = bytes_to_unicode()
  spec = json.loads(open(os.path.join(out, "tokenizer.json")).read())
  spec["added_tokens"], spec["model"]["vocab"] = [], {table[b]: b for b in range(256)}
  (legacy / "tokenizer.json").write_text(json.dumps(spec))
  done = cli_inprocess.run(capfd, "prepare", exports["corpus"], "--out", str(tmp_path / "old"),
                           "--tokenizer", str(legacy / "tokenizer.json"), "--noprogress")
  assert done.returncode == 0 and "(byte, vocab 256, uint8)" in done.stdout, done
  np.testing.assert_array_equal(open_prepared(str(tmp_path / "old"))[0], expected)


def test_a_bpe_runs_export_prepares_and_trains_back_following_the_advice(exports, capfd, tmp_path):
  """Byte data into the BPE export (300 rows, more than the 256 ids: not padding, another
  tokenizer) is refused; the advice, run as printed, prepares data with the export's tokenizer,
  the run's own tokens, and the run then starts from the export."""
  workdir, out = exports["bpe"]
  line = refused(cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "refused"),
                                   f"--config.init_from=hf:{out}"))
  assert "the run's tokenizer has 256 ids but" in line and "vocab_size=300" in line, line
  data = str(tmp_path / "data")
  flags = follow(line, capfd, exports["corpus"], data)
  tokens, tokenizer = open_prepared(data)
  assert tokenizer.vocab_size == 300
  np.testing.assert_array_equal(tokens, open_prepared(exports["bpe_data"])[0])
  started(cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "run"),
                            f"--config.init_from=hf:{out}", *flags))


def gpt2_with_tokenizer(directory, vocab_size: int, tokenizer_json: str):
  """A tiny transformers GPT-2 of `vocab_size` rows saved in `directory` with `tokenizer_json`
  as its tokenizer.json."""
  torch.manual_seed(0)
  model = perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=vocab_size, n_positions=32, n_embd=32, n_layer=2, n_head=2,
      layer_norm_epsilon=1e-6)))
  model.save_pretrained(str(directory))
  shutil.copy(tokenizer_json, os.path.join(directory, "tokenizer.json"))
  return model


def test_padded_embeddings_are_accepted_with_a_note_and_transformers_logits(exports, capfd,
                                                                             tmp_path):
  """A checkpoint of 310 rows whose tokenizer has 300 ids (310 is no multiple jaxdp pads to):
  a run on data prepared with that tokenizer starts, saying which rows it drops, and computes
  transformers' logits for every id the tokenizer has."""
  directory = tmp_path / "padded"
  model = gpt2_with_tokenizer(directory, 310, os.path.join(exports["bpe_data"], "tokenizer.json"))
  done = cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "run"),
                           f"--config.init_from=hf:{directory}",
                           f"--config.data.path={exports['bpe_data']}")
  started(done)
  assert (f"jaxdp: note: config.init_from='hf:{directory}' has vocab_size=310, 10 rows past the "
          "run's 300-id tokenizer") in done.stderr, done.stderr
  config = load_preset("tiny_cpu")
  config.model.positions = "learned"
  cfg = model_config(config, 300)
  params = hf_import.load_params(f"hf:{directory}", cfg)
  ids = np.random.RandomState(0).randint(0, 300, (2, cfg.seq_len)).astype(np.int32)
  ours = build(cfg).module.apply({"params": params}, ids)
  assert relative_error(ours, torch_logits(model, ids)[..., :300]) < 1e-4


def test_a_tokenizer_with_ids_past_the_rows_is_refused_with_a_fix_that_works(exports, capfd,
                                                                              tmp_path):
  """A 256-row checkpoint whose tokenizer has two added tokens past its rows (258 ids): data
  prepared with that tokenizer is refused; the advice (transformers' resize_token_embeddings
  into a copy) run as printed gives a checkpoint the run starts from."""
  backend = Tokenizer.from_file(os.path.join(exports["byte"][1], "tokenizer.json"))
  backend.add_special_tokens(["<pad>", "<sep>"])
  backend.save(str(tmp_path / "tokenizer.json"))
  directory = tmp_path / "grown_tokenizer"
  gpt2_with_tokenizer(directory, 256, str(tmp_path / "tokenizer.json"))
  data = str(tmp_path / "data")
  assert cli_inprocess.run(capfd, "prepare", exports["corpus"], "--out", data, "--tokenizer",
                           str(directory / "tokenizer.json"), "--noprogress").returncode == 0
  assert open_prepared(data)[1].vocab_size == 258
  line = refused(cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "refused"),
                                   f"--config.init_from=hf:{directory}",
                                   f"--config.data.path={data}"))
  assert "the run's tokenizer has 258 ids but" in line and "vocab_size=256" in line, line
  assert "has 258 ids as jaxdp reads it, 2 past its rows" in line, line
  flags = follow(line, capfd, exports["corpus"], data)
  started(cli_inprocess.run(capfd, *TRAIN, "--workdir", str(tmp_path / "run"),
                            f"--config.data.path={data}", *flags))
