"""A refused resume writes nothing in the workdir (issue 31): no new TensorBoard events file (the
writer opens on the first record), no jaxdp.log or metrics.jsonl lines (held until the run passes
the resume check), and the lock file left as it was, its times included. Each kind of refusal
met after the workdir is opened is tried: a changed config, a changed model, changed data, a
step that is not there, checkpoint shapes another model cannot take, and another
config.checkpoint_dir for a run that has checkpoints."""

import json
import os
import shutil
import subprocess
import sys

from conftest import TINY_RUN_FLAGS, cli_env

HERE = os.path.dirname(os.path.abspath(__file__))

# Each refused resume (flags after TINY_RUN_FLAGS) and what its one line says.
REFUSALS = [
    (["--config.seed=7"], "different config: seed (0 -> 7)"),
    (["--config.model.n_layer=3"], "different config: model.n_layer (2 -> 3)"),
    (["--config.data.path=OTHER"], "the data at config.data.path="),
    (["--restore_from=WORKDIR/checkpoints/99"], "--restore_from="),
    (["--config.model.d_model=64", "--allow_config_change"], "holds arrays of other shapes"),
    # Another place for the checkpoints of a run that has some: it would start again from step 0.
    (["--config.checkpoint_dir=WORKDIR-elsewhere"], "keeps its checkpoints in"),
]

# Runs each command line in this one process (the device count is the same for all), writing
# after each {"returncode", "stderr", "snapshot"}: every file and folder's size and times (ns).
DRIVER = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
from cli_inprocess import _run_one
workdir, commands = sys.argv[2], json.loads(sys.argv[3])

def snapshot():
  out = {}
  for root, dirs, names in os.walk(workdir):
    for name in dirs + names:
      st = os.lstat(os.path.join(root, name))
      out[os.path.relpath(os.path.join(root, name), workdir)] = [st.st_size, st.st_mtime_ns]
  return out

print(json.dumps({"snapshot": snapshot()}), flush=True)
for argv in commands:
  code, stderr = _run_one(argv)
  print(json.dumps({"returncode": code, "stderr": stderr, "snapshot": snapshot()}), flush=True)
"""


def contents(workdir):
  """{relative path: bytes} of every file under `workdir`."""
  out = {}
  for root, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_every_refused_resume_leaves_the_workdir_exactly_as_it_was(tiny_run, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(tiny_run[0], workdir)
  other = tmp_path / "other.txt"
  other.write_text("Some other text to train on, not the built-in corpus.\n" * 200)
  before = contents(workdir)
  assert any(name.startswith("events.out.tfevents") for name in before)
  assert ".jaxdp.lock" in before
  commands = [["train", *TINY_RUN_FLAGS, "--workdir", str(workdir),
               *(f.replace("OTHER", str(other)).replace("WORKDIR", str(workdir)) for f in flags)]
              for flags, _ in REFUSALS]
  done = subprocess.run([sys.executable, "-c", DRIVER, HERE, str(workdir), json.dumps(commands)],
                        capture_output=True, text=True, env=cli_env(), timeout=900)
  assert done.returncode == 0, done.stderr[-3000:]
  first, *results = (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
  assert len(results) == len(REFUSALS), done.stdout[-3000:]
  for (flags, said), result in zip(REFUSALS, results):
    lines = result["stderr"].strip().splitlines()
    assert result["returncode"] == 2 and len(lines) == 1, (flags, result["stderr"][-3000:])
    assert lines[0].startswith("jaxdp: error: ") and said in lines[0], (flags, lines)
    assert "jaxdp.log" not in lines[0]  # No pointer to a log this run did not write.
    # Names, sizes and modification times of every file and folder: nothing new, nothing touched.
    assert result["snapshot"] == first["snapshot"], flags
  assert contents(workdir) == before
