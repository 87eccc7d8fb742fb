"""The built-in models as Hugging Face checkpoints and back: pure mappings, no file access.

`to_hf(params, cfg)` gives the `config.json` dict and the tensors (name -> float32 array) of
the equivalent `transformers` model: `gpt` as `GPT2LMHeadModel`, `llama` as `LlamaForCausalLM`
or, by cfg.variant, `Qwen2ForCausalLM`, `Qwen3ForCausalLM` or `MistralForCausalLM`.
`check_hf_config(hf, cfg)` says which jaxdp field differs from a checkpoint's config.json, and
`from_hf(tensors, cfg)` turns the checkpoint's tensors into jaxdp's parameter tree.

Every numeric choice is mapped, not assumed (sources: transformers' modeling_gpt2.py and
modeling_llama.py, and jaxdp's gpt.py, llama.py, common.py):
- GPT-2 stores its linear layers as Conv1D, weight [in, out] (jaxdp's Linear is [out, in]);
  c_attn is one [D, 3D] matrix whose output is q | k | v, each heads-major (H x K), which is
  exactly jaxdp's DenseGeneral qkv kernel [D, 3, H, K] flattened; c_proj is [H*K, D].
- GPT-2's "gelu_new" is the tanh approximation, flax's `nn.gelu` default; its LayerNorm eps is
  config.model.norm_eps (the gpt default, flax's 1e-6, is written as layer_norm_epsilon).
- Attention scores are divided by sqrt(K) in both (GPT-2: scale_attn_weights, not by layer).
- Rotary: jaxdp's `rotary` pairs dimension i with i + K/2 (split in halves), which is HF Llama's
  `rotate_half` convention with the same inverse frequencies theta^(-2i/K), so q/k weights map
  unpermuted (Meta's original interleaved checkpoints are already permuted by HF's converter).
- Llama's weights are [out, in] like jaxdp's; q/k/v/o are flattened over (heads, head_dim).
- The variants (transformers' modeling_qwen2.py, modeling_qwen3.py, modeling_mistral.py): Qwen2
  adds biases to q_proj, k_proj, v_proj (never o_proj); Qwen3 applies q_norm and k_norm, RMSNorms
  of one [head_dim] weight over each head, after the projection and before rotary, and takes
  head_dim from config.json; Mistral (and Qwen with use_sliding_window) masks keys with
  kv_idx <= q_idx - sliding_window (transformers' sliding_window_overlay), jaxdp's
  `sliding_window`. A Qwen checkpoint whose layers mix sliding and full attention is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
from typing import Any

import numpy as np

from jaxdp.errors import JaxdpError
from jaxdp.models.choices import HF_CLASSES, check_variant
from jaxdp.models.common import ModelConfig
from jaxdp.models.llama import mlp_hidden

# Tensors a checkpoint may hold that carry no parameter (buffers of older transformers).
BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# config.model.variant -> (transformers architecture, model_type); "" is plain Llama.
ARCHITECTURES = {variant: (name, variant or "llama") for variant, name in HF_CLASSES.items()}
VARIANT_OF_TYPE = {model_type: variant for variant, (_, model_type) in ARCHITECTURES.items()}

# ---- Every config.json key, by architecture: used, harmless or refused ------------------------
# The rule: a key of a checkpoint's config.json is read (USED: mapped to a jaxdp field, or checked
# and refused when its value is one jaxdp's model does not compute, naming it) or listed as
# HARMLESS (it cannot change the logits: bookkeeping, generation defaults, the dropouts of the
# training that made the checkpoint, which config.model.dropout replaces); any other key, unless
# null, is refused by name: jaxdp cannot tell whether it changes the computation, and a model
# that silently computes something else is worse than one line asking to remove the key.
HARMLESS = frozenset({
    "_name_or_path", "_commit_hash", "_attn_implementation_autoset", "architectures",
    "transformers_version", "dtype", "torch_dtype", "use_bfloat16", "bos_token_id",
    "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id", "initializer_range",
    "use_cache", "id2label", "label2id", "num_labels", "output_attentions",
    "output_hidden_states", "return_dict", "problem_type", "chunk_size_feed_forward",
    "torchscript", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "tf_legacy_loss", "cross_attention_hidden_size", "tie_encoder_decoder",
    # Generation defaults of older config.json files (generate's options, not the model's).
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty",
    "length_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
    "num_return_sequences", "output_scores", "return_dict_in_generate", "forced_bos_token_id",
    "forced_eos_token_id", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens",
})
# Keys of PretrainedConfig that change the model unless they hold this value.
_GENERIC_OFF = {"is_encoder_decoder": False, "is_decoder": False, "add_cross_attention": False,
                "pruned_heads": {}}
_LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
               "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
               "partial_rotary_factor", "attention_dropout", "tie_word_embeddings",
               # The context its rotary positions were trained for: config.seq_len's bound.
               "max_position_embeddings")
USED = {
    # max_position_embeddings: transformers' alias of n_positions (GPT2Config.attribute_map).
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_inner", "n_positions", "n_ctx",
             "max_position_embeddings",
             "activation_function", "layer_norm_epsilon", "scale_attn_weights",
             "scale_attn_by_inverse_layer_idx", "tie_word_embeddings",
             # Training-time dropouts, the sequence-summary head of GPT2DoubleHeadsModel (not the
             # LM head), and an fp32 upcast of the attention jaxdp computes in fp32 anyway.
             "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type", "summary_use_proj",
             "summary_activation", "summary_proj_to_labels", "summary_first_dropout",
             "reorder_and_upcast_attn"),
    # pretraining_tp > 1 only splits the same matmuls into slices in transformers.
    "llama": _LLAMA_KEYS + ("attention_bias", "mlp_bias", "pretraining_tp"),
    "qwen2": _LLAMA_KEYS + ("use_sliding_window", "sliding_window", "max_window_layers",
                            "layer_types"),
    "qwen3": _LLAMA_KEYS + ("attention_bias", "use_sliding_window", "sliding_window",
                            "max_window_layers", "layer_types"),
    "mistral": _LLAMA_KEYS + ("sliding_window",),
}
# What each rope_scaling type does, for the one line refusing it (transformers'
# modeling_rope_utils.py): none is implemented by jaxdp's rotary positions.
ROPE_TYPES = {
    "linear": "positions divided by its factor",
    "dynamic": "NTK scaling of the base with the sequence length",
    "yarn": "YaRN's interpolated frequencies and attention factor",
    "longrope": "LongRoPE's per-dimension factors",
    "llama3": "Llama 3.1's frequencies rescaled by wavelength",
}


def max_positions(hf: dict) -> int | None:
  """The longest context of a checkpoint's config.json: GPT-2's n_positions (learned positions:
  its table's rows; n_ctx or max_position_embeddings in older files), a rotary model's
  max_position_embeddings; None if it gives none."""
  for key in ("n_positions", "max_position_embeddings", "n_ctx"):
    if hf.get(key):
      return int(hf[key])
  return None


def position_note(hf: dict, cfg: ModelConfig, where: str) -> str:
  """What an import does to a checkpoint's positions beyond config.seq_len ("" if nothing): a
  GPT-2 position table longer than seq_len keeps its first seq_len rows (windows of seq_len
  tokens never use the rest), which an export then declares as its n_positions."""
  limit = max_positions(hf)
  if cfg.family != "gpt" or not limit or limit <= cfg.seq_len:
    return ""
  return (f"jaxdp: note: {where} has n_positions={limit} learned positions; this run's "
          f"config.seq_len={cfg.seq_len} uses its first {cfg.seq_len} (the other {limit - cfg.seq_len} "
          f"rows are dropped, and an export has n_positions={cfg.seq_len}); set "
          f"--config.seq_len={limit} to keep them all")


def check_keys(hf: dict, where: str = "the checkpoint") -> None:
  """Refuses a config.json key that is neither used by jaxdp's import of its model_type nor
  harmless (see USED, HARMLESS), and a generic option that changes the model.

  Raises:
    JaxdpError: one line naming the key and the fix.
  """
  kind = hf.get("model_type")
  if kind not in USED:
    return  # hf_fields names the architecture.
  for key, off in _GENERIC_OFF.items():
    if hf.get(key, off) not in (off, None):
      raise JaxdpError(f"{where}'s config.json sets {key}={hf[key]!r}, which jaxdp's "
                       f"{kind} import does not compute (it needs {off!r})")
  if hf.get("quantization_config") is not None:
    raise JaxdpError(f"{where}'s config.json has quantization_config: its weights are quantized, "
                     "which jaxdp does not import; give the checkpoint in float16/bfloat16/float32")
  known = HARMLESS | set(USED[kind]) | set(_GENERIC_OFF) | {"model_type", "quantization_config"}
  unknown = sorted(k for k, v in hf.items() if k not in known and v is not None)
  if unknown:
    raise JaxdpError(f"{where}'s config.json has {unknown[0]}={hf[unknown[0]]!r}, a field jaxdp's "
                     f"{kind} import does not know ({len(unknown)} such: {', '.join(unknown)}); it "
                     "may change the model, so it is refused: if it does not, remove it from "
                     "config.json")


def _np(x) -> np.ndarray:
  return np.asarray(x, np.float32)


# ---- jaxdp -> Hugging Face ------------------------------------------------------------------

def hf_config(cfg: ModelConfig, *, eos_token_id: int | None = None) -> dict[str, Any]:
  """The config.json of `cfg`'s model as a transformers config.

  Raises:
    JaxdpError: a model with no transformers equivalent, naming the field.
  """
  # Written even when None: GPT2Config's defaults (50256) would name an id the vocab may lack.
  special = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
  # The tokenizer's ids only: the padding rows of model.pad_vocab_to_multiple are dropped (see
  # to_hf), so transformers' softmax, loss and sampling see the ids jaxdp's masked logits do.
  common = {"vocab_size": exported_vocab(cfg), "dtype": "float32", "torch_dtype": "float32",
            "tie_word_embeddings":
            cfg.tie_embeddings, **special}
  if cfg.family == "gpt":
    if cfg.positions != "learned":
      raise JaxdpError(f"config.model.positions={cfg.positions!r} is not GPT-2: export of a gpt "
                       "model needs positions='learned' (GPT-2 has no rotary positions); train "
                       "with --config.model.positions=learned, or use family=llama")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": cfg.seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": model_mlp(cfg),
            "activation_function": "gelu_new", "layer_norm_epsilon": cfg.eps,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False}
  if cfg.family == "llama":
    check_variant(cfg.family, cfg.variant, head_dim=cfg.head_dim, qkv_bias=cfg.qkv_bias,
                  qk_norm=cfg.qk_norm, sliding_window=cfg.sliding_window)
    architecture, model_type = ARCHITECTURES[cfg.variant]
    out = {"architectures": [architecture], "model_type": model_type, **common,
           "hidden_size": cfg.d_model, "intermediate_size": mlp_hidden(cfg),
           "num_hidden_layers": cfg.n_layer, "num_attention_heads": cfg.n_head,
           "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_size,
           "hidden_act": "silu", "max_position_embeddings": cfg.seq_len,
           "rms_norm_eps": cfg.eps, "rope_theta": cfg.rope_theta,
           "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
           "attention_dropout": 0.0}
    window = cfg.sliding_window or None
    if cfg.variant == "":
      out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    elif cfg.variant == "mistral":
      out.update(sliding_window=window)
    else:  # Qwen: every layer slides (max_window_layers 0) or none does.
      out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=0,
                 layer_types=[("sliding" if window else "full") + "_attention"] * cfg.n_layer)
      if cfg.variant == "qwen3":
        out.update(attention_bias=False)
    return out
  raise JaxdpError(f"config.model.family={cfg.family!r} has no Hugging Face export")


def exported_vocab(cfg: ModelConfig) -> int:
  """The vocabulary an export declares: the tokenizer's ids, without the padding rows of
  model.pad_vocab_to_multiple (whose logits jaxdp masks, so they are never fed or sampled)."""
  if cfg.valid_vocab_size and cfg.valid_vocab_size < cfg.vocab_size:
    return cfg.valid_vocab_size
  return cfg.vocab_size


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """jaxdp parameters (unboxed) -> the transformers state dict, float32 and contiguous.

  The tied output head is not written (transformers ties lm_head to the input embedding when
  config.json says tie_word_embeddings). The embedding and head keep the tokenizer's rows only
  (`exported_vocab`): transformers would give padding rows probability, jaxdp gives them none.
  """
  hf_config(cfg)  # Refuses what has no equivalent.
  out = _to_hf(params, cfg)
  rows = exported_vocab(cfg)
  for name in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
    if name in out:
      out[name] = out[name][:rows]
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


def _to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """to_hf's tensors with every row of the (padded) vocabulary."""
  out: dict[str, np.ndarray] = {}
  d = cfg.d_model
  if cfg.family == "gpt":
    out["transformer.wte.weight"] = _np(params["wte"]["embedding"])
    out["transformer.wpe.weight"] = _np(params["wpe"])
    for i in range(cfg.n_layer):
      p, o = params[f"block_{i}"], f"transformer.h.{i}."
      out[o + "ln_1.weight"], out[o + "ln_1.bias"] = _np(p["ln1"]["scale"]), _np(p["ln1"]["bias"])
      out[o + "ln_2.weight"], out[o + "ln_2.bias"] = _np(p["ln2"]["scale"]), _np(p["ln2"]["bias"])
      out[o + "attn.c_attn.weight"] = _np(p["attn"]["qkv"]["kernel"]).reshape(d, 3 * d)
      out[o + "attn.c_attn.bias"] = _np(p["attn"]["qkv"]["bias"]).reshape(3 * d)
      out[o + "attn.c_proj.weight"] = _np(p["attn"]["proj"]["kernel"]).reshape(d, d)
      out[o + "attn.c_proj.bias"] = _np(p["attn"]["proj"]["bias"])
      out[o + "mlp.c_fc.weight"] = _np(p["mlp"]["fc"]["kernel"]).T  # [F, D] -> Conv1D [D, F]
      out[o + "mlp.c_fc.bias"] = _np(p["mlp"]["fc"]["bias"])
      out[o + "mlp.c_proj.weight"] = _np(p["mlp"]["proj"]["kernel"]).T  # [D, F] -> [F, D]
      out[o + "mlp.c_proj.bias"] = _np(p["mlp"]["proj"]["bias"])
    out["transformer.ln_f.weight"] = _np(params["ln_f"]["scale"])
    out["transformer.ln_f.bias"] = _np(params["ln_f"]["bias"])
    if not cfg.tie_embeddings:
      out["lm_head.weight"] = _np(params["lm_head"])
  else:
    out["model.embed_tokens.weight"] = _np(params["embed"]["embedding"])
    for i in range(cfg.n_layer):
      p, o = params[f"block_{i}"], f"model.layers.{i}."
      a = p["attn"]
      out[o + "input_layernorm.weight"] = _np(p["attn_norm"]["scale"])
      out[o + "post_attention_layernorm.weight"] = _np(p["mlp_norm"]["scale"])
      for name in ("q", "k", "v"):
        w = _np(a[f"w{name}"])  # [heads, K, D]
        out[o + f"self_attn.{name}_proj.weight"] = w.reshape(-1, d)
        if cfg.qkv_bias:
          out[o + f"self_attn.{name}_proj.bias"] = _np(a[f"b{name}"]).reshape(-1)  # [heads * K]
        if cfg.qk_norm and name != "v":
          out[o + f"self_attn.{name}_norm.weight"] = _np(a[f"{name}_norm"]["scale"])
      out[o + "self_attn.o_proj.weight"] = _np(a["wo"]).reshape(d, -1)  # [D, H, K] -> [D, H*K]
      for name, hf in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
        out[o + f"mlp.{hf}.weight"] = _np(p["mlp"][name])
    out["model.norm.weight"] = _np(params["norm"]["scale"])
    if not cfg.tie_embeddings:
      out["lm_head.weight"] = _np(params["lm_head"])
  return out


# ---- Hugging Face -> jaxdp ------------------------------------------------------------------

def _get(hf: dict, *keys, default=None):
  for key in keys:
    if key in hf and hf[key] is not None:
      return hf[key]
  return default


def hf_rope_theta(hf: dict) -> float:
  """rope_theta of a Llama config.json: top level (transformers < 5) or in rope_parameters."""
  params = hf.get("rope_parameters") or {}
  return float(_get(hf, "rope_theta", default=params.get("rope_theta", 10000.0)))


def hf_fields(hf: dict) -> tuple[str, dict[str, Any]]:
  """(family, {jaxdp config field: value}) of a transformers config.json, the values its
  architecture needs in config.model (and seq_len's upper bound for learned positions).

  Raises:
    JaxdpError: an architecture or option jaxdp's models do not have, naming the HF field.
  """
  kind = hf.get("model_type")
  check_keys(hf)
  if kind == "gpt2":
    act = hf.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh"):
      raise JaxdpError(f"the checkpoint's activation_function={act!r} is not jaxdp gpt's tanh "
                       "GELU (gelu_new)")
    for field, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True)):
      if bool(hf.get(field, ok)) != ok:
        raise JaxdpError(f"the checkpoint's {field}={hf.get(field)} has no jaxdp equivalent")
    d = hf["n_embd"]
    inner = hf.get("n_inner") or 4 * d
    return "gpt", {"model.n_layer": hf["n_layer"], "model.n_head": hf["n_head"],
                   "model.d_model": d, "intermediate_size": inner,
                   "model.positions": "learned",
                   # GPT2Config's default is tied (transformers then ignores any lm_head.weight).
                   "model.tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
                   "model.norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
                   "max_seq_len": max_positions(hf)}
  if kind in VARIANT_OF_TYPE:
    return "llama", _llama_fields(hf, kind)
  raise JaxdpError(f"the checkpoint's model_type={kind!r} is not one of gpt2, "
                   f"{', '.join(VARIANT_OF_TYPE)}, the architectures jaxdp imports")


def _llama_fields(hf: dict, kind: str) -> dict[str, Any]:
  """hf_fields of the llama family's checkpoints (model_type llama, qwen2, qwen3, mistral)."""
  # Options of the four classes that jaxdp's llama lacks, as (field, the value it has).
  lacking = {"llama": (("attention_bias", False), ("mlp_bias", False)),
             "qwen3": (("attention_bias", False),)}.get(kind, ())
  for field, ok in lacking:
    if bool(hf.get(field, ok)) != ok:
      raise JaxdpError(f"the checkpoint's {field}={hf[field]} has no jaxdp equivalent (biases "
                       f"on {'every attention projection' if field == 'attention_bias' else 'the MLP'})")
  if hf.get("hidden_act", "silu") != "silu":
    raise JaxdpError(f"the checkpoint's hidden_act={hf['hidden_act']!r} is not SwiGLU's silu")
  if float(hf.get("attention_dropout") or 0.0) != 0.0:
    raise JaxdpError(f"the checkpoint's attention_dropout={hf['attention_dropout']} has no "
                     "jaxdp equivalent (dropout on attention probabilities)")
  scaling = hf.get("rope_scaling") or {}
  rope_type = scaling.get("rope_type", scaling.get("type")) or \
      (hf.get("rope_parameters") or {}).get("rope_type", "default")
  if rope_type != "default":
    field = "rope_scaling" if scaling else "rope_parameters"  # transformers < 5, and 5.
    what = ROPE_TYPES.get(rope_type, "a rope type jaxdp does not know")
    raise JaxdpError(f"the checkpoint's {field} has rope_type {rope_type!r} ({what}), which jaxdp's "
                     "rotary positions do not implement (only plain rotary, rope_type 'default'); "
                     "this checkpoint cannot be imported exactly")
  partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                  hf.get("partial_rotary_factor", 1.0))
  if float(partial) != 1.0:
    raise JaxdpError(f"the checkpoint's partial_rotary_factor={partial} has no jaxdp equivalent "
                     "(rotary positions on every head dimension)")
  d, h = hf["hidden_size"], hf["num_attention_heads"]
  head = hf.get("head_dim") or d // h
  if head == d // h and d % h:
    raise JaxdpError(f"the checkpoint's hidden_size={d} is not a multiple of "
                     f"num_attention_heads={h}, and it gives no head_dim")
  kv = hf.get("num_key_value_heads") or h
  return {"model.variant": VARIANT_OF_TYPE[kind], "model.n_layer": hf["num_hidden_layers"],
          "model.n_head": h, "model.d_model": d, "model.n_kv_head": 0 if kv == h else kv,
          "head_size": head, "intermediate_size": hf["intermediate_size"],
          "model.qkv_bias": kind == "qwen2", "model.qk_norm": kind == "qwen3",
          "model.sliding_window": _sliding_window(hf, kind),
          "model.rope_theta": hf_rope_theta(hf),
          "model.tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
          "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
          "max_seq_len": max_positions(hf)}


def _sliding_window(hf: dict, kind: str) -> int:
  """The sliding window every layer of the checkpoint uses, 0 for none; as transformers reads it:
  Mistral's sliding_window applies to every layer; Qwen's only with use_sliding_window, to the
  layers layer_types names (by default those from max_window_layers on); Llama has none.

  Raises:
    JaxdpError: a Qwen checkpoint whose layers mix sliding and full attention.
  """
  if kind == "mistral":
    return int(hf.get("sliding_window") or 0)
  if kind == "llama" or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
    return 0
  n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
  types = hf.get("layer_types") or ["sliding_attention" if i >= first else "full_attention"
                                    for i in range(n)]
  if set(types) == {"full_attention"}:
    return 0
  if set(types) == {"sliding_attention"}:
    return int(hf["sliding_window"])
  why = (f"{types.count('sliding_attention')} of {n} sliding" if hf.get("layer_types")
         else f"use_sliding_window with max_window_layers={first} of {n} layers")
  raise JaxdpError(f"the checkpoint's layer_types mix sliding and full attention ({why}); jaxdp's "
                   "sliding_window applies to every layer")


def check_hf_config(hf: dict, cfg: ModelConfig, where: str,
                    tokenizer: CheckpointTokenizer | None = None) -> None:
  """Raises a one-line JaxdpError naming the first jaxdp field that differs from the checkpoint
  at `where` (its config.json is `hf`) and the value to set. `tokenizer`: the checkpoint's own,
  for the vocabulary (see `check_vocab`)."""
  family, fields = hf_fields(hf)
  if cfg.family != family:
    raise JaxdpError(f"config.model.family={cfg.family!r} but {where} is {hf.get('model_type')}; "
                     f"set --config.model.family={family}")
  check_vocab(hf, cfg, where, tokenizer)
  have: dict[str, Any] = {
      "model.n_layer": cfg.n_layer, "model.n_head": cfg.n_head, "model.d_model": cfg.d_model,
      "model.n_kv_head": 0 if cfg.kv_heads == cfg.n_head else cfg.kv_heads,
      "model.positions": cfg.positions, "model.tie_embeddings": cfg.tie_embeddings,
      "model.rope_theta": cfg.rope_theta, "model.norm_eps": cfg.eps,
      "model.variant": cfg.variant,
      "model.qkv_bias": cfg.qkv_bias, "model.qk_norm": cfg.qk_norm,
      "model.sliding_window": cfg.sliding_window}
  for field, value in fields.items():
    if field in ("max_seq_len", "intermediate_size", "head_size"):
      continue
    if field == "model.norm_eps" and not np.isclose(value, have[field], rtol=1e-6, atol=0):
      raise JaxdpError(f"config.model.norm_eps={have[field]:g} but {where} uses {value:g}; set "
                       f"--config.model.norm_eps={value:g}")
    if field != "model.norm_eps" and value != have[field]:
      shown = value if not isinstance(value, str) else repr(value)
      raise JaxdpError(f"config.{field}={have[field]!r} but {where} has {shown}; set "
                       f"--config.{field}={value}")
  limit = fields["max_seq_len"]
  if limit and cfg.seq_len > limit:  # Positions the checkpoint has no row for, or never trained.
    if family == "gpt":
      raise JaxdpError(f"config.seq_len={cfg.seq_len} is longer than the n_positions={limit} learned "
                       f"positions of {where} (its position table has {limit} rows); set "
                       f"--config.seq_len={limit} or less")
    raise JaxdpError(f"config.seq_len={cfg.seq_len} is longer than the max_position_embeddings={limit} "
                     f"of {where}, the context its rotary positions were trained for; set "
                     f"--config.seq_len={limit} or less (to train a longer context on purpose, raise "
                     "max_position_embeddings in its config.json)")
  if family == "llama" and cfg.head_size != fields["head_size"]:
    raise JaxdpError(f"config.model.head_dim={cfg.head_dim} gives heads of {cfg.head_size} but "
                     f"{where} has head_dim={fields['head_size']}; set --config.model.head_dim="
                     f"{fields['head_size']}")
  width = fields["intermediate_size"]
  if model_mlp(cfg) != width:
    ours = f"config.model.mlp_ratio={cfg.mlp_ratio:g}" + (f", mlp_dim={cfg.mlp_dim}" if cfg.mlp_dim
                                                          else "")
    raise JaxdpError(f"{ours} gives an MLP of {model_mlp(cfg)} but {where} has "
                     f"{'n_inner' if family == 'gpt' else 'intermediate_size'}={width}; "
                     f"set {_mlp_fix(cfg, width)}")


@dataclasses.dataclass(frozen=True)
class CheckpointTokenizer:
  """A checkpoint's own tokenizer as `jaxdp prepare --tokenizer` reads it (jaxdp.lm.hf_import
  reads it; `check_vocab` compares it with the run's and names it in its advice)."""

  directory: str  # The checkpoint's directory, as config.init_from gives it.
  path: str | None  # Its tokenizer.json; None when it has none.
  ids: int = 0  # Ids (rows needed) of the tokenizer that `jaxdp prepare --tokenizer path` uses.
  added_end_of_text: bool = False  # The file has no end-of-text token: jaxdp added one (an id).


def check_vocab(hf: dict, cfg: ModelConfig, where: str,
                tokenizer: CheckpointTokenizer | None = None) -> None:
  """Refuses a checkpoint whose rows do not cover the run's tokenizer, with advice that works.

  Accepted: the checkpoint's vocab_size is the run's rows or the run's tokenizer's ids (a jaxdp
  export of a padded run), or exceeds the run's ids when the checkpoint's own tokenizer has as
  many ids as the run's (padded embeddings, normal in Hugging Face checkpoints: rows no id of the
  tokenizer reaches; `from_hf` fits them to the run's rows). `tokenizer` None: not looked at.

  Raises:
    JaxdpError: one line naming both counts and the command(s) that make them agree: prepare the
      data with the checkpoint's tokenizer (its real path), or, when that tokenizer itself has
      ids past the checkpoint's rows, give the model a row for each (transformers'
      resize_token_embeddings) and start from that copy.
  """
  tokens = cfg.valid_vocab_size or cfg.vocab_size
  rows = hf.get("vocab_size")
  if rows in (cfg.vocab_size, tokens):
    return
  if not isinstance(rows, int) or isinstance(rows, bool) or rows < 1:
    raise JaxdpError(f"{where}'s config.json has vocab_size={rows!r}, not a number of rows; it "
                     "is not a causal language model checkpoint jaxdp can import")
  theirs = tokenizer.ids if tokenizer is not None and tokenizer.path is not None else None
  if tokens < rows and theirs == tokens:
    return
  head = f"the run's tokenizer has {tokens} ids but {where} has vocab_size={rows}"
  multiple = next((m for m in (64, 128, 256, 8, 16, 32)
                   if rows > tokens and -(-tokens // m) * m == rows), None)
  if multiple and theirs is None:  # What a run with model.pad_vocab_to_multiple exports.
    raise JaxdpError(f"{where} has vocab_size={rows}, the run's {tokens}-id tokenizer padded "
                     f"to a multiple of {multiple} (this run's model has {cfg.vocab_size}); set "
                     f"--config.model.pad_vocab_to_multiple={multiple}")
  prepare = "`jaxdp prepare YOUR_FILES --out NEW_DATA --tokenizer {}`"
  data = " --config.data.path=NEW_DATA"
  if tokenizer is None:
    raise JaxdpError(f"{head}; prepare the data with the checkpoint's tokenizer "
                     f"({prepare.format('CHECKPOINT/tokenizer.json')}) and train with{data}, so "
                     "the ids mean the same")
  path = os.path.join(tokenizer.directory, "tokenizer.json")
  if tokenizer.path is None:
    raise JaxdpError(f"{head}; prepare the data with the checkpoint's tokenizer: "
                     f"{tokenizer.directory!r} has no tokenizer.json, so copy there the one it was "
                     f"trained with, then {prepare.format(shlex.quote(path))} and train with{data}")
  assert theirs is not None
  if theirs <= rows:  # Its tokenizer fits its rows: the run's data used another.
    raise JaxdpError(f"{head}; prepare the data with the checkpoint's own tokenizer ({theirs} "
                     f"ids): {prepare.format(shlex.quote(tokenizer.path))}, then train with{data}")
  why = " (it has no end-of-text token, so jaxdp adds one)" if tokenizer.added_end_of_text else ""
  grown = f"{tokenizer.directory.rstrip(os.sep)}-{theirs}rows"
  # The copy keeps the tokenizer, whose ids its rows now cover.
  code = (f"import shutil, transformers as t; m = t.AutoModelForCausalLM.from_pretrained("
          f"{json.dumps(tokenizer.directory)}); m.resize_token_embeddings({theirs}); "
          f"m.save_pretrained({json.dumps(grown)}); shutil.copy({json.dumps(tokenizer.path)}, "
          f"{json.dumps(grown)})")
  then = ("" if tokens == theirs else
          f"prepare the data with its tokenizer, {prepare.format(shlex.quote(tokenizer.path))}, and ")
  raise JaxdpError(f"{head}, and its own tokenizer {tokenizer.path!r} has {theirs} ids as jaxdp "
                   f"reads it{why}, {theirs - rows} past its rows; give the model a row for each "
                   f"id (`python -c {shlex.quote(code)}`), then {then}train with "
                   f"{shlex.quote('--config.init_from=hf:' + grown)}" + (data if then else ""))


def vocab_note(hf: dict, cfg: ModelConfig, where: str) -> str:
  """What an import does to a checkpoint's rows past the run's ("" if none): padded embeddings
  of more rows than the run's model keep the run's first rows (no token id reaches the others);
  an export then declares the tokenizer's ids."""
  rows, tokens = hf.get("vocab_size"), cfg.valid_vocab_size or cfg.vocab_size
  if not isinstance(rows, int) or rows <= cfg.vocab_size:
    return ""
  return (f"jaxdp: note: {where} has vocab_size={rows}, {rows - tokens} rows past the run's "
          f"{tokens}-id tokenizer, which no id reaches; this run keeps its first {cfg.vocab_size} "
          f"(the other {rows - cfg.vocab_size} are dropped, and an export has vocab_size={tokens}); "
          f"set --config.model.pad_vocab_to_multiple={rows} to keep them all")


def model_mlp(cfg: ModelConfig) -> int:
  """The MLP hidden width of `cfg`'s model (gpt: F of its GELU MLP; llama: SwiGLU's)."""
  if cfg.family == "gpt":
    return cfg.mlp_dim or int(cfg.mlp_ratio * cfg.d_model)
  return mlp_hidden(cfg)


def _mlp_fix(cfg: ModelConfig, width: int) -> str:
  """The flag that gives `cfg`'s model an MLP `width` wide: the roundest mlp_ratio that does,
  else mlp_dim (Llama-2-7B's 11008 and Llama-3-8B's 14336 are no round multiple of 4096)."""
  exact = (width if cfg.family == "gpt" else 1.5 * width) / cfg.d_model
  for ratio in (round(exact), round(exact * 2) / 2, round(exact * 4) / 4):
    if ratio > 0 and model_mlp(dataclasses.replace(cfg, mlp_ratio=ratio, mlp_dim=0)) == width:
      return f"--config.model.mlp_ratio={ratio:g}" + (" --config.model.mlp_dim=0" if cfg.mlp_dim else "")
  return f"--config.model.mlp_dim={width}"


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The transformers tensor names and shapes a checkpoint of `cfg`'s model holds."""
  d, k, f = cfg.d_model, cfg.head_size, model_mlp(cfg)
  if cfg.family == "gpt":
    shapes = {"transformer.wte.weight": (cfg.vocab_size, d), "transformer.ln_f.weight": (d,),
              "transformer.ln_f.bias": (d,)}
    if not cfg.tie_embeddings:
      shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.n_layer):
      o = f"transformer.h.{i}."
      shapes.update({o + "ln_1.weight": (d,), o + "ln_1.bias": (d,), o + "ln_2.weight": (d,),
                     o + "ln_2.bias": (d,), o + "attn.c_attn.weight": (d, 3 * d),
                     o + "attn.c_attn.bias": (3 * d,), o + "attn.c_proj.weight": (d, d),
                     o + "attn.c_proj.bias": (d,), o + "mlp.c_fc.weight": (d, f),
                     o + "mlp.c_fc.bias": (f,), o + "mlp.c_proj.weight": (f, d),
                     o + "mlp.c_proj.bias": (d,)})
    return shapes
  g = cfg.kv_heads
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.n_layer):
    o = f"model.layers.{i}."
    shapes.update({o + "input_layernorm.weight": (d,), o + "post_attention_layernorm.weight": (d,),
                   o + "self_attn.q_proj.weight": (cfg.n_head * k, d),
                   o + "self_attn.k_proj.weight": (g * k, d),
                   o + "self_attn.v_proj.weight": (g * k, d),
                   o + "self_attn.o_proj.weight": (d, cfg.n_head * k),
                   o + "mlp.gate_proj.weight": (f, d), o + "mlp.up_proj.weight": (f, d),
                   o + "mlp.down_proj.weight": (d, f)})
    if cfg.qkv_bias:
      shapes.update({o + "self_attn.q_proj.bias": (cfg.n_head * k,),
                     o + "self_attn.k_proj.bias": (g * k,), o + "self_attn.v_proj.bias": (g * k,)})
    if cfg.qk_norm:
      shapes.update({o + "self_attn.q_norm.weight": (k,), o + "self_attn.k_norm.weight": (k,)})
  return shapes


def canonical_names(tensors: dict[str, Any], family: str) -> dict[str, Any]:
  """The checkpoint's tensors under the names `expected_shapes` uses: GPT-2 checkpoints saved
  from the base model (the hub's "gpt2") lack the "transformer." prefix. Buffers stay (from_hf
  checks them)."""
  out = {}
  for name, value in tensors.items():
    if family == "gpt" and not name.startswith(("transformer.", "lm_head.")):
      name = "transformer." + name
    out[name] = value
  return out


def _fitted_vocab(tensors: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
  """`tensors` with the embedding and head rows fitted to cfg.vocab_size: a checkpoint of
  exactly the tokenizer's ids padded with zero rows (a run with model.pad_vocab_to_multiple),
  padded embeddings past them cut (rows no id of the tokenizer reaches; `check_vocab` decides
  which checkpoints may). Rows fewer than the tokenizer's ids are left for the shape check."""
  valid = cfg.valid_vocab_size or cfg.vocab_size
  out = dict(tensors)
  for name in ("transformer.wte.weight", "model.embed_tokens.weight", "lm_head.weight"):
    if name not in out or np.ndim(out[name]) != 2:
      continue
    have = np.shape(out[name])[0]
    if have != cfg.vocab_size and have >= valid:
      rows = _np(out[name])[:cfg.vocab_size]
      out[name] = np.concatenate([rows, np.zeros((cfg.vocab_size - len(rows),) + rows.shape[1:],
                                                 np.float32)])
  return out


def _check_buffers(buffers: dict[str, Any], cfg: ModelConfig, where: str) -> None:
  """Buffers older transformers saved: GPT-2's causal mask "attn.bias" (lower triangular) and
  "attn.masked_bias" (the masked score), and Llama's "rotary_emb.inv_freq", which must be the
  frequencies of cfg.rope_theta (a scaled rotary baked into them is refused)."""
  for name, value in buffers.items():
    value = np.asarray(value)
    if name.endswith(".attn.bias"):
      n = value.shape[-1] if value.ndim else 0
      ok = value.ndim >= 2 and np.array_equal(value.reshape(-1, n, n)[0] != 0,
                                              np.tril(np.ones((n, n), bool)))
      what = "a causal mask"
    elif name.endswith(".attn.masked_bias"):
      ok, what = value.size == 1, "one masked score"
    else:
      k = cfg.head_size
      want = 1.0 / (cfg.rope_theta ** (np.arange(0, k, 2, dtype=np.float64) / k))
      ok = value.shape == want.shape and np.allclose(value.astype(np.float64), want, rtol=1e-3)
      what = f"the rotary inverse frequencies of rope_theta={cfg.rope_theta:g}"
    if not ok:
      raise JaxdpError(f"{where}: buffer {name!r} is not {what}, so the checkpoint computes "
                       "something jaxdp's model does not; it cannot be imported exactly")


def from_hf(tensors: dict[str, Any], cfg: ModelConfig, where: str) -> dict:
  """The checkpoint's tensors (canonical names, see `canonical_names`) -> jaxdp's parameter
  tree for `cfg` (float32 numpy arrays, unboxed).

  Every tensor is consumed: a parameter, a head tied to the embedding and equal to it, or a
  buffer checked against what the model computes (GPT-2's causal mask, the rotary inverse
  frequencies); anything else is refused by name. A checkpoint of the tokenizer's vocabulary
  loads into a run that pads it (model.pad_vocab_to_multiple): its padding rows are zeros, whose
  logits the model masks anyway; a checkpoint with rows past the tokenizer's ids (padded
  embeddings) keeps the run's first cfg.vocab_size.

  Raises:
    JaxdpError: a missing, unexpected or misshapen tensor, named with both shapes; a second head
      that differs from the tied embedding; a buffer that says the model computes otherwise.
  """
  buffers = {name: tensors[name] for name in tensors if name.endswith(BUFFERS)}
  _check_buffers(buffers, cfg, where)
  tensors = _fitted_vocab({n: v for n, v in tensors.items() if n not in buffers}, cfg)
  shapes = expected_shapes(cfg)
  for name, shape in shapes.items():
    if name not in tensors:
      raise JaxdpError(f"{where} has no tensor {name!r}, which config.model needs; is it a "
                       f"{'GPT-2' if cfg.family == 'gpt' else ARCHITECTURES[cfg.variant][0]} checkpoint of this size?")
    if tuple(tensors[name].shape) != shape:
      raise JaxdpError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                       f"config.model needs {list(shape)}")
  tied_head = "lm_head.weight" in tensors and "lm_head.weight" not in shapes
  if tied_head:
    embedding = "transformer.wte.weight" if cfg.family == "gpt" else "model.embed_tokens.weight"
    if not np.array_equal(_np(tensors["lm_head.weight"]), _np(tensors[embedding])):
      raise JaxdpError(f"{where} has its own tensor 'lm_head.weight', different from {embedding!r}, "
                       "but config.json says tie_word_embeddings=true (transformers then ignores "
                       "lm_head.weight); set tie_word_embeddings to false in its config.json to "
                       "import that head, or delete the tensor")
  extra = sorted(set(tensors) - set(shapes) - ({"lm_head.weight"} if tied_head else set())
                 - ({"transformer.wpe.weight"} if cfg.family == "gpt" else set()))
  if extra:
    raise JaxdpError(f"{where} has tensor {extra[0]!r} that jaxdp's {cfg.family} has no place "
                     f"for ({len(extra)} such); it is another architecture or variant")
  t = {k: _np(v) for k, v in tensors.items()}
  d, h, k, g = cfg.d_model, cfg.n_head, cfg.head_size, cfg.kv_heads
  if cfg.family == "gpt":
    if "transformer.wpe.weight" not in t or t["transformer.wpe.weight"].shape[1] != d \
        or t["transformer.wpe.weight"].shape[0] < cfg.seq_len:
      found = list(t["transformer.wpe.weight"].shape) if "transformer.wpe.weight" in t else None
      raise JaxdpError(f"{where}: tensor 'transformer.wpe.weight' has shape {found}, config "
                       f"needs at least [{cfg.seq_len}, {d}] (config.seq_len x d_model)")
    params: dict = {"wte": {"embedding": t["transformer.wte.weight"]},
                    **({} if cfg.tie_embeddings else {"lm_head": t["lm_head.weight"]}),
                    # Positions past seq_len are never used by a window of seq_len tokens.
                    "wpe": t["transformer.wpe.weight"][:cfg.seq_len],
                    "ln_f": {"scale": t["transformer.ln_f.weight"],
                             "bias": t["transformer.ln_f.bias"]}}
    for i in range(cfg.n_layer):
      o = f"transformer.h.{i}."
      params[f"block_{i}"] = {
          "ln1": {"scale": t[o + "ln_1.weight"], "bias": t[o + "ln_1.bias"]},
          "ln2": {"scale": t[o + "ln_2.weight"], "bias": t[o + "ln_2.bias"]},
          "attn": {"qkv": {"kernel": t[o + "attn.c_attn.weight"].reshape(d, 3, h, k),
                           "bias": t[o + "attn.c_attn.bias"].reshape(3, h, k)},
                   "proj": {"kernel": t[o + "attn.c_proj.weight"].reshape(h, k, d),
                            "bias": t[o + "attn.c_proj.bias"]}},
          "mlp": {"fc": {"kernel": t[o + "mlp.c_fc.weight"].T.copy(), "bias": t[o + "mlp.c_fc.bias"]},
                  "proj": {"kernel": t[o + "mlp.c_proj.weight"].T.copy(),
                           "bias": t[o + "mlp.c_proj.bias"]}}}
    return params
  params = {"embed": {"embedding": t["model.embed_tokens.weight"]},
            "norm": {"scale": t["model.norm.weight"]}}
  if not cfg.tie_embeddings:
    params["lm_head"] = t["lm_head.weight"]
  for i in range(cfg.n_layer):
    o = f"model.layers.{i}."
    params[f"block_{i}"] = {
        "attn_norm": {"scale": t[o + "input_layernorm.weight"]},
        "mlp_norm": {"scale": t[o + "post_attention_layernorm.weight"]},
        "attn": {"wq": t[o + "self_attn.q_proj.weight"].reshape(h, k, d),
                 "wk": t[o + "self_attn.k_proj.weight"].reshape(g, k, d),
                 "wv": t[o + "self_attn.v_proj.weight"].reshape(g, k, d),
                 "wo": t[o + "self_attn.o_proj.weight"].reshape(d, h, k)},
        "mlp": {"w_gate": t[o + "mlp.gate_proj.weight"], "w_up": t[o + "mlp.up_proj.weight"],
                "w_down": t[o + "mlp.down_proj.weight"]}}
    attn = params[f"block_{i}"]["attn"]
    if cfg.qkv_bias:
      attn.update(bq=t[o + "self_attn.q_proj.bias"].reshape(h, k),
                  bk=t[o + "self_attn.k_proj.bias"].reshape(g, k),
                  bv=t[o + "self_attn.v_proj.bias"].reshape(g, k))
    if cfg.qk_norm:
      attn.update(q_norm={"scale": t[o + "self_attn.q_norm.weight"]},
                  k_norm={"scale": t[o + "self_attn.k_norm.weight"]})
  return params
