"""Reading a Hugging Face (transformers) checkpoint for `config.init_from="hf:DIR"`.

The mapping of parameters and config fields is jaxdp.models.hf (pure, shared with the export in
jaxdp.lm.hf_export); this module reads the files: config.json and model.safetensors (or the shards
a model.safetensors.index.json names). `safetensors` is imported only here, when needed.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from jaxdp.errors import JaxdpError
from jaxdp.models import hf
from jaxdp.models.common import ModelConfig

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


def safetensors_module():
  """The `safetensors` package, or a JaxdpError saying how to install it."""
  try:
    import safetensors.numpy
    return safetensors
  except ImportError:
    raise JaxdpError("Hugging Face checkpoints need the safetensors package: pip install "
                     "'jaxdp[hf]' (or pip install safetensors)") from None


def checkpoint_dir(init_from: str) -> str:
  """The directory of config.init_from="hf:DIR"."""
  return init_from[len("hf:"):]


def read_config(directory: str, field: str = "config.init_from") -> dict:
  """The config.json of a transformers checkpoint directory."""
  where = f"{field}='hf:{directory}'"
  if not os.path.isdir(directory):
    raise JaxdpError(f"{where}: {directory!r} is not a directory; give a local Hugging Face "
                     "checkpoint directory (save_pretrained's output)")
  path = os.path.join(directory, "config.json")
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    raise JaxdpError(f"{where}: no config.json in {directory!r}; it is not a Hugging Face "
                     "checkpoint directory") from None
  except (OSError, ValueError) as e:
    raise JaxdpError(f"{where}: cannot read {path!r}: {e}") from None


def read_tensors(directory: str, field: str = "config.init_from") -> dict[str, np.ndarray]:
  """Every tensor of model.safetensors (or of the shards a model.safetensors.index.json
  names), as numpy arrays (bfloat16/float16 are widened to float32).

  Raises:
    JaxdpError: a missing or unreadable file, or a weight that is not floating point (an int32
      "weight" would load as numbers of another scale), naming the tensor.
  """
  where = f"{field}='hf:{directory}'"
  single, index = os.path.join(directory, WEIGHTS), os.path.join(directory, WEIGHTS_INDEX)
  if os.path.exists(single):
    files = [single]
  elif os.path.exists(index):
    with open(index) as f:
      files = [os.path.join(directory, name)
               for name in sorted(set(json.load(f)["weight_map"].values()))]
  else:
    found = [n for n in ("pytorch_model.bin", "tf_model.h5", "flax_model.msgpack")
             if os.path.exists(os.path.join(directory, n))]
    hint = (f" (it has {found[0]}: save it again with save_pretrained(DIR, safe_serialization=True))"
            if found else "")
    raise JaxdpError(f"{where}: no {WEIGHTS} in {directory!r}{hint}")
  safetensors = safetensors_module()
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:
      with safetensors.safe_open(path, framework="flax") as f:
        for name in f.keys():
          value = f.get_tensor(name)
          # Buffers (hf.BUFFERS: a boolean causal mask) are checked by value in models.hf.
          if not jnp.issubdtype(value.dtype, jnp.floating) and not name.endswith(hf.BUFFERS):
            raise JaxdpError(f"{where}: tensor {name!r} in {os.path.basename(path)} is "
                             f"{value.dtype}, not floating point; jaxdp imports float32, "
                             "bfloat16 or float16 weights")
          tensors[name] = np.asarray(value, np.float32)
    except (OSError, ValueError, RuntimeError) as e:
      raise JaxdpError(f"{where}: cannot read {path!r}: {str(e).splitlines()[0]}") from None
  return tensors


def load_params(init_from: str, cfg: ModelConfig) -> dict:
  """jaxdp parameters (unboxed float32 numpy) of `cfg`'s model from config.init_from="hf:DIR",
  after checking the checkpoint's config.json against `cfg` field by field.

  Raises:
    JaxdpError: a missing directory or file, a field of config.model (or the vocabulary) that
      differs from the checkpoint, or a tensor of the wrong shape; one line naming it.
  """
  directory = checkpoint_dir(init_from)
  where = f"config.init_from={init_from!r}"
  hf_cfg = read_config(directory)
  # The checkpoint's tokenizer is read only when the rows differ from the run's (its ids then
  # decide between padded embeddings and another tokenizer, and name the fix).
  tokenizer = (checkpoint_tokenizer(directory) if hf_cfg.get("vocab_size")
               not in (cfg.vocab_size, cfg.valid_vocab_size or cfg.vocab_size) else None)
  hf.check_hf_config(hf_cfg, cfg, where, tokenizer)
  tensors = hf.canonical_names(read_tensors(directory), cfg.family)
  return hf.from_hf(tensors, cfg, where)


def checkpoint_tokenizer(directory: str) -> hf.CheckpointTokenizer:
  """The tokenizer.json of the checkpoint in `directory` as `jaxdp prepare --tokenizer` reads
  it: its ids (the rows a model needs) and whether jaxdp adds the end-of-text id."""
  from jaxdp.data import tokenizers
  path = os.path.join(directory, tokenizers.TOKENIZER_FILE)
  if not os.path.isfile(path):
    return hf.CheckpointTokenizer(directory, None)
  tokenizer = tokenizers.from_spec(path)
  return hf.CheckpointTokenizer(directory, path, tokenizer.vocab_size,
                                bool(getattr(tokenizer, "added_end_of_text", False)))


def position_note(init_from: str, cfg: ModelConfig) -> str:
  """The start banner's notes on what the run leaves of config.init_from ("" if nothing): its
  positions beyond config.seq_len (models.hf.position_note) and its rows beyond the run's
  vocabulary (models.hf.vocab_note), one line each."""
  hf_cfg, where = read_config(checkpoint_dir(init_from)), f"config.init_from={init_from!r}"
  return "\n".join(note for note in (hf.position_note(hf_cfg, cfg, where),
                                     hf.vocab_note(hf_cfg, cfg, where)) if note)
