"""Readers of a live workdir (issue 30, kind 6): `jaxdp inspect`, `generate`, `export` and
`evaluate` against a run that saves every step and keeps one checkpoint see only committed
checkpoints, and a step its retention deletes while it is read is skipped or replaced by the
newest, never a traceback or a failure.
"""

import os
import subprocess
import sys
import time

import cli_inprocess
import pytest

from jaxdp.lm.run import load_step_for_inference
from jaxdp.runtime.checkpoint import Checkpointer, describe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
@pytest.mark.multiprocess
def test_readers_looping_against_a_run_saving_every_step_never_fail(tmp_path, capfd):
  workdir = str(tmp_path / "run")
  args = [sys.executable, "-m", "jaxdp.cli.main", "train", "--config", "tiny_cpu", "--cpu_devices", "2",
          "--workdir", workdir, "--progress=false", "--config.num_steps=60",
          "--config.checkpoint_every=1", "--config.keep_last=1", "--config.log_every=10",
          "--config.eval_every=0"]
  run = subprocess.Popen(args, env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.time() + 300
    while not os.path.isdir(os.path.join(workdir, "checkpoints")) or \
        not Checkpointer(workdir, create=False).all_steps():
      assert run.poll() is None, run.communicate()[1][-2000:]
      assert time.time() < deadline, "no checkpoint within 300 s"
      time.sleep(0.2)
    reads, seen = 0, set()
    while run.poll() is None:
      listed = describe(workdir)  # What `jaxdp inspect` shows.
      assert listed and all(d["arrays"] for d in listed)
      step, params, _, _ = load_step_for_inference(workdir)  # generate's, export's, evaluate's.
      assert params is not None
      seen.add(step)
      done = cli_inprocess.run(capfd, "inspect", workdir)
      assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
      reads += 1
    assert run.wait(timeout=300) == 0, run.stderr.read()[-2000:] if run.stderr else ""
    assert reads >= 2 and len(seen) >= 2, (reads, seen)  # Really read while steps were replaced.
  finally:
    if run.poll() is None:
      run.kill()
      run.wait()
