"""Issue 31, faults 1 and 2: what crosses the Hugging Face boundary is used exactly or refused.

Import: every config.json key is used, harmless or refused by name (models.hf.USED/HARMLESS),
every tensor is consumed (a parameter, a tied head equal to the embedding, a checked buffer),
non-float weights are refused naming the tensor, untied GPT-2 heads and tied or untied Llama
heads give transformers' logits, and real Llama-2/3 MLP widths import with the advice printed.
Export: a run with a padded vocabulary exports the tokenizer's ids only, so transformers' loss
and samples are jaxdp's. Tiny random models (no download), transformers on CPU.
"""

import dataclasses
import json
import os
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from test_huggingface import perturbed, relative_error, torch_logits, train  # noqa: E402

from jaxdp.errors import JaxdpError  # noqa: E402
from jaxdp.lm import hf_export, hf_import, load_for_inference  # noqa: E402
from jaxdp.lm.config import load_preset  # noqa: E402
from jaxdp.lm.spec import model_config  # noqa: E402
from jaxdp.models import build, hf  # noqa: E402
from jaxdp.models.common import ModelConfig  # noqa: E402
from jaxdp.models.sampling import generate  # noqa: E402

pytestmark = pytest.mark.slow

IDS = np.random.RandomState(0).randint(0, 256, (2, 24)).astype(np.int32)


def gpt2(seed=0, **overrides):
  torch.manual_seed(seed)
  return perturbed(transformers.GPT2LMHeadModel(transformers.GPT2Config(
      vocab_size=256, n_positions=48, n_embd=32, n_layer=2, n_head=2, **overrides)))


def llama(seed=0, **overrides):
  torch.manual_seed(seed)
  shape = dict(vocab_size=256, hidden_size=32, intermediate_size=88, num_hidden_layers=2,
               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
               rms_norm_eps=1e-5, rope_theta=500.0)
  return perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**shape, **overrides})))


def gpt_cfg(**fields) -> ModelConfig:
  return ModelConfig(vocab_size=256, seq_len=24, n_layer=2, n_head=2, d_model=32, family="gpt",
                     positions="learned", norm_eps=1e-5, **fields)


def llama_cfg(**fields) -> ModelConfig:
  return ModelConfig(**{**dict(vocab_size=256, seq_len=24, n_layer=2, n_head=2, d_model=32,
                               family="llama", n_kv_head=1, norm_eps=1e-5, rope_theta=500.0,
                               tie_embeddings=False), **fields})


def imported(directory, cfg):
  where = f"config.init_from='hf:{directory}'"
  hf.check_hf_config(json.load(open(os.path.join(directory, "config.json"))), cfg, where)
  return hf.from_hf(hf.canonical_names(hf_import.read_tensors(str(directory)), cfg.family), cfg, where)


def assert_same_logits(model, directory, cfg):
  params = imported(directory, cfg)
  assert relative_error(build(cfg).module.apply({"params": params}, IDS), torch_logits(model, IDS)) < 1e-4
  return params


def test_an_untied_gpt2_imports_its_own_head_and_exports_it_back(tmp_path):
  model = gpt2(tie_word_embeddings=False)
  assert not torch.equal(model.lm_head.weight, model.transformer.wte.weight)
  model.save_pretrained(str(tmp_path))
  # The default (tied) config is refused naming the field, then the untied head is exact.
  with pytest.raises(JaxdpError, match=r"config.model.tie_embeddings=True but .* has False; set "
                                       r"--config.model.tie_embeddings=False"):
    imported(tmp_path, gpt_cfg())
  cfg = gpt_cfg(tie_embeddings=False)
  params = assert_same_logits(model, tmp_path, cfg)
  back = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{
      k: v for k, v in hf.hf_config(cfg).items() if k not in ("architectures", "model_type")}))
  missing, unexpected = back.load_state_dict({k: torch.tensor(v) for k, v in hf.to_hf(params, cfg).items()},
                                             strict=False)
  assert not unexpected and not [m for m in missing if not m.endswith(".attn.bias")], missing
  assert not back.config.tie_word_embeddings
  assert relative_error(torch_logits(back.eval(), IDS), torch_logits(model, IDS)) < 1e-6


@pytest.mark.parametrize("tied", [True, False])
def test_llama_heads_tied_or_not_give_transformers_logits(tmp_path, tied):
  model = llama(tie_word_embeddings=tied)
  model.save_pretrained(str(tmp_path))
  with pytest.raises(JaxdpError, match=f"set --config.model.tie_embeddings={tied}"):
    imported(tmp_path, llama_cfg(tie_embeddings=not tied))
  assert_same_logits(model, tmp_path, llama_cfg(tie_embeddings=tied))


@pytest.mark.parametrize("change,named", [
    ({"attention_bias": True}, "attention_bias=True has no jaxdp equivalent"),
    ({"mlp_bias": True}, "mlp_bias=True has no jaxdp equivalent"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}},
     "rope_scaling has rope_type 'llama3' (Llama 3.1's frequencies rescaled by wavelength)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_type 'linear' (positions divided"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic' (NTK"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' (YaRN"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 500.0}},
     "rope_parameters has rope_type 'longrope'"),
    ({"use_parallel_residual": True}, "config.json has use_parallel_residual=True, a field jaxdp's "
     "llama import does not know (1 such: use_parallel_residual); it may change the model"),
    ({"quantization_config": {"quant_method": "gptq"}}, "has quantization_config: its weights are "
     "quantized"),
    ({"add_cross_attention": True}, "sets add_cross_attention=True"),
])
def test_a_llama_key_jaxdp_does_not_compute_is_refused_by_name(change, named):
  config = llama().config.to_dict()
  with pytest.raises(JaxdpError, match=".*".join(map(__import__("re").escape, named.split("...")))):
    hf.check_hf_config({**config, **change}, llama_cfg(), "the checkpoint")


def test_every_key_transformers_writes_is_classified_and_harmless_ones_pass():
  """The config.json of each class jaxdp imports, as transformers writes it (to_dict, the most
  keys), passes the key check; a harmless key changes nothing, a null unknown key passes."""
  for config in (transformers.GPT2Config(), transformers.LlamaConfig(), transformers.Qwen2Config(),
                 transformers.Qwen3Config(), transformers.MistralConfig()):
    hf.check_keys(config.to_dict())
  gpt2_config = gpt2().config.to_dict()
  hf.check_hf_config({**gpt2_config, "torch_dtype": "bfloat16", "resid_pdrop": 0.3,
                      "something_new": None}, gpt_cfg(), "the checkpoint")
  with pytest.raises(JaxdpError, match="has something_new=1, a field jaxdp's gpt2 import does not know"):
    hf.check_hf_config({**gpt2_config, "something_new": 1}, gpt_cfg(), "the checkpoint")


def test_every_tensor_is_consumed_or_refused_by_name(tmp_path):
  model = gpt2()
  model.save_pretrained(str(tmp_path / "gpt"))
  tensors = safetensors_numpy.load_file(str(tmp_path / "gpt" / "model.safetensors"))
  cfg = gpt_cfg()

  def variant(name, change):
    directory = tmp_path / name
    shutil.copytree(tmp_path / "gpt", directory)
    safetensors_numpy.save_file(change(dict(tensors)), str(directory / "model.safetensors"))
    return directory

  # A tied checkpoint carrying an lm_head equal to wte is fine; a different one is refused.
  same = variant("same_head", lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"].copy()})
  assert_same_logits(model, same, cfg)
  other = variant("other_head", lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] + 1})
  with pytest.raises(JaxdpError, match="its own tensor 'lm_head.weight', different from "
                                       "'transformer.wte.weight', but config.json says tie_word"):
    imported(other, cfg)
  extra = variant("extra", lambda t: {**t, "transformer.h.0.attn.q_norm.weight": np.ones(16, np.float32)})
  with pytest.raises(JaxdpError, match="has tensor 'transformer.h.0.attn.q_norm.weight' that"):
    imported(extra, cfg)
  ints = variant("ints", lambda t: {**t, "transformer.h.1.mlp.c_fc.weight":
                                    t["transformer.h.1.mlp.c_fc.weight"].astype(np.int32)})
  with pytest.raises(JaxdpError, match="tensor 'transformer.h.1.mlp.c_fc.weight' in model.safetensors "
                                       "is int32, not floating point"):
    imported(ints, cfg)
  # Buffers of older transformers are checked, not dropped: a causal mask passes, a scaled
  # rotary baked into Llama's inv_freq is refused.
  mask = np.tril(np.ones((48, 48), bool))[None, None]
  buffered = variant("buffers", lambda t: {**t, "h.0.attn.bias": mask, "h.1.attn.bias": mask})
  assert_same_logits(model, buffered, cfg)
  lcfg = llama_cfg()
  good = 1.0 / 500.0 ** (np.arange(0, 16, 2) / 16)
  hf._check_buffers({"model.layers.0.self_attn.rotary_emb.inv_freq": good.astype(np.float32)}, lcfg, "w")
  with pytest.raises(JaxdpError, match="buffer 'model.layers.0.self_attn.rotary_emb.inv_freq' is not "
                                       "the rotary inverse frequencies of rope_theta=500"):
    hf._check_buffers({"model.layers.0.self_attn.rotary_emb.inv_freq": good.astype(np.float32) / 8},
                      lcfg, "w")


@pytest.mark.parametrize("d_model,width,n_head,kv", [(4096, 11008, 32, 32), (4096, 14336, 32, 8)])
def test_real_llama_2_and_3_mlp_widths_import_with_the_advice_printed(d_model, width, n_head, kv):
  """Llama-2-7B's and Llama-3-8B's config.json (no weights): the advice given against the
  default mlp_ratio is a flag the config takes, after which the check passes."""
  hf_json = transformers.LlamaConfig(hidden_size=d_model, intermediate_size=width,
                                     num_attention_heads=n_head, num_key_value_heads=kv,
                                     num_hidden_layers=2, vocab_size=256).to_dict()
  config = load_preset("llama")
  config.model.d_model, config.model.n_head, config.model.n_layer = d_model, n_head, 2
  config.model.n_kv_head = 0 if kv == n_head else kv
  config.model.rope_theta, config.model.norm_eps = 10000.0, 1e-6
  with pytest.raises(JaxdpError) as refused:
    hf.check_hf_config(hf_json, model_config(config, 256), "the checkpoint")
  advice = str(refused.value).rsplit("set ", 1)[1]
  for flag in advice.split():
    name, value = flag.removeprefix("--config.").split("=")
    section, field = name.split(".")
    config[section][field] = type(config[section][field])(float(value))
  hf.check_hf_config(hf_json, model_config(config, 256), "the checkpoint")


def test_a_llama_mlp_width_no_ratio_gives_imports_with_mlp_dim(tmp_path):
  model = llama(intermediate_size=100)  # Not a multiple of 8: no mlp_ratio gives it.
  model.save_pretrained(str(tmp_path))
  with pytest.raises(JaxdpError, match="intermediate_size=100; set --config.model.mlp_dim=100$"):
    imported(tmp_path, llama_cfg())
  assert_same_logits(model, tmp_path, llama_cfg(mlp_dim=100))


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_a_checkpoint_shorter_than_seq_len_is_refused_naming_both_numbers_and_the_fix(family):
  """A GPT-2 position table with fewer rows than config.seq_len, or a rotary model's
  max_position_embeddings below it: refused in one line, never cut or extrapolated silently."""
  key = "n_positions" if family == "gpt" else "max_position_embeddings"
  model, cfg = (gpt2(), gpt_cfg()) if family == "gpt" else (llama(), llama_cfg())
  config = {**model.config.to_dict(), key: 16}
  with pytest.raises(JaxdpError, match=rf"^config.seq_len=24 is longer than the {key}=16 .*; set "
                                       r"--config.seq_len=16 or less"):
    hf.check_hf_config(config, cfg, "the checkpoint")
  hf.check_hf_config(config, dataclasses.replace(cfg, seq_len=16), "the checkpoint")  # The limit.
  assert hf.position_note(config, dataclasses.replace(cfg, seq_len=16), "the checkpoint") == ""


def test_a_longer_gpt2_position_table_is_cut_to_seq_len_with_a_note_and_exact_logits(tmp_path):
  model = gpt2()  # n_positions=48; gpt_cfg's seq_len is 24.
  model.save_pretrained(str(tmp_path))
  note = hf.position_note(model.config.to_dict(), gpt_cfg(), "the checkpoint")
  assert note == ("jaxdp: note: the checkpoint has n_positions=48 learned positions; this run's "
                  "config.seq_len=24 uses its first 24 (the other 24 rows are dropped, and an export "
                  "has n_positions=24); set --config.seq_len=48 to keep them all")
  params = assert_same_logits(model, tmp_path, gpt_cfg())  # Every position it uses is exact.
  assert np.array_equal(params["wpe"], model.transformer.wpe.weight.detach().numpy()[:24])
  assert hf.position_note(llama().config.to_dict(), llama_cfg(), "the checkpoint") == ""  # Rotary.


# ---- Export of a padded vocabulary ------------------------------------------------------------

@pytest.fixture(scope="module")
def padded_export(tmp_path_factory):
  """A 1-step gpt run on bytes (256 ids) with the vocabulary padded to 288, exported."""
  root = tmp_path_factory.mktemp("padded")
  workdir = train(root / "run", steps=1, positions="learned", pad_vocab_to_multiple=96)
  hf_export.export(workdir, str(root / "out"))
  return workdir, str(root / "out")


def test_a_padded_vocabulary_exports_the_tokenizers_ids_with_jaxdps_loss_and_samples(padded_export):
  workdir, out = padded_export
  params, module, _ = load_for_inference(workdir)
  assert module.cfg.vocab_size == 288 and module.cfg.valid_vocab_size == 256
  assert json.load(open(os.path.join(out, "config.json")))["vocab_size"] == 256
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert model.lm_head.weight.shape[0] == 256
  ours = np.asarray(module.apply({"params": params}, IDS))
  assert relative_error(ours[..., :256], torch_logits(model, IDS)) < 1e-4
  # jaxdp's loss gives the padding ids no mass: it equals transformers' own loss.
  logp = jax.nn.log_softmax(ours, axis=-1)
  assert float(jax.nn.logsumexp(ours[..., 256:], axis=-1).max()) < -1e30
  ours_loss = -np.mean(np.take_along_axis(np.asarray(logp)[:, :-1], IDS[:, 1:, None], -1))
  with torch.no_grad():
    theirs_loss = float(model(torch.tensor(IDS, dtype=torch.long),
                              labels=torch.tensor(IDS, dtype=torch.long)).loss)
  assert ours_loss == pytest.approx(theirs_loss, rel=1e-5)
  # Samples: transformers' generate and jaxdp's never give a padding id; greedy is the same.
  prompt = IDS[:1, :4]
  with torch.no_grad():
    torch.manual_seed(0)
    sampled = model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=True, top_k=0,
                             max_new_tokens=18, num_return_sequences=8, pad_token_id=0)
    greedy = model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False,
                            max_new_tokens=18, pad_token_id=0)
  assert int(sampled.max()) < 256
  ours_sampled = [t for seed in range(4) for t in generate(params, module, prompt[0], 18,
                                                           temperature=2.0, seed=seed)]
  assert max(ours_sampled) < 256
  ours_greedy = list(generate(params, module, prompt[0], 18, temperature=0.0))
  assert ours_greedy == greedy[0, 4:].tolist()


def test_an_export_of_a_padded_run_imports_back_into_a_padded_run(padded_export):
  workdir, out = padded_export
  params, module, _ = load_for_inference(workdir)
  cfg = dataclasses.replace(module.cfg, seq_len=24)
  back = imported(out, cfg)
  assert back["wte"]["embedding"].shape == (288, 32)
  np.testing.assert_array_equal(back["wte"]["embedding"][:256], np.asarray(params["wte"]["embedding"])[:256])
  np.testing.assert_array_equal(back["wte"]["embedding"][256:], 0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_an_untied_head_and_mlp_dim_are_valid_config_with_closed_form_counts(family):
  from jaxdp.core.tree import count_params
  from jaxdp.lm.config import validate
  c = load_preset("tiny_cpu")
  c.model.family, c.model.tie_embeddings, c.model.mlp_dim = family, False, 100
  if family == "gpt":
    c.model.positions = "learned"
  validate(c, 8)
  model = build(model_config(c, 256))
  params = model.init_fn(jax.random.key(0))
  assert count_params(params) == model.param_count
  assert "lm_head" in params
