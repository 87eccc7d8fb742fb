"""Writing a run as a Hugging Face (transformers) model directory: `export(workdir, out)`.

The mapping of parameters and config fields is jaxdp.models.hf (pure, shared with the import in
jaxdp.lm.hf_import); this module writes the files: config.json, model.safetensors (or, past
`max_shard_size`, the shards model-0000k-of-0000n.safetensors and model.safetensors.index.json,
as transformers' save_pretrained names them), float32 or bfloat16, and the tokenizer
(tokenizer.json + tokenizer_config.json). `safetensors` and `tokenizers` are imported only here,
when needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from typing import Any

import ml_dtypes
import numpy as np

from jaxdp.data import tokenizers as toks
from jaxdp.data.prepare import TOKENIZER_FILE, WORKDIR_TOKENIZER
from jaxdp.errors import JaxdpError, atomic_write, os_reason, writing
from jaxdp.lm.hf_import import WEIGHTS, WEIGHTS_INDEX, safetensors_module
from jaxdp.models import hf
from jaxdp.models.common import ModelConfig

END_OF_TEXT = toks.END_OF_TEXT
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}  # --dtype: the tensors' type.
MAX_SHARD_SIZE = "5GB"  # transformers' save_pretrained default before 5.x: one file below it.
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, field: str = "--max_shard_size") -> int:
  """Bytes of a size such as 2GB, 500MB, 1.5GiB or 1000000 (a plain number is bytes;
  transformers' units: GB is 10^9, GiB 2^30).

  Raises:
    JaxdpError: not a size, or under one byte, naming `field`.
  """
  match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
  unit = match.group(2).upper() if match else ""
  if not match or unit not in _UNITS:
    raise JaxdpError(f"{field}={text!r} is not a size; give bytes (e.g. 1000000) or a number with "
                     f"a unit, e.g. 2GB, 500MB or 1.5GiB (units: {', '.join(u for u in _UNITS if u)})")
  size = int(float(match.group(1)) * _UNITS[unit])
  if size < 1:
    raise JaxdpError(f"{field}={text!r} must be at least 1 byte, e.g. 2GB")
  return size


def shards(tensors: dict[str, np.ndarray], max_bytes: int) -> list[dict[str, np.ndarray]]:
  """The tensors, in order, in consecutive groups of at most `max_bytes` each (a tensor larger
  than that alone), as transformers' save_pretrained splits a state dict."""
  groups: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name, value in tensors.items():
    if groups[-1] and size + value.nbytes > max_bytes:
      groups.append({})
      size = 0
    groups[-1][name] = value
    size += value.nbytes
  return groups


def export(workdir: str, out: str, step: int | None = None, *,
           max_shard_size: str | int = MAX_SHARD_SIZE, dtype: str = "float32") -> dict[str, Any]:
  """Writes the checkpoint `step` (default: the latest) of the run in `workdir` to `out` as a
  transformers model directory; returns {"step", "family", "architecture", "files"}.

  `max_shard_size`: bytes (or a size such as "2GB", see `parse_size`) of the largest weights
  file; a model larger than it is written as model-0000k-of-0000n.safetensors shards and
  model.safetensors.index.json. `dtype`: "float32" (exact) or "bfloat16" (rounded to nearest,
  half the bytes; config.json's dtype says which).

  Raises:
    JaxdpError: no such run or step, a model with no transformers equivalent (naming the
      field), a tokenizer with no tokenizer.json form, a bad size or dtype, or `out` not
      writable.
  """
  from jaxdp.lm.run import load_step_for_inference
  from jaxdp.runtime.checkpoint import Checkpointer
  from jaxdp.runtime.checkpoint import exists as checkpoint_exists
  from jaxdp.runtime.checkpoint import location as checkpoint_location
  if dtype not in DTYPES:
    raise JaxdpError(f"--dtype={dtype!r} is not one of {', '.join(DTYPES)}")
  max_bytes = parse_size(max_shard_size)
  if os.path.exists(out) and not os.path.isdir(out):
    raise JaxdpError(f"--out={out!r} is a file; give a directory (it is created if missing)")
  clashes = _weights_files(out) + [n for n in EXPORT_FILES if n not in (WEIGHTS, WEIGHTS_INDEX)
                                   and os.path.exists(os.path.join(out, n))]
  if clashes and not _is_jaxdp_export(out):
    raise JaxdpError(f"--out={out!r} already holds {', '.join(clashes)}, not written by `jaxdp "
                     "export`; give a new or empty directory (export replaces only its own files)")
  if not checkpoint_exists(checkpoint_location(workdir)):
    raise JaxdpError(f"--workdir={workdir!r} has no checkpoints/; give the directory a "
                     "`jaxdp train --workdir` wrote")
  checkpoints = Checkpointer(workdir, create=False)
  steps = checkpoints.all_steps()
  checkpoints.close()
  if step is not None and step not in steps:
    raise JaxdpError(f"--step={step} is not a checkpoint of --workdir={workdir!r}; its steps: "
                     f"{', '.join(map(str, steps)) or 'none'}")
  # The latest step by default, retried if a live run's retention deletes it while it is read.
  step, params, module, tokenizer = load_step_for_inference(workdir, step)
  cfg: ModelConfig = module.cfg
  tensors = hf.to_hf(params, cfg)  # Refuses an architecture transformers lacks, before writing.
  tensors = {name: value.astype(DTYPES[dtype]) for name, value in tensors.items()}
  tokenizer_json, eos, eos_token = _tokenizer_json(workdir, tokenizer, hf.exported_vocab(cfg))
  config = {**hf.hf_config(cfg, eos_token_id=eos), "dtype": dtype, "torch_dtype": dtype}
  # Each file is written under a temporary name and renamed; config.json (what transformers
  # loads first) is removed first and written last, so an export stopped halfway (a full disk)
  # never loads. A failed export removes all of its files, so the same command runs again.
  try:
    with writing(out, "export: writing --out"):
      os.makedirs(out, exist_ok=True)
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(out, "config.json"))
      weights = _write_weights(out, tensors, max_bytes, f"jaxdp step {step}")
      for stale in set(_weights_files(out)) - set(weights):  # Of an earlier export (checked above).
        os.remove(os.path.join(out, stale))
      atomic_write(os.path.join(out, TOKENIZER_FILE), tokenizer_json, "export: writing")
      special = {"eos_token": eos_token, "bos_token": eos_token} if eos is not None else {}
      _write_json(os.path.join(out, "tokenizer_config.json"),
                  {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.seq_len,
                   "clean_up_tokenization_spaces": False, "add_prefix_space": False, **special})
      _write_json(os.path.join(out, "generation_config.json"),
                  {"do_sample": True, **({"eos_token_id": eos, "bos_token_id": eos}
                                         if eos is not None else {})})
      _write_json(os.path.join(out, "config.json"), config)
  except OSError as e:
    _remove_export(out)
    raise JaxdpError(f"cannot write --out={out!r}: {os_reason(e, out)}") from None
  except BaseException:
    _remove_export(out)
    raise
  others = [n for n in EXPORT_FILES if n not in (WEIGHTS, WEIGHTS_INDEX)]
  return {"step": step, "family": cfg.family, "architecture": config["architectures"][0],
          "files": sorted(weights + others)}


EXPORT_FILES = (WEIGHTS, WEIGHTS_INDEX, "config.json", TOKENIZER_FILE, "tokenizer_config.json",
                "generation_config.json")


def _write_weights(out: str, tensors: dict[str, np.ndarray], max_bytes: int,
                   source: str) -> list[str]:
  """Writes `tensors` as model.safetensors, or as shards and their index when they exceed
  `max_bytes`; returns the names of the files written."""
  save_file = safetensors_module().numpy.save_file
  umask = os.umask(0)
  os.umask(umask)

  def save(group: dict[str, np.ndarray], path: str, metadata: dict[str, str]) -> None:
    partial = f"{path}.partial-{os.getpid()}"
    try:
      save_file(group, partial, metadata=metadata)
      # safetensors writes through a private temporary file (mode 0600): give the weights the
      # mode every other exported file gets, so another user or a serving container can read them.
      os.chmod(partial, 0o666 & ~umask)
      os.replace(partial, path)
    finally:
      with contextlib.suppress(OSError):
        os.remove(partial)

  metadata = {"format": "pt", "source": source}  # "source" marks the files as export's own.
  groups = shards(tensors, max_bytes)
  if len(groups) == 1:
    save(tensors, os.path.join(out, WEIGHTS), metadata=metadata)
    return [WEIGHTS]
  names = [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
  for name, group in zip(names, groups):
    save(group, os.path.join(out, name), metadata=metadata)
  _write_json(os.path.join(out, WEIGHTS_INDEX),
              {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
               "weight_map": {t: name for name, group in zip(names, groups) for t in group}})
  return [*names, WEIGHTS_INDEX]


def _weights_files(out: str) -> list[str]:
  """The weights files in `out`: model.safetensors, the index and shards."""
  if not os.path.isdir(out):
    return []
  return sorted(n for n in os.listdir(out) if n in (WEIGHTS, WEIGHTS_INDEX) or _SHARD.fullmatch(n))


def _is_jaxdp_export(out: str) -> bool:
  """True when `out` holds an earlier `jaxdp export` (its weights say so), which may be replaced."""
  files = [n for n in _weights_files(out) if n != WEIGHTS_INDEX]
  try:
    for name in files:
      with safetensors_module().safe_open(os.path.join(out, name), "np") as f:
        if not (f.metadata() or {}).get("source", "").startswith("jaxdp "):
          return False
    return bool(files)
  except Exception:  # noqa: BLE001 - unreadable weights: not ours.
    return False


def _write_json(path: str, value: dict) -> None:
  atomic_write(path, json.dumps(value, indent=2) + "\n", "export: writing")


def _remove_export(out: str) -> None:
  """Removes export's own files (and temporary ones) from `out` after a failed export."""
  if not os.path.isdir(out):
    return
  for name in os.listdir(out):
    own = name.split(".partial-")[0]
    if own in EXPORT_FILES or _SHARD.fullmatch(own):
      with contextlib.suppress(OSError):
        os.remove(os.path.join(out, name))


def _tokenizer_json(workdir: str, tokenizer, rows: int) -> tuple[str, int | None, str | None]:
  """(the text of a tokenizer.json equal to the run's tokenizer, its end-of-text id, that
  token's text), for a model of `rows` ids.

  A BPE (or any `tokenizers`) tokenizer is the run's own tokenizer.json, copied; the byte
  tokenizer is written as a byte-level BPE with no merges whose id b is the byte b and whose id
  255 (never a byte of UTF-8) is end-of-text, as in jaxdp (`tokenizers.byte_level_tokenizer`).

  Raises:
    JaxdpError: no tokenizer.json form, or one with an id the model has no row for (what
      `jaxdp prepare --tokenizer OUT/tokenizer.json` and transformers would then produce).
  """
  saved = os.path.join(workdir, WORKDIR_TOKENIZER, TOKENIZER_FILE)
  if os.path.exists(saved):
    with open(saved) as f:
      text = f.read()
  elif getattr(tokenizer, "name", None) == "byte" or tokenizer.vocab_size == 256:
    text = toks.byte_level_tokenizer().to_str()
  else:
    raise JaxdpError(f"the run's tokenizer ({type(tokenizer).__name__}) has no tokenizer.json "
                     f"in {os.path.join(workdir, WORKDIR_TOKENIZER)!r} to export")
  from tokenizers import Tokenizer
  # Read back as `jaxdp prepare --tokenizer` reads it: every id it can give must be a row.
  backend = Tokenizer.from_str(text)
  has_eot = any(backend.token_to_id(name) is not None for name in toks.EOT_NAMES)
  read = toks.HFTokenizer(backend)
  if read.vocab_size > rows:
    raise JaxdpError(f"the run's tokenizer reads back with {read.vocab_size} ids, but its model has "
                     f"{rows} rows; export would write a tokenizer whose ids the model lacks")
  if not has_eot:  # The end-of-text id jaxdp added when reading is not in the file.
    return text, None, None
  return text, read.end_of_text, backend.id_to_token(read.end_of_text)


def byte_tokenizer():
  """jaxdp's byte tokenizer as a `tokenizers.Tokenizer` (see tokenizers.byte_level_tokenizer)."""
  return toks.byte_level_tokenizer()
