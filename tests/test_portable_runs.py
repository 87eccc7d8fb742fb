"""A run is self-contained and portable; a broken config file is one clear line.

The workdir holds what sampling needs (config, tokenizer); data is stored by resolved path and
identified by content, so the same bytes under another path resume as the same run.
"""

import os
import shutil
import subprocess
import sys

import cli_inprocess
from conftest import cli_env
import pytest

# XLA's default optimisations: runs resumed on another shape (tests/conftest.py).
pytestmark = pytest.mark.default_xla

CLI = [sys.executable, "-m", "jaxdp.cli.main"]
TINY = ["--config", "tiny_cpu", "--config.eval_steps=1", "--progress=false", "--cpu_devices", "2"]


def jaxdp(*args, cwd):
  return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(),
                        timeout=300)


def ok(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def refused(result, *messages):
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error:"), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  for message in messages:
    assert message in lines[0], lines[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  from jaxdp.data import builtin_corpus_path
  root = tmp_path_factory.mktemp("portable")
  (root / "data").mkdir()
  shutil.copy(builtin_corpus_path(), root / "data" / "corpus.txt")
  return root


def test_generate_needs_neither_the_data_nor_the_training_directory(corpus, tmp_path):
  ok(jaxdp("train", *TINY, "--config.num_steps=2", "--config.data.path=data/corpus.txt",
           "--workdir", "run", cwd=corpus))
  moved = tmp_path / "moved_run"
  shutil.copytree(corpus / "run", moved)
  hidden = corpus / "data_hidden"
  os.rename(corpus / "data", hidden)  # The data is gone from where training read it.
  try:
    out = ok(jaxdp("generate", "--workdir", str(moved), "--prompt", "ab", "--max_new_tokens", "5",
                   "--temperature", "0", cwd=tmp_path)).stdout
  finally:
    os.rename(hidden, corpus / "data")
  assert out.startswith("ab") and os.path.exists(moved / "tokenizer" / "byte.json")


def test_same_bytes_under_another_path_resume_and_changed_bytes_are_refused(corpus, tmp_path):
  workdir = str(tmp_path / "run")
  ok(jaxdp("train", *TINY, "--config.num_steps=2", "--config.data.path=data/corpus.txt",
           "--workdir", workdir, cwd=corpus))
  copy = tmp_path / "elsewhere.txt"
  shutil.copy(corpus / "data" / "corpus.txt", copy)
  ok(jaxdp("train", *TINY, "--config.num_steps=3", f"--config.data.path={copy}",
           "--workdir", workdir, cwd=tmp_path))
  with open(copy, "a") as f:
    f.write("one more line\n")
  refused(jaxdp("train", *TINY, "--config.num_steps=4", f"--config.data.path={copy}",
                "--workdir", workdir, cwd=tmp_path), "changed (sha256", "--allow_config_change")


def test_bpe_run_keeps_its_tokenizer_after_the_prepared_data_is_gone(corpus, tmp_path):
  ok(jaxdp("prepare", str(corpus / "data" / "corpus.txt"), "--out", "prepared", "--tokenizer",
           "bpe", "--vocab_size", "300", "--progress=false", cwd=tmp_path))
  ok(jaxdp("train", *TINY, "--config.num_steps=2", "--config.seq_len=32",
           "--config.data.path=prepared", "--workdir", "run", cwd=tmp_path))
  shutil.rmtree(tmp_path / "prepared")
  out = ok(jaxdp("generate", "--workdir", "run", "--prompt", "KING", "--max_new_tokens", "4",
                 "--temperature", "0", cwd=tmp_path)).stdout
  assert out.startswith("KING") and os.path.exists(tmp_path / "run" / "tokenizer" / "tokenizer.json")


@pytest.mark.parametrize("text,message", [
    ("def get_config(:\n", "syntax error at line 1"),
    ("import ml_collections\ndef get_config():\n  c = ml_collections.ConfigDict()\n  c.seed = 0\n"
     "  return c\n", "lacks"),
    ("x = 1\n", "defines no get_config()"),
    ("def get_config():\n  raise ValueError('boom')\n", "get_config() raised ValueError: boom"),
])
def test_a_broken_config_file_is_one_line(tmp_path, capfd, text, message):
  path = tmp_path / "mine.py"
  path.write_text(text)
  # Refused while the flags are read, before any device work: the same main() in this process.
  refused(cli_inprocess.run(capfd, "train", "--config", str(path), "--workdir", str(tmp_path / "w")),
          message)


def test_a_field_added_after_a_checkpoint_was_written_counts_as_its_default():
  from jaxdp.runtime.loop import changed_fields
  saved = {"data": {"path": "x"}, "seed": 0}  # Written before data.packing existed.
  fields, defaults = ["seed", "data.packing"], {"seed": 0, "data.packing": "concat"}
  assert changed_fields(saved, {"seed": 0, "data": {"packing": "concat"}}, fields, defaults) == []
  assert changed_fields(saved, {"seed": 0, "data": {"packing": "document"}}, fields, defaults) == [
      "data.packing ('concat' -> 'document')"]
