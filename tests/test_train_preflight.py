"""`jaxdp train` (and `train_and_evaluate`) refuse every bad input before anything is written
(issue 31): one line `jaxdp: error: ...` naming the flag or field the user gave, exit status 2,
no file created or touched in the workdir, and advice that works when followed (each test runs
it). Refusals and the runs that follow the advice run in this process (tests/cli_inprocess.py)
on its 8 emulated devices; one finished run (checkpoints 2 and 4) is trained once per module
and copied where a test changes it."""

import json
import os
import re
import shlex
import shutil

from cli_inprocess import run
import jax
import pytest

from jaxdp.cli import main as cli_main
from jaxdp.errors import JaxdpError
from jaxdp.lm import train_and_evaluate
from jaxdp.lm.config import load_preset

# A tiny run: 4 steps, checkpoints at 2 and 4, one evaluation batch.
TRAIN = ["train", "--config", "tiny_cpu", "--cpu_devices", "8", "--progress=false",
         "--config.checkpoint_every=2", "--config.eval_steps=1", "--config.log_every=2"]


def snapshot(root):
  """{path: (size, mtime_ns)} of every file, folder and link under `root`, and the bytes of
  every file: a refused command must leave all of it as it was."""
  out = {}
  for folder, dirs, names in os.walk(root):
    for name in dirs + names:
      path = os.path.join(folder, name)
      st = os.lstat(path)
      content = None
      if os.path.isfile(path) and not os.path.islink(path):
        with open(path, "rb") as f:
          content = f.read()
      out[os.path.relpath(path, root)] = (st.st_size, st.st_mtime_ns, content)
  return out


def train(capfd, *flags):
  return run(capfd, *TRAIN, *flags)


def refused(result, *named):
  """The one error line of a refused command (exit 2, no traceback), which names `named`."""
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error: "), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  for text in named:
    assert text in lines[0], (text, lines[0])
  return lines[0]


def trained(result):
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def events(workdir, kind):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r.get("event") == kind]


def steps(workdir):
  return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
  """A finished 4-step run (checkpoints 2 and 4), trained once for the module."""
  workdir = tmp_path_factory.mktemp("trained") / "run2"
  trained(run(None, *TRAIN, "--config.num_steps=4", "--workdir", str(workdir)))
  assert steps(workdir) == [2, 4]
  return str(workdir)


@pytest.fixture
def here(run2, tmp_path, monkeypatch):
  """tmp_path as the working directory, holding a copy of the finished run as run2/."""
  shutil.copytree(run2, tmp_path / "run2")
  monkeypatch.chdir(tmp_path)
  return tmp_path


# ---- 1. a step directory given as --workdir ----------------------------------------------------

def test_a_step_directory_as_workdir_with_later_checkpoints_names_workdir_and_the_fix_that_works(
    here, capfd):
  before = snapshot(here)
  line = refused(train(capfd, "--workdir", "run2/checkpoints/2", "--config.num_steps=6"),
                 "--workdir='run2/checkpoints/2'", "later checkpoints")
  assert not line.startswith("jaxdp: error: --restore_from"), line  # The user never gave it.
  assert snapshot(here) == before
  # The advice: a new workdir that starts from step 2.
  fix = shlex.split(re.search(r"(--workdir \S+ --restore_from \S+)", line).group(1))
  assert fix[-1] == "run2/checkpoints/2", line
  trained(train(capfd, *fix, "--config.num_steps=6"))
  assert [e["step"] for e in events(fix[1], "resume")] == [2]
  assert steps(fix[1]) == [4, 6]


# ---- 2. --restore_from checked before anything is written --------------------------------------

def test_a_restore_from_that_is_no_checkpoint_step_is_refused_before_anything_is_written(
    here, capfd):
  (here / "afile").write_text("x")
  os.symlink("nowhere", here / "dangle")
  before = snapshot(here)
  advised = set()
  for given in ["run2", "run2/checkpoints/", "run2/checkpoints/3", "afile", "dangle",
                "afile/4"]:
    line = refused(train(capfd, "--workdir", "rA", "--restore_from", given,
                         "--config.num_steps=6"), f"--restore_from={given!r}")
    assert snapshot(here) == before, given  # No rA/, no lock, no checkpoints/, no tokenizer/.
    if given.startswith("run2"):  # A run, its checkpoints/, a missing step: its steps named.
      advised.add(re.search(r"e\.g\. --restore_from=(\S+)", line).group(1))
  config = load_preset("tiny_cpu")
  config.num_steps = 6
  with pytest.raises(JaxdpError, match=r"--restore_from='run2/checkpoints/3'"):
    train_and_evaluate(config, "rA", restore_from="run2/checkpoints/3", progress=False)
  assert snapshot(here) == before
  # Every step-less form points at the run's latest step, and that works.
  assert advised == {os.path.join("run2", "checkpoints", "4")}, advised
  trained(train(capfd, "--workdir", "rA", "--restore_from", advised.pop(), "--config.num_steps=6"))
  assert [e["step"] for e in events("rA", "resume")] == [4] and steps("rA") == [6]


# ---- 3. a changed shape: advice that works ------------------------------------------------------

def test_a_changed_model_shape_is_refused_with_advice_that_works_not_allow_config_change(
    here, capfd):
  before = snapshot(here)
  start = ["--workdir", "rE", "--restore_from", "run2/checkpoints/4", "--config.num_steps=6"]
  for extra in ([], ["--allow_config_change"]):
    line = refused(train(capfd, *start, "--config.model.n_layer=3", *extra),
                   "model.n_layer (2 -> 3)", "--config.model.n_layer=2", "without --restore_from")
    assert "add --allow_config_change" not in line, line
    assert snapshot(here) == before
  # Resumed with the checkpoint's config, from its step.
  trained(train(capfd, *start, "--config.model.n_layer=2"))
  assert [e["step"] for e in events("rE", "resume")] == [4] and steps("rE") == [6]
  # Or afresh with the new shape: a new workdir, no --restore_from.
  trained(train(capfd, "--workdir", "rE3", "--config.num_steps=2", "--config.model.n_layer=3"))
  assert [e["step"] for e in events("rE3", "start")] == [0]


def test_a_plain_resume_offers_allow_config_change_only_for_fields_that_can_change(here, capfd):
  before = snapshot(here)
  line = refused(train(capfd, "--workdir", "run2", "--config.num_steps=6",
                       "--config.model.n_layer=3", "--config.seed=7"),
                 "model.n_layer (2 -> 3)", "seed (0 -> 7)", "--config.model.n_layer=2",
                 "--config.seed=0", "a new --workdir")
  assert "add --allow_config_change" not in line and "--restore_from" not in line, line
  line = refused(train(capfd, "--workdir", "run2", "--config.num_steps=6", "--config.seed=7"),
                 "seed (0 -> 7)", "add --allow_config_change")
  assert snapshot(here) == before
  trained(train(capfd, "--workdir", "run2", "--config.num_steps=6", "--config.seed=7",
                "--allow_config_change"))
  assert steps("run2")[-1] == 6


# ---- 4, 5. config.checkpoint_dir that can never be a folder -------------------------------------

def test_an_unusable_checkpoint_dir_is_refused_naming_it_before_anything_is_written(here, capfd):
  (here / "afile").write_text("x")
  os.symlink("nowhere", here / "dangle")
  before = snapshot(here)
  for given, said in [("afile", "is a file"), ("dangle", "which does not exist"),
                      ("afile/sub", "which is a file")]:
    refused(train(capfd, "--workdir", "d6", f"--config.checkpoint_dir={given}"),
            f"config.checkpoint_dir={given!r}", said)
    assert snapshot(here) == before, given
  config = load_preset("tiny_cpu")
  config.checkpoint_dir = "dangle"
  with pytest.raises(JaxdpError, match="config.checkpoint_dir='dangle' is a symlink"):
    train_and_evaluate(config, "d7", progress=False)
  assert snapshot(here) == before
  os.remove("dangle")  # The advice: remove the link (or give the directory itself).
  trained(train(capfd, "--workdir", "d7", "--config.num_steps=2", "--config.checkpoint_dir=dangle"))
  assert "2" in os.listdir("dangle")  # The checkpoints went where config.checkpoint_dir says.


# ---- 6. a field that can have no effect ----------------------------------------------------------

def test_profile_steps_past_num_steps_is_refused_and_both_fixes_are_accepted(here, capfd,
                                                                             monkeypatch):
  before = snapshot(here)
  line = refused(train(capfd, "--workdir", "p", "--config.num_steps=4",
                       "--config.profile_steps=10:20"),
                 "config.profile_steps='10:20'", "no effect", "config.num_steps=4")
  assert snapshot(here) == before
  fixes = re.findall(r"--config\.(?:profile_steps|num_steps)=[\d:]+", line.split("no effect")[1])
  assert any(f.startswith("--config.profile_steps=") for f in fixes), line
  assert any(f.startswith("--config.num_steps=") for f in fixes), line
  seen = []
  monkeypatch.setattr(cli_main.MODULES["train"], "run", lambda args: seen.append(args) or 0)
  for fix in fixes:  # Each accepted by the schema (the run itself is stubbed out).
    flags = ["--config.num_steps=4", "--config.profile_steps=10:20", fix]
    assert run(capfd, *TRAIN, "--workdir", "p", *flags).returncode == 0, fix
  assert len(seen) == len(fixes)


# ---- 7. a --restore_from checkpoint already at num_steps -----------------------------------------

def test_a_restore_from_at_num_steps_into_a_new_workdir_is_refused_not_a_workdir_without_checkpoint(
    here, capfd):
  before = snapshot(here)
  line = refused(train(capfd, "--workdir", "ab sé", "--config.num_steps=4", "--restore_from",
                       "run2/checkpoints/4"),
                 "--restore_from='run2/checkpoints/4'", "config.num_steps=4",
                 "raise --config.num_steps")
  assert snapshot(here) == before
  above = int(re.search(r"raise --config.num_steps above (\d+)", line).group(1))
  assert above == 4, line
  trained(train(capfd, "--workdir", "ab sé", "--config.num_steps=6", "--restore_from",
                "run2/checkpoints/4"))
  assert steps("ab sé") == [6]
  # The new workdir resumes from its own checkpoint, not from step 0.
  out = trained(train(capfd, "--workdir", "ab sé", "--config.num_steps=6"))
  assert "already at step 6" in out


# ---- 8. config.init_from on a resume ----------------------------------------------------------

def test_init_from_other_than_the_checkpoints_own_is_refused_and_the_same_one_resumes(
    here, capfd):
  from jaxdp.lm.hf_export import export
  llama = ["--config.model.family=llama"]
  trained(train(capfd, "--workdir", "src", "--config.num_steps=2", *llama))
  export("src", "hf1")
  shutil.copytree("src", "hz")  # A checkpoint trained without init_from.
  before = snapshot(here)
  line = refused(train(capfd, "--workdir", "hz", "--config.num_steps=4", *llama,
                       "--config.init_from=hf:hf1"),
                 "config.init_from='hf:hf1'", "a fresh --workdir", "drop --config.init_from")
  assert "started from random weights" in line and "--restore_from" not in line, line
  assert snapshot(here) == before
  # Dropped: hz resumes its own checkpoint.
  trained(train(capfd, "--workdir", "hz", "--config.num_steps=4", *llama))
  assert [e["step"] for e in events("hz", "resume")] == [2]
  # A fresh workdir starts from it; resumed with the same init_from, it goes on silently.
  trained(train(capfd, "--workdir", "hf-run", "--config.num_steps=2", *llama,
                "--config.init_from=hf:hf1"))
  result = train(capfd, "--workdir", "hf-run", "--config.num_steps=4", *llama,
                 "--config.init_from=hf:hf1")
  trained(result)
  assert "jaxdp: error" not in result.stderr and steps("hf-run") == [2, 4]


# ---- 9. every path flag of every subcommand given as '' -----------------------------------------

def test_every_path_flag_of_every_subcommand_refuses_an_empty_path(capfd, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  for module in cli_main.MODULES.values():  # A flag accepted here fails the test.
    monkeypatch.setattr(module, "run", lambda args: pytest.fail(f"accepted: {args}"))
  required = {"launch": ["--nprocs", "2"], "replay": ["--step", "1"]}
  walked = []
  for name, module in sorted(cli_main.MODULES.items()):
    for flag in module.COMMAND.flags:
      if not flag.path:
        continue
      for empty in ("", " "):
        argv = [name, *required.get(name, []), f"--{flag.name}={empty}"]
        if name == "launch":
          argv += ["--", "train"]
        line = refused(run(capfd, *argv), f"--{flag.name}={empty!r} is empty")
        assert "Traceback" not in line
      walked.append(f"{name} --{flag.name}")
  assert os.listdir(tmp_path) == []
  # The path flags a user reported, and one of each kind, are among them.
  assert {"train --restore_from", "train --workdir", "export --out", "plot --out",
          "prepare --out"} <= set(walked), walked


# ---- 10. a run with nothing to train -------------------------------------------------------

def test_a_run_already_at_num_steps_writes_nothing(here, capfd):
  before = snapshot(here)
  out = trained(train(capfd, "--workdir", "run2", "--config.num_steps=4"))
  assert "already at step 4; nothing to train" in out and "eval_loss" in out
  assert snapshot(here) == before


def test_the_api_refuses_like_the_command_line_on_jax_devices(here):
  config = load_preset("tiny_cpu")
  config.num_steps = 4
  before = snapshot(here)
  with pytest.raises(JaxdpError, match="would train nothing"):
    train_and_evaluate(config, "fresh", restore_from="run2/checkpoints/4",
                       devices=jax.devices()[:2], progress=False)
  with pytest.raises(JaxdpError, match="--restore_from='' is empty"):  # Not "start afresh".
    train_and_evaluate(config, "fresh", restore_from="", devices=jax.devices()[:2],
                       progress=False)
  assert snapshot(here) == before


def test_fits_own_restore_refuses_later_checkpoints_in_the_pre_flights_words(here):
  """A `fit` caller (runtime/loop.restore) and `jaxdp train` (lm/preflight) give one refusal,
  built in one place (runtime/paths.later_checkpoints_error), with the same working advice."""
  from jaxdp.lm import preflight
  from jaxdp.runtime import loop
  from jaxdp.runtime.checkpoint import Checkpointer
  config = load_preset("tiny_cpu")
  with pytest.raises(JaxdpError) as by_preflight:
    preflight.check_paths(config, "run2", "run2/checkpoints/2")
  checkpoints = Checkpointer("run2", create=False)
  try:
    with pytest.raises(JaxdpError) as by_fit:  # Refused before the state or record is needed.
      loop.restore(checkpoints, None, None, restore_from="run2/checkpoints/2", workdir="run2")
  finally:
    checkpoints.close()
  assert str(by_fit.value) == str(by_preflight.value)
  assert "--workdir='run2' already has checkpoints at steps 4" in str(by_fit.value)
  assert "--workdir run2-from-2 --restore_from run2/checkpoints/2 (or --workdir run2 alone to " \
         "resume its latest step, 4)" in str(by_fit.value)
