"""Documents from the inputs of `jaxdp prepare`, streamed in bounded pieces.

Kinds of input (by suffix; a folder is walked for the file kinds, in sorted order):
  text      .txt .text .md .rst   one document per file, read in chunks
  JSONL     .jsonl                one document per line: the string field `text_field`
  Parquet   .parquet              one document per row of the column `text_field` (pyarrow)
  Arrow     .arrow                a `datasets` Arrow file: one document per row of `text_field`
  dataset   a folder written by `datasets.Dataset.save_to_disk` (its "train" split for a
            DatasetDict): one document per row of `text_field`

`iter_pieces` yields (text, ends_document) with each text at most about `chunk_chars`
characters, so a file larger than memory is never held whole: a long text file is cut after a
newline that sits between two non-space characters, where byte-level BPE pre-tokenisation splits
anyway (so the tokens equal those of the whole file for byte-level BPE tokenizers).
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator, Sequence
import hashlib
import json
import os

from jaxdp.errors import JaxdpError

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
PARQUET_SUFFIXES = (".parquet",)
ARROW_SUFFIXES = (".arrow",)
DOCUMENT_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES
CHUNK_BYTES = 16 << 20  # Text read per piece: bounds prepare's memory (docs/data.md).


def is_saved_dataset(path: str) -> bool:
  """A folder written by `datasets` `save_to_disk` (a Dataset or a DatasetDict)."""
  return os.path.isdir(path) and (
      os.path.isfile(os.path.join(path, "dataset_dict.json"))
      or (os.path.isfile(os.path.join(path, "state.json"))
          and os.path.isfile(os.path.join(path, "dataset_info.json"))))


def list_inputs(inputs: Sequence[str], skipped: list[str] | None = None) -> list[str]:
  """Files named directly, saved datasets, and every document file under named folders (sorted).

  Files under a folder with another suffix are left out and appended to `skipped`, so the caller
  can say so instead of dropping them silently.
  """
  if not inputs:
    raise JaxdpError("prepare: no INPUT given; name text, JSONL or Parquet files, saved datasets "
                     "or folders")
  found_all: list[str] = []
  for item in inputs:
    if not os.path.exists(item):
      raise JaxdpError(f"prepare: input {item!r} does not exist; check the path")
    if item.endswith(".bin") and os.path.isfile(item):
      raise JaxdpError(f"prepare: {item!r} is a token file (.bin), already tokenized; train on it "
                       f"directly with --config.data.path={item}")
    if os.path.isfile(item) or is_saved_dataset(item):
      found_all.append(os.path.abspath(item))
      continue
    every = sorted(os.path.abspath(os.path.join(root, name))
                   for root, _, names in os.walk(item) for name in names)
    found = [f for f in every if f.endswith(DOCUMENT_SUFFIXES)]
    if skipped is not None:
      skipped += [f for f in every if f not in found and not os.path.basename(f).startswith(".")]
    if not found:
      raise JaxdpError(f"prepare: folder {item!r} holds no {', '.join(DOCUMENT_SUFFIXES)} files "
                       "and is not a saved dataset; name the files directly or rename them")
    found_all += found
  return list(dict.fromkeys(found_all))  # An input named twice is read once.


def describe(path: str) -> dict:
  """{path, bytes, sha256} of an input file, or of every file of a saved dataset's folder."""
  digest, size = hashlib.sha256(), 0
  files = ([path] if os.path.isfile(path) else
           sorted(os.path.join(root, n) for root, _, names in os.walk(path) for n in names))
  for file in files:
    if file != path:
      digest.update(os.path.relpath(file, path).encode() + b"\0")
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 22), b""):
        digest.update(block)
        size += len(block)
  return {"path": path, "bytes": size, "sha256": digest.hexdigest()}


def iter_pieces(path: str, text_field: str = "text",
                chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[str, bool]]:
  """(text, ends_document) of `path`, in order; see the module docstring.

  Raises:
    JaxdpError: empty input, text that is not UTF-8, a record without a string `text_field`, or
      an optional library (pyarrow, datasets) that is missing.
  """
  if is_saved_dataset(path) or path.endswith(ARROW_SUFFIXES):
    yield from _rows(_hf_dataset(path), path, text_field)
  elif path.endswith(PARQUET_SUFFIXES):
    yield from _parquet(path, text_field)
  elif path.endswith(JSONL_SUFFIXES):
    yield from _jsonl(path, text_field)
  else:
    yield from _text(path, chunk_bytes)


def _utf8_error(path: str, raw: bytes, e: UnicodeDecodeError, where: str) -> JaxdpError:
  return JaxdpError(f"prepare: {path!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at {where}); "
                    "convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out")


def last_safe_cut(text: str) -> int:
  """The last index i with text[i-2] non-space, text[i-1] == "\\n", text[i] non-space; 0 if none."""
  i = len(text) - 1
  while True:
    i = text.rfind("\n", 0, i)
    if i < 1:
      return 0
    if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
      return i + 1


def _text(path: str, chunk_bytes: int) -> Iterator[tuple[str, bool]]:
  decoder = codecs.getincrementaldecoder("utf-8")("strict")
  pending, offset, any_text = "", 0, False
  with open(path, "rb") as f:
    while True:
      raw = f.read(chunk_bytes)
      try:
        pending += decoder.decode(raw, final=not raw)
      except UnicodeDecodeError as e:
        raise _utf8_error(path, raw, e, f"byte offset {offset + e.start}") from None
      offset += len(raw)
      any_text = any_text or bool(pending.strip())
      if not raw:
        break
      cut = last_safe_cut(pending)
      # No safe cut in several chunks (one enormous line, say): cut anyway to bound memory.
      if cut == 0 and len(pending) > 4 * chunk_bytes:
        cut = len(pending)
      if cut:
        yield pending[:cut], False
        pending = pending[cut:]
  if not any_text:
    raise JaxdpError(f"prepare: input {path!r} is empty; leave it out or give it text")
  yield pending, True


def _field(record, path: str, where: str, text_field: str) -> str:
  if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
    raise JaxdpError(f"prepare: {path!r} {where} has no string {text_field!r} field; each record "
                     f"needs one (choose the field with --text_field)")
  return record[text_field]


def _jsonl(path: str, text_field: str) -> Iterator[tuple[str, bool]]:
  count = 0
  with open(path, "rb") as f:
    for number, line in enumerate(f, start=1):  # One line at a time: never the whole file.
      if not line.strip():
        continue
      try:
        record = json.loads(line.decode("utf-8"))
      except UnicodeDecodeError as e:
        raise _utf8_error(path, line, e, f"line {number}") from None
      except json.JSONDecodeError as e:
        raise JaxdpError(f"prepare: {path!r} line {number} is not JSON ({e.msg}); JSONL needs one "
                         "object per line") from None
      text = _field(record, path, f"line {number}", text_field)
      if text:
        count += 1
        yield text, True
  if not count:
    raise JaxdpError(f"prepare: {path!r} holds no non-empty {text_field!r} fields")


def _parquet(path: str, text_field: str) -> Iterator[tuple[str, bool]]:
  try:
    import pyarrow.parquet as pq
  except ImportError:
    raise JaxdpError(f"prepare: {path!r} is Parquet, which needs pyarrow: pip install "
                     "'jaxdp[data]'") from None
  try:
    file = pq.ParquetFile(path)
  except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file.
    raise JaxdpError(f"prepare: cannot read {path!r} as Parquet ({e}); check the file") from None
  if text_field not in file.schema_arrow.names:
    raise JaxdpError(f"prepare: {path!r} has no column {text_field!r} (columns: "
                     f"{', '.join(file.schema_arrow.names)}); choose one with --text_field")
  count = 0
  for batch in file.iter_batches(batch_size=1024, columns=[text_field]):
    for text in batch.column(0).to_pylist():
      if not isinstance(text, str):
        raise JaxdpError(f"prepare: {path!r} column {text_field!r} holds {type(text).__name__}, "
                         "not strings; choose a text column with --text_field")
      if text:
        count += 1
        yield text, True
  if not count:
    raise JaxdpError(f"prepare: {path!r} holds no non-empty {text_field!r} values")


def _hf_dataset(path: str):
  try:
    import datasets
  except ImportError:
    raise JaxdpError(f"prepare: {path!r} is a Hugging Face dataset, which needs `datasets`: pip "
                     "install 'jaxdp[data]'") from None
  if path.endswith(ARROW_SUFFIXES):
    return datasets.Dataset.from_file(path)  # Memory-mapped.
  loaded = datasets.load_from_disk(path)
  if isinstance(loaded, datasets.DatasetDict):
    if "train" not in loaded:
      raise JaxdpError(f"prepare: the dataset at {path!r} has splits {', '.join(loaded)} but no "
                       "'train'; save the split to prepare on its own with save_to_disk")
    loaded = loaded["train"]
  return loaded


def _rows(dataset, path: str, text_field: str) -> Iterator[tuple[str, bool]]:
  if text_field not in dataset.column_names:
    raise JaxdpError(f"prepare: the dataset at {path!r} has no column {text_field!r} (columns: "
                     f"{', '.join(dataset.column_names)}); choose one with --text_field")
  count = 0
  for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
    for text in batch[text_field]:
      if not isinstance(text, str):
        raise JaxdpError(f"prepare: the dataset at {path!r} column {text_field!r} holds "
                         f"{type(text).__name__}, not strings; choose a text column with --text_field")
      if text:
        count += 1
        yield text, True
  if not count:
    raise JaxdpError(f"prepare: the dataset at {path!r} holds no non-empty {text_field!r} values")
