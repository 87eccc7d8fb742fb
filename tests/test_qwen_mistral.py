"""Qwen2/2.5, Qwen3 and Mistral as variants of the llama family, against the real client: tiny
transformers models built here (no download; every bias and norm perturbed) import with their
logits, train a step under ZeRO-3 on 2 devices, export as their own class and reload in
transformers with the same logits and greedy continuation; fields jaxdp lacks are refused by
name; sliding windows are exact in every kernel and the cache; sharded and bfloat16 export; the
real sizes' parameter counts against transformers and the published ones.
"""

import dataclasses
import json
import os
import re
import struct

from flax.linen import meta
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from test_huggingface import TEXT, assert_refused, cli, perturbed, relative_error, torch_logits  # noqa: E402

from jaxdp.errors import JaxdpError  # noqa: E402
from jaxdp.lm import hf_export, hf_import, load_for_inference, train_and_evaluate  # noqa: E402
from jaxdp.lm.config import load_preset  # noqa: E402
from jaxdp.lm.spec import model_config  # noqa: E402
from jaxdp.models import ModelConfig, build, hf  # noqa: E402
from jaxdp.models.common import CACHE, attention, init_cache, reference_attention  # noqa: E402
from jaxdp.models.sampling import generate  # noqa: E402

# Trains three tiny runs on 2 devices and compiles a dozen small models: tens of seconds.
pytestmark = pytest.mark.slow

VARIANTS = ("qwen2", "qwen3", "mistral")
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "mistral": "MistralForCausalLM"}


def tiny_hf_model(variant: str, seed: int = 0, **overrides):
  """The transformers twin of configs/{variant}_tiny.py (tiny_cpu's 2 layers, 32 wide, 2 heads,
  SwiGLU 88), made from transformers' own config class, biases and norms perturbed."""
  torch.manual_seed(seed)
  shape = dict(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
  if variant == "qwen2":
    config = transformers.Qwen2Config(**shape, tie_word_embeddings=True, rope_theta=1e6,
                                      rms_norm_eps=1e-6, **overrides)
  elif variant == "qwen3":
    config = transformers.Qwen3Config(**shape, head_dim=24, tie_word_embeddings=True,
                                      rope_theta=1e6, rms_norm_eps=1e-6, **overrides)
  else:
    config = transformers.MistralConfig(**shape, sliding_window=16, tie_word_embeddings=False,
                                        rope_theta=1e4, rms_norm_eps=1e-5, **overrides)
  return perturbed(getattr(transformers, CLASSES[variant])(config))


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for seed, variant in enumerate(VARIANTS):
    model = tiny_hf_model(variant, seed)
    model.save_pretrained(str(root / variant))
    out[variant] = (str(root / variant), model)
  return out


def import_config(variant: str, directory: str):
  config = load_preset(f"{variant}_tiny")
  config.init_from = f"hf:{directory}"
  return config


def pattern(message: str) -> str:
  """A regular expression matching `message` from the start, "..." standing for any text."""
  return "^" + ".*".join(re.escape(part) for part in message.split("..."))


IDS = np.random.RandomState(0).randint(0, 256, (2, 32)).astype(np.int32)


@pytest.mark.parametrize("variant", VARIANTS + ("qwen2_sliding",))
def test_a_tiny_checkpoint_imports_with_its_logits(hf_dirs, tmp_path, variant):
  """The preset's fields are the checkpoint's (check_hf_config passes), and the imported
  parameters give transformers' logits on every kernel; a Qwen whose every layer slides
  (use_sliding_window, max_window_layers 0) imports with jaxdp's sliding_window."""
  if variant == "qwen2_sliding":
    model = tiny_hf_model("qwen2", 5, use_sliding_window=True, sliding_window=8,
                          max_window_layers=0)
    model.save_pretrained(str(tmp_path))
    directory, variant = str(tmp_path), "qwen2"
    config = import_config(variant, directory)
    config.model.sliding_window = 8
  else:
    directory, model = hf_dirs[variant]
    config = import_config(variant, directory)
  cfg = model_config(config, 256)
  params = hf_import.load_params(config.init_from, cfg)
  theirs = torch_logits(model, IDS)
  for kernel in ("xla", "reference"):
    module = build(dataclasses.replace(cfg, attention=kernel)).module
    assert relative_error(module.apply({"params": params}, IDS), theirs) < 1e-4, kernel
  # And back: export's config.json and tensors make the same transformers model (the window of
  # a sliding Qwen as use_sliding_window on every layer).
  config_json = hf.hf_config(cfg)
  back = hf_model(config_json)
  missing, unexpected = back.load_state_dict(
      {k: torch.tensor(v) for k, v in hf.to_hf(params, cfg).items()}, strict=False)
  assert not unexpected and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
  assert relative_error(torch_logits(back.eval(), IDS), theirs) < 1e-6


def hf_model(config_json: dict, device: str = "cpu"):
  """The transformers model of an exported config.json (the class it names), initialised."""
  config = transformers.AutoConfig.for_model(
      **{k: v for k, v in config_json.items() if k != "architectures"})
  with torch.device(device):
    model = transformers.AutoModelForCausalLM.from_config(config)
  assert type(model).__name__ == config_json["architectures"][0]
  return model


@pytest.fixture(scope="module")
def trained(hf_dirs, tmp_path_factory):
  """Each tiny checkpoint imported, one step under ZeRO-3 on 2 devices, exported."""
  root = tmp_path_factory.mktemp("trained")
  out = {}
  for variant in VARIANTS:
    config = import_config(variant, hf_dirs[variant][0])
    config.num_steps, config.eval_every, config.checkpoint_every = 1, 0, 0
    config.warmup_steps, config.strategy = 0, "zero3"
    workdir = str(root / variant)
    train_and_evaluate(config, workdir, devices=jax.devices()[:2], progress=False)
    result = hf_export.export(workdir, str(root / f"{variant}_hf"))
    out[variant] = (config, workdir, str(root / f"{variant}_hf"), result)
  return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_zero3_step_from_the_import_exports_to_its_own_class(hf_dirs, trained, variant):
  config, workdir, out, result = trained[variant]
  assert result["architecture"] == CLASSES[variant] and result["files"] == sorted(
      ["model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
       "generation_config.json"])
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(model).__name__ == CLASSES[variant]
  params, module, _ = load_for_inference(workdir)
  assert relative_error(module.apply({"params": params}, IDS), torch_logits(model, IDS)) < 1e-4
  # The step started from the checkpoint: Adam's first update moves each parameter by at most
  # the learning rate (plus its decay), and some by about that much.
  original = {k: v.numpy() for k, v in hf_dirs[variant][1].state_dict().items()}
  moved = max(float(np.abs(p.detach().numpy() - original[k]).max())
              for k, p in model.state_dict().items())
  bound = config.learning_rate * (1 + config.weight_decay * max(
      float(np.abs(v).max()) for v in original.values()))
  assert 0.5 * config.learning_rate < moved <= bound * 1.001
  # The same greedy continuation, through jaxdp's cache (past Mistral's 16-position window).
  prompt = list(TEXT.encode())[:20]
  ours = list(generate(params, module, np.asarray(prompt), 10, temperature=0))
  with torch.no_grad():
    theirs = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 20, dtype=torch.long),
                            max_new_tokens=10, do_sample=False)[0, 20:].tolist()
  assert ours == theirs


def test_exported_config_json_names_each_architecture_and_its_fields(trained):
  configs = {v: json.load(open(os.path.join(trained[v][2], "config.json"))) for v in VARIANTS}
  assert [configs[v]["model_type"] for v in VARIANTS] == list(VARIANTS)
  assert configs["qwen3"]["head_dim"] == 24 and configs["qwen3"]["attention_bias"] is False
  assert configs["qwen2"]["tie_word_embeddings"] and configs["qwen2"]["use_sliding_window"] is False
  assert configs["mistral"]["sliding_window"] == 16 and not configs["mistral"]["tie_word_embeddings"]


@pytest.mark.parametrize("variant,change,named", [
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
               "layer_types": None},  # transformers then slides from layer max_window_layers on.
     "layer_types mix sliding and full attention (use_sliding_window with max_window_layers=1"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types mix sliding and full attention"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True has no jaxdp equivalent"),
    ("mistral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope_scaling has rope_type 'linear' (positions divided by its factor), which jaxdp's"),
    ("qwen2", {"hidden_act": "gelu"}, "hidden_act='gelu' is not SwiGLU's silu"),
    ("qwen3", {"attention_dropout": 0.1}, "attention_dropout=0.1 has no jaxdp equivalent"),
    ("mistral", {"sliding_window": 8}, "config.model.sliding_window=16 but config.init_from"),
    ("qwen3", {"head_dim": 16}, "has head_dim=16; set --config.model.head_dim=16"),
    ("qwen2", {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"]},
     "config.model.variant='qwen2' but config.init_from="),
])
def test_a_field_jaxdp_does_not_implement_or_that_differs_is_refused_by_name(
    hf_dirs, tmp_path, variant, change, named):
  directory, _ = hf_dirs[variant]
  config = json.load(open(os.path.join(directory, "config.json")))
  (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
  with pytest.raises(JaxdpError, match=pattern("..." + named)):
    hf.check_hf_config(json.load(open(tmp_path / "config.json")),
                       model_config(import_config(variant, str(tmp_path)), 256),
                       f"config.init_from='hf:{tmp_path}'")


def test_a_refused_field_is_one_line_through_the_command_line(hf_dirs, tmp_path):
  directory, _ = hf_dirs["qwen3"]
  config = json.load(open(os.path.join(directory, "config.json")))
  os.symlink(os.path.join(directory, "model.safetensors"), tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps({**config, "attention_bias": True}))
  assert_refused(cli("train", "--config", "qwen3_tiny", f"--config.init_from=hf:{tmp_path}",
                     "--cpu_devices", "1", "--noprogress", "--workdir", str(tmp_path / "run")),
                 "attention_bias=True has no jaxdp equivalent")


def test_sharded_and_bfloat16_exports_reload_in_transformers(trained, tmp_path):
  _, workdir, single, _ = trained["qwen3"]
  sharded = tmp_path / "sharded"
  result = hf_export.export(workdir, str(sharded), max_shard_size="20KB")
  shards = sorted(n for n in os.listdir(sharded) if n.startswith("model-"))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert {os.stat(sharded / n).st_mode & 0o777 for n in shards} == {
      os.stat(sharded / "config.json").st_mode & 0o777}
  assert not (sharded / "model.safetensors").exists() and set(shards) < set(result["files"])
  index = json.load(open(sharded / "model.safetensors.index.json"))
  assert set(index["weight_map"].values()) == set(shards)
  ours = transformers.AutoModelForCausalLM.from_pretrained(str(sharded)).eval()
  reference = transformers.AutoModelForCausalLM.from_pretrained(single).eval()
  sizes = [[reference.state_dict()[t].numel() * 4 for t, f in index["weight_map"].items()
            if f == n] for n in shards]
  # Each shard within the size, or a tensor larger than it alone (the 32 KB embedding).
  assert all(sum(s) <= 20_000 or len(s) == 1 for s in sizes) and max(map(sum, sizes)) > 20_000
  np.testing.assert_array_equal(torch_logits(ours, IDS), torch_logits(reference, IDS))
  np.testing.assert_array_equal(  # jaxdp's own import reads the shards back.
      hf_import.read_tensors(str(sharded))["model.norm.weight"],
      reference.state_dict()["model.norm.weight"].numpy())
  # bfloat16, into the same directory: the shards of the earlier export go.
  result = hf_export.export(workdir, str(sharded), dtype="bfloat16")
  assert sorted(n for n in os.listdir(sharded) if "safetensors" in n) == ["model.safetensors"]
  # The weights are as readable as every other exported file (safetensors writes them 0600).
  mode = os.stat(sharded / "config.json").st_mode & 0o777
  assert os.stat(sharded / "model.safetensors").st_mode & 0o777 == mode
  raw = open(sharded / "model.safetensors", "rb").read()
  header = json.loads(raw[8:8 + struct.unpack("<Q", raw[:8])[0]])
  assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
  assert json.load(open(sharded / "config.json"))["dtype"] == "bfloat16"
  halved = transformers.AutoModelForCausalLM.from_pretrained(str(sharded), dtype="auto")
  for name, value in halved.state_dict().items():
    assert value.dtype == torch.bfloat16
    assert torch.equal(value, reference.state_dict()[name].to(torch.bfloat16)), name


def test_sizes_and_dtypes_are_checked():
  assert [hf_export.parse_size(s) for s in ("20KB", "5GB", "1.5GiB", 1000)] == [
      20_000, 5_000_000_000, 3 * 2**29, 1000]
  for bad in ("lots", "5 parsecs", "-1GB"):
    with pytest.raises(JaxdpError, match="--max_shard_size=.* is not a size"):
      hf_export.parse_size(bad)
  for small in ("0", "0.1B"):  # A size, but no shard fits in it.
    with pytest.raises(JaxdpError, match="--max_shard_size=.* must be at least 1 byte"):
      hf_export.parse_size(small)
  with pytest.raises(JaxdpError, match="--dtype='float16' is not one of float32, bfloat16"):
    hf_export.export("nowhere", "nowhere", dtype="float16")


# ---- The model side: sliding window, head size, closed forms, refusals ----------------------

def windowed_attention(q, k, v, window):
  """The oracle: each query's softmax over keys i - window < j <= i, written as a loop."""
  t, h, g = q.shape[1], q.shape[2], k.shape[2]
  out = np.zeros(q.shape, np.float64)
  for i in range(t):
    lo = max(0, i - window + 1)
    for head in range(h):
      kk, vv = k[:, lo:i + 1, head // (h // g)], v[:, lo:i + 1, head // (h // g)]  # [B, S, K]
      scores = np.einsum("bk,bsk->bs", q[:, i, head], kk) / np.sqrt(q.shape[-1])
      p = np.exp(scores - scores.max(-1, keepdims=True))
      out[:, i, head] = np.einsum("bs,bsk->bk", p / p.sum(-1, keepdims=True), vv)
  return out


@pytest.mark.parametrize("window", [1, 3, 12])
def test_sliding_window_is_exact_in_every_kernel(window):
  rng = np.random.RandomState(window)
  q, k, v = (rng.randn(2, 12, h, 8).astype(np.float32) for h in (4, 2, 2))
  expected = windowed_attention(q, k, v, window)
  for kernel in ("xla", "reference"):
    np.testing.assert_allclose(attention(q, k, v, kernel, window=window), expected, atol=1e-5)
  segments = np.repeat([[0] * 5 + [1] * 7], 2, axis=0)  # Document packing and a window at once.
  mask = jnp.asarray((segments[:, :, None] == segments[:, None, :])[:, None])
  np.testing.assert_allclose(attention(q, k, v, "xla", mask, window),
                             reference_attention(q, k, v, mask, window), atol=1e-6)


def tiny_cfg(**fields) -> ModelConfig:
  return ModelConfig(**{**dict(vocab_size=256, seq_len=24, n_layer=2, n_head=4, d_model=32,
                               family="llama", n_kv_head=2, tie_embeddings=False), **fields})


def test_decoding_from_the_cache_keeps_the_window_and_head_size():
  """Prefill 5 tokens, then one at a time up to 20: the same logits as the whole sequence at
  once, with a window (6) shorter than the context and heads (12) not d_model / n_head."""
  cfg = tiny_cfg(variant="qwen3", qk_norm=True, head_dim=12, sliding_window=6)
  model = build(cfg)
  # Jitted: eager Flax dispatches op by op, tens of seconds on a loaded 2-core machine.
  params = jax.jit(lambda key: jax.tree.map(lambda x: x + 0.1 * jax.random.normal(key, x.shape),
                                            meta.unbox(model.init_fn(key))))(jax.random.PRNGKey(0))
  tokens = jnp.asarray(IDS[:1, :20])
  full = np.asarray(jax.jit(model.module.apply)({"params": params}, tokens))[0]
  cache = init_cache(cfg, 1, cfg.seq_len)
  assert cache["block_0"]["attn"]["k"].shape == (1, 24, 2, 12)
  apply = jax.jit(lambda cache, tokens: model.module.apply({"params": params, CACHE: cache},
                                                           tokens, mutable=[CACHE]))
  got, start = [], 0
  for stop in [5, *range(6, 21)]:  # Two shapes, two compilations.
    logits, variables = apply(cache, tokens[:, start:stop])
    cache, start = variables[CACHE], stop
    got.append(np.asarray(logits[0]))
  np.testing.assert_allclose(np.concatenate(got), full, atol=2e-5 * np.abs(full).max())
  unwindowed = build(dataclasses.replace(cfg, sliding_window=0)).module
  assert not np.allclose(jax.jit(unwindowed.apply)({"params": params}, tokens)[0], full, atol=1e-3)


@pytest.mark.parametrize("fields", [dict(variant="qwen2", qkv_bias=True),
                                    dict(variant="qwen3", qk_norm=True, head_dim=12),
                                    dict(variant="mistral", sliding_window=5, tie_embeddings=True)])
def test_param_count_closed_form_is_the_initialised_tree(fields):
  model = build(tiny_cfg(**fields))
  shapes = jax.eval_shape(model.init_fn, jax.random.PRNGKey(0))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == model.param_count


@pytest.mark.parametrize("fields,named", [
    (dict(family="gpt", n_kv_head=0, qkv_bias=True), "config.model.qkv_bias=True is a llama-family"),
    (dict(qk_norm=True), "config.model.qk_norm=True does not fit config.model.variant='' "
                         "(LlamaForCausalLM, which export writes); set --config.model.variant=qwen3"),
    (dict(variant="qwen2"), "config.model.qkv_bias=False does not fit config.model.variant='qwen2'"),
    (dict(sliding_window=4), "config.model.sliding_window=4 does not fit ...; set "
                             "--config.model.variant=mistral"),
    (dict(variant="gemma"), "config.model.variant='gemma' is not one of"),
    (dict(variant="mistral", sliding_window=-1), "config.model.sliding_window=-1 is negative"),
])
def test_variant_fields_the_model_lacks_are_refused_by_name(fields, named):
  with pytest.raises(JaxdpError, match=pattern(named)):
    build(tiny_cfg(**fields))


# Each preset's tokenizer ids (Qwen's tokenizer.json: 151,643 + 22 added; Mistral v0.1's 32,000),
# the closed form with the checkpoint's padded vocabulary, and the published figures: the model
# cards' totals and non-embedding counts in billions as printed (Qwen2.5-0.5B: 0.49 / 0.36,
# Qwen3-0.6B: 0.6 / 0.44, Qwen3-1.7B: 1.7 / 1.4) and the hub's 7.24B for Mistral-7B-v0.1.
PRESETS = [("qwen2_5_0_5b", 151665, 494_032_768, (0.49, 0.36, 2)),
           ("qwen3_0_6b", 151665, 596_049_920, (0.6, 0.44, 1)),
           ("qwen3_1_7b", 151665, 1_720_574_976, (1.7, 1.4, 1)),
           ("mistral_7b", 32000, 7_241_732_096, (7.24, None, 2))]


@pytest.mark.parametrize("name,tokens,count,published", PRESETS)
def test_real_presets_have_the_published_parameter_counts(name, tokens, count, published):
  cfg = model_config(load_preset(name), tokens)
  model_count = build(cfg).param_count
  assert model_count == count
  total, non_embedding, digits = published
  assert round(count / 1e9, digits) == total
  embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  if non_embedding is not None:
    assert round((count - embeddings) / 1e9, len(str(non_embedding)) - 2) == non_embedding
  # transformers' own count of the same config.json, instantiated without memory.
  # The export leaves out the padding rows (tokenizer ids only, issue 31), so transformers
  # counts the padded rows fewer.
  theirs = hf_model(hf.hf_config(cfg), device="meta")
  padding = (cfg.vocab_size - hf.exported_vocab(cfg)) * cfg.d_model * (1 if cfg.tie_embeddings else 2)
  assert sum(p.numel() for p in theirs.parameters()) == count - padding
