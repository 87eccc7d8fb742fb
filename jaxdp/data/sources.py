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
import dataclasses
import hashlib
import json
import os
import shlex
import sys

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
    check_not_binary(path)
    yield from _jsonl(path, text_field)
  else:
    check_not_binary(path)
    yield from _text(path, chunk_bytes)


# Leading bytes of compressed files: (magic, what it is, the command that decompresses to stdout).
_COMPRESSED = ((b"\x1f\x8b", "gzip-compressed", "gunzip -c", (".gz",)),
               (b"BZh", "bzip2-compressed", "bunzip2 -c", (".bz2",)),
               (b"\xfd7zXZ\x00", "xz-compressed", "xz -dc", (".xz",)),
               (b"\x28\xb5\x2f\xfd", "zstd-compressed", "zstd -dc", (".zst",)))
_TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tar")
# Leading bytes of other binary formats: (magic, what it is, what to do instead).
_FORMATS = ((b"\x89PNG\r\n\x1a\n", "a PNG image", ""), (b"\xff\xd8\xff", "a JPEG image", ""),
            (b"GIF8", "a GIF image", ""),
            (b"%PDF-", "a PDF document", "extract its text with a PDF tool first (e.g. pdftotext)"),
            (b"\x7fELF", "an executable (ELF)", ""),
            (b"SQLite format 3\x00", "an SQLite database", "export its text column first"),
            (b"\x89HDF\r\n\x1a\n", "an HDF5 file", ""),
            (b"PAR1", "a Parquet file", "name it with a .parquet suffix so it is read as Parquet"),
            (b"ARROW1", "an Arrow file", "name it with an .arrow suffix so it is read as Arrow"),
            (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract it first (e.g. 7z x)"),
            (b"Rar!\x1a\x07", "a RAR archive", "extract it first (e.g. unrar x)"))
# Byte-order marks of the encodings iconv converts (the longer UTF-32 marks first).
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32LE"), (b"\x00\x00\xfe\xff", "UTF-32BE"),
         (b"\xff\xfe", "UTF-16LE"), (b"\xfe\xff", "UTF-16BE"))
# C0 control bytes text does not hold (tab, newlines, vertical tab, form feed and escape it may).
_CONTROL = frozenset(range(0x20)) - {0x09, 0x0a, 0x0b, 0x0c, 0x0d, 0x1b} | {0x7f}


@dataclasses.dataclass(frozen=True)
class NotText:
  """What a file given as text really is, and how to get text from it.

  what: "gzip-compressed", "a zip archive", "UTF-16 text", "a PNG image", ...
  command: a shell command that writes text (or a folder of files) to `out`; "" if there is none.
  out: what `command` writes; `folder`: whether that is a folder.
  encoding: text in another encoding than UTF-8 (the command converts it).
  advice: what to do when there is no command ("give the text it was made from").
  """
  what: str
  command: str = ""
  out: str = ""
  folder: bool = False
  encoding: bool = False
  advice: str = "give the text it was made from"


def _beside(path: str, suffix: str, ext: str = "") -> str:
  """`path` without `suffix` (when it ends so), keeping a remaining extension, else plus `ext`."""
  stem = path[:-len(suffix)] if suffix and path.lower().endswith(suffix) else path
  return stem if stem != path and os.path.splitext(stem)[1] else stem + ext


def sniff(path: str, head: bytes) -> NotText | None:
  """What `path` is, from its first bytes `head` (8 KiB), if it is not UTF-8 text; None if it
  may be (the decoder then checks every byte). Compressed files, archives, UTF-16 and UTF-32
  text, known binary formats, and bytes with NULs or many control codes (NumPy arrays are the
  callers', whose advice differs)."""
  quoted, lowered = shlex.quote(path), path.lower()
  tar_suffix = next((x for x in _TAR_SUFFIXES if lowered.endswith(x)), "")
  is_tar = len(head) > 262 and head[257:262] == b"ustar"
  compressed = next((c for c in _COMPRESSED if head.startswith(c[0])), None)
  if is_tar or (tar_suffix and compressed):  # GNU tar reads each compression on its own.
    folder = _beside(path, tar_suffix) + "_files" if tar_suffix else os.path.splitext(path)[0] + "_files"
    kind = "a tar archive" if is_tar or compressed is None else f"a {compressed[1]} tar archive"
    return NotText(kind, f"mkdir -p {shlex.quote(folder)} && tar -xf {quoted} -C "
                   f"{shlex.quote(folder)}", folder, True)
  if compressed:
    _, what, command, suffixes = compressed
    out = _beside(path, next((x for x in suffixes if lowered.endswith(x)), ""), ".txt")
    return NotText(what, f"{command} {quoted} > {shlex.quote(out)}", out)
  if head.startswith(b"PK\x03\x04"):
    folder = os.path.splitext(path)[0] + "_files"
    return NotText("a zip archive", f"unzip {quoted} -d {shlex.quote(folder)}", folder, True)
  for bom, encoding in _BOMS:
    if head.startswith(bom):
      out = _beside(path, os.path.splitext(path)[1]) + ".utf8" + (os.path.splitext(path)[1] or ".txt")
      return NotText(f"{encoding[:6]} text (a {encoding} byte-order mark)",
                     f"iconv -f {encoding[:6]} -t UTF-8 {quoted} > {shlex.quote(out)}", out,
                     encoding=True)
  even, odd = head[0::2], head[1::2]
  if len(head) >= 16 and min(even.count(0), odd.count(0)) == 0 and \
      max(even.count(0) / len(even), odd.count(0) / len(odd)) > 0.9:  # ASCII in UTF-16, no mark.
    encoding = "UTF-16LE" if odd.count(0) > even.count(0) else "UTF-16BE"
    out = _beside(path, os.path.splitext(path)[1]) + ".utf8" + (os.path.splitext(path)[1] or ".txt")
    return NotText(f"{encoding} text (no byte-order mark)",
                   f"iconv -f {encoding} -t UTF-8 {quoted} > {shlex.quote(out)}", out, encoding=True)
  for magic, what, advice in _FORMATS:
    if head.startswith(magic):
      return NotText(what, advice=advice or "give the text it was made from")
  if b"\x00" in head:
    return NotText(f"binary data (NUL bytes, the first at byte offset {head.index(0)})")
  controls = sum(head.count(c) for c in _CONTROL)
  if controls > max(8, len(head) // 100):  # Random bytes hold ~12%; text none, or a stray few.
    return NotText(f"binary data ({controls} of its first {len(head)} bytes are control codes)")
  return None


def _refusal(who: str, found: NotText, then: str) -> JaxdpError:
  """One line: `who` is what `found` says, not (UTF-8) text; the command that gives text, then
  `then` (what to run on its output); or the advice when no command gives text."""
  verb = "extract" if found.folder else "convert" if found.encoding else "decompress"
  todo = f"{verb} it first: `{found.command}`, then {then}" if found.command else found.advice
  return JaxdpError(f"{who} is {found.what}, not {'UTF-8 ' if found.encoding else ''}text; {todo}")


def check_not_binary(path: str) -> None:
  """Refuses a compressed, archived, NumPy or other binary file given to `jaxdp prepare` as text
  or JSONL: its bytes would fail as "not UTF-8" (with advice to re-encode what is no text) or,
  worse, decode (`sniff` says what it is).

  Raises:
    JaxdpError: naming what the file is and the command that gives text (decompress it first).
  """
  with open(path, "rb") as f:
    head = f.read(8192)
  if head.startswith(b"\x93NUMPY"):
    raise JaxdpError(f"prepare: {path!r} is a NumPy .npy array, not text: `jaxdp prepare` reads "
                     "text, JSONL and Parquet. If it holds token ids (< 65,536), write them as a "
                     "headerless uint16 token file and train on that directly (docs/data.md, token "
                     f"files): `python -c \"import numpy as np; np.load({path!r}).astype(np.uint16)"
                     f".tofile('tokens.bin')\"`, then --config.data.path=tokens.bin with "
                     "--config.data.tokenizer set to the tokenizer that made the ids")
  found = sniff(path, head)
  if found is not None:
    then = f"`jaxdp prepare {shlex.quote(found.out)} ...`"
    raise _refusal(f"prepare: {path!r}", found, then)


def check_training_text(path: str, head: bytes, field: str = "config.data.path") -> None:
  """Refuses a file given to training as raw text that `sniff` finds is not UTF-8 text, naming
  what it is and the command that gives text, then the `field` setting that trains on it.

  Raises:
    JaxdpError: one line naming `field`, what the file is, and the fix.
  """
  if head.startswith(b"\x93NUMPY"):
    raise JaxdpError(f"{field}={path!r} is a NumPy .npy array, not text; for token ids write a "
                     "token file (docs/data.md, token files) and train on that")
  found = sniff(path, head)
  if found is None:
    return
  out = shlex.quote(found.out)
  if found.folder or found.out.lower().endswith(DOCUMENT_SUFFIXES[len(TEXT_SUFFIXES):]):
    prepared = shlex.quote(os.path.splitext(found.out)[0] + "_prepared")
    then = f"`jaxdp prepare {out} --out {prepared}`, then --config.data.path={prepared}"
  else:
    then = f"--config.data.path={out}"
  raise _refusal(f"{field}={path!r}", found, then)


def _named(field: str, path: str) -> str:
  """"config.data.path='x'", or "config.data.sources entry 'x'" for one entry of a list."""
  return f"{field} {path!r}" if field.endswith(" entry") else f"{field}={path!r}"


def check_exists(path: str, field: str = "config.data.path") -> None:
  """Refuses a local input path that is not there, before any advice about its format ("" is
  the built-in corpus; a URL is left to its reader).

  Raises:
    JaxdpError: one line naming `field` and the path, and where a relative path is taken from.
  """
  if path and "://" not in path and not os.path.exists(path):
    raise JaxdpError(f"{_named(field, path)} does not exist; check the path (relative paths are from "
                     f"{os.getcwd()!r})")


def check_trainable(path: str, field: str = "config.data.path") -> None:
  """Refuses a document file (JSONL, Parquet, Arrow, a saved dataset) given as training data:
  training reads text, token files and `jaxdp prepare` output, and would otherwise take a JSONL
  file's JSON syntax itself for the text.

  Raises:
    JaxdpError: naming `field` and the `jaxdp prepare` command that makes it trainable, or
      saying that a local document path does not exist.
  """
  lowered = path.lower().rstrip("/")
  document = lowered.endswith(JSONL_SUFFIXES + PARQUET_SUFFIXES + ARROW_SUFFIXES + (".json",)) \
      or (bool(path) and is_saved_dataset(path))
  if document:  # Advice to prepare a path that is not there would fail in turn.
    check_exists(path, field)
  if document:
    out = os.path.splitext(path.rstrip("/"))[0] + "_prepared"
    raise JaxdpError(f"{_named(field, path)} is a document file (records, not text): training would "
                     f"read its syntax as text; tokenize it first with `jaxdp prepare "
                     f"{shlex.quote(path)} --out {shlex.quote(out)}`, then train with "
                     f"--config.data.path={shlex.quote(out)}")


def utf8_advice(path: str) -> tuple[str, str]:
  """The command that converts a Latin-1 (or Windows-1252) file to UTF-8, and what it writes."""
  ext = os.path.splitext(path)[1]
  out = shlex.quote(path[:len(path) - len(ext)] + ".utf8" + (ext or ".txt"))
  return f"`iconv -f latin1 -t utf-8 {shlex.quote(path)} > {out}`", out


def _utf8_error(path: str, raw: bytes, e: UnicodeDecodeError, where: str) -> JaxdpError:
  command, out = utf8_advice(path)
  return JaxdpError(f"prepare: {path!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at {where}); "
                    f"if it is Latin-1 text, convert it: {command}, then `jaxdp prepare {out} ...`; "
                    "or leave it out")


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


def _check_text(text: str, path: str, where: str) -> None:
  """A JSON string may escape a lone UTF-16 surrogate ("\\ud800"), which is no character."""
  try:
    text.encode("utf-8")
  except UnicodeEncodeError as e:
    raise JaxdpError(f"prepare: {path!r} {where} holds a lone surrogate "
                     f"(\\u{ord(text[e.start]):04x} at character {e.start}), which is not text; "
                     "fix or drop that record") from None


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
      _check_text(text, path, f"line {number}")
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
  count, row, nulls = 0, 0, []
  for batch in file.iter_batches(batch_size=1024, columns=[text_field]):
    for text in batch.column(0).to_pylist():
      row += 1
      if text is None:  # A missing value in a text column: a row without a document.
        nulls.append(row)
        continue
      if not isinstance(text, str):
        raise JaxdpError(f"prepare: {path!r} column {text_field!r} holds {type(text).__name__}, "
                         "not strings; choose a text column with --text_field")
      _check_text(text, path, f"row {row}")
      if text:
        count += 1
        yield text, True
  _note_nulls(path, text_field, nulls)
  if not count:
    raise JaxdpError(f"prepare: {path!r} holds no non-empty {text_field!r} values")


def _note_nulls(path: str, text_field: str, rows: list[int]) -> None:
  """Says on stderr which rows had no text (null) and were skipped, like empty ones."""
  if rows:
    shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
    print(f"prepare: note: {path!r}: skipped {len(rows)} null {text_field!r} value"
          f"{'s' if len(rows) != 1 else ''} (rows {shown}, from 1)", file=sys.stderr)


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
  count, row, nulls = 0, 0, []
  for batch in dataset.select_columns([text_field]).iter(batch_size=1024):
    for text in batch[text_field]:
      row += 1
      if text is None:
        nulls.append(row)
        continue
      if not isinstance(text, str):
        raise JaxdpError(f"prepare: the dataset at {path!r} column {text_field!r} holds "
                         f"{type(text).__name__}, not strings; choose a text column with --text_field")
      _check_text(text, path, f"row {row}")
      if text:
        count += 1
        yield text, True
  _note_nulls(path, text_field, nulls)
  if not count:
    raise JaxdpError(f"prepare: the dataset at {path!r} holds no non-empty {text_field!r} values")
