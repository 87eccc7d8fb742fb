"""Inputs that are not what their use needs (issue 31): a compressed, archived, NumPy or binary
file given to `jaxdp prepare`, and a training path that does not exist. Each is refused in one
line that says what the input is, and every command the line advises is run here and works."""

import bz2
import gzip
import json
import lzma
import os
import re
import subprocess
import zipfile

from cli_inprocess import run
import numpy as np
import pytest

from jaxdp.lm import schema

TEXT = "To be, or not to be, that is the question.\n" * 40


def refusal(result):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error: "), result.stderr
  assert "Traceback" not in result.stderr
  return lines[0]


def advised(line):
  """The shell commands a message advises (between backticks)."""
  return re.findall(r"`([^`]+)`", line)


def write_zip(path):
  with zipfile.ZipFile(path, "w") as z:
    z.writestr("doc.txt", TEXT)


@pytest.mark.parametrize("name,write,what", [
    ("corpus.txt.gz", lambda p: open(p, "wb").write(gzip.compress(TEXT.encode())), "gzip-compressed"),
    ("corpus.bz2", lambda p: open(p, "wb").write(bz2.compress(TEXT.encode())), "bzip2-compressed"),
    ("corpus.jsonl.xz", lambda p: open(p, "wb").write(lzma.compress(
        (json.dumps({"text": TEXT}) + "\n").encode())), "xz-compressed"),
    ("corpus.zip", write_zip, "zip archive"),
])
def test_prepare_names_a_compressed_input_and_its_advice_works(capfd, tmp_path, monkeypatch, name,
                                                               write, what):
  monkeypatch.chdir(tmp_path)
  write(name)
  line = refusal(run(capfd, "prepare", name, "--out", "out"))
  assert what in line and "iconv" not in line and "UTF-8" not in line, line
  assert not os.path.exists("out")  # Nothing written.
  extract, again = advised(line)
  subprocess.run(extract, shell=True, check=True, cwd=tmp_path, timeout=60)
  assert again.startswith("jaxdp prepare ") and again.endswith(" ...")
  result = run(capfd, *again[len("jaxdp "):-len(" ...")].split(), "--out", "out")
  assert result.returncode == 0, result.stderr
  assert os.path.exists(os.path.join("out", "tokens.bin"))


def test_prepare_names_a_npy_array_and_its_token_file_advice_works(capfd, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ids = np.arange(300, dtype=np.int64) * 97 % 50257
  np.save("ids.npy", ids)
  line = refusal(run(capfd, "prepare", "ids.npy", "--out", "out"))
  assert "NumPy .npy array" in line and "iconv" not in line, line
  assert not os.path.exists("out")
  (convert,) = [c for c in advised(line) if c.startswith("python ")]
  subprocess.run(convert, shell=True, check=True, cwd=tmp_path, timeout=120)
  assert np.array_equal(np.fromfile("tokens.bin", np.uint16), ids)  # The ids, nanoGPT's format.
  schema.check_value("data.path", "tokens.bin")  # The advised --config.data.path is accepted.


def test_prepare_names_nul_bytes_as_binary(capfd, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with open("blob.txt", "wb") as f:
    f.write(b"some text\x00\x01\x02 and bytes")
  line = refusal(run(capfd, "prepare", "blob.txt", "--out", "out"))
  assert "NUL bytes" in line and "binary" in line and "iconv" not in line, line
  assert not os.path.exists("out")


def test_a_training_path_that_does_not_exist_says_so_before_any_advice(capfd, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for path in ("/nonexistent/x.jsonl", "missing.parquet"):
    line = refusal(run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w",
                       f"--config.data.path={path}"))
    assert f"config.data.path={path!r} does not exist" in line, line
    assert "jaxdp prepare" not in line, line  # No advice that would fail in turn.
  assert os.listdir(tmp_path) == []
  # An existing document file: the advised prepare runs, and the advised data.path is accepted.
  with open("docs.jsonl", "w") as f:
    f.write(json.dumps({"text": TEXT}) + "\n")
  line = refusal(run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w",
                     "--config.data.path=docs.jsonl"))
  (prepare,) = advised(line)
  assert run(capfd, *prepare.split()[1:]).returncode == 0
  (path,) = re.findall(r"--config\.data\.path=(\S+)$", line)
  schema.check_value("data.path", path)
  assert os.path.exists(os.path.join(path, "tokens.bin"))
