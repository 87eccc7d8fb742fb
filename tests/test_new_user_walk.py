"""The instances a new user's walk found (issue 31), each fixed by a mechanism (the schema, the
path resolver, strict metrics JSON) and kept here as a check that the advice printed works."""

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys

from cli_inprocess import run
from conftest import cli_env
import jax
import jax.numpy as jnp
import optax
import pytest

import jaxdp
from jaxdp.cli import command
from jaxdp.cli import main as cli_main
from jaxdp.errors import JaxdpError


def one_line(result, *texts):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2 and len(lines) == 1, result.stderr
  assert lines[0].startswith("jaxdp: error: ") and "Traceback" not in result.stderr
  for text in texts:
    assert text in lines[0], (text, lines[0])
  return lines[0]


def test_a_jsonl_data_path_is_refused_with_a_prepare_command_that_works(tmp_path, monkeypatch,
                                                                       capfd):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "docs.jsonl").write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
  line = one_line(run(capfd, "train", "--config", "tiny_cpu", "--config.data.path=docs.jsonl"),
                  "config.data.path='docs.jsonl'", "jaxdp prepare")
  prepare = shlex.split(line.split("`jaxdp ")[1].split("`")[0])
  assert run(capfd, *prepare, "--progress=false").returncode == 0  # The advised command runs...
  trained = line.rsplit("--config.data.path=", 1)[1]
  monkeypatch.setattr(cli_main.MODULES["train"], "run", lambda args: 0)
  result = run(capfd, "train", "--config", "tiny_cpu", f"--config.data.path={trained}")
  assert result.returncode == 0, result.stderr  # ... and its output is accepted as data.


def test_a_lone_surrogate_in_a_jsonl_line_is_named_by_line(tmp_path, capfd):
  (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 here"}\n')
  one_line(run(capfd, "prepare", str(tmp_path / "a.jsonl"), "--out", str(tmp_path / "o")),
           "line 2 holds a lone surrogate", "\\ud800")
  assert not os.path.exists(tmp_path / "o" / "manifest.json")


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="needs pyarrow")
def test_parquet_null_texts_are_skipped_and_counted(tmp_path, capfd):
  import pyarrow as pa
  import pyarrow.parquet as pq
  pq.write_table(pa.table({"text": ["one doc", None, "two doc", None, ""]}),
                 tmp_path / "d.parquet")
  result = run(capfd, "prepare", str(tmp_path / "d.parquet"), "--out", str(tmp_path / "o"),
               "--progress=false")
  assert result.returncode == 0, result.stderr
  assert "skipped 2 null 'text' values (rows 2, 4" in result.stderr
  assert "2 documents" in result.stdout
  # A column that is not text at all is still refused, naming the real fix.
  pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
  one_line(run(capfd, "prepare", str(tmp_path / "n.parquet"), "--out", str(tmp_path / "o2")),
           "holds int", "--text_field")


def test_metrics_are_strict_json_with_null_for_non_finite_numbers(tmp_path):
  from jaxdp.runtime.metrics import MetricsWriter, json_line, read_metrics
  assert json_line({"a": math.nan, "b": [1.0, math.inf], "c": 2}) == \
      '{"a": null, "b": [1.0, null], "c": 2}'
  writer = MetricsWriter(str(tmp_path))
  writer.write({"step": 1, "train_loss": 2.5, "grad_noise_scale": float("nan")})
  writer.close()

  def refuse(name):
    raise ValueError(f"{name} is not JSON")
  text = (tmp_path / "metrics.jsonl").read_text()
  assert json.loads(text, parse_constant=refuse)["grad_noise_scale"] is None
  assert read_metrics(str(tmp_path))[-1]["train_loss"] == 2.5


def test_jax_platforms_naming_a_missing_plugin_is_one_line():
  if any(m.name.startswith("jax_cuda") for m in __import__("pkgutil").iter_modules()):
    pytest.skip("this host has a CUDA plugin")
  with pytest.raises(JaxdpError, match="JAX_PLATFORMS='cuda' asks for cuda"):
    command.check_platforms("cuda")
  command.check_platforms("cpu")  # Always there.


def test_jax_platforms_cuda_without_its_plugin_refuses_before_device_work(tiny_run):
  if any(m.name.startswith("jax_cuda") for m in __import__("pkgutil").iter_modules()):
    pytest.skip("this host has a CUDA plugin")
  env = dict(cli_env(), JAX_PLATFORMS="cuda")
  done = subprocess.run([sys.executable, "-m", "jaxdp.cli.main", "generate", "--workdir",
                         str(tiny_run[0]), "--max_new_tokens", "1"],
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
  assert "JAX_PLATFORMS='cuda'" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_integer_parameter_leaf_is_named_through_the_api():
  def init_fn(rng):
    return {"w": jax.random.normal(rng, (4, 2)), "table": {"ids": jnp.arange(4, dtype=jnp.int32)}}

  def loss_fn(params, batch, rng):
    del rng
    return jnp.sum((batch["x"] @ params["w"]) ** 2), jnp.float32(batch["x"].shape[0])
  dp = jaxdp.DataParallel(loss_fn, optax.sgd(0.1), devices=jax.devices()[:2])
  with pytest.raises(JaxdpError, match=r"int32 parameter leaf \['table'\]\['ids'\]"):
    dp.init_state(init_fn)


def test_plan_with_a_model_axis_checks_every_candidate_before_compiling(monkeypatch):
  from jaxdp.analysis import plan as planning
  from jaxdp.lm.config import load_preset
  compiled = []
  monkeypatch.setattr(planning, "measure_strategy",
                      lambda config, strategy, devices: compiled.append(strategy) or {})
  config = load_preset("tiny_cpu")
  config.mesh.model = 3  # Divides no candidate's mesh on 8 devices: refused, nothing compiled.
  with pytest.raises(JaxdpError, match="config.mesh.model=3"):
    planning.plan(config, jax.devices())
  assert compiled == []
  config.mesh.model = 2  # The default strategy (dp) cannot use it; the ZeRO candidates can.
  result = planning.plan(config, jax.devices())
  assert compiled == ["zero1", "zero2", "zero3"] and result["params"] > 0


def test_patience_without_periodic_evaluation_is_refused_through_the_api_too():
  from jaxdp.runtime.options import FitOptions
  with pytest.raises(JaxdpError, match="FitOptions.patience=3 has no effect without periodic"):
    FitOptions(num_steps=10, patience=3)
  assert FitOptions(num_steps=10, patience=3, eval_every=2).patience == 3
