"""Deterministic input: corpus -> token windows -> grain chain -> global batches.

The global batch of step `s` is a pure function of (seed, s): example `j` of the training
stream is `examples[j]` of a grain chain (source -> shuffle -> repeat -> map) whose shuffle is a
fresh permutation every epoch, and step `s` takes examples `[s*B, (s+1)*B)`. Every window is
seen exactly once per epoch, whatever the number of devices or hosts; a device's rows are a
slice of the global batch, never a separate sampler, so changing the device count changes only
who computes a row, not which rows are in a step. Resuming at step `s` needs nothing but `s`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
import hashlib
import importlib.resources
import json
import os
import queue
import threading
from typing import Any

import grain
import numpy as np

from jaxdp.data import mixture as mixtures
from jaxdp.data import sources, tokenfiles
from jaxdp.data.packing import concat_example, example_fn
from jaxdp.data.spec import DataSpec
from jaxdp.data.tokenizers import ByteTokenizer
from jaxdp.errors import JaxdpError

BUILTIN_CORPUS = "tinyshakespeare"


def builtin_corpus_path() -> str:
  """The installed path of the built-in corpus (tinyshakespeare.txt, about 1 MB of text)."""
  return str(importlib.resources.files("jaxdp") / "assets" / "tinyshakespeare.txt")


def load_corpus(path: str, tokenizer: str = ""):
  """(tokens, tokenizer) of config.data.path: "" (built-in corpus), a text file (bytes), a
  directory written by `jaxdp prepare` (memory-mapped, with its tokenizer), or nanoGPT/llm.c
  `.bin` token files (memory-mapped; a folder's training files; see data/tokenfiles.py)."""
  train, _, tok = open_data(path, tokenizer)
  return train, tok


def open_data(path: str, tokenizer: str = ""):
  """(training stream, validation stream or None, tokenizer) of config.data.path; the
  validation stream is None unless a folder of .bin files has "val" files (then the caller
  splits the tail, config.data.val_fraction). `tokenizer`: config.data.tokenizer, used for
  .bin token files (default: the tokenizer.json beside them)."""
  if path and tokenfiles.is_token_path(path):
    train, val = tokenfiles.open_token_path(path)
    tok = _token_file_tokenizer(path, tokenizer)
    for name, stream in (("training", train), ("validation", val)):
      largest = largest_id(stream) if stream is not None else -1
      if largest >= tok.vocab_size:
        raise JaxdpError(f"config.data.path={path!r}: the {name} tokens hold id {largest}, but the "
                         f"tokenizer ({tokenizer or 'the tokenizer.json beside them'}) has "
                         f"{tok.vocab_size} ids; set config.data.tokenizer to the tokenizer that "
                         "wrote these files")
    return train, val, tok
  if path and os.path.isdir(path):
    from jaxdp.data import prepare  # Imports this module: loaded only when needed.
    tokens, tok = prepare.open_prepared(path)
    return tokens, None, tok
  return load_tokens(path), None, ByteTokenizer()


def largest_id(tokens: np.ndarray | tokenfiles.ConcatTokens, chunk: int = 1 << 26) -> int:
  """The largest token id of a (memory-mapped) stream, read in chunks of `chunk` ids (bounded
  memory; a token file written with another tokenizer would otherwise index past the embedding)."""
  if not len(tokens):
    return -1
  return max(int(np.asarray(tokens[i:i + chunk]).max()) for i in range(0, len(tokens), chunk))


def _token_file_tokenizer(path: str, spec: str):
  from jaxdp.data import tokenizers
  folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  spec = spec or os.path.join(folder, tokenizers.TOKENIZER_FILE)
  if not os.path.exists(spec):
    raise JaxdpError(f"config.data.path={path!r} holds token ids without a tokenizer; set "
                     "--config.data.tokenizer=PATH/tokenizer.json (the tokenizer that wrote them) "
                     "or put its tokenizer.json beside the .bin files")
  try:
    return tokenizers.from_spec(spec)
  except JaxdpError as e:
    raise JaxdpError(str(e).replace("--tokenizer", "config.data.tokenizer")) from None


def load_tokens(path: str) -> np.ndarray:
  """Reads a UTF-8 text file ("" = the built-in corpus) into byte tokens."""
  path = path or builtin_corpus_path()
  if not os.path.exists(path):
    raise JaxdpError(f"config.data.path={path!r} does not exist; give a UTF-8 text file, a "
                     "directory written by `jaxdp prepare`, a .bin token file (or folder), or '' for "
                     "the built-in corpus")
  if os.path.isdir(path):
    raise JaxdpError(f"config.data.path={path!r} is a directory; give a UTF-8 text file or a "
                     "directory written by `jaxdp prepare`")
  with open(path, "rb") as f:
    raw = f.read()
  if not raw.strip():
    raise JaxdpError(f"config.data.path={path!r} is empty; the corpus needs text to train on")
  # The same rules as `jaxdp prepare`: compressed, archived and binary files are named as what
  # they are (a gzip file's bytes are no Latin-1 text to convert), and a corpus is UTF-8 text.
  sources.check_training_text(path, raw[:8192])
  try:
    raw.decode("utf-8")
  except UnicodeDecodeError as e:
    command, out = sources.utf8_advice(path)
    raise JaxdpError(f"config.data.path={path!r} is not valid UTF-8 (byte 0x{raw[e.start]:02x} at "
                     f"byte offset {e.start}); if it is Latin-1 text, convert it: {command}, then "
                     f"--config.data.path={out}") from None
  return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)


def split_tokens(tokens: np.ndarray, val_fraction: float, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Head for training, tail for validation; both must hold at least one window."""
  n_val = int(len(tokens) * val_fraction)
  train, val = tokens[:len(tokens) - n_val], tokens[len(tokens) - n_val:]
  check_windows(train, "training", seq_len)
  check_windows(val, "validation", seq_len)
  return train, val


def check_windows(part, name: str, seq_len: int) -> None:
  """Raises JaxdpError unless the split `part` holds at least one window of seq_len + 1 tokens."""
  if len(part) < seq_len + 1:
    raise JaxdpError(
        f"the {name} split has {len(part)} tokens, fewer than config.seq_len+1={seq_len + 1}; "
        "use a larger corpus (config.data.path), a smaller config.seq_len, or adjust "
        "config.data.val_fraction")


class WindowSource:
  """Random-access grain source: window i is tokens[i*T : i*T + T + 1] (inputs plus next token)."""

  def __init__(self, tokens: np.ndarray | tokenfiles.ConcatTokens, seq_len: int):
    self._tokens = tokens
    self._seq_len = seq_len

  def __len__(self) -> int:
    return (len(self._tokens) - 1) // self._seq_len

  def __getitem__(self, index: int) -> np.ndarray:
    start = index * self._seq_len
    # Reads this window only from a memory-mapped stream; ids are int32 whatever the file's dtype.
    return np.asarray(self._tokens[start:start + self._seq_len + 1], dtype=np.int32)

  def windows(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
    """int32 [len(indices), T + 1]: the windows `indices` in one gather (rows = __getitem__)."""
    if isinstance(self._tokens, tokenfiles.ConcatTokens):  # Several .bin shards: slices only.
      return np.stack([self[int(i)] for i in np.ravel(indices)]).reshape(-1, self._seq_len + 1)
    starts = np.asarray(indices, np.int64)[:, None] * self._seq_len
    return np.asarray(self._tokens[starts + np.arange(self._seq_len + 1)], dtype=np.int32)


class ConcatWindows:
  """The windows of several sources, one after another (a mixture's validation windows)."""

  def __init__(self, sources):
    self._sources = list(sources)
    self._ends = np.cumsum([len(s) for s in self._sources])

  def __len__(self) -> int:
    return int(self._ends[-1])

  def __getitem__(self, index: int) -> np.ndarray:
    part = int(np.searchsorted(self._ends, index, side="right"))
    return self._sources[part][index - (int(self._ends[part - 1]) if part else 0)]


def training_examples(source, seed: int, to_example=concat_example) -> grain.MapDataset:
  """The infinite training stream: a new permutation of the source every epoch, each window
  made an example by `to_example` (data/packing.py)."""
  return grain.MapDataset.source(source).shuffle(seed=seed).repeat().map(to_example)


class ShuffledWindows:
  """`training_examples(source, seed, to_example)` with a batched read: example j of both is
  to_example(source[order[j]]), `order` being grain's shuffle of the window indices (a new
  permutation every epoch). `examples(ids)` gathers the windows of a whole batch at once and
  makes them examples in one call, instead of a grain map per example: a tiny model's step
  (a few ms) otherwise waits on the loader thread's per-example Python, which contends with
  the step's dispatch for the interpreter (measured in docs/benchmarks.md)."""

  def __init__(self, source: WindowSource, seed: int, to_example=concat_example):
    self._source = source
    self._to_example = to_example
    self._order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat()

  def __getitem__(self, j: int) -> dict[str, np.ndarray]:
    return self._to_example(self._source[self._order[j]])

  def examples(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    """Examples `ids` (any shape S) as arrays [*S, ...]."""
    windows = self._source.windows([self._order[int(j)] for j in np.ravel(ids)])
    return {k: v.reshape(np.shape(ids) + v.shape[1:]) for k, v in self._to_example(windows).items()}


class Batches:
  """Global batches laid out [grad_accum_steps, global_batch / grad_accum_steps, ...].

  `rows` selects which rows of the global batch this process materialises (all of them on one
  host); micro-batch `a` always holds the same examples, so accumulation and device count change
  only the arithmetic's grouping, never the data.
  """

  def __init__(self, examples: grain.MapDataset, global_batch_size: int, grad_accum_steps: int):
    self._examples = examples
    self._batch = global_batch_size
    self._accum = grad_accum_steps

  def example_ids(self, step: int) -> np.ndarray:
    """int64 [A, global_batch / A]: the global example indices of step `step`'s batch, in order."""
    ids = step * self._batch + np.arange(self._batch)
    return ids.reshape(self._accum, self._batch // self._accum)

  def __call__(self, step: int, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    """The batch of step `step`, its `rows` only: each example's arrays as [A, len(rows), ...], plus
    "ids" int32 [A, len(rows)] (global example indices, which key per-example randomness)."""
    return self.at(step * self._batch, self._batch, rows)

  def at(self, start: int, size: int, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    """The global batch of examples [start, start + size) (a DataSchedule's step), its `rows` of
    each micro-batch only, laid out as `__call__`'s."""
    ids = (start + np.arange(size)).reshape(self._accum, size // self._accum)[:, rows]
    if hasattr(self._examples, "examples"):  # Batched read (ShuffledWindows).
      batch = self._examples.examples(ids)
    else:
      examples = [self._examples[int(j)] for j in ids.ravel()]
      batch = {k: np.stack([e[k] for e in examples]).reshape(ids.shape + (-1,))
               for k in examples[0]}
    batch["ids"] = ids.astype(np.int32)
    return batch


class EvalBatches:
  """A finite split (validation) in batches [1, batch_size, ...] that count each window once.

  The windows evaluated are the first `num_windows` of the split, in order: all of them, or
  the first `max_batches * batch_size` when `max_batches` > 0 (config.eval_steps). Batch `k`
  holds windows [k*B, (k+1)*B); the rows of the last batch past the end are padding, with
  weight 0 on every token, so they add nothing to a token-weighted loss. The row count stays
  `batch_size` (the global batch size, divisible by the data devices), and a process builds
  only its own `rows` of a batch, so the set of windows does not depend on the device count.
  """

  def __init__(self, source, batch_size: int, max_batches: int = 0, to_example=concat_example):
    self._source = source
    self._to_example = to_example
    self._batch = batch_size
    total = len(source)
    self.num_windows = total if max_batches <= 0 else min(total, max_batches * batch_size)
    self.num_batches = -(-self.num_windows // batch_size)

  def __len__(self) -> int:
    return self.num_batches

  def example_ids(self, k: int) -> np.ndarray:
    """[1, batch_size] window indices of batch k; indices >= num_windows are padding."""
    if not 0 <= k < self.num_batches:
      raise IndexError(f"evaluation batch {k} of {self.num_batches}")
    return (k * self._batch + np.arange(self._batch))[None]

  def __call__(self, k: int, rows: slice | np.ndarray = slice(None)) -> dict[str, np.ndarray]:
    """Evaluation batch `k`, its `rows` only: arrays [1, len(rows), ...] with padding rows' weights 0.

    Raises IndexError for k outside [0, num_batches)."""
    ids = self.example_ids(k)[:, rows]
    real = ids < self.num_windows
    first = self._to_example(self._source[0])  # The shapes and dtypes of a row; padding copies them.
    examples = [self._to_example(self._source[int(j)]) if ok else
                {name: np.zeros_like(v) for name, v in first.items()}
                for j, ok in zip(ids.ravel(), real.ravel())]
    batch = {name: np.stack([e[name] for e in examples]).reshape(ids.shape + (-1,))
             for name in first}
    batch["weights"] = batch["weights"] * real[..., None].astype(batch["weights"].dtype)
    batch["ids"] = ids.astype(np.int32)
    return batch


def corpus_digest(path: str) -> str:
  """sha256 of what config.data.path names: a text file's bytes, a prepared directory's manifest
  (it holds the token file's checksum), or the bytes of its .bin token files (name and content of
  each). Checkpoints keep it, so a resume notices data that changed under the same path, which
  would silently change the examples of every step."""
  path = path or builtin_corpus_path()
  files = [path]
  if os.path.isdir(path):
    from jaxdp.data import prepare  # Imports this module: loaded only when needed.
    if tokenfiles.is_token_path(path):
      train, val = tokenfiles.token_files(path)
      files = train + val
    else:
      files = [os.path.join(path, prepare.MANIFEST)]
  digest = hashlib.sha256()
  for file in files:
    if len(files) > 1:
      digest.update(os.path.basename(file).encode() + b"\0")
    with open(file, "rb") as f:
      for chunk in iter(lambda: f.read(1 << 22), b""):
        digest.update(chunk)
  return digest.hexdigest()


def _same_tokenizer(a, b) -> bool:
  if type(a) is not type(b) or a.vocab_size != b.vocab_size or a.end_of_text != b.end_of_text:
    return False
  backend = getattr(a, "backend", None)
  return backend is None or backend.to_str() == b.backend.to_str()


class Dataset:
  """The training and validation streams of a DataSpec: its path, or the weighted mixture of its
  sources (data/mixture.py), packed by its packing (data/packing.py).

  Raises:
    JaxdpError: data that does not exist, cannot be read or is too short for seq_len, sources
      with different tokenizers (each message names the config.data field).
  """

  def __init__(self, spec: DataSpec, tokenizer=None):
    specs = mixtures.parse_sources(spec.sources)
    self.sources = specs or [(spec.path, 1.0)]
    if specs:
      for path, _ in specs:
        if not os.path.exists(path):
          raise JaxdpError(f"config.data.sources: {path!r} does not exist; give a directory written "
                           "by `jaxdp prepare`, a .bin token file (or folder) or a UTF-8 text file")
    opened = [open_data(path, spec.tokenizer) for path, _ in self.sources]
    self.tokenizer = tokenizer or opened[0][2]
    for (path, _), (_, _, tok) in zip(self.sources[1:], opened[1:]):
      if not _same_tokenizer(tok, opened[0][2]):
        raise JaxdpError(f"config.data.sources: {path!r} has another tokenizer than "
                         f"{self.sources[0][0]!r}; prepare every source with the same --tokenizer")
    digests = [corpus_digest(path) for path, _ in self.sources]
    self.digest = digests[0] if not specs else hashlib.sha256(json.dumps(
        [[d, w] for d, (_, w) in zip(digests, self.sources)]).encode()).hexdigest()
    to_example = example_fn(spec.packing, getattr(self.tokenizer, "end_of_text", None))
    train_sources, val_sources = [], []
    for train, val in ((o[0], o[1]) for o in opened):
      if val is None:
        train, val = split_tokens(train, spec.val_fraction, spec.seq_len)
      else:
        check_windows(train, "training", spec.seq_len)
        check_windows(val, "validation", spec.seq_len)
      train_sources.append(WindowSource(train, spec.seq_len))
      val_sources.append(WindowSource(val, spec.seq_len))
    self.train_sources = train_sources
    self.train_source = train_sources[0] if not specs else ConcatWindows(train_sources)
    self.val_source = val_sources[0] if not specs else ConcatWindows(val_sources)
    self.mixture: mixtures.Mixture | None = None
    examples: mixtures.MixedExamples | ShuffledWindows
    if specs:
      self.mixture = mixtures.Mixture([w for _, w in self.sources])
      examples = mixtures.MixedExamples(self.mixture, [
          training_examples(s, spec.seed + i, to_example) for i, s in enumerate(train_sources)])
    else:
      examples = ShuffledWindows(train_sources[0], spec.seed, to_example)  # = self.train_source
    self.train = Batches(examples, spec.global_batch_size, spec.grad_accum_steps)
    # Every validation window once (or the first eval_steps batches' worth).
    self.val = EvalBatches(self.val_source, spec.global_batch_size, spec.eval_steps, to_example)

  @property
  def examples_per_epoch(self) -> int:
    """Training windows in one pass over the training split (all sources of a mixture)."""
    return len(self.train_source)

  def realised_mixture(self, num_examples: int) -> dict[str, float] | None:
    """{source path: share of the first `num_examples` training examples}; None without a
    mixture. Exact: the interleaving is a pure function of the example index."""
    if self.mixture is None or num_examples <= 0:
      return None
    taken = self.mixture.taken(num_examples)
    return {path: float(n) / num_examples for (path, _), n in zip(self.sources, taken)}


def prefetch(make: Callable[[int], Any], start: int, stop: int,
             depth: int = 2) -> Generator[Any, None, None]:
  """Yields make(start), ..., make(stop-1), computing up to `depth` ahead on a thread.

  `make` typically builds the batch and puts it on the devices, so the next step's input is
  already transferred while the current step runs. Exceptions surface in the consumer.
  """
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop_event = threading.Event()

  def worker():
    try:
      for i in range(start, stop):
        if stop_event.is_set():
          return
        q.put((i, make(i), None))
    except BaseException as e:  # noqa: BLE001 - re-raised in the consumer thread.
      q.put((None, None, e))

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    for _ in range(start, stop):
      _, item, error = q.get()
      if error is not None:
        raise error
      yield item
  finally:
    stop_event.set()
    while thread.is_alive():
      try:
        q.get_nowait()
      except queue.Empty:
        thread.join(timeout=0.05)
