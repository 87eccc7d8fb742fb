"""Input data: sources, tokenizers, the prepared on-disk format, token files, packing, mixtures
and the grain pipeline whose global batch of step `s` is a pure function of (seed, s). Imports
no JAX itself (grain may).

Names are imported on first use, so jaxdp.data.spec (the typed `DataSpec`) is read without
loading grain.
"""

import importlib
from typing import Any

_EXPORTS = {
    **dict.fromkeys(("BUILTIN_CORPUS", "Batches", "Dataset", "WindowSource", "builtin_corpus_path",
                     "corpus_digest", "load_corpus", "load_tokens", "prefetch", "split_tokens",
                     "training_examples"), "jaxdp.data.pipeline"),
    "DataSpec": "jaxdp.data.spec", "ByteTokenizer": "jaxdp.data.tokenizers",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name not in _EXPORTS:
    raise AttributeError(f"module 'jaxdp.data' has no attribute {name!r}")
  value = getattr(importlib.import_module(_EXPORTS[name]), name)
  globals()[name] = value
  return value


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(__all__))
