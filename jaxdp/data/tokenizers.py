"""Tokenizers: bytes, a BPE trained by `jaxdp prepare`, any Hugging Face `tokenizer.json`, and
(when `tiktoken` is installed) a `.tiktoken` BPE file; saved next to the data and in each run's
workdir so sampling and export never need the data again.

Every tokenizer has `name`, `vocab_size`, `end_of_text` (the id that ends each document),
`encode(text)` (int32 ids; text that spells a special token such as "<|endoftext|>" is ordinary
text), `encode_batch(texts)`, `decode(ids)` and `save(folder)`; `load(folder)` reads one back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
import json
import os
import shutil

import numpy as np

from jaxdp.errors import JaxdpError

END_OF_TEXT = "<|endoftext|>"
# Names under which tokenizers ship their end-of-text / end-of-sequence token, in preference order;
# a tokenizer.json with none of them gets END_OF_TEXT added as a special token.
EOT_NAMES = (END_OF_TEXT, "<|end_of_text|>", "</s>", "<eos>")
TOKENIZER_FILE = "tokenizer.json"
BYTE_FILE = "byte.json"
TIKTOKEN_FILE = "tokenizer.tiktoken"


class ByteTokenizer:
  """UTF-8 bytes as tokens: no training, no unknown tokens, 256 ids.

  End of text is byte 0xFF, which never occurs in UTF-8 (RFC 3629), so it cannot be confused
  with text and the vocabulary stays 256; `decode` shows it as "<|endoftext|>".
  """

  vocab_size = 256
  name = "byte"
  end_of_text = 0xFF

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32 ids [n], one per UTF-8 byte."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text: a list of int32 [n_i]."""
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """Ids (any int array or sequence) -> text; invalid UTF-8 becomes U+FFFD, 0xFF "<|endoftext|>"."""
    ids = [int(i) for i in np.asarray(ids).ravel()]
    parts, start = [], 0
    for i, token in enumerate(ids + [self.end_of_text]):
      if token == self.end_of_text:
        parts.append(bytes(ids[start:i]).decode("utf-8", errors="replace"))
        start = i + 1
    return END_OF_TEXT.join(parts)

  def save(self, folder: str) -> str:
    """Writes byte.json into `folder` (which must exist); returns its path."""
    path = os.path.join(folder, BYTE_FILE)
    with open(path, "w") as f:
      json.dump({"kind": "byte", "vocab_size": self.vocab_size}, f)
    return path


class HFTokenizer:
  """A Hugging Face `tokenizers.Tokenizer` (a `tokenizer.json`): the BPE `jaxdp prepare` trains
  (name "bpe") or one given by path (name "hf").

  Encoding treats special tokens spelled in the text as ordinary text (encode_special_tokens)
  and adds no template tokens (BOS) of the post-processor: documents are plain text followed by
  `end_of_text`, appended by the caller.
  """

  def __init__(self, tokenizer, name: str = "hf"):
    self._tokenizer = tokenizer
    self.name = name
    # Whether the file had no end-of-text token of its own, so that jaxdp added one (a new id).
    self.added_end_of_text = not any(tokenizer.token_to_id(n) is not None for n in EOT_NAMES)
    self.end_of_text = _end_of_text_id(tokenizer)
    tokenizer.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not a boundary.
    # The rows a model needs: one past the largest id (an id list with a gap still needs a row
    # for its last id, which a count of the tokens would miss).
    self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

  @property
  def backend(self):
    """The `tokenizers.Tokenizer` itself (for export)."""
    return self._tokenizer

  @classmethod
  def from_file(cls, path: str, name: str = "hf") -> HFTokenizer:
    """Loads a tokenizer.json; raises JaxdpError when the file cannot be read as one."""
    import tokenizers
    try:
      tokenizer = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # noqa: BLE001 - the library raises bare Exceptions on bad files.
      raise JaxdpError(f"cannot read tokenizer {path!r} ({str(e).splitlines()[0][:120]}); give a "
                       "Hugging Face tokenizer.json") from None
    return cls(tokenizer, name)

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32 ids [n] (no BOS or other template tokens)."""
    return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Encodes on all cores (the library's Rust thread pool)."""
    return [np.asarray(e.ids, np.int32)
            for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids) -> str:
    """Ids (any int array or sequence) -> text, special tokens included."""
    return self._tokenizer.decode([int(i) for i in np.asarray(ids).ravel()],
                                  skip_special_tokens=False)

  def save(self, folder: str) -> str:
    """Writes tokenizer.json into `folder` (which must exist); returns its path."""
    path = os.path.join(folder, TOKENIZER_FILE)
    self._tokenizer.save(path)
    return path


def _end_of_text_id(tokenizer) -> int:
  """The id of the first of EOT_NAMES the tokenizer knows; END_OF_TEXT is added if none."""
  for name in EOT_NAMES:
    token = tokenizer.token_to_id(name)
    if token is not None:
      return token
  from tokenizers import AddedToken
  tokenizer.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
  return tokenizer.token_to_id(END_OF_TEXT)


class TiktokenTokenizer:
  """A `.tiktoken` BPE file (base64 token and rank per line) with the GPT-2 pre-tokeniser pattern
  and "<|endoftext|>" as the id after the last rank. Needs the optional `tiktoken` package."""

  name = "tiktoken"
  # The GPT-2 / r50k split pattern (tiktoken_ext/openai_public.py).
  PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

  def __init__(self, path: str):
    try:
      import tiktoken
      from tiktoken.load import load_tiktoken_bpe
    except ImportError:
      raise JaxdpError(f"--tokenizer={path!r} is a .tiktoken file, which needs the optional "
                       "`tiktoken` package: pip install tiktoken") from None
    ranks = load_tiktoken_bpe(path)
    self._path = path
    self.end_of_text = len(ranks)
    self._encoding = tiktoken.Encoding(name=os.path.basename(path), pat_str=self.PATTERN,
                                       mergeable_ranks=ranks,
                                       special_tokens={END_OF_TEXT: self.end_of_text})
    self.vocab_size = self.end_of_text + 1

  def encode(self, text: str) -> np.ndarray:
    """Text -> int32 ids [n]; special tokens spelled in the text are encoded as text."""
    return np.asarray(self._encoding.encode_ordinary(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode` of each text (tiktoken's threaded batch): a list of int32 [n_i]."""
    return [np.asarray(e, np.int32) for e in self._encoding.encode_ordinary_batch(list(texts))]

  def decode(self, ids) -> str:
    """Ids (any int array or sequence) -> text."""
    return self._encoding.decode([int(i) for i in np.asarray(ids).ravel()])

  def save(self, folder: str) -> str:
    """Copies the .tiktoken file into `folder` as tokenizer.tiktoken; returns its path."""
    path = os.path.join(folder, TIKTOKEN_FILE)
    shutil.copyfile(self._path, path)
    return path


# Backwards-compatible name: the trained BPE is a Hugging Face tokenizer.
BPETokenizer = HFTokenizer


def train_bpe(documents: Iterable[str], vocab_size: int, length: int | None = None) -> HFTokenizer:
  """Byte-level BPE (GPT-2 style, no normaliser) with END_OF_TEXT as its one special token,
  trained from an iterator of documents (streamed: the library keeps only word counts)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tokenizer = Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tokenizer.train_from_iterator(documents, trainer, length=length)
  return HFTokenizer(tokenizer, "bpe")


def from_spec(spec: str):
  """The tokenizer `--tokenizer` names: "byte", or a path to a tokenizer.json (or a folder holding
  one) or a .tiktoken file. ("bpe", trained on the data, is handled by `prepare`.)

  A tokenizer.json that is the byte alphabet alone (what `jaxdp export` wrote for a byte run
  before it declared end-of-text) is the byte tokenizer: read as itself it would lack an
  end-of-text id, and the one added would be a 257th id that the exported model has no row for.
  """
  if spec == "byte":
    return ByteTokenizer()
  if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, TOKENIZER_FILE)):
    spec = os.path.join(spec, TOKENIZER_FILE)
  if not os.path.isfile(spec):
    raise JaxdpError(f"--tokenizer={spec!r} is not 'byte', 'bpe', a tokenizer.json file (or a "
                     "folder holding one) or a .tiktoken file; check the path")
  if spec.endswith(".tiktoken"):
    return TiktokenTokenizer(spec)
  tokenizer = HFTokenizer.from_file(spec)
  if tokenizer.added_end_of_text and tokenizer.vocab_size == 257:  # The file is read only then.
    with open(spec, encoding="utf-8") as f:
      if is_byte_alphabet(json.load(f)):
        return ByteTokenizer()
  return tokenizer


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (openai/gpt-2, encoder.py), which
  byte-level BPE (`tokenizers`' ByteLevel) spells its byte tokens with."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, n = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(printable, map(chr, chars)))


def byte_level_tokenizer():
  """ByteTokenizer as a `tokenizers.Tokenizer` (what `jaxdp export` writes for a byte run): a
  byte-level BPE with no merges whose id b is the byte b, except id 255, which is END_OF_TEXT
  (special). Byte 0xFF never occurs in UTF-8, so no text loses a token; transformers and
  `jaxdp prepare --tokenizer` then read the same 256 ids, end-of-text included, as the model's
  256 rows."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  table = bytes_to_unicode()
  assert set(table.values()) == set(pre_tokenizers.ByteLevel.alphabet()), "GPT-2's byte table"
  vocab = {table[b]: b for b in range(ByteTokenizer.end_of_text)}
  vocab[END_OF_TEXT] = ByteTokenizer.end_of_text
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  # use_regex=False: no word splitting, every byte is its own piece (no merges anyway).
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(END_OF_TEXT, special=True, normalized=False)])
  return tok


def is_byte_alphabet(spec: dict) -> bool:
  """True when the tokenizer.json `spec` (parsed) gives ByteTokenizer's ids for every text: a
  byte-level BPE of the 256 byte tokens alone (id b is byte b), with no normalizer and no added
  tokens (so no merge, no rewriting of the text, no id past 255)."""
  model = spec.get("model") or {}
  table = bytes_to_unicode()
  return (model.get("type") == "BPE" and not spec.get("normalizer") and not spec.get("added_tokens")
          and (spec.get("pre_tokenizer") or {}).get("type") == "ByteLevel"
          and model.get("vocab") == {table[b]: b for b in range(256)})


def save(tokenizer, folder: str) -> str:
  """Writes `tokenizer` into `folder` (tokenizer.json, byte.json or tokenizer.tiktoken)."""
  os.makedirs(folder, exist_ok=True)
  return tokenizer.save(folder)


def load(folder: str, name: str | None = None):
  """The tokenizer `save` wrote into `folder`, or None if it holds none. `name` ("bpe"/"hf")
  labels a tokenizer.json; it defaults to "hf"."""
  if os.path.isfile(os.path.join(folder, TOKENIZER_FILE)):
    return HFTokenizer.from_file(os.path.join(folder, TOKENIZER_FILE), name or "hf")
  if os.path.isfile(os.path.join(folder, TIKTOKEN_FILE)):
    return TiktokenTokenizer(os.path.join(folder, TIKTOKEN_FILE))
  if os.path.isfile(os.path.join(folder, BYTE_FILE)):
    return ByteTokenizer()
  return None
