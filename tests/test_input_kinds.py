"""Inputs that are not what their use needs (issue 31): a compressed, archived, NumPy or binary
file given to `jaxdp prepare`, and a training path that does not exist. Each is refused in one
line that says what the input is, and every command the line advises is run here and works."""

import bz2
import gzip
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import tarfile
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


def write_tar(path, mode="w"):
  with tarfile.open(path, mode) as t:
    info = tarfile.TarInfo("doc.txt")
    info.size = len(TEXT.encode())
    t.addfile(info, io.BytesIO(TEXT.encode()))


def write_zst(path):
  if shutil.which("zstd") is None:
    pytest.skip("no zstd command")
  with open(path, "wb") as f:
    f.write(subprocess.run(["zstd", "-c"], input=TEXT.encode(), capture_output=True, check=True).stdout)


@pytest.mark.parametrize("name,write,what", [
    ("corpus.txt.gz", lambda p: open(p, "wb").write(gzip.compress(TEXT.encode())), "gzip-compressed"),
    ("corpus.bz2", lambda p: open(p, "wb").write(bz2.compress(TEXT.encode())), "bzip2-compressed"),
    ("corpus.jsonl.xz", lambda p: open(p, "wb").write(lzma.compress(
        (json.dumps({"text": TEXT}) + "\n").encode())), "xz-compressed"),
    ("corpus.zip", write_zip, "zip archive"),
    ("corpus.txt.zst", write_zst, "zstd-compressed"),
    ("corpus.tar", write_tar, "tar archive"),
    ("corpus.tar.gz", lambda p: write_tar(p, "w:gz"), "gzip-compressed tar archive"),
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


ENCODED = [("utf16.txt", TEXT.encode("utf-16"), "UTF-16 text (a UTF-16LE byte-order mark)"),
           ("utf16be.txt", TEXT.encode("utf-16-be"), "UTF-16BE text (no byte-order mark)"),
           ("latin.txt", ("Caf\u00e9 cr\u00e8me. " + TEXT).encode("latin-1"), "is not valid UTF-8")]


@pytest.mark.parametrize("name,raw,what", ENCODED, ids=[n for n, _, _ in ENCODED])
def test_prepare_names_text_in_another_encoding_and_its_iconv_advice_works(capfd, tmp_path,
                                                                          monkeypatch, name, raw,
                                                                          what):
  monkeypatch.chdir(tmp_path)
  with open(name, "wb") as f:
    f.write(raw)
  line = refusal(run(capfd, "prepare", name, "--out", "out"))
  assert what in line and "NUL" not in line, line
  assert not os.path.exists("out")
  convert, again = advised(line)
  assert convert.startswith("iconv ")
  subprocess.run(convert, shell=True, check=True, cwd=tmp_path, timeout=60)
  converted = again[len("jaxdp prepare "):-len(" ...")]
  with open(converted, encoding="utf-8") as f:  # The text itself, now UTF-8.
    assert f.read().lstrip("\ufeff") == raw.decode("latin-1" if "latin" in name else
                                                    "utf-16" if "be" not in name else "utf-16-be")
  assert run(capfd, "prepare", converted, "--out", "out").returncode == 0


@pytest.mark.parametrize("name,raw,what", [
    ("image.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "a PNG image"),
    ("paper.txt", b"%PDF-1.7\n" + bytes(range(128, 256)) * 8, "a PDF document"),
    ("noise.txt", bytes(np.random.RandomState(0).randint(1, 256, 4096, dtype=np.uint8)),
     "binary data ("),
    ("docs.jsonl", b"\x89HDF\r\n\x1a\n" + b"\x01" * 64, "an HDF5 file"),
])
def test_prepare_names_a_binary_format_without_encoding_advice(capfd, tmp_path, monkeypatch, name,
                                                               raw, what):
  """No `iconv` for bytes that are no text in any encoding: it would make garbage tokens."""
  monkeypatch.chdir(tmp_path)
  with open(name, "wb") as f:
    f.write(raw)
  line = refusal(run(capfd, "prepare", name, "--out", "out"))
  assert what in line and "iconv" not in line and "UTF-8" not in line, line
  assert not os.path.exists("out")


@pytest.mark.parametrize("name,write,what", [
    ("corpus.txt.gz", lambda p: open(p, "wb").write(gzip.compress(TEXT.encode())), "gzip-compressed"),
    ("corpus.txt", lambda p: open(p, "wb").write(TEXT.encode("utf-16")), "UTF-16 text"),
    ("corpus.tar", write_tar, "tar archive"),
])
def test_training_on_a_compressed_or_encoded_text_file_names_it_and_its_advice_works(
    capfd, tmp_path, monkeypatch, name, write, what):
  """The same kinds as prepare's, for --config.data.path read as raw text: one line naming the
  field and what the file is; the advised commands run and the advised data.path trains."""
  monkeypatch.chdir(tmp_path)
  write(name)
  line = refusal(run(capfd, "train", "--config", "tiny_cpu", "--cpu_devices", "8", "--workdir", "w",
                     f"--config.data.path={name}"))
  assert line.startswith(f"jaxdp: error: config.data.path={os.path.abspath(name)!r} is ") \
      and what in line and "latin1" not in line, line
  assert not os.path.exists("w")
  for command in advised(line):
    subprocess.run(command, shell=True, check=True, cwd=tmp_path, timeout=120)
  (path,) = re.findall(r"--config\.data\.path=(\S+)$", line)
  schema.check_value("data.path", path)
  from jaxdp.data.pipeline import open_data
  train, _, tokenizer = open_data(path)
  assert len(train) >= len(TEXT.encode()) - 1


def test_a_training_path_that_does_not_exist_says_so_before_any_advice(capfd, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  # In this process without --cpu_devices: a refusal after the run set up its devices would fail
  # the test (tests/cli_inprocess.py), so each is refused before any JAX work.
  for path in ("/nonexistent/x.jsonl", "missing.parquet", "/nonexistent/x.txt", "missing.bin",
               "missing_dir/"):
    line = refusal(run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w",
                       f"--config.data.path={path}"))
    assert f"config.data.path={path!r} does not exist" in line, line
    assert "jaxdp prepare" not in line and "UTF-8" not in line, line  # No format advice.
  line = refusal(run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w",
                     "--config.data.sources=missing.txt:1"))
  assert "config.data.sources entry 'missing.txt' does not exist" in line, line
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
