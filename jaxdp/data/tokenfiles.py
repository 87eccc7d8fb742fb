"""Token files that `train` reads directly, memory-mapped, without re-tokenising.

  nanoGPT     a headerless `.bin` of little-endian uint16 token ids (prepare.py of
              karpathy/nanoGPT's data folders writes train.bin and val.bin)
  llm.c       a `.bin` with a 256 x int32 header: magic 20240520 (uint16 tokens, version 1) or
              20240801 (uint32 tokens, version 7), then the token count, then the tokens
              (karpathy/llm.c dev/data/data_common.py)

config.data.path may name one such file (validation: its tail, config.data.val_fraction) or a
folder of them: files whose name contains "val" are the validation split, the others (sorted by
name) the training stream; a folder without a "val" file splits its stream's tail as a single
file does. The tokenizer is config.data.tokenizer, else a tokenizer.json beside the files.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import numpy as np

from jaxdp.errors import JaxdpError

TOKEN_SUFFIXES = (".bin",)
HEADER_INTS = 256
LLMC_FORMATS = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}  # magic -> (version, dtype)


def read_token_file(path: str) -> np.ndarray:
  """The tokens of a nanoGPT or llm.c `.bin` file, memory-mapped (nothing is read yet)."""
  size = os.path.getsize(path)
  header = np.fromfile(path, np.int32, count=3) if size >= 4 * HEADER_INTS else np.zeros(3, np.int32)
  if int(header[0]) in LLMC_FORMATS:
    version, dtype = LLMC_FORMATS[int(header[0])]
    count = int(header[2])
    expected = 4 * HEADER_INTS + count * np.dtype(dtype).itemsize
    if int(header[1]) != version or size != expected:
      raise JaxdpError(f"config.data.path: {path!r} has an llm.c header (magic {header[0]}) but "
                       f"version {header[1]} / {size} bytes, not version {version} / {expected} "
                       "bytes; the file is truncated or not an llm.c token file")
    return np.memmap(path, dtype, mode="r", offset=4 * HEADER_INTS, shape=(count,))
  if size % 2:
    raise JaxdpError(f"config.data.path: {path!r} has an odd number of bytes; a headerless .bin "
                     "must be uint16 tokens (nanoGPT) and an llm.c file needs its header")
  if size == 0:
    raise JaxdpError(f"config.data.path: {path!r} is empty; it holds no tokens")
  return np.memmap(path, np.uint16, mode="r")


def write_token_file(path: str, tokens: np.ndarray, header: bool = True) -> None:
  """Writes `tokens` as an llm.c `.bin` (header=True; uint16 or uint32 by the largest id) or as a
  headerless nanoGPT uint16 file: for tests and for converting data to jaxdp's readers."""
  tokens = np.asarray(tokens)
  wide = tokens.size and int(tokens.max()) >= 1 << 16
  if wide and not header:
    raise JaxdpError("a headerless nanoGPT .bin holds uint16 ids only; write an llm.c header")
  dtype = np.uint32 if wide else np.uint16
  with open(path, "wb") as f:
    if header:
      magic = 20240801 if wide else 20240520
      head = np.zeros(HEADER_INTS, np.int32)
      head[:3] = magic, LLMC_FORMATS[magic][0], len(tokens)
      f.write(head.tobytes())
    f.write(tokens.astype(dtype).tobytes())


class ConcatTokens:
  """tokens[start:stop] of several arrays (memory maps) read as one stream, on demand.

  Slicing returns another view without reading; np.asarray(view) reads what it spans.
  """

  def __init__(self, parts: Sequence[np.ndarray], start: int = 0, stop: int | None = None):
    self._parts = list(parts)
    self._ends = np.cumsum([len(p) for p in self._parts])
    self._start = start
    self._stop = int(self._ends[-1]) if stop is None else stop

  def __len__(self) -> int:
    return self._stop - self._start

  def __getitem__(self, key: slice) -> ConcatTokens:
    start, stop, step = key.indices(len(self))
    if step != 1:
      raise ValueError("ConcatTokens supports contiguous slices only")
    return ConcatTokens(self._parts, self._start + start, self._start + max(start, stop))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    out, position = [], self._start
    while position < self._stop:
      part = int(np.searchsorted(self._ends, position, side="right"))
      begin = int(self._ends[part - 1]) if part else 0
      end = min(self._stop, int(self._ends[part]))
      out.append(np.asarray(self._parts[part][position - begin:end - begin]))
      position = end
    tokens = np.concatenate(out) if out else np.zeros(0, np.int32)
    return tokens.astype(dtype or np.int32)


def token_files(path: str) -> tuple[list[str], list[str]]:
  """(training files, validation files) of config.data.path: a .bin file, or a folder of them."""
  if os.path.isfile(path):
    return [path], []
  files = sorted(os.path.join(path, n) for n in os.listdir(path) if n.endswith(TOKEN_SUFFIXES))
  val = [f for f in files if "val" in os.path.basename(f)]
  train = [f for f in files if f not in val]
  if not train:
    raise JaxdpError(f"config.data.path={path!r} holds no training .bin files (names without "
                     "'val'); add train shards or point at a file")
  return train, val


def is_token_path(path: str) -> bool:
  """A .bin file, or a folder holding .bin files and no prepare manifest."""
  if os.path.isfile(path):
    return path.endswith(TOKEN_SUFFIXES)
  return (os.path.isdir(path) and not os.path.isfile(os.path.join(path, "manifest.json"))
          and any(n.endswith(TOKEN_SUFFIXES) for n in os.listdir(path)))


def open_token_path(path: str) -> tuple[np.ndarray | ConcatTokens, np.ndarray | ConcatTokens | None]:
  """(training stream, validation stream or None) of a .bin file or folder, memory-mapped."""
  train, val = token_files(path)
  return _stream(train), _stream(val) if val else None


def _stream(files: list[str]):
  """One file's memory map as it is (slices are plain views), or several joined by ConcatTokens."""
  parts = [read_token_file(f) for f in files]
  return parts[0] if len(parts) == 1 else ConcatTokens(parts)
