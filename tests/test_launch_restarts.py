"""`jaxdp launch` that restarts and never orphans, and Ctrl-C at any moment of any command.

- `--max_restarts`: a worker killed (SIGKILL, by the test hook JAXDP_TEST_DIE_AT_STEP) mid-run;
  the launcher stops the other, restarts the run from its last checkpoint, and it ends with final
  parameters bitwise equal to a straight run (config.reduction="fixed_order", so the 1-device
  reference of this process stands for every device count); with `--min_nprocs 1`, a second
  kill before any new checkpoint moves the run to one process, still bitwise.
- `kill -9` of the launcher: every worker is gone within 10 s, and the workdir is free again.
- SIGINT from the first instant on: exit status 130, one line, no traceback.

Multi-process (the slow tier): each launched run is tiny_cpu, 8 steps, one CPU device per process.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

from conftest import cli_env
import jax
import numpy as np
import pytest

from jaxdp.lm import config as lm_config
from jaxdp.lm import load_for_inference, train_and_evaluate
from jaxdp.runtime.lock import WorkdirLock
from jaxdp.runtime.metrics import read_metrics

# XLA's default optimisations: restarts on fewer processes end bitwise (tests/conftest.py).
pytestmark = [pytest.mark.multiprocess, pytest.mark.default_xla]

NUM_STEPS = 8
OVERRIDES = {"num_steps": NUM_STEPS, "checkpoint_every": 2, "eval_every": 0, "log_every": 1,
             "reduction": "fixed_order"}
TRAIN = ["train", "--config", "tiny_cpu", "--progress=false",
         *[f"--config.{k}={v}" for k, v in OVERRIDES.items()]]
# Process 1 dies before step 6: the checkpoint of step 2 is complete by then (the save of step 4
# waits for it), so the first attempt has made progress.
DIES_MID_RUN = "1:6"


def jaxdp_cli(*args):
  return [sys.executable, "-m", "jaxdp.cli.main", *args]


def params_bits(workdir):
  """The latest checkpoint's parameters as raw bytes, by path."""
  params, _, _ = load_for_inference(str(workdir))
  leaves = jax.tree_util.tree_leaves_with_path(params)
  return {jax.tree_util.keystr(path): np.asarray(leaf).tobytes() for path, leaf in leaves}


def last_losses(workdir):
  """{step: train_loss} of a run's metrics.jsonl, the last record of each step (a restarted run
  logs the steps after its checkpoint again)."""
  return {r["step"]: r["train_loss"] for r in read_metrics(str(workdir)) if "train_loss" in r}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """The run without failures, in this process on one device: (params bits, losses)."""
  workdir = tmp_path_factory.mktemp("straight")
  config = lm_config.load_preset("tiny_cpu")
  for key, value in OVERRIDES.items():
    setattr(config, key, value)
  train_and_evaluate(config, str(workdir), devices=jax.devices()[:1], progress=False)
  return params_bits(workdir), last_losses(workdir)


def launch(workdir, *flags, die):
  run = subprocess.run(
      jaxdp_cli("launch", "--nprocs", "2", "--cpu_devices", "1", *flags, "--", *TRAIN,
                "--workdir", str(workdir)),
      capture_output=True, text=True, env=dict(cli_env(), JAXDP_TEST_DIE_AT_STEP=die), timeout=900)
  print(run.stderr[-2000:])
  return run


def starts(output):
  """[(number of processes, restart number)] of each start the launcher announced."""
  return [(int(n), int(r or 0)) for n, r in
          re.findall(r"jaxdp launch: (\d+) processes \(pids [\d, ]+\), coordinator [\d.:]+"
                     r"(?:, restart (\d+))?", output)]


def test_a_killed_worker_is_restarted_and_the_run_ends_bitwise_as_if_it_never_failed(
    straight, tmp_path):
  run = launch(tmp_path / "run", "--max_restarts", "1", die=DIES_MID_RUN)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert starts(run.stdout) == [(2, 0), (2, 1)]
  assert re.search(r"jaxdp launch: restart 1 of 1: process 1 \(pid \d+\) was killed by SIGKILL: .*; "
                   r"resuming from step [24]\n", run.stderr), run.stderr
  assert "[0] done: step 8" in run.stdout and "[1] done: step 8" in run.stdout
  want_params, want_losses = straight
  assert params_bits(tmp_path / "run") == want_params  # Every byte of every parameter.
  assert last_losses(tmp_path / "run") == want_losses


def test_a_worker_that_dies_again_before_any_checkpoint_moves_the_run_to_fewer_processes(
    straight, tmp_path):
  # Attempt 0 dies mid-run (after a checkpoint: restarted on 2), attempt 1 before its first step
  # (no new checkpoint: restarted on 1, the floor).
  run = launch(tmp_path / "run", "--max_restarts", "2", "--min_nprocs", "1",
               die=f"{DIES_MID_RUN},1:1:1")
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
  assert starts(run.stdout) == [(2, 0), (2, 1), (1, 2)]
  assert re.search(r"restart 1 of 2: process 1 \(pid \d+\) was killed by SIGKILL: .*; resuming "
                   r"from step [24]\n", run.stderr), run.stderr
  assert re.search(r"restart 2 of 2: process 1 \(pid \d+\) was killed by SIGKILL: .*; resuming "
                   r"from step [24]; no new checkpoint since the last start: continuing on 1 "
                   r"process\(es\) instead of 2\n", run.stderr), run.stderr
  assert "[0] done: step 8" in run.stdout
  resumed = [r for r in read_metrics(str(tmp_path / "run")) if r.get("event") == "resume"]
  assert resumed[-1]["num_devices"] == 1  # The last attempt: one process of one device.
  want_params, want_losses = straight
  assert params_bits(tmp_path / "run") == want_params
  assert last_losses(tmp_path / "run") == want_losses


def test_bad_input_in_a_worker_is_not_restarted(tmp_path):
  run = subprocess.run(
      jaxdp_cli("launch", "--nprocs", "2", "--cpu_devices", "1", "--max_restarts", "3", "--",
                "train", "--config", "tiny_cpu", "--config.global_batch_size=3",
                "--workdir", str(tmp_path / "run")),
      capture_output=True, text=True, env=cli_env(), timeout=600)
  assert run.returncode == 2, run.stdout[-3000:] + run.stderr[-3000:]
  assert len(starts(run.stdout)) == 1
  assert "not restarted: bad input fails the same way again" in run.stderr, run.stderr


def _alive(pid):
  """Whether any thread of `pid` still runs. A zombie (dead, not yet reaped by its new parent)
  does not; but a process whose main thread has exited while another thread is still being torn
  down shows its main thread as a zombie too, and still holds its files (the workdir lock)."""
  try:
    tasks = os.listdir(f"/proc/{pid}/task")
  except FileNotFoundError:
    return False
  for task in tasks:
    try:
      with open(f"/proc/{pid}/task/{task}/stat") as f:
        if f.read().rsplit(")", 1)[1].split()[0] != "Z":
          return True
    except (FileNotFoundError, ProcessLookupError):
      pass
  return False


def test_kill_9_of_the_launcher_ends_every_worker_within_seconds(tmp_path):
  workdir, log = tmp_path / "run", tmp_path / "launch.out"
  with open(log, "w") as out:
    launcher = subprocess.Popen(
        jaxdp_cli("launch", "--nprocs", "2", "--cpu_devices", "1", "--", "train", "--config",
                  "tiny_cpu", "--progress=false", "--config.num_steps=5000",
                  "--config.eval_every=0", "--config.log_every=1", "--workdir", str(workdir)),
        stdout=out, stderr=subprocess.STDOUT, env=cli_env())
  pids = []
  try:
    deadline = time.monotonic() + 300
    while "step 1/" not in log.read_text():  # Mid-run: after the first step.
      assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
      time.sleep(0.2)
    pids = [int(p) for p in re.search(r"pids ([\d, ]+)", log.read_text()).group(1).split(", ")]
    launcher.kill()
    launcher.wait()
    killed = time.monotonic()
    while any(map(_alive, pids)) and time.monotonic() - killed < 10:
      time.sleep(0.05)
    gone_s = time.monotonic() - killed
  finally:
    for pid in pids:
      if _alive(pid):
        os.kill(pid, signal.SIGKILL)
  print(f"workers gone {gone_s:.2f} s after kill -9 of the launcher")
  assert not any(map(_alive, pids)), "a worker outlived its launcher by 10 s"
  lines = (workdir / "jaxdp.log").read_text()
  for pid in pids:  # Each said why, in the run's log (its stderr went to the dead launcher).
    assert (f"the launcher (pid {launcher.pid}) is gone; process pid {pid} stops without saving "
            "(exit status 129)") in lines
  with WorkdirLock(str(workdir)):  # A rerun is not refused: nobody holds the workdir.
    pass


SIGINT_MOMENTS = (0.0, 0.05, 0.1, 0.2, 0.5)


def interrupted(command, delay, tmp_path, block=True):
  """Starts `command`, sends it SIGINT after `delay` s; (status, stderr).

  `block`: the process starts with SIGINT blocked (as `jaxdp launch` starts its workers), so
  that a signal sent while Python itself starts (before any jaxdp code runs: the interpreter,
  site and the environment's .pth files) waits for jaxdp's handler; jaxdp owns every moment
  after that."""
  old = signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT]) if block else None
  try:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=cli_env(), cwd=tmp_path)
  finally:
    if block:
      signal.pthread_sigmask(signal.SIG_SETMASK, old)
  time.sleep(delay)
  process.send_signal(signal.SIGINT)
  _, stderr = process.communicate(timeout=300)
  return process.returncode, stderr


def console_script():
  path = os.path.join(os.path.dirname(sys.executable), "jaxdp")
  return [path] if os.path.exists(path) else None


@pytest.mark.parametrize("entry", ["module", "console_script"])
def test_ctrl_c_at_any_early_moment_exits_130_without_a_traceback(entry, tmp_path):
  prefix = jaxdp_cli() if entry == "module" else console_script()
  if prefix is None:
    pytest.skip("the console script `jaxdp` is not installed next to this Python")
  train = [*prefix, "train", "--config", "tiny_cpu", "--config.num_steps=2", "--progress=false",
           "--cpu_devices=1", "--workdir", str(tmp_path / "run")]
  results = {delay: interrupted(train, delay, tmp_path) for delay in SIGINT_MOMENTS}
  results["1.0, SIGINT not blocked"] = interrupted(train, 1.0, tmp_path, block=False)
  for when, (status, stderr) in results.items():
    print(when, status, stderr.strip().splitlines()[-1:])
    assert status == 130 and "Traceback" not in stderr and "Exception ignored" not in stderr, \
        (when, status, stderr[-3000:])
    assert "jaxdp: interrupted" in stderr


@pytest.mark.parametrize("command", [
    ["plan", "--config", "tiny_cpu"],
    ["launch", "--nprocs", "2", "--cpu_devices", "1", "--", "train", "--config", "tiny_cpu"]],
    ids=["plan", "launch"])
def test_ctrl_c_early_in_other_commands_exits_130_without_a_traceback(command, tmp_path):
  if command[0] == "launch":
    command = [*command, "--workdir", str(tmp_path / "run")]
  for delay in (0.3, 1.5):
    status, stderr = interrupted(jaxdp_cli(*command), delay, tmp_path)
    print(command[0], delay, status, stderr.strip().splitlines()[-1:])
    assert status == 130 and "Traceback" not in stderr and "Exception ignored" not in stderr, \
        (delay, status, stderr[-3000:])


def test_restart_flags_are_checked_before_anything_starts(capfd):
  from cli_inprocess import run
  base = ["launch", "--nprocs", "2"]
  tail = ["--", "train", "--config", "tiny_cpu"]
  result = run(capfd, *base, "--min_nprocs", "3", "--max_restarts", "1", *tail)
  assert result.returncode == 2
  assert "jaxdp: error: --min_nprocs=3 must be between 1 and --nprocs=2" in result.stderr
  result = run(capfd, *base, "--min_nprocs", "1", *tail)
  assert result.returncode == 2
  assert "--min_nprocs=1 only applies on a restart; give --max_restarts R > 0 too" in result.stderr
  result = run(capfd, *base, "--max_restarts", "-1", *tail)
  assert result.returncode == 2 and "--max_restarts" in result.stderr


def test_a_restart_resumes_from_the_workdir_not_from_restore_from():
  from jaxdp.runtime.launch import _without_restore_from
  command = ["train", "--restore_from", "a/checkpoints/4", "--workdir", "w",
             "--restore_from=b/checkpoints/2", "--config", "tiny_cpu"]
  assert _without_restore_from(command) == ["train", "--workdir", "w", "--config", "tiny_cpu"]


def test_latest_checkpoint_counts_only_complete_steps(tmp_path):
  from jaxdp.runtime.launch import latest_checkpoint
  assert latest_checkpoint(str(tmp_path)) is None
  for name in ("2", "4", "6.orbax-checkpoint-tmp-1234", "notes"):
    os.makedirs(tmp_path / "checkpoints" / name)
  assert latest_checkpoint(str(tmp_path)) == 4
  shutil.rmtree(tmp_path / "checkpoints")
  assert latest_checkpoint(None) is None


def test_the_failure_blamed_is_the_cause_not_its_consequences():
  from types import SimpleNamespace

  from jaxdp.runtime.launch import _blame

  def ended(status):
    return SimpleNamespace(popen=SimpleNamespace(returncode=status))
  # Killed from outside, then bad input (its peers abort when the coordinator leaves), then
  # JAX's abort of a process whose peer is gone, then any other status (a lost peer's exit 3).
  ranked = sorted([ended(3), ended(-signal.SIGABRT), ended(2), ended(-signal.SIGKILL)], key=_blame)
  assert [p.popen.returncode for p in ranked] == [-signal.SIGKILL, 2, -signal.SIGABRT, 3]


def test_launcher_clauses_follow_an_error_line_without_double_punctuation():
  from jaxdp.runtime.launch import clause
  line = "process 1 (pid 7) exited with status 1: F1207 coordination service ... Exiting."
  assert f"{clause(line)}; stopped the other 1 process(es)".endswith("Exiting; stopped the other 1 process(es)")
  assert clause("jaxdp: error: config.lr=-1 must be positive") == "jaxdp: error: config.lr=-1 must be positive"
  assert clause("waiting...") == "waiting..."  # An ellipsis is not a sentence's end.
  assert clause("done.  ") == "done"
  for ending in ".", "!", "?", ";", ":", ",", ". ;":
    assert clause(f"Aborting{ending}") == "Aborting", ending


@pytest.mark.parametrize("ending", [".", ""])
def test_a_failing_workers_message_has_one_clause_per_fact(ending, monkeypatch, capfd):
  """The launcher's lines about a failed worker, exactly: the worker's own error line (its
  closing punctuation dropped, never "Exiting.; stopped"), then each clause the launcher adds.
  The workers are stand-ins (a Python one-liner each), so only the launcher's wording is tested."""
  from jaxdp.runtime import launch

  def child(command, process_id, nprocs, port, cpu_devices):
    # Launched children start with the forwarded signals blocked (jaxdp's CLI unblocks them).
    script = ("import signal, sys, time\n"
              "signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])\n"
              f"if {process_id} == 1: print('jaxdp: error: the shard is gone. Exiting{ending}'); sys.exit(1)\n"
              "time.sleep(60)\n")
    return [sys.executable, "-c", script]
  monkeypatch.setattr(launch, "child_command", child)
  capfd.readouterr()
  assert launch.launch(2, ["train"], max_restarts=1) == 1
  lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("jaxdp launch:")]
  failed = r"process 1 \(pid \d+\) exited with status 1: jaxdp: error: the shard is gone\. Exiting"
  assert len(lines) == 2, lines
  assert re.fullmatch(rf"jaxdp launch: restart 1 of 1: {failed}; stopped the other 1 process\(es\); "
                      r"resuming from the start \(no checkpoint yet\)", lines[0]), lines[0]
  assert re.fullmatch(rf"jaxdp launch: {failed}; stopped the other 1 process\(es\); "
                      r"no restarts left \(--max_restarts=1\)", lines[1]), lines[1]
