"""Both built-in models through every subcommand, and presets by name or by path.

`plan`, `verify`, `generate` and `inspect` work for `gpt` and `llama` alike; a preset is found
by name from any directory and by its path in a checkout.
"""

import json
import os
import subprocess
import sys

import cli_inprocess
from conftest import TINY_RUN_FLAGS, cli_env
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = [sys.executable, "-m", "jaxdp.cli.main"]
TINY = ["--config.num_steps=2", "--config.eval_steps=1", "--config.log_every=1"]
LLAMA = ["--config.model.family=llama", "--config.model.n_kv_head=2",
         "--config.model.tie_embeddings=false"]


def same_as_tiny_run() -> bool:
  """The tiny_cpu runs here are conftest's canonical run (conftest.tiny_run) flag for flag."""
  return set(TINY_RUN_FLAGS) == {"--config", "tiny_cpu", *TINY, "--progress=false", "--cpu_devices", "2"}


def jaxdp(*args, cwd=ROOT):
  result = subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(),
                          timeout=300)
  assert result.returncode == 0, (args, result.stderr[-3000:])
  return result


@pytest.mark.parametrize("preset", ["tiny_cpu", "configs/tiny_cpu.py"])
def test_preset_by_name_and_by_checkout_path(preset, tmp_path, request):
  if preset == "tiny_cpu":  # By name: the session's canonical run is exactly this command.
    assert TINY_RUN_FLAGS[:2] == ("--config", preset) and same_as_tiny_run()
    workdir = request.getfixturevalue("tiny_run")[0]
  else:
    workdir = tmp_path
    jaxdp("train", "--config", preset, *TINY, "--progress=false", "--cpu_devices", "2",
          "--workdir", str(workdir))
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert any(r.get("step") == 2 and "eval_loss" in r for r in records)


@pytest.fixture(scope="module", params=["gpt", "llama"])
def trained(request, tmp_path_factory):
  family = request.param
  if family == "gpt" and same_as_tiny_run():  # The session's canonical run: this command.
    return family, request.getfixturevalue("tiny_run")[0], []
  workdir = tmp_path_factory.mktemp(family)
  extra = LLAMA
  jaxdp("train", "--config", "tiny_cpu", *TINY, *extra, "--progress=false", "--cpu_devices", "2",
        "--workdir", str(workdir))
  return family, workdir, extra


def test_generate_and_inspect_work_for_both_families(trained, capfd):
  family, workdir, _ = trained
  # In this process, on its own 8 emulated devices (generation runs on one of them).
  generated = cli_inprocess.run(capfd, "generate", "--workdir", str(workdir), "--prompt", "ROMEO:",
                                "--max_new_tokens", "8", "--temperature", "0", "--cpu_devices", "8")
  assert generated.returncode == 0, generated.stderr[-3000:]
  out = generated.stdout
  assert out.startswith("ROMEO:") and len(out.rstrip("\n")) >= len("ROMEO:")
  inspected = cli_inprocess.run(capfd, "inspect", str(workdir))  # No device work: in-process.
  assert inspected.returncode == 0, inspected.stderr[-3000:]
  shown = inspected.stdout
  assert f"model.family={family!r}" in shown
  if family == "llama":
    assert "wq" in shown and "w_gate" in shown and "lm_head" in shown
  else:
    assert "qkv" in shown and "lm_head" not in shown


def test_plan_and_verify_work_for_llama(tmp_path):
  """gpt's plan and verify are covered by test_zero and test_cli; llama runs the same CLI."""
  # One block: the same code paths, less compiling. No warmup: verify compares its cases without
  # it, so plan's steps are the very programs verify compiled.
  small = [*LLAMA, "--config.model.n_layer=1", "--config.warmup_steps=0"]
  # Both commands in one process on the same 4 devices (tests/cli_inprocess.py as a script):
  # plan then finds each strategy's init and step compiled (in memory or conftest's cache).
  commands = [["verify", "--config", "tiny_cpu", *small, "--cpu_devices", "4", "--steps", "1"],
              ["plan", "--config", "tiny_cpu", *small, "--cpu_devices", "4", "--json"]]
  (tmp_path / "commands.json").write_text(json.dumps(commands))
  done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "cli_inprocess.py"),
                         str(tmp_path / "commands.json"), str(tmp_path / "results.jsonl")],
                        capture_output=True, text=True, cwd=ROOT, env=cli_env(), timeout=600)
  lines = tmp_path / "results.jsonl"  # One line per command run; each command's stderr.
  results = [json.loads(line) for line in lines.read_text().splitlines()] if lines.exists() else []
  assert [r["returncode"] for r in results] == [0, 0], (results, done.stderr[-3000:])
  # stdout: verify's lines, then plan's JSON (indented: its first line is "{").
  verify, _, plan = done.stdout.partition("\n{\n")
  plan = json.loads("{" + plan)
  assert {"dp", "zero1", "zero2", "zero3"} <= set(plan["strategies"])
  assert plan["strategies"]["zero3"]["params_bytes_per_device"] < \
      plan["strategies"]["dp"]["params_bytes_per_device"]
  assert "all strategies match one device" in verify
  assert "zero3@2x2" in verify  # The 2x2 (data x model) mesh is among the cases.
