"""A run you can see into: MFU, step time, peak memory and input wait in every train line
(metrics.jsonl, TensorBoard, the plain progress line), a jax.profiler trace of chosen steps,
and the Weights & Biases sink in offline mode (its own run files read back, wandb not mocked).

One short training run (module fixture) serves all the log checks.
"""

import contextlib
import glob
import io
import json
import math
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_viz import scalars

from jaxdp.errors import JaxdpError
from jaxdp.lm import build, model_flops_per_device, train_and_evaluate
from jaxdp.lm.config import load_preset, validate
from jaxdp.runtime import observe, peaks
from jaxdp.runtime.metrics import read_metrics
from jaxdp.runtime.profiling import parse_profile_steps

HARDWARE = ("mfu", "step_time_s", "peak_memory_bytes", "data_wait_fraction")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """8 tiny steps on 2 devices, logging every 2, tracing steps 3-4, with W&B offline."""
  workdir = str(tmp_path_factory.mktemp("observed"))
  wandb_dir = str(tmp_path_factory.mktemp("wandb"))
  config = load_preset("tiny_cpu")
  config.num_steps, config.log_every, config.eval_every, config.checkpoint_every = 8, 2, 0, 0
  config.profile_steps = "2:4"
  config.wandb.project, config.wandb.mode = "jaxdp-test", "offline"
  out = io.StringIO()
  old = os.environ.get("WANDB_DIR")
  os.environ["WANDB_DIR"] = wandb_dir
  try:
    with contextlib.redirect_stdout(out):
      train_and_evaluate(config, workdir, devices=jax.devices()[:2], progress=False)
  finally:
    if old is None:
      os.environ.pop("WANDB_DIR")
    else:
      os.environ["WANDB_DIR"] = old
  return {"workdir": workdir, "wandb_dir": wandb_dir, "stdout": out.getvalue(),
          "records": read_metrics(workdir)}


def train_lines(records):
  return [r for r in records if "train_loss" in r]


def test_every_train_line_has_finite_hardware_numbers(run):
  lines = train_lines(run["records"])
  assert [r["step"] for r in lines] == [2, 4, 6, 8]
  for line in lines:
    for name in HARDWARE:
      assert math.isfinite(line[name]), (name, line)
    # Against a matmul peak measured at start-up, the model cannot exceed the hardware.
    assert 0 < line["mfu"] < 1, line
    assert line["step_time_s"] > 0 and 0 <= line["data_wait_fraction"] <= 1
    assert line["peak_memory_bytes"] > 0
  start = next(r for r in run["records"] if r.get("event") == "start")
  # On CPU: a measured peak, and memory from the compiled step (XLA:CPU keeps no statistics).
  assert start["peak_flops_source"] == "measured" and start["peak_flops_per_sec"] > 0
  assert start["peak_memory_source"] == "memory_analysis"
  assert start["flops_per_device_step"] > 0
  # mfu is the step's FLOPs per second over that peak: recompute it from the line.
  line = lines[-1]
  expected = start["flops_per_device_step"] * 2 / line["step_time_s"] / start["peak_flops_per_sec"]
  assert line["mfu"] == pytest.approx(expected, rel=1e-6)


def test_hardware_numbers_reach_tensorboard_and_the_progress_line(run):
  tb = scalars(run["workdir"])
  for name in HARDWARE:
    assert sorted(tb[name]) == [2, 4, 6, 8], name
  assert tb["mfu"][8] == pytest.approx(train_lines(run["records"])[-1]["mfu"], rel=1e-5)
  progress = [line for line in run["stdout"].splitlines() if line.startswith("step 8/8")]
  assert progress and all(f" {k} " in progress[0] for k in ("mfu", "step", "wait", "mem")), run["stdout"]
  # The start banner names what MFU is measured against.
  # On this CPU it is a matmul timed on the machine, by this run or an earlier one (test_peaks.py).
  assert "mfu: " in run["stdout"] and "measured" in run["stdout"], run["stdout"]
  assert "timed at start-up" in run["stdout"] or "delete it to time again" in run["stdout"]


def test_tensorboard_events_are_written_without_importing_torch(tmp_path):
  # tensorboardX would import PyTorch (installed here for the export tests) only to accept torch
  # tensors as images: seconds of every `jaxdp train` start-up. A process that already has torch
  # keeps it and its writer still works.
  code = ("import sys\nfrom jaxdp.runtime.metrics import MetricsWriter\n"
          "w = MetricsWriter(sys.argv[1]); w.write({'step': 1, 'train_loss': 2.5}); w.close()\n"
          "print('torch' in sys.modules)\n")
  import subprocess
  for first, expected in (("", "False"), ("import torch\n", "True")):
    out = subprocess.run([sys.executable, "-c", first + code, str(tmp_path / expected)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == [expected], out.stderr[-2000:]
    assert scalars(str(tmp_path / expected))["train_loss"] == {1: 2.5}


def test_profile_steps_write_a_trace(run):
  traces = glob.glob(os.path.join(run["workdir"], "profile", "**", "*.xplane.pb"), recursive=True)
  assert traces and os.path.getsize(traces[0]) > 0


@pytest.mark.parametrize("text", ["5", "4:2", "3:3", "-1:2", "a:b", "1:2:3"])
def test_bad_profile_steps_are_one_line_errors(text):
  with pytest.raises(JaxdpError, match="config.profile_steps=.*START:STOP"):
    parse_profile_steps(text)
  config = load_preset("tiny_cpu")
  config.profile_steps = text
  with pytest.raises(JaxdpError, match="config.profile_steps"):
    validate(config, 2)


def test_profile_steps_parse():
  assert parse_profile_steps("") is None
  assert parse_profile_steps("10:15") == (10, 15)


def wandb_records(path):
  """The protobuf Records of a W&B run file: W&B's LevelDB-log framing (a 7-byte ":W&B" header,
  then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type FULL/FIRST/MIDDLE/LAST)."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, "rb").read()
  ident, magic, _ = struct.unpack("<4sHB", data[:7])
  assert ident == b":W&B" and magic == 0xBEE1
  pos, pending = 7, b""
  while pos + 7 <= len(data):
    left = 32768 - pos % 32768
    crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
    if kind == 0:
      pos += left
      continue
    chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
    pending = chunk if kind in (1, 2) else pending + chunk
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pending)
      yield record


def test_wandb_offline_run_holds_the_scalars_and_the_config(run):
  files = glob.glob(os.path.join(run["wandb_dir"], "wandb", "offline-run-*", "run-*.wandb"))
  assert len(files) == 1, files
  history, config = {}, {}
  for record in wandb_records(files[0]):
    kind = record.WhichOneof("record_type")
    if kind == "history":
      item = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
      history.setdefault(item["_step"], {}).update(item)
    elif kind == "run":
      config.update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                     for i in record.run.config.update})
  lines = train_lines(run["records"])
  assert sorted(history) == [line["step"] for line in lines]
  for line in lines:
    for name in ("train_loss", "tokens_per_sec") + HARDWARE:
      assert history[line["step"]][name] == pytest.approx(line[name], rel=1e-6), name
  assert config["model"]["n_layer"] == 2 and config["profile_steps"] == "2:4"
  # The run id is kept in the workdir, so a resume continues the same W&B run.
  run_id = open(os.path.join(run["workdir"], "wandb_run_id")).read().strip()
  assert files[0].endswith(f"run-{run_id}.wandb")


def test_wandb_missing_is_one_error_naming_the_extra(tmp_path, monkeypatch):
  from jaxdp.runtime.wandb_sink import WandbSink
  monkeypatch.setitem(sys.modules, "wandb", None)  # What `import wandb` sees when not installed.
  with pytest.raises(JaxdpError, match=r"pip install 'jaxdp\[wandb\]'"):
    WandbSink("p", "offline", str(tmp_path), {})


def test_bad_wandb_mode_is_refused():
  config = load_preset("tiny_cpu")
  config.wandb.mode = "sometimes"
  with pytest.raises(JaxdpError, match="config.wandb.mode='sometimes' is not one of"):
    validate(config, 2)


def test_datasheet_peaks_by_device_kind():
  assert peaks.datasheet_peak_flops("NVIDIA H200", jnp.bfloat16) == 989.4e12
  assert peaks.datasheet_peak_flops("NVIDIA H100 80GB HBM3", jnp.bfloat16) == 989.4e12
  assert peaks.datasheet_peak_flops("NVIDIA H100 PCIe", jnp.bfloat16) == 756e12
  assert peaks.datasheet_peak_flops("NVIDIA A100-SXM4-80GB", jnp.float32) == 156e12
  assert peaks.datasheet_peak_flops("TPU v5 lite", jnp.bfloat16) == 197e12
  assert peaks.datasheet_peak_flops("cpu", jnp.float32) is None
  assert peaks.datasheet_peak_flops("NVIDIA GeForce GTX 1080", jnp.float32) is None


def test_looped_steps_are_counted_without_their_loops():
  """XLA counts a scan body once: with remat (a scan over blocks) and 4 micro-batches (a scan
  over 3 of them) the compiled count falls short, the loop-free count matches the plain step."""
  devices = jax.devices()[:2]

  def compiled_flops(**fields):
    config = load_preset("tiny_cpu")
    for name, value in fields.items():
      setattr(config, name, value)
    trainer = build(config, devices)
    batch = trainer.train_batch(0)
    lowered = trainer.train_step.lower(trainer.abstract_state(), batch)
    loop_free = model_flops_per_device(config, trainer.dataset.tokenizer.vocab_size,
                                               devices, batch)
    # The lowered step's count (XLA's cost analysis before compilation, loops as in the
    # compiled one), as a compile of each would take longer than the whole test.
    return observe.lowered_flops(lowered), loop_free
  plain, none_needed = compiled_flops()
  assert none_needed is None  # No loop: the compiled count is used as it is.
  looped, loop_free = compiled_flops(remat="block", grad_accum_steps=4)
  assert looped < 0.8 * plain  # What the loop-free count corrects.
  assert loop_free == pytest.approx(plain, rel=0.03)


def test_padded_vocabulary_changes_nothing_but_the_shapes():
  """A 250-id vocabulary padded to 256: the padding ids get no probability, and the loss equals
  the unpadded model's with the same weights for the real ids."""
  from jaxdp.models import ModelConfig
  from jaxdp.models import build as build_lm
  base = dict(seq_len=16, n_layer=1, n_head=2, d_model=16)
  padded = build_lm(ModelConfig(vocab_size=256, valid_vocab_size=250, **base))
  plain = build_lm(ModelConfig(vocab_size=250, **base))
  params = jax.tree.map(lambda x: getattr(x, "value", x),
                        jax.jit(padded.init_fn)(jax.random.PRNGKey(0)),
                        is_leaf=lambda x: hasattr(x, "value"))
  small = jax.tree_util.tree_map_with_path(
      lambda path, x: x[:250] if "wte" in jax.tree_util.keystr(path) else x, params)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 250, (2, 16)), jnp.int32)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, 1), "weights": jnp.ones((2, 16)),
           "ids": jnp.arange(2, dtype=jnp.int32)}
  logits = jax.jit(padded.module.apply)({"params": params}, tokens)
  assert logits.shape[-1] == 256
  assert float(jax.nn.softmax(logits)[..., 250:].max()) == 0.0
  np.testing.assert_allclose(logits[..., :250], jax.jit(plain.module.apply)({"params": small}, tokens),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(jax.jit(padded.loss_fn)(params, batch, None)[0],
                             jax.jit(plain.loss_fn)(small, batch, None)[0], rtol=1e-5)


def test_model_config_pads_any_vocabulary():
  from jaxdp.lm.spec import model_config
  config = load_preset("tiny_cpu")
  config.model.pad_vocab_to_multiple = 64
  cfg = model_config(config, 50257)
  assert (cfg.vocab_size, cfg.valid_vocab_size) == (50304, 50257)
  assert model_config(config, 256).vocab_size == 256
  config.model.pad_vocab_to_multiple = 0
  with pytest.raises(JaxdpError, match="config.model.pad_vocab_to_multiple=0 must be"):
    validate(config, 2)


def test_wandb_mode_without_a_project_is_reported_as_ignored():
  from jaxdp.lm.config import ignored_fields
  config = load_preset("tiny_cpu")
  config.wandb.mode = "online"
  assert any("config.wandb.mode='online' has no effect without config.wandb.project" in m
             for m in ignored_fields(config))
