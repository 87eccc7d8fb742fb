"""Hugging Face checkpoints out (`jaxdp export`) and in (`config.init_from="hf:DIR"`), against
the real client: transformers loads what jaxdp writes and computes the same logits; tiny
transformers models built here (no download) imported into jaxdp compute the same logits as
transformers does; the exported tokenizer round-trips text; bad input is one line, status 2.
"""

import copy
import json
import os
import shutil
import subprocess
import sys

import cli_inprocess
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from conftest import cli_env  # noqa: E402

from jaxdp.data.prepare import prepare  # noqa: E402
from jaxdp.lm import build, hf_export, hf_import, load_for_inference, train_and_evaluate  # noqa: E402
from jaxdp.lm.config import load_preset  # noqa: E402

# Trains three tiny runs and compiles train steps on 8 devices: tens of seconds.
pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "jaxdp.cli.main"]
TEXT = "ROMEO: But soft, what light through yonder window breaks? Ünïcödé ✓ 日本\n\tok  "
LLAMA = dict(family="llama", n_kv_head=1, tie_embeddings=False, rope_theta=500.0)


def cli(*args):
  return subprocess.run([*CLI, *args], capture_output=True, text=True, env=cli_env(), timeout=300)


def assert_refused(result, *messages):
  """Exit status 2 and exactly one line, `jaxdp: error: ...`, holding every message."""
  assert result.returncode == 2, (result.returncode, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error: "), result.stderr
  for message in messages:
    assert message in lines[0], lines[0]


def relative_error(ours, theirs) -> float:
  return float(np.abs(np.asarray(ours) - np.asarray(theirs)).max() / np.abs(theirs).max())


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


def train(workdir, data="", steps=3, **model_fields):
  """A few fp32 steps of the tiny preset on one device: parameters away from their init."""
  config = load_preset("tiny_cpu")
  config.num_steps, config.eval_every, config.checkpoint_every = steps, 0, 0
  config.data.path = data
  for name, value in model_fields.items():
    config.model[name] = value
  train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], progress=False)
  return str(workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Trained workdirs: gpt (learned positions, byte tokenizer), llama (GQA, untied head, BPE
  data prepared here), gpt with rotary positions (not exportable)."""
  root = tmp_path_factory.mktemp("runs")
  corpus = root / "corpus.txt"
  corpus.write_text((TEXT + "\n") * 200 + open(os.path.join(
      os.path.dirname(__file__), "..", "jaxdp", "assets", "tinyshakespeare.txt")).read()[:20000])
  prepare([str(corpus)], str(root / "bpe"), tokenizer="bpe", vocab_size=300, progress=False)
  return {"gpt": train(root / "gpt", positions="learned"),
          "llama": train(root / "llama", data=str(root / "bpe"), d_model=64, n_head=4, **LLAMA),
          "rope": train(root / "rope", steps=1, positions="rope")}


@pytest.fixture(scope="module")
def exported(runs, tmp_path_factory):
  """gpt exported through the real CLI after its workdir moved; llama through the library."""
  root = tmp_path_factory.mktemp("exported")
  moved = str(root / "moved_gpt_run")
  shutil.copytree(runs["gpt"], moved)
  result = cli("export", "--workdir", moved, "--out", str(root / "gpt"))
  assert result.returncode == 0, result.stderr
  assert "exported step 3" in result.stdout
  hf_export.export(runs["llama"], str(root / "llama"))
  return {"gpt": (moved, str(root / "gpt")), "llama": (runs["llama"], str(root / "llama"))}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_transformers_loads_the_export_and_gives_jaxdp_logits(exported, family):
  workdir, out = exported[family]
  assert {"config.json", "model.safetensors", "tokenizer.json",
          "tokenizer_config.json"} <= set(os.listdir(out))
  model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert type(model).__name__ == {"gpt": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}[family]
  params, module, tokenizer = load_for_inference(workdir)
  ids = np.asarray(tokenizer.encode(TEXT), np.int32)[None, :module.cfg.seq_len]
  assert ids.shape[1] == module.cfg.seq_len  # The whole context: every position is compared.
  ours = module.apply({"params": params}, ids)
  assert relative_error(ours, torch_logits(model, ids)) < 1e-4
  if family == "llama":  # GQA and the untied head really went through.
    assert model.config.num_key_value_heads == 1 and not model.config.tie_word_embeddings
    assert model.config.rope_parameters["rope_theta"] == 500.0


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_the_exported_tokenizer_is_the_runs_tokenizer(exported, family):
  """gpt's run used bytes, llama's a BPE trained by prepare: AutoTokenizer gives the same ids
  and decodes them back to the text."""
  workdir, out = exported[family]
  _, _, ours = load_for_inference(workdir)
  theirs = transformers.AutoTokenizer.from_pretrained(out)
  ids = theirs.encode(TEXT, add_special_tokens=False)
  assert ids == ours.encode(TEXT).tolist()
  assert theirs.decode(ids) == TEXT
  assert len(theirs) == ours.vocab_size
  if family == "llama":
    assert theirs.eos_token == "<|endoftext|>"


def tiny_hf_model(family: str, seed: int):
  """A transformers model from a config (no download), every vector moved away from its init
  (biases 0, norms 1) so that a wrong mapping of them shows."""
  torch.manual_seed(seed)
  if family == "gpt":
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=256, n_positions=48, n_embd=32, n_layer=2, n_head=2))
  else:
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, rope_theta=500.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False, max_position_embeddings=64))
  return perturbed(model)


def perturbed(model):
  """`model` in eval mode with every vector (biases 0, norms 1 at init) moved by random noise
  from torch's global generator, so that a wrong mapping of them shows."""
  with torch.no_grad():
    for param in model.parameters():
      if param.ndim == 1:
        param.add_(0.2 * torch.randn_like(param))
  return model.eval()


# The jaxdp fields each tiny model needs (gpt: GPT-2's LayerNorm eps is 1e-5, jaxdp's 1e-6).
IMPORTED = {"gpt": dict(positions="learned", norm_eps=1e-5),
            "llama": dict(d_model=64, n_head=4, n_kv_head=2, norm_eps=1e-5,
                          **{k: v for k, v in LLAMA.items() if k != "n_kv_head"})}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf")
  out = {}
  for seed, family in enumerate(["gpt", "llama"]):
    model = tiny_hf_model(family, seed)
    model.save_pretrained(str(root / family))
    out[family] = (str(root / family), model)
  return out


def import_config(family, directory, **fields):
  config = load_preset("tiny_cpu")
  config.init_from = f"hf:{directory}"
  for name, value in {**IMPORTED[family], **fields}.items():
    config.model[name] = value
  return config


@pytest.mark.parametrize("family,strategy,mesh_model",
                         [("gpt", "dp", 1), ("llama", "zero3", 2)])
def test_a_transformers_model_imported_with_init_from_gives_its_logits(hf_dirs, family, strategy,
                                                                       mesh_model):
  """On 8 devices: gpt replicated (dp), llama with ZeRO-3 and its heads split over 2 devices."""
  directory, model = hf_dirs[family]
  config = import_config(family, directory)
  config.strategy, config.mesh.model = strategy, mesh_model
  trainer = build(config)
  state = trainer.init_state()
  ids = np.random.RandomState(0).randint(0, 256, (2, config.seq_len)).astype(np.int32)
  ours = trainer.model.module.apply({"params": jax.device_get(state.params)}, ids)
  assert relative_error(ours, torch_logits(model, ids)) < 1e-4
  # And the run trains from there: the first step's loss is transformers' loss on its batch.
  batch = jax.device_get(trainer.train_batch(0))
  inputs, targets = (batch[k].reshape(-1, config.seq_len) for k in ("inputs", "targets"))
  with torch.no_grad():
    logits = model(torch.tensor(inputs, dtype=torch.long)).logits
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                 torch.tensor(targets.ravel(), dtype=torch.long))
  _, metrics = trainer.train_step(state, trainer.train_batch(0))
  assert float(metrics["train_loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_a_field_that_differs_from_the_checkpoint_is_named(hf_dirs, tmp_path):
  other_vocab = tmp_path / "other_vocab"
  shutil.copytree(hf_dirs["gpt"][0], other_vocab)
  hf_config = json.loads((other_vocab / "config.json").read_text())
  (other_vocab / "config.json").write_text(json.dumps({**hf_config, "vocab_size": 50257}))
  with pytest.raises(Exception, match=r"the run's tokenizer has 256 ids but .* has "
                                      r"vocab_size=50257; prepare the data with the checkpoint's"):
    build(import_config("gpt", other_vocab))
  from jaxdp.models.common import ModelConfig
  from jaxdp.models.hf import check_hf_config
  unpadded = ModelConfig(vocab_size=500, seq_len=48, n_layer=2, n_head=2, d_model=32,
                         positions="learned")
  with pytest.raises(Exception, match="vocab_size=512, the run's 500-id tokenizer padded to a "
                                      "multiple of 64 .* set --config.model.pad_vocab_to_multiple=64"):
    check_hf_config({**hf_config, "vocab_size": 512}, unpadded, "the export")
  directory, _ = hf_dirs["llama"]
  with pytest.raises(Exception, match=r"config.model.n_kv_head=0 but .* has 2; set "
                                      r"--config.model.n_kv_head=2"):
    build(import_config("llama", directory, n_kv_head=0))
  with pytest.raises(Exception, match=r"config.model.norm_eps=1e-06 but .* uses 1e-05"):
    build(import_config("gpt", hf_dirs["gpt"][0], norm_eps=0.0))
  with pytest.raises(Exception, match=r"mlp_ratio=2 gives an MLP of 88 .* intermediate_size=176; "
                                      r"set --config.model.mlp_ratio=4$"):
    build(import_config("llama", directory, mlp_ratio=2))


# ---- One line and exit status 2 through the real command line --------------------------------

def test_exporting_a_rotary_gpt_names_the_field(runs, tmp_path):
  result = cli("export", "--workdir", runs["rope"], "--out", str(tmp_path / "out"))
  assert_refused(result, "config.model.positions='rope' is not GPT-2",
                 "--config.model.positions=learned")
  assert not os.path.exists(tmp_path / "out" / "model.safetensors")


def test_export_refusals(runs, tmp_path, capfd):
  assert_refused(cli("export", "--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path)),
                 "has no checkpoints/")
  assert_refused(cli("export", "--workdir", runs["gpt"], "--step", "2", "--out", str(tmp_path)),
                 "--step=2 is not a checkpoint", "its steps: 3")
  # Refused while parsing, before any device work: the same main() in this process.
  assert_refused(cli_inprocess.run(capfd, "export", "--workdir", runs["gpt"]), "needs --out DIR")
  (tmp_path / "a_file").write_text("")
  assert_refused(cli("export", "--workdir", runs["gpt"], "--out", str(tmp_path / "a_file")),
                 "is a file; give a directory")
  assert_refused(cli_inprocess.run(capfd, "export", "--workdir", runs["gpt"], "--out", str(tmp_path),
                                   "--step=-1"),
                 "--step=-1 is out of range")


def test_init_from_refusals(hf_dirs, tmp_path):
  directory, _ = hf_dirs["gpt"]
  train = ["train", "--config", "tiny_cpu", "--config.model.positions=learned",
           "--config.model.norm_eps=1e-5", "--cpu_devices", "1", "--noprogress",
           "--workdir", str(tmp_path / "run")]
  assert_refused(cli(*train, f"--config.init_from=hf:{tmp_path / 'missing'}"),
                 "config.init_from=", "is not a directory")
  assert_refused(cli(*train, "--config.init_from=gpt2"), "must be '' (random init) or 'hf:DIR'")
  # Shapes: config.json says n_inner=128 (mlp_ratio 4 checks out), the tensors are 64 wide.
  bad = tmp_path / "bad"
  shutil.copytree(directory, bad)
  hf_config = json.loads((bad / "config.json").read_text())
  narrow = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**hf_config, "n_inner": 64}))
  narrow.save_pretrained(str(bad))
  (bad / "config.json").write_text(json.dumps({**hf_config, "n_inner": 128}))
  assert_refused(cli(*train, f"--config.init_from=hf:{bad}"),
                 "tensor 'transformer.h.0.mlp.c_fc.weight' has shape [32, 64]",
                 "config.model needs [32, 128]")
  assert_refused(cli(*train, f"--config.init_from=hf:{directory}", "--config.model.n_layer=3"),
                 "config.model.n_layer=3 but", "set --config.model.n_layer=2")
  # More positions than the checkpoint's table has rows: never a silent cut.
  assert_refused(cli(*train, f"--config.init_from=hf:{directory}", "--config.seq_len=64"),
                 "config.seq_len=64 is longer than the n_positions=48 learned positions",
                 "set --config.seq_len=48 or less")
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_an_import_that_keeps_part_of_the_position_table_says_so_after_the_banner(hf_dirs, tmp_path):
  directory, _ = hf_dirs["gpt"]  # n_positions=48; tiny_cpu's seq_len is 32.
  done = cli("train", "--config", "tiny_cpu", "--config.model.positions=learned",
             "--config.model.norm_eps=1e-5", "--cpu_devices", "1", "--noprogress",
             "--config.num_steps=1", "--config.eval_every=0", "--config.eval_steps=1",
             f"--config.init_from=hf:{directory}", "--workdir", str(tmp_path / "run"))
  assert done.returncode == 0, done.stderr[-3000:]
  lines = (done.stdout + done.stderr).splitlines()
  (note,) = [line for line in lines if line.startswith("jaxdp: note: config.init_from=")]
  assert "n_positions=48 learned positions; this run's config.seq_len=32 uses its first 32" in note
  # A resume reads its own checkpoint, not the import: no note.
  again = cli("train", "--config", "tiny_cpu", "--config.model.positions=learned",
              "--config.model.norm_eps=1e-5", "--cpu_devices", "1", "--noprogress",
              "--config.num_steps=1", "--config.eval_every=0", "--config.eval_steps=1",
              f"--config.init_from=hf:{directory}", "--workdir", str(tmp_path / "run"))
  assert again.returncode == 0 and "jaxdp: note: config.init_from" not in again.stderr, again.stderr


def test_a_moved_workdir_generates_the_same_text_with_and_without_the_cache(exported):
  """`jaxdp generate` on the moved gpt run: greedy text equal with --cache and --nocache, and
  the speed reported on stderr (stdout is only the text)."""
  moved, _ = exported["gpt"]
  runs = [cli("generate", "--workdir", moved, "--prompt", "ROMEO:", "--max_new_tokens", "12",
              "--temperature", "0", "--cpu_devices", "1", flag) for flag in ("--cache", "--nocache")]
  for result, kind in zip(runs, ("cached", "uncached")):
    assert result.returncode == 0, result.stderr
    assert "tokens/s decoding" in result.stderr and f"({kind};" in result.stderr
    assert "tokens/s" not in result.stdout
  assert runs[0].stdout == runs[1].stdout and runs[0].stdout.startswith("ROMEO:")


@pytest.mark.parametrize("variant", ["sharded", "base_model", "bfloat16"])
def test_other_ways_of_saving_give_the_same_parameters(hf_dirs, tmp_path, variant):
  """A sharded model.safetensors.index.json, a GPT-2 saved from its base model (tensor names
  without "transformer."), and bfloat16 weights (widened to float32) read as the same tree."""
  from jaxdp.lm.spec import model_config
  directory, model = hf_dirs["gpt"]
  cfg = model_config(import_config("gpt", directory), 256)
  reference = hf_import.load_params(f"hf:{directory}", cfg)
  if variant == "sharded":
    model.save_pretrained(str(tmp_path), max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    assert not os.path.exists(tmp_path / "model.safetensors")
  elif variant == "base_model":
    model.transformer.save_pretrained(str(tmp_path))
  else:
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(str(tmp_path))  # The fixture's stays.
    reference = jax.tree.map(lambda x: np.asarray(torch.tensor(x).bfloat16().float()), reference)
  loaded = hf_import.load_params(f"hf:{tmp_path}", cfg)
  assert jax.tree.structure(loaded) == jax.tree.structure(reference)
  for ours, theirs in zip(jax.tree.leaves(loaded), jax.tree.leaves(reference)):
    assert ours.dtype == np.float32 and np.array_equal(ours, theirs)


def test_export_never_replaces_files_it_did_not_write(runs, tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "tokenizer.json").write_text('{"my": "own tokenizer"}')
  with pytest.raises(Exception, match="already holds tokenizer.json, not written by `jaxdp export`"):
    hf_export.export(runs["gpt"], str(mine))
  assert (mine / "tokenizer.json").read_text() == '{"my": "own tokenizer"}'
  assert os.listdir(mine) == ["tokenizer.json"]
  again = tmp_path / "again"
  first = hf_export.export(runs["gpt"], str(again))
  (again / "notes.txt").write_text("keep")
  assert hf_export.export(runs["gpt"], str(again))["files"] == first["files"]  # Its own export: replaced.
  assert "notes.txt" not in first["files"] and (again / "notes.txt").read_text() == "keep"
