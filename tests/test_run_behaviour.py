"""What a user sees and what a run does at its edges: banner, plain progress lines, summary,
one run per workdir, signals at any moment, library messages kept off the terminal."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from conftest import cli_env
import jax
import pytest

from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset

CLI = [sys.executable, "-m", "jaxdp.cli.main"]
TINY = ["--config", "tiny_cpu", "--config.eval_steps=1", "--progress=false", "--cpu_devices", "2"]


def run(*args):
  return subprocess.run([*CLI, *args], capture_output=True, text=True, env=cli_env(), timeout=300)


def start(*args):
  return subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=cli_env())


def wait_for(predicate, timeout=120.0):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    time.sleep(0.1)
  return False


def train_here(workdir, allow_config_change=False, **overrides):
  """The TINY run trained or resumed in this process on 2 of its devices (`jaxdp train` calls the
  same train_and_evaluate): for a workdir a test only needs trained, or shown usable again, this
  spares an interpreter and JAX start-up per run."""
  config = load_preset("tiny_cpu")
  config.eval_steps = 1
  for key, value in overrides.items():
    config[key] = value
  return train_and_evaluate(config, str(workdir), devices=jax.devices()[:2], progress=False,
                            allow_config_change=allow_config_change)


def metrics(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [json.loads(line) for line in open(path) if line.strip()]


def test_banner_plain_progress_lines_and_summary(tiny_run, tmp_path, capfd):
  source, first = tiny_run  # The session's `jaxdp train`: 2 steps, every step logged, an eval.
  assert first.returncode == 0, first.stderr
  out = first.stdout
  assert "jaxdp: starting, training to step 2" in out and "parameters" in out
  assert "strategy dp, precision fp32" in out and "tokens per step" in out
  assert "step 1/2: loss" in out and "step 2/2: loss" in out  # Plain lines without a bar.
  assert "jaxdp: done (reached num_steps): 2 steps" in out and "eval_loss: final" in out
  assert os.path.join(str(source), "checkpoints", "2") in out  # Where the best checkpoint is.
  workdir = str(tmp_path / "run")
  shutil.copytree(source, workdir)
  capfd.readouterr()
  again = train_here(workdir, num_steps=2, log_every=1)  # In this process: nothing to train.
  out = capfd.readouterr().out
  assert again["step"] == 2 and "already at step 2" in out, out
  final = [r["eval_loss"] for r in metrics(workdir) if "eval_loss" in r][-1]
  assert again["eval_loss"] == final  # The saved eval loss, not None (`jaxdp train` prints it).
  assert f"eval_loss {final:.4f}" in out


def test_library_messages_go_to_the_log_file_not_the_terminal(tiny_run):
  result = tiny_run[1]  # The session's canonical `jaxdp train` run (2 steps, an eval, a save).
  assert result.returncode == 0, result.stderr
  assert "absl" not in result.stderr and "WARNING" not in result.stderr, result.stderr


def test_a_second_run_on_the_same_workdir_is_refused_and_a_killed_run_leaves_no_lock(tmp_path):
  workdir = str(tmp_path)
  first = start("train", *TINY, "--config.num_steps=100000", "--config.log_every=1",
                "--workdir", workdir)
  try:
    assert wait_for(lambda: any(r.get("step", 0) >= 1 and "train_loss" in r for r in metrics(workdir)))
    second = run("train", *TINY, "--config.num_steps=3", "--workdir", workdir)
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and "is in use by another run (pid" in lines[0], second.stderr
    assert str(first.pid) in lines[0]
  finally:
    first.kill()  # SIGKILL: no chance to clean up.
    first.communicate()
  # The kernel dropped the dead run's lock: the next run just resumes (in this process; 2 steps,
  # as the other runs here that start afresh: one compiled program).
  assert train_here(workdir, allow_config_change=True, num_steps=2)["step"] >= 2


# Moments: start-up (imports, device setup), compilation, around the first step, mid-run, and
# mid-save (a checkpoint every step, so a late signal lands in or next to an orbax save).
MOMENTS = [("startup", signal.SIGINT, 0.3, 3), ("compile", signal.SIGINT, 1.5, 3),
           ("first_step", signal.SIGTERM, 3.0, 3), ("mid_run", signal.SIGINT, None, 3),
           ("mid_save", signal.SIGTERM, None, 1)]


@pytest.mark.parametrize("moment,sig,delay,checkpoint_every", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_a_signal_at_any_moment_exits_cleanly_and_leaves_a_usable_workdir(
    tmp_path, moment, sig, delay, checkpoint_every):
  workdir = str(tmp_path)
  proc = start("train", *TINY, "--config.num_steps=100000", "--config.log_every=1",
               f"--config.checkpoint_every={checkpoint_every}", "--workdir", workdir)
  if delay is None:  # Mid-run: once steps are being logged.
    assert wait_for(lambda: any(r.get("step", 0) >= 4 and "train_loss" in r for r in metrics(workdir)))
  else:
    time.sleep(delay)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=120)
  # 75: stopped and saved (config.preempt_exit_code); 130: before any state. Never a crash (< 0).
  assert proc.returncode in (75, 130), (proc.returncode, err[-2000:])
  assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
  if proc.returncode == 130:  # Stopped before any state existed: one line, nothing saved.
    assert err.strip().splitlines()[-1].startswith("jaxdp: interrupted"), err
  else:  # Stopped in the loop: saved, and said so.
    assert "stopped after step" in out + err
  if delay is None:
    assert proc.returncode == 75
  # The workdir is usable: the next run resumes it, or starts afresh (in this process).
  assert train_here(workdir, allow_config_change=True, num_steps=2)["step"] >= 2


def test_a_disk_that_fills_during_a_checkpoint_ends_with_one_line(tiny_run, tmpfs, fill):
  workdir = os.path.join(tmpfs, "run")
  shutil.copytree(tiny_run[0], workdir)  # A finished 2-step run (every step logged).
  fill(tmpfs)
  full = run("train", *TINY, "--config.num_steps=6", "--config.checkpoint_every=1",
             "--config.log_every=1", "--workdir", workdir)
  assert full.returncode == 2, full.stderr[-3000:]
  err = full.stderr.strip().splitlines()
  assert err[-1].startswith("jaxdp: error:") and "No space left on device" in err[-1], err[-5:]
  assert "Traceback" not in full.stderr and len(err) <= 3, full.stderr[-3000:]


def test_a_truncated_checkpoint_is_one_warning_line_and_the_run_resumes(tmp_path):
  workdir = str(tmp_path)
  train_here(workdir, num_steps=4, checkpoint_every=2)  # Checkpoints 2 and 4, in this process.
  files = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(workdir, "checkpoints", "4"))
           for name in names]
  biggest = max(files, key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  resumed = run("train", *TINY, "--config.num_steps=6", "--config.checkpoint_every=2",
                "--workdir", workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  err = resumed.stderr.strip().splitlines()
  warning = [line for line in err if "checkpoint step 4 is unreadable" in line]
  assert len(warning) == 1 and warning[0].startswith("jaxdp: warning:"), resumed.stderr[-3000:]
  assert len(err) <= 3 and "Traceback" not in resumed.stderr, resumed.stderr[-3000:]
  assert "resuming at step 2" in resumed.stdout


def test_resuming_with_another_optimizer_is_refused_not_restarted(tiny_run, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_run[0], workdir)  # A finished 2-step tiny_cpu run, as `run` trains it.
  changed = run("train", *TINY, "--config.num_steps=4", "--config.optimizer=sgd",
                "--workdir", workdir)
  assert changed.returncode == 2 and "optimizer ('adamw' -> 'sgd')" in changed.stderr, changed.stderr
  forced = run("train", *TINY, "--config.num_steps=4", "--config.optimizer=sgd",
               "--allow_config_change", "--workdir", workdir)
  assert forced.returncode == 2, forced.stderr[-2000:]
  assert "written with another optimizer" in forced.stderr.strip().splitlines()[-1]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # Nothing moved aside.


def test_a_run_too_big_for_memory_is_one_line_before_it_runs_and_the_workdir_stays_usable(tmp_path):
  workdir = str(tmp_path / "run")
  big = run("train", *TINY, "--config.seq_len=32768", "--config.global_batch_size=8",
            "--workdir", workdir)
  assert big.returncode == 2
  last = big.stderr.strip().splitlines()[-1]
  assert last.startswith("jaxdp: error: the train step needs") and "GiB per device" in last
  assert "remat" in last and "Traceback" not in big.stderr + big.stdout
  assert train_here(workdir, num_steps=2)["step"] == 2  # The fixed run, in this process.


def test_a_run_refused_at_validation_creates_no_workdir(tmp_path):
  workdir = tmp_path / "never"
  refused = run("train", *TINY, "--config.data.packing=doc", "--workdir", str(workdir))
  assert refused.returncode == 2 and "config.data.packing='doc'" in refused.stderr
  assert not workdir.exists()
