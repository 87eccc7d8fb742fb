"""How windows of the token stream become examples: `config.data.packing`.

  "concat"    window i is tokens[i*T : i*T + T + 1], cut across documents; an example is
              {inputs, targets, weights} (the format jaxdp always had).
  "document"  the same windows, plus `segment_ids` and `positions` int32 [T]: a new segment
              starts at the window's first token and at every end-of-text token (the end-of-text
              token opens the document it precedes, like a BOS: the previous document's last
              token predicts it, and it predicts the next document's first token from nothing),
              and positions count from 0 within each segment. The models mask attention to
              tokens of the same segment and use `positions` for rotary/learned embeddings, so
              no token attends across a document boundary (docs/data.md).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

PACKINGS = ("concat", "document")


def concat_example(window: np.ndarray) -> dict[str, np.ndarray]:
  """{inputs, targets int32 [..., T], weights float32 [..., T]} of windows [..., T + 1]: one
  window, or a batch of them at once (the loader's fast path)."""
  return {"inputs": window[..., :-1], "targets": window[..., 1:],
          "weights": np.ones(window.shape[:-1] + (window.shape[-1] - 1,), np.float32)}


def document_fields(inputs: np.ndarray, end_of_text: int) -> tuple[np.ndarray, np.ndarray]:
  """(segment_ids, positions), int32 [..., T], of windows' inputs [..., T] (see the module
  docstring); each row of a batch on its own."""
  index = np.arange(inputs.shape[-1])
  starts = inputs == end_of_text
  if inputs.shape[-1]:
    starts[..., 0] = True
  segment_ids = np.cumsum(starts, axis=-1, dtype=np.int32) - 1
  positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
  return segment_ids.astype(np.int32), positions.astype(np.int32)


def example_fn(packing: str, end_of_text: int | None) -> Callable[[np.ndarray], dict]:
  """The function window(s) [..., T + 1] -> example(s) of `packing`."""
  if packing == "concat":
    return concat_example
  if end_of_text is None:
    raise ValueError("document packing needs the tokenizer's end-of-text id")

  def document_example(window: np.ndarray) -> dict[str, np.ndarray]:
    example = concat_example(window)
    example["segment_ids"], example["positions"] = document_fields(example["inputs"], end_of_text)
    return example
  return document_example
