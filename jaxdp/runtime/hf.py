"""Hugging Face checkpoints on disk: `export` a run, and read one for `config.init_from="hf:DIR"`.

The mapping of parameters and config fields is jaxdp.models.hf (pure); this module reads and
writes the files: config.json, model.safetensors (or a sharded model.safetensors.index.json on
import), and the tokenizer (tokenizer.json + tokenizer_config.json). `safetensors` and
`tokenizers` are imported only here, when needed.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from jaxdp.data.prepare import TOKENIZER_FILE, WORKDIR_TOKENIZER
from jaxdp.errors import JaxdpError, os_reason
from jaxdp.models import hf
from jaxdp.models.common import ModelConfig

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
END_OF_TEXT = "<|endoftext|>"


def _safetensors():
  try:
    import safetensors.numpy
    return safetensors
  except ImportError:
    raise JaxdpError("Hugging Face checkpoints need the safetensors package: pip install "
                     "'jaxdp[hf]' (or pip install safetensors)") from None


# ---- Export ---------------------------------------------------------------------------------

def export(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
  """Writes the checkpoint `step` (default: the latest) of the run in `workdir` to `out` as a
  transformers model directory; returns {"step", "family", "files"}.

  Raises:
    JaxdpError: no such run or step, a model with no transformers equivalent (naming the
      field), a tokenizer with no tokenizer.json form, or `out` not writable.
  """
  from jaxdp.runtime.checkpoint import Checkpointer
  from jaxdp.runtime.trainer import load_for_inference
  if os.path.exists(out) and not os.path.isdir(out):
    raise JaxdpError(f"--out={out!r} is a file; give a directory (it is created if missing)")
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoints/; give the directory a "
                     "`jaxdp train --workdir` wrote")
  checkpoints = Checkpointer(workdir, create=False)
  steps = checkpoints.all_steps()
  checkpoints.close()
  if step is not None and step not in steps:
    raise JaxdpError(f"--step={step} is not a checkpoint of --workdir={workdir!r}; its steps: "
                     f"{', '.join(map(str, steps)) or 'none'}")
  step = steps[-1] if step is None and steps else step
  params, module, tokenizer = load_for_inference(workdir, step)
  cfg: ModelConfig = module.cfg
  tensors = hf.to_hf(params, cfg)  # Refuses an architecture transformers lacks, before writing.
  tokenizer_json, eos = _tokenizer_json(workdir, tokenizer)
  config = hf.hf_config(cfg, eos_token_id=eos)
  try:
    os.makedirs(out, exist_ok=True)
    _safetensors().numpy.save_file(tensors, os.path.join(out, WEIGHTS),
                                   metadata={"format": "pt", "source": f"jaxdp step {step}"})
    _write_json(os.path.join(out, "config.json"), config)
    with open(os.path.join(out, TOKENIZER_FILE), "w") as f:
      f.write(tokenizer_json)
    special = {"eos_token": END_OF_TEXT, "bos_token": END_OF_TEXT} if eos is not None else {}
    _write_json(os.path.join(out, "tokenizer_config.json"),
                {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.seq_len,
                 "clean_up_tokenization_spaces": False, "add_prefix_space": False, **special})
    _write_json(os.path.join(out, "generation_config.json"),
                {"do_sample": True, **({"eos_token_id": eos, "bos_token_id": eos}
                                       if eos is not None else {})})
  except OSError as e:
    raise JaxdpError(f"cannot write --out={out!r}: {os_reason(e, out)}") from None
  return {"step": step, "family": cfg.family,
          "files": sorted(os.listdir(out))}


def _write_json(path: str, value: dict) -> None:
  with open(path, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")


def _tokenizer_json(workdir: str, tokenizer) -> tuple[str, int | None]:
  """(the text of a tokenizer.json equal to the run's tokenizer, its end-of-text id or None).

  A BPE (or any `tokenizers`) tokenizer is the run's own tokenizer.json, copied; the byte
  tokenizer is written as a byte-level BPE with no merges whose id b is the byte b, so
  transformers' tokenizers give the same ids and decode the same bytes.
  """
  saved = os.path.join(workdir, WORKDIR_TOKENIZER, TOKENIZER_FILE)
  if os.path.exists(saved):
    with open(saved) as f:
      text = f.read()
    vocab = json.loads(text).get("added_tokens", [])
    eos = next((t["id"] for t in vocab if t.get("content") == END_OF_TEXT), None)
    return text, eos
  if getattr(tokenizer, "name", None) == "byte" or tokenizer.vocab_size == 256:
    return byte_tokenizer().to_str(), None
  raise JaxdpError(f"the run's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json "
                   f"in {os.path.join(workdir, WORKDIR_TOKENIZER)!r} to export")


def byte_tokenizer():
  """jaxdp's byte tokenizer as a `tokenizers.Tokenizer`: ids 0..255 are the bytes 0..255."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers
  # ByteLevel's printable stand-in for each byte (GPT-2's bytes_to_unicode), in byte order.
  alphabet = {ch: ord(ch) for ch in pre_tokenizers.ByteLevel.alphabet()}
  table = _bytes_to_unicode()
  vocab = {table[b]: b for b in range(256)}
  assert set(vocab) == set(alphabet), "ByteLevel's alphabet is GPT-2's byte table"
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
  # use_regex=False: no word splitting, every byte is its own piece (no merges anyway).
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  return tok


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (openai/gpt-2, encoder.py)."""
  printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
               + list(range(ord("®"), ord("ÿ") + 1)))
  chars, n = printable[:], 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(printable, map(chr, chars)))


# ---- Import ---------------------------------------------------------------------------------

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
  names), as numpy arrays (bfloat16/float16 are widened to float32)."""
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
  safetensors = _safetensors()
  tensors: dict[str, np.ndarray] = {}
  for path in files:
    try:
      with safetensors.safe_open(path, framework="flax") as f:
        for name in f.keys():
          tensors[name] = np.asarray(f.get_tensor(name), np.float32)
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
  hf.check_hf_config(hf_cfg, cfg, where)
  tensors = hf.canonical_names(read_tensors(directory), cfg.family)
  return hf.from_hf(tensors, cfg, where)

