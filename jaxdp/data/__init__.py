"""Input data: sources, tokenizers, the prepared on-disk format, token files, packing, mixtures
and the grain pipeline whose global batch of step `s` is a pure function of (seed, s). Imports
no JAX."""

from jaxdp.data.pipeline import (
                                 BUILTIN_CORPUS,
                                 Batches,
                                 Dataset,
                                 WindowSource,
                                 builtin_corpus_path,
                                 corpus_digest,
                                 load_corpus,
                                 load_tokens,
                                 prefetch,
                                 split_tokens,
                                 training_examples,
)
from jaxdp.data.tokenizers import ByteTokenizer

__all__ = ["BUILTIN_CORPUS", "Batches", "ByteTokenizer", "Dataset", "WindowSource",
           "builtin_corpus_path", "corpus_digest", "load_corpus", "load_tokens", "prefetch",
           "split_tokens", "training_examples"]
