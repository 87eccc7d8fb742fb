"""A resume refused for a changed config writes nothing in the workdir (issue 31): no new
TensorBoard events file (the writer opens on the first record), no jaxdp.log lines (held until
the run passes the resume check), and the lock file left as it was."""

import os
import shutil
import subprocess
import sys

from conftest import TINY_RUN_FLAGS, cli_env


def snapshot(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_a_resume_refused_for_a_changed_config_leaves_the_workdir_byte_identical(tiny_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run[0], workdir)
  before = snapshot(workdir)
  assert any(name.startswith("events.out.tfevents") for name in before)
  done = subprocess.run([sys.executable, "-m", "jaxdp.cli.main", "train", *TINY_RUN_FLAGS,
                         "--config.seed=7", "--workdir", str(workdir)], capture_output=True,
                        text=True, env=cli_env(), timeout=600)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
  assert "different config: seed (0 -> 7)" in lines[0], lines
  assert "jaxdp.log" not in lines[0]  # No pointer to a log this run did not write.
  after = snapshot(workdir)
  assert sorted(after) == sorted(before)  # No new events file.
  assert {k: len(v) for k, v in after.items()} == {k: len(v) for k, v in before.items()}
  assert after == before
