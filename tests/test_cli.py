"""The command line: a real run end to end, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest


def jaxdp(*args, cwd=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "jaxdp.main", *args], capture_output=True,
                        text=True, cwd=cwd, env=env, timeout=300)


def test_train_then_generate_from_the_command_line(tmp_path):
  workdir = str(tmp_path / "run")
  result = jaxdp("train", "--config", "tiny_cpu", "--workdir", workdir, "--cpu_devices", "2",
                 "--progress=false", "--config.num_steps=10")
  assert result.returncode == 0, result.stderr
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert records[0]["num_devices"] == 2
  assert records[-1] == {"step": 10, "eval_loss": pytest.approx(records[-1]["eval_loss"])}
  out = jaxdp("generate", "--workdir", workdir, "--prompt", "ROMEO:", "--max_new_tokens", "20",
              "--seed", "3", "--cpu_devices", "1")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("ROMEO:") and len(out.stdout.encode()) >= len("ROMEO:") + 20
  again = jaxdp("generate", "--workdir", workdir, "--prompt", "ROMEO:", "--max_new_tokens", "20",
                "--seed", "3", "--cpu_devices", "1")
  assert again.stdout == out.stdout


@pytest.mark.parametrize("args, message", [
    (["--config.nonsense=1"], "unknown config field 'nonsense'"),
    (["--config.global_batch_size=10", "--cpu_devices", "4"],
     "config.global_batch_size=10 is not divisible by data devices x grad_accum_steps = 4 x 1"),
    (["--config.data.path=/no/such.txt"], "config.data.path='/no/such.txt' does not exist"),
    (["--config", "no_such_preset"], "no such file or preset"),
    (["--config.seq_len=abc"], "--config.seq_len=abc"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  result = jaxdp("train", "--config", "tiny_cpu", "--workdir", str(tmp_path), *args)
  assert result.returncode == 2
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error:") and message in lines[0]


def test_empty_corpus_is_a_clear_error(tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  result = jaxdp("train", "--config", "tiny_cpu", "--workdir", str(tmp_path / "w"),
                 f"--config.data.path={empty}", "--cpu_devices", "2")
  assert result.returncode == 2 and "is empty" in result.stderr and "Traceback" not in result.stderr


def test_generate_without_checkpoint_is_a_clear_error(tmp_path):
  result = jaxdp("generate", "--workdir", str(tmp_path), "--cpu_devices", "1")
  assert result.returncode == 2 and "has no checkpoint" in result.stderr
