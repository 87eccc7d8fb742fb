"""The prepared-data format: `jaxdp prepare` writes it, `open_prepared` reads it.

A prepared directory holds ONE token stream: every document of the inputs, in input order, each
followed by the tokenizer's end-of-text token (docs/data.md):

  manifest.json     inputs (path, bytes, sha256), request, tokenizer, token count, dtype, sha256
  tokenizer.json    the tokenizer (BPE trained here, or the --tokenizer file); byte.json for bytes
  tokens.bin        the stream: little-endian uint8 (vocab <= 256), uint16 (<= 65536) or uint32

Training memory-maps tokens.bin (np.memmap) and reads windows on demand, so the validation split
(the stream's tail, config.data.val_fraction) and seq_len are chosen when training, exactly as
for a raw text file. Inputs are read and encoded in pieces of about `chunk_bytes` (sources.py),
so preparing a corpus larger than memory needs memory for one piece. The manifest is written
last: a directory without one is not a finished preparation, and a rerun with the same inputs
and options finds the manifest and does nothing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import hashlib
import json
import os
import re
import sys
import time

import numpy as np

from jaxdp.data import sources
from jaxdp.data import tokenizers as toks
from jaxdp.data.tokenizers import (  # noqa: F401 - re-exported: the names callers know.
  END_OF_TEXT,
  TOKENIZER_FILE,
  BPETokenizer,
  ByteTokenizer,
  HFTokenizer,
  train_bpe,
)
from jaxdp.errors import JaxdpError, WriteFailed, os_reason, writing

FORMAT = "jaxdp-prepared"
VERSION = 2
MANIFEST = "manifest.json"
TOKENS_FILE = "tokens.bin"
CHUNK_BYTES = sources.CHUNK_BYTES
# Pieces of a long text are cut for parallel encoding only where byte-level BPE splits anyway
# (see _encoding_pieces), so the tokens are identical to encoding the whole text.
ENCODE_PIECE_CHARS = 1 << 16
ENCODE_BATCH_CHARS = 1 << 21  # Text per encode_batch call: bounds the Python id lists.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")
PREPARED_FILES = (TOKENS_FILE, toks.TOKENIZER_FILE, toks.BYTE_FILE, toks.TIKTOKEN_FILE)
# Every file prepare writes, finished or in progress: what a failed run removes and a rerun clears.
OWN_FILES = frozenset(PREPARED_FILES) | {TOKENS_FILE + ".tmp", MANIFEST + ".tmp"}


def token_dtype(vocab_size: int) -> np.dtype:
  """The narrowest unsigned dtype holding ids < vocab_size: uint8, uint16 or uint32."""
  return np.dtype(np.uint8 if vocab_size <= 1 << 8 else np.uint16 if vocab_size <= 1 << 16
                  else np.uint32)


def sha256_file(path: str) -> str:
  """Hex sha256 of the file at `path`, read in 1 MiB blocks."""
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


class Progress:
  """Tokens written and tokens/s: a tqdm bar on a terminal, a plain line every `every_s` seconds
  otherwise (logs, CI), and nothing when disabled."""

  def __init__(self, enabled: bool, total_bytes: int, every_s: float = 10.0):
    self._enabled, self._total, self._every = enabled, total_bytes, every_s
    self._start = self._last = time.monotonic()
    self.tokens = 0
    self._bar = None
    if enabled and sys.stderr.isatty():
      from tqdm.auto import tqdm
      self._bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing")

  def update(self, tokens: int, text_bytes: int) -> None:
    """Counts `tokens` more tokens from `text_bytes` bytes of input and reports when due."""
    self.tokens += tokens
    if self._bar is not None:
      self._bar.update(text_bytes)
      self._bar.set_postfix_str(f"{self.rate():,.0f} tokens/s", refresh=False)
    elif self._enabled and time.monotonic() - self._last >= self._every:
      self._last = time.monotonic()
      print(f"prepare: {self.tokens:,} tokens, {self.rate():,.0f} tokens/s", file=sys.stderr,
            flush=True)

  def rate(self) -> float:
    """Tokens per second since the start (wall clock)."""
    return self.tokens / max(time.monotonic() - self._start, 1e-9)

  def close(self, report: bool = True) -> None:
    """Closes the bar and prints the total (when enabled and `report`: not after a failure,
    whose one-line error is then all that is said)."""
    if self._bar is not None:
      self._bar.close()
    if self._enabled and report:
      print(f"prepare: {self.tokens:,} tokens in {time.monotonic() - self._start:.1f} s "
            f"({self.rate():,.0f} tokens/s)", file=sys.stderr, flush=True)


# ---- Writing ----------------------------------------------------------------------------------

def _up_to_date(out: str, request: dict) -> dict | None:
  """The existing manifest if it was made from the same inputs and options and is intact."""
  try:
    manifest = read_manifest(out)
  except JaxdpError:
    return None
  if manifest.get("request") != request:
    return None
  path = os.path.join(out, TOKENS_FILE)
  if not os.path.exists(path) or os.path.getsize(path) != manifest["bytes"]:
    return None
  return manifest


def _clear_previous(out: str) -> None:
  """Removes an earlier preparation's files (and only those) before writing a new one."""
  if not os.path.isdir(out):
    os.makedirs(out, exist_ok=True)
    return
  manifest_path = os.path.join(out, MANIFEST)
  if not os.path.exists(manifest_path):
    if set(os.listdir(out)) <= OWN_FILES:  # An interrupted or failed prepare's own files.
      for name in os.listdir(out):
        os.remove(os.path.join(out, name))
      return
    if os.listdir(out):
      raise JaxdpError(f"prepare: --out={out!r} exists, is not empty and holds no {MANIFEST}; give "
                       "a new or empty directory (prepare will not overwrite other files)")
    return
  with open(manifest_path) as f:
    old = json.load(f)
  os.remove(manifest_path)  # First: a half-rewritten directory must not look finished.
  # Version 1 wrote ArrayRecord shards, listed in its manifest.
  for name in [s["file"] for s in old.get("shards", [])] + list(PREPARED_FILES):
    if os.path.exists(os.path.join(out, name)):
      os.remove(os.path.join(out, name))


def _tokenizer_request(tokenizer: str, vocab_size: int) -> dict:
  if tokenizer in ("byte", "bpe"):
    return {"kind": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else 256}
  path = os.path.abspath(tokenizer)
  if os.path.isdir(path):
    path = os.path.join(path, toks.TOKENIZER_FILE)
  if not os.path.isfile(path):
    toks.from_spec(tokenizer)  # Raises the error naming the flag.
  return {"kind": "file", "path": path, "sha256": sha256_file(path)}


def prepare(inputs: Sequence[str], out: str, *, tokenizer: str = "byte", vocab_size: int = 4096,
            text_field: str = "text", chunk_bytes: int = CHUNK_BYTES,
            progress: bool = True) -> dict:
  """Tokenises `inputs` into `out` and returns the manifest; a no-op if `out` is up to date.

  `tokenizer`: "byte", "bpe" (byte-level BPE of `vocab_size` trained on the inputs), or a path
  to a Hugging Face tokenizer.json (or a folder holding one) or a .tiktoken file.

  Raises:
    JaxdpError: missing or unreadable inputs, a bad tokenizer, an unsafe --out.
  """
  if tokenizer == "bpe" and vocab_size < 257:
    raise JaxdpError(f"prepare: --vocab_size={vocab_size} is too small for byte-level BPE; it "
                     "needs at least 257 (256 bytes + end-of-text)")
  if not text_field:
    raise JaxdpError("prepare: --text_field is empty; name the JSONL/Parquet/dataset field that "
                     "holds the text")
  if os.path.islink(out) and not os.path.exists(out):  # makedirs would fail on it with a traceback.
    raise JaxdpError(f"prepare: --out={out!r} is a symlink to {os.readlink(out)!r}, which does not "
                     "exist; fix or remove the link, or give a new or empty directory")
  if os.path.exists(out) and not os.path.isdir(out):
    raise JaxdpError(f"prepare: --out={out!r} is a file; give a new or empty directory")
  skipped: list[str] = []
  files = sources.list_inputs(inputs, skipped)
  if skipped:
    shown = ", ".join(repr(os.path.relpath(f)) for f in skipped[:5])
    print(f"jaxdp: warning: prepare skipped {len(skipped)} file(s) whose suffix is not "
          f"{', '.join(sources.DOCUMENT_SUFFIXES)}: {shown}{' ...' if len(skipped) > 5 else ''}; "
          "name a file directly to include it", file=sys.stderr, flush=True)
  described = [sources.describe(path) for path in files]
  request = {"version": VERSION, "tokenizer": _tokenizer_request(tokenizer, vocab_size),
             "text_field": text_field, "inputs": [dict(d) for d in described]}
  existing = _up_to_date(out, request)
  if existing is not None:
    existing["up_to_date"] = True
    return existing
  for path in files:  # Fail on a bad input before clearing or training anything.
    for _ in sources.iter_pieces(path, text_field, chunk_bytes):
      break
  created = not os.path.isdir(out)
  try:
    # Every write below (the tokenizer, tokens.bin, the manifest, written last) refused by the
    # disk is one line naming --out; the manifest's absence keeps a half-prepared --out unusable.
    with writing(out, "prepare: writing --out"):
      _clear_previous(out)
      return _write(files, described, request, out, tokenizer, vocab_size, text_field,
                    chunk_bytes, progress)
  except BaseException:  # Failed or interrupted: leave no half-written files behind.
    for name in OWN_FILES:
      if os.path.exists(os.path.join(out, name)):
        os.remove(os.path.join(out, name))
    if created and not os.listdir(out):
      os.rmdir(out)
    raise


def _write(files, described, request, out, tokenizer, vocab_size, text_field, chunk_bytes,
           progress) -> dict:
  """prepare's work once `out` is clear: the tokenizer, tokens.bin, then the manifest."""
  if tokenizer == "bpe":
    tok = train_bpe((text for path in files
                     for text, _ in sources.iter_pieces(path, text_field, chunk_bytes)), vocab_size)
  else:
    tok = toks.from_spec(tokenizer)
  if tok.vocab_size < 2:
    raise JaxdpError(f"prepare: the tokenizer {tokenizer!r} has {tok.vocab_size} id(s), only its "
                     "end-of-text token; give a tokenizer.json with a real vocabulary")
  tokenizer_file = os.path.basename(toks.save(tok, out))
  dtype = token_dtype(tok.vocab_size)
  tmp = os.path.join(out, TOKENS_FILE + ".tmp")
  digest, num_tokens = hashlib.sha256(), 0
  bar = Progress(progress, sum(d["bytes"] for d in described))
  try:
    with open(tmp, "wb") as f:
      for entry in described:
        entry.update(documents=0, tokens=0)
        for tokens, documents, text_bytes in _encode(tok, entry["path"], text_field, chunk_bytes):
          raw = tokens.astype(dtype).tobytes()
          f.write(raw)
          digest.update(raw)
          entry["documents"] += documents
          entry["tokens"] += len(tokens)
          num_tokens += len(tokens)
          bar.update(len(tokens), text_bytes)
  except OSError as e:
    bar.close(report=False)
    raise WriteFailed(f"prepare: writing {tmp!r} failed ({os_reason(e, out)}); nothing is left "
                      "half-written: free space or pick another --out, then run the same "
                      "command") from None
  except BaseException:
    bar.close(report=False)
    raise
  bar.close()
  os.replace(tmp, os.path.join(out, TOKENS_FILE))
  manifest = {
      "format": FORMAT, "request": request,
      "tokenizer": {"kind": tok.name, "vocab_size": tok.vocab_size, "file": tokenizer_file,
                    "end_of_text": tok.end_of_text},
      "num_documents": sum(d["documents"] for d in described), "num_tokens": num_tokens,
      "dtype": dtype.name, "file": TOKENS_FILE, "bytes": num_tokens * dtype.itemsize,
      "sha256": digest.hexdigest(), "inputs": described,
      "split": {"validation": "the last config.data.val_fraction of the token stream, chosen "
                              "when training; the rest is the training split"},
  }
  tmp = os.path.join(out, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out, MANIFEST))
  manifest["up_to_date"] = False
  return manifest


def _encode(tok, path: str, text_field: str,
            chunk_bytes: int) -> Iterator[tuple[np.ndarray, int, int]]:
  """(tokens, documents ended, text bytes) of `path` in groups of about ENCODE_BATCH_CHARS
  characters (so the id lists in flight stay small): each document's tokens then
  tok.end_of_text, in input order; encode_batch runs on all cores."""
  texts: list[str] = []
  ends: list[bool] = []
  size = 0

  def flush():
    out = []
    for ids, end in zip(tok.encode_batch(texts), ends):
      out.append(ids)
      if end:
        out.append(np.array([tok.end_of_text], np.int32))
    return (np.concatenate(out), sum(ends), sum(len(t.encode("utf-8")) for t in texts))

  for text, end in sources.iter_pieces(path, text_field, chunk_bytes):
    pieces = _encoding_pieces(text)
    del text
    for k, piece in enumerate(pieces):
      texts.append(piece)
      ends.append(end and k == len(pieces) - 1)
      size += len(piece)
      if size >= min(chunk_bytes, ENCODE_BATCH_CHARS):
        yield flush()
        texts, ends, size = [], [], 0
  if texts:
    yield flush()


# ---- Reading a prepared directory -------------------------------------------------------------

def read_manifest(path: str) -> dict:
  """The manifest of a prepared directory, as a dict.

  Raises JaxdpError when the directory has no manifest, or one of another format or version.
  """
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


def open_prepared(path: str) -> tuple[np.ndarray, object]:
  """(token stream, memory-mapped; tokenizer) of a prepared directory."""
  manifest = read_manifest(path)
  file = os.path.join(path, manifest["file"])
  if not os.path.exists(file) or os.path.getsize(file) != manifest["bytes"]:
    raise JaxdpError(f"{file!r} is missing or changed since `jaxdp prepare` wrote it; prepare "
                     f"{path!r} again")
  tokenizer = toks.load(path, manifest["tokenizer"]["kind"])
  if tokenizer is None:
    raise JaxdpError(f"{path!r} lost its tokenizer file; prepare it again")
  if not manifest["num_tokens"]:
    raise JaxdpError(f"config.data.path={path!r} holds no tokens; prepare it from inputs with text")
  tokens = np.memmap(file, np.dtype(manifest["dtype"]), mode="r", shape=(manifest["num_tokens"],))
  return tokens, tokenizer


WORKDIR_TOKENIZER = "tokenizer"  # WORKDIR/tokenizer/: the run's own copy of its tokenizer.


def save_tokenizer(tokenizer, workdir: str) -> str:
  """Writes `tokenizer` into WORKDIR/tokenizer/ (atomically: a temporary folder renamed), so
  sampling, inspecting and exporting a run never need its data again."""
  folder = os.path.join(workdir, WORKDIR_TOKENIZER)
  if os.path.isdir(folder) and toks.load(folder) is not None:
    return folder  # A resumed run: the data's digest already matched the saved run.
  tmp = folder + ".tmp"
  try:
    if os.path.isdir(tmp):
      for name in os.listdir(tmp):
        os.remove(os.path.join(tmp, name))
    toks.save(tokenizer, tmp)
    with open(os.path.join(tmp, "kind.json"), "w") as f:
      json.dump({"kind": tokenizer.name}, f)
    if os.path.isdir(folder):
      os.rmdir(folder)  # Empty (an earlier run stopped before writing it).
    os.replace(tmp, folder)
  except OSError as e:
    raise WriteFailed(f"writing the run's tokenizer to {folder!r} failed "
                      f"({os_reason(e, folder)}); free space or pick another --workdir, then run "
                      "the same command") from None
  return folder


def load_tokenizer(workdir: str):
  """The tokenizer saved by `save_tokenizer` in `workdir`, or None if the run has none saved."""
  folder = os.path.join(workdir, WORKDIR_TOKENIZER)
  kind = None
  if os.path.isfile(os.path.join(folder, "kind.json")):
    with open(os.path.join(folder, "kind.json")) as f:
      kind = json.load(f).get("kind")
  return toks.load(folder, kind)
