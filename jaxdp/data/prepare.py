"""The prepared-data format: `jaxdp prepare` writes it, `open_prepared` reads it.

A prepared directory holds ONE token stream: every document of the inputs, in input order (each
followed by the end-of-text token with the BPE tokenizer; simply concatenated with the byte
tokenizer, like `cat`), cut into records of `tokens_per_record` tokens:

  manifest.json               inputs (path, bytes, sha256), tokenizer, token counts, shards (sha256)
  tokenizer.json              the trained byte-level BPE tokenizer (absent for "byte")
  tokens-00000.array_record   record r = tokens[r*C : (r+1)*C], C = tokens_per_record

Training reads windows of the stream by random access (grain's ArrayRecordDataSource), so the
validation split (the stream's tail, config.data.val_fraction) and seq_len are chosen when
training, exactly as for a raw text file. The manifest is written last: a directory without one
is not a finished preparation.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import threading
from typing import Iterator, Sequence

import numpy as np

from jaxdp.data.pipeline import ByteTokenizer
from jaxdp.errors import JaxdpError, os_reason

FORMAT = "jaxdp-prepared"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZERS = ("byte", "bpe")
END_OF_TEXT = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst")
JSONL_SUFFIXES = (".jsonl",)
TOKENS_PER_RECORD = 4096
RECORDS_PER_SHARD = 2048
# Long documents are cut for parallel encoding only where byte-level BPE splits anyway (see
# _encoding_pieces), so the tokens are identical to encoding the whole document.
ENCODE_PIECE_CHARS = 1 << 16
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


class BPETokenizer:
  """A byte-level BPE tokenizer (`tokenizers` library): decode(encode(x)) == x for any text."""

  name = "bpe"

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self.vocab_size = tokenizer.get_vocab_size()
    self.end_of_text = tokenizer.token_to_id(END_OF_TEXT)

  @classmethod
  def load(cls, path: str) -> "BPETokenizer":
    import tokenizers
    return cls(tokenizers.Tokenizer.from_file(path))

  def save(self, path: str) -> None:
    self._tokenizer.save(path)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tokenizer.encode(text).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes on all cores (the library's Rust thread pool)."""
    return [np.asarray(e.ids, np.int32) for e in self._tokenizer.encode_batch(list(texts))]

  def decode(self, ids) -> str:
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()],
                                  skip_special_tokens=False)


def train_bpe(documents: Sequence[str], vocab_size: int) -> BPETokenizer:
  """Byte-level BPE (GPT-2 style, no normaliser) with END_OF_TEXT as its one special token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(documents, trainer, length=len(documents))
  return BPETokenizer(tokenizer)


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16
                  else np.uint32)


# ---- Reading inputs ---------------------------------------------------------------------------

def list_input_files(inputs: Sequence[str], skipped: list[str] | None = None) -> list[str]:
  """Files named directly, plus every text/JSONL file under named directories (sorted).

  Files under a directory with another suffix are left out and appended to `skipped`, so the
  caller can say so instead of dropping them silently.
  """
  if not inputs:
    raise JaxdpError("prepare: no INPUT given; name text files, JSONL files or directories")
  files: list[str] = []
  for item in inputs:
    if not os.path.exists(item):
      raise JaxdpError(f"prepare: input {item!r} does not exist; check the path")
    if os.path.isfile(item):
      files.append(os.path.abspath(item))
      continue
    every = sorted(os.path.abspath(os.path.join(root, name))
                   for root, _, names in os.walk(item) for name in names)
    found = [f for f in every if f.endswith(TEXT_SUFFIXES + JSONL_SUFFIXES)]
    if skipped is not None:
      skipped += [f for f in every if f not in found and not os.path.basename(f).startswith(".")]
    if not found:
      raise JaxdpError(f"prepare: directory {item!r} holds no {', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)} "
                       "files; name the files directly or rename them")
    files += found
  return list(dict.fromkeys(files))  # A file named twice is read once.


def _decode_utf8(raw: bytes, path: str, line: int | None = None) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    where = f"line {line}" if line is not None else f"byte offset {e.start}"
    raise JaxdpError(f"prepare: {path!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at {where}); "
                     "convert it, e.g. `iconv -f latin1 -t utf-8`, or leave it out") from None


def read_documents(path: str, raw: bytes) -> list[str]:
  """A text file is one document; a JSONL file is one document per line's "text" field."""
  if not raw.strip():
    raise JaxdpError(f"prepare: input {path!r} is empty; leave it out or give it text")
  if not path.endswith(JSONL_SUFFIXES):
    return [_decode_utf8(raw, path)]
  documents = []
  for number, line in enumerate(raw.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(_decode_utf8(line, path, number))
    except json.JSONDecodeError as e:
      raise JaxdpError(f"prepare: {path!r} line {number} is not JSON ({e.msg}); JSONL needs one "
                       "object per line") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise JaxdpError(f"prepare: {path!r} line {number} has no string \"text\" field; each JSONL "
                       "line must be an object like {\"text\": \"...\"}")
    if record["text"]:
      documents.append(record["text"])
  if not documents:
    raise JaxdpError(f"prepare: {path!r} holds no non-empty \"text\" fields")
  return documents


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _encoding_pieces(text: str) -> list[str]:
  """Cuts text after a newline that sits between two non-space characters.

  Byte-level BPE pre-tokenises "x\\ny" into "x", "\\n", "y" whatever surrounds the cut, and merges
  never cross pre-tokens, so encoding the pieces gives the tokens of the whole text.
  """
  pieces, start = [], 0
  while len(text) - start > ENCODE_PIECE_CHARS:
    cut = _SAFE_CUT.search(text, start + ENCODE_PIECE_CHARS)
    if cut is None:
      break
    pieces.append(text[start:cut.start()])
    start = cut.start()
  pieces.append(text[start:])
  return pieces


# ---- Writing shards ---------------------------------------------------------------------------

class _ShardWriter:
  """Appends tokens to records of `tokens_per_record`, rolling to a new shard every N records."""

  def __init__(self, out: str, dtype: np.dtype, tokens_per_record: int, records_per_shard: int):
    self._out, self._dtype = out, dtype
    self._per_record, self._per_shard = tokens_per_record, records_per_shard
    self._pending: list[np.ndarray] = []
    self._pending_count = 0
    self._writer = None
    self._records_in_shard = 0
    self.shards: list[dict] = []

  def add(self, tokens: np.ndarray) -> None:
    self._pending.append(tokens.astype(self._dtype))
    self._pending_count += len(tokens)
    if self._pending_count >= self._per_record:
      buffer = np.concatenate(self._pending)
      full = len(buffer) // self._per_record * self._per_record
      for start in range(0, full, self._per_record):
        self._write_record(buffer[start:start + self._per_record])
      self._pending, self._pending_count = [buffer[full:]], len(buffer) - full

  def close(self) -> list[dict]:
    if self._pending_count:
      self._write_record(np.concatenate(self._pending))
    self._close_shard()
    return self.shards

  def _write_record(self, record: np.ndarray) -> None:
    from array_record.python.array_record_module import ArrayRecordWriter
    if self._writer is None:
      name = f"tokens-{len(self.shards):05d}.array_record"
      self._writer = ArrayRecordWriter(os.path.join(self._out, name), "group_size:1")
      self.shards.append({"file": name, "records": 0, "tokens": 0})
    self._writer.write(record.tobytes())
    self.shards[-1]["records"] += 1
    self.shards[-1]["tokens"] += len(record)
    if self.shards[-1]["records"] == self._per_shard:
      self._close_shard()

  def _close_shard(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None
      path = os.path.join(self._out, self.shards[-1]["file"])
      self.shards[-1].update(bytes=os.path.getsize(path), sha256=sha256_file(path))


def _up_to_date(out: str, request: dict) -> dict | None:
  """The existing manifest if it was made from the same inputs and options and is intact."""
  try:
    manifest = read_manifest(out)
  except JaxdpError:
    return None
  if manifest.get("request") != request:
    return None
  for shard in manifest["shards"]:
    path = os.path.join(out, shard["file"])
    if not os.path.exists(path) or os.path.getsize(path) != shard["bytes"]:
      return None
  return manifest


def _clear_previous(out: str) -> None:
  """Removes an earlier preparation's files (and only those) before writing a new one."""
  if not os.path.isdir(out):
    os.makedirs(out, exist_ok=True)
    return
  manifest_path = os.path.join(out, MANIFEST)
  if not os.path.exists(manifest_path):
    if os.listdir(out):
      raise JaxdpError(f"prepare: --out={out!r} exists, is not empty and holds no {MANIFEST}; give "
                       "a new or empty directory (prepare will not overwrite other files)")
    return
  with open(manifest_path) as f:
    old = json.load(f)
  os.remove(manifest_path)  # First: a half-rewritten directory must not look finished.
  for name in [s["file"] for s in old.get("shards", [])] + [TOKENIZER_FILE]:
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))


def prepare(inputs: Sequence[str], out: str, *, tokenizer: str = "byte", vocab_size: int = 4096,
            tokens_per_record: int = TOKENS_PER_RECORD, records_per_shard: int = RECORDS_PER_SHARD,
            progress: bool = True) -> dict:
  """Tokenises `inputs` into `out` and returns the manifest; a no-op if `out` is up to date."""
  if tokenizer not in TOKENIZERS:
    raise JaxdpError(f"prepare: --tokenizer={tokenizer!r} is not one of {', '.join(TOKENIZERS)}")
  if tokenizer == "bpe" and vocab_size < 257:
    raise JaxdpError(f"prepare: --vocab_size={vocab_size} is too small for byte-level BPE; it "
                     "needs at least 257 (256 bytes + end-of-text)")
  skipped: list[str] = []
  files = list_input_files(inputs, skipped)
  if skipped:
    shown = ", ".join(repr(os.path.relpath(f)) for f in skipped[:5])
    print(f"jaxdp: warning: prepare skipped {len(skipped)} file(s) whose suffix is not "
          f"{', '.join(TEXT_SUFFIXES + JSONL_SUFFIXES)}: {shown}{' ...' if len(skipped) > 5 else ''}; "
          "name a file directly to include it", file=sys.stderr, flush=True)
  raws = {}
  described = []
  for path in files:
    with open(path, "rb") as f:
      raws[path] = f.read()
    described.append({"path": path, "bytes": len(raws[path]),
                      "sha256": hashlib.sha256(raws[path]).hexdigest()})
  request = {"version": VERSION, "tokenizer": tokenizer,
             "vocab_size": vocab_size if tokenizer == "bpe" else 256,
             "tokens_per_record": tokens_per_record, "inputs": [dict(d) for d in described]}
  existing = _up_to_date(out, request)
  if existing is not None:
    existing["up_to_date"] = True
    return existing
  documents_per_file = {path: read_documents(path, raws[path]) for path in files}
  del raws
  documents = [d for path in files for d in documents_per_file[path]]
  _clear_previous(out)
  if tokenizer == "bpe":
    tok = train_bpe(documents, vocab_size)
    tok.save(os.path.join(out, TOKENIZER_FILE))
  else:
    tok = ByteTokenizer()
  dtype = token_dtype(tok.vocab_size)
  writer = _ShardWriter(out, dtype, tokens_per_record, records_per_shard)
  tokens_per_file = {}
  for path, tokens in _encode_files(tok, files, documents_per_file, progress):
    writer.add(tokens)
    tokens_per_file[path] = tokens_per_file.get(path, 0) + len(tokens)
  shards = writer.close()
  for entry in described:
    entry.update(documents=len(documents_per_file[entry["path"]]),
                 tokens=tokens_per_file.get(entry["path"], 0))
  manifest = {
      "format": FORMAT, "request": request,
      "tokenizer": {"kind": tok.name, "vocab_size": tok.vocab_size,
                    "file": TOKENIZER_FILE if tokenizer == "bpe" else None,
                    "end_of_text": getattr(tok, "end_of_text", None)},
      "num_documents": len(documents), "num_tokens": sum(s["tokens"] for s in shards),
      "dtype": dtype.name, "tokens_per_record": tokens_per_record, "shards": shards,
      "inputs": described,
      "split": {"validation": "the last config.data.val_fraction of the token stream, chosen "
                              "when training; the rest is the training split"},
  }
  tmp = os.path.join(out, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out, MANIFEST))
  manifest["up_to_date"] = False
  return manifest


def _encode_files(tok, files: list[str], documents_per_file: dict[str, list[str]],
                  progress: bool) -> Iterator[tuple[str, np.ndarray]]:
  """(file, tokens) per document, in input order; BPE encodes batches of pieces on all cores."""
  from tqdm.auto import tqdm
  total = sum(len(d) for docs in documents_per_file.values() for d in docs)
  with tqdm(total=total, unit="char", unit_scale=True, desc="tokenizing",
            disable=not progress) as bar:
    for path in files:
      for document in documents_per_file[path]:
        if isinstance(tok, BPETokenizer):
          pieces = _encoding_pieces(document)
          tokens = np.concatenate(tok.encode_batch(pieces) + [np.array([tok.end_of_text], np.int32)])
        else:
          tokens = tok.encode(document)
        bar.update(len(document))
        yield path, tokens


# ---- Reading a prepared directory -------------------------------------------------------------

def is_prepared(path: str) -> bool:
  return os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(path: str) -> dict:
  manifest_path = os.path.join(path, MANIFEST)
  if not os.path.isfile(manifest_path):
    raise JaxdpError(f"config.data.path={path!r} is a directory without {MANIFEST}; prepare it "
                     f"first (`jaxdp prepare {path} --out PREPARED`) and point config.data.path at "
                     "PREPARED")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != FORMAT or manifest.get("request", {}).get("version") != VERSION:
    raise JaxdpError(f"{manifest_path!r} is not a {FORMAT} v{VERSION} manifest; re-run "
                     "`jaxdp prepare` with this jaxdp version")
  return manifest


class ShardedTokens:
  """tokens[start:stop] of a prepared stream, read from ArrayRecord records on demand.

  Slicing returns another view without reading; np.asarray(view) reads the records it spans.
  """

  def __init__(self, source, tokens_per_record: int, dtype: np.dtype, start: int, stop: int):
    self._source, self._per_record, self._dtype = source, tokens_per_record, dtype
    self._start, self._stop = start, stop
    self._lock = threading.Lock()  # The prefetch thread and evaluation read concurrently.

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, key: slice) -> "ShardedTokens":
    start, stop, step = key.indices(len(self))
    if step != 1:
      raise ValueError("ShardedTokens supports contiguous slices only")
    return ShardedTokens(self._source, self._per_record, self._dtype, self._start + start,
                         self._start + max(start, stop))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    if not len(self):
      return np.zeros(0, dtype or np.int32)
    first, last = self._start // self._per_record, (self._stop - 1) // self._per_record
    with self._lock:
      records = [self._source[r] for r in range(first, last + 1)]
    tokens = np.concatenate([np.frombuffer(r, self._dtype) for r in records])
    offset = self._start - first * self._per_record
    return tokens[offset:offset + len(self)].astype(dtype or np.int32)


def open_prepared(path: str) -> tuple[ShardedTokens, object]:
  """(token stream, tokenizer) of a prepared directory."""
  import grain
  manifest = read_manifest(path)
  files = [os.path.join(path, s["file"]) for s in manifest["shards"]]
  for shard, file in zip(manifest["shards"], files):
    if not os.path.exists(file) or os.path.getsize(file) != shard["bytes"]:
      raise JaxdpError(f"{file!r} is missing or changed since `jaxdp prepare` wrote it; prepare "
                       f"{path!r} again")
  info = manifest["tokenizer"]
  tokenizer = (BPETokenizer.load(os.path.join(path, info["file"])) if info["kind"] == "bpe"
               else ByteTokenizer())
  source = grain.sources.ArrayRecordDataSource(files)
  tokens = ShardedTokens(source, manifest["tokens_per_record"], np.dtype(manifest["dtype"]), 0,
                         manifest["num_tokens"])
  return tokens, tokenizer


WORKDIR_TOKENIZER = "tokenizer"  # WORKDIR/tokenizer/: the run's own copy of its tokenizer.


def save_tokenizer(tokenizer, workdir: str) -> str:
  """Writes `tokenizer` into WORKDIR/tokenizer/ (atomically), so sampling, inspecting and
  exporting a run never need its data again: `tokenizer.json` for BPE, `byte.json` for bytes."""
  folder = os.path.join(workdir, WORKDIR_TOKENIZER)
  name = TOKENIZER_FILE if isinstance(tokenizer, BPETokenizer) else "byte.json"
  target, tmp = os.path.join(folder, name), os.path.join(folder, name + ".tmp")
  if os.path.exists(target):  # A resumed run: the data's digest already matched the saved run.
    return folder
  try:
    os.makedirs(folder, exist_ok=True)
    if isinstance(tokenizer, BPETokenizer):
      tokenizer.save(tmp)
    else:
      with open(tmp, "w") as f:
        json.dump({"kind": "byte", "vocab_size": tokenizer.vocab_size}, f)
    os.replace(tmp, target)
  except OSError as e:
    raise JaxdpError(f"cannot write the run's tokenizer to {folder!r}: "
                     f"{os_reason(e, folder)}; free space or pick another --workdir") from None
  return folder


def load_tokenizer(workdir: str):
  """The tokenizer saved by `save_tokenizer` in `workdir`, or None if the run has none saved."""
  folder = os.path.join(workdir, WORKDIR_TOKENIZER)
  if os.path.exists(os.path.join(folder, TOKENIZER_FILE)):
    return BPETokenizer.load(os.path.join(folder, TOKENIZER_FILE))
  if os.path.exists(os.path.join(folder, "byte.json")):
    return ByteTokenizer()
  return None
