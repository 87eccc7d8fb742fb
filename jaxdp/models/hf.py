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
from typing import Any

import numpy as np

from jaxdp.errors import JaxdpError
from jaxdp.models.choices import HF_CLASSES, check_variant
from jaxdp.models.common import ModelConfig
from jaxdp.models.llama import mlp_hidden

# Tensors a checkpoint may hold that carry no parameter (buffers of older transformers).
_BUFFERS = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")

# config.model.variant -> (transformers architecture, model_type); "" is plain Llama.
ARCHITECTURES = {variant: (name, variant or "llama") for variant, name in HF_CLASSES.items()}
VARIANT_OF_TYPE = {model_type: variant for variant, (_, model_type) in ARCHITECTURES.items()}


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
  common = {"vocab_size": cfg.vocab_size, "dtype": "float32", "torch_dtype": "float32",
            "tie_word_embeddings":
            cfg.tie_embeddings, **special}
  if cfg.family == "gpt":
    if cfg.positions != "learned":
      raise JaxdpError(f"config.model.positions={cfg.positions!r} is not GPT-2: export of a gpt "
                       "model needs positions='learned' (GPT-2 has no rotary positions); train "
                       "with --config.model.positions=learned, or use family=llama")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", **common,
            "n_positions": cfg.seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layer,
            "n_head": cfg.n_head, "n_inner": int(cfg.mlp_ratio * cfg.d_model),
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


def to_hf(params: dict, cfg: ModelConfig) -> dict[str, np.ndarray]:
  """jaxdp parameters (unboxed) -> the transformers state dict, float32 and contiguous.

  The tied output head is not written (transformers ties lm_head to the input embedding when
  config.json says tie_word_embeddings).
  """
  hf_config(cfg)  # Refuses what has no equivalent.
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
  return {k: np.ascontiguousarray(v) for k, v in out.items()}


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
                   "model.d_model": d, "model.mlp_ratio": inner / d,
                   "model.positions": "learned", "model.tie_embeddings": True,
                   "model.norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
                   "max_seq_len": hf.get("n_positions", hf.get("n_ctx"))}
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
    raise JaxdpError(f"the checkpoint's {field} {rope_type!r} is not plain rotary positions")
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
          "model.norm_eps": float(hf.get("rms_norm_eps", 1e-6))}


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


def check_hf_config(hf: dict, cfg: ModelConfig, where: str) -> None:
  """Raises a one-line JaxdpError naming the first jaxdp field that differs from the checkpoint
  at `where` (its config.json is `hf`) and the value to set."""
  family, fields = hf_fields(hf)
  if cfg.family != family:
    raise JaxdpError(f"config.model.family={cfg.family!r} but {where} is {hf.get('model_type')}; "
                     f"set --config.model.family={family}")
  if hf.get("vocab_size") != cfg.vocab_size:
    tokens = cfg.valid_vocab_size or cfg.vocab_size
    hf_vocab = hf.get("vocab_size")
    multiple = next((m for m in (64, 128, 256, 8, 16, 32) if isinstance(hf_vocab, int)
                     and hf_vocab > tokens and -(-tokens // m) * m == hf_vocab), None)
    if multiple:  # What a run with model.pad_vocab_to_multiple exports.
      raise JaxdpError(f"{where} has vocab_size={hf_vocab}, the run's {tokens}-id tokenizer padded "
                       f"to a multiple of {multiple} (this run's model has {cfg.vocab_size}); set "
                       f"--config.model.pad_vocab_to_multiple={multiple}")
    raise JaxdpError(f"the run's tokenizer has {tokens} ids but {where} has vocab_size="
                     f"{hf_vocab}; prepare the data with the checkpoint's tokenizer "
                     "(`jaxdp prepare --tokenizer DIR/tokenizer.json`) so the ids mean the same")
  have: dict[str, Any] = {
      "model.n_layer": cfg.n_layer, "model.n_head": cfg.n_head, "model.d_model": cfg.d_model,
      "model.n_kv_head": 0 if cfg.kv_heads == cfg.n_head else cfg.kv_heads,
      "model.positions": cfg.positions, "model.tie_embeddings": cfg.tie_embeddings,
      "model.rope_theta": cfg.rope_theta, "model.norm_eps": cfg.eps,
      "model.mlp_ratio": cfg.mlp_ratio, "model.variant": cfg.variant,
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
  if family == "gpt" and fields["max_seq_len"] and cfg.seq_len > fields["max_seq_len"]:
    raise JaxdpError(f"config.seq_len={cfg.seq_len} is longer than {where}'s n_positions="
                     f"{fields['max_seq_len']} learned positions; set --config.seq_len="
                     f"{fields['max_seq_len']} or less")
  if family == "llama" and cfg.head_size != fields["head_size"]:
    raise JaxdpError(f"config.model.head_dim={cfg.head_dim} gives heads of {cfg.head_size} but "
                     f"{where} has head_dim={fields['head_size']}; set --config.model.head_dim="
                     f"{fields['head_size']}")
  if family == "llama" and mlp_hidden(cfg) != fields["intermediate_size"]:
    width, exact = fields["intermediate_size"], 1.5 * fields["intermediate_size"] / cfg.d_model
    # The roundest ratio that gives the width (Llama's own rounding makes several do).
    fits = [r for r in (round(exact), round(exact * 2) / 2, round(exact, 3), exact)
            if r > 0 and mlp_hidden(dataclasses.replace(cfg, mlp_ratio=r)) == width]
    if fits:
      fix = f"set --config.model.mlp_ratio={fits[0]:g}"
    elif width % 8:
      fix = ("jaxdp's llama MLP is round_up(2/3 x mlp_ratio x d_model, 8) wide, so no mlp_ratio "
             f"gives {width}, which is not a multiple of 8: this checkpoint cannot be imported")
    else:
      fix = "no mlp_ratio gives that width"
    raise JaxdpError(f"config.model.mlp_ratio={cfg.mlp_ratio:g} gives an MLP of {mlp_hidden(cfg)} "
                     f"but {where} has intermediate_size={width}; {fix}")


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """The transformers tensor names and shapes a checkpoint of `cfg`'s model holds."""
  d, k, f = cfg.d_model, cfg.head_size, (int(cfg.mlp_ratio * cfg.d_model) if cfg.family == "gpt"
                                         else mlp_hidden(cfg))
  if cfg.family == "gpt":
    shapes = {"transformer.wte.weight": (cfg.vocab_size, d), "transformer.ln_f.weight": (d,),
              "transformer.ln_f.bias": (d,)}
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
  from the base model (the hub's "gpt2") lack the "transformer." prefix; buffers are dropped."""
  out = {}
  for name, value in tensors.items():
    if name.endswith(_BUFFERS):
      continue
    if family == "gpt" and not name.startswith(("transformer.", "lm_head.")):
      name = "transformer." + name
    out[name] = value
  return out


def from_hf(tensors: dict[str, Any], cfg: ModelConfig, where: str) -> dict:
  """The checkpoint's tensors (canonical names, see `canonical_names`) -> jaxdp's parameter
  tree for `cfg` (float32 numpy arrays, unboxed).

  Raises:
    JaxdpError: a missing, unexpected or misshapen tensor, named with both shapes.
  """
  shapes = expected_shapes(cfg)
  for name, shape in shapes.items():
    if name not in tensors:
      raise JaxdpError(f"{where} has no tensor {name!r}, which config.model needs; is it a "
                       f"{'GPT-2' if cfg.family == 'gpt' else ARCHITECTURES[cfg.variant][0]} checkpoint of this size?")
    if tuple(tensors[name].shape) != shape:
      raise JaxdpError(f"{where}: tensor {name!r} has shape {list(tensors[name].shape)}, "
                       f"config.model needs {list(shape)}")
  tied_head = "lm_head.weight" in tensors and "lm_head.weight" not in shapes
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
