"""`DataSpec`: what the input pipeline reads and how it batches it, as plain typed values.

The language-model app builds one from its config (jaxdp.lm.spec); the data layer never sees the
config itself. The error messages name the config fields (config.data.path, ...), which is where
a user sets them.
"""

from __future__ import annotations

import dataclasses

from jaxdp.data.packing import PACKINGS
from jaxdp.errors import need


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """The input of a run.

  Attributes:
    path: a UTF-8 text file, a `jaxdp prepare` directory or a .bin token file (or folder);
      "" is the built-in corpus. Ignored when `sources` is set.
    sources: a weighted mixture "PATH:WEIGHT,PATH:WEIGHT" (data/mixture.py); "" for `path` alone.
    tokenizer: a tokenizer.json for text or token files ("" = bytes, or the prepared one).
    val_fraction: the share of a text corpus's tokens held out for validation (its tail).
    packing: how documents fill windows, one of data.packing.PACKINGS.
    seq_len: tokens per training window (inputs; targets are shifted by one).
    seed: the seed of the training order (a mixture's source i uses seed + i).
    global_batch_size: examples per optimizer step, over all devices.
    grad_accum_steps: micro-batches per step; the batch of a step is [A, B/A, ...].
    eval_steps: validation batches per evaluation (0: every validation window once).

  Raises:
    JaxdpError: a packing that is not one of PACKINGS (at construction).
  """
  path: str = ""
  sources: str = ""
  tokenizer: str = ""
  val_fraction: float = 0.1
  packing: str = "concat"
  seq_len: int = 128
  seed: int = 0
  global_batch_size: int = 8
  grad_accum_steps: int = 1
  eval_steps: int = 0

  def __post_init__(self) -> None:
    need(self.packing in PACKINGS,
         f"config.data.packing={self.packing!r} is not one of {', '.join(PACKINGS)}")
