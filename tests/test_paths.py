"""A run given in every form a user writes it (the workdir, its checkpoints/, a step directory,
relative or absolute, through a symlink, with spaces and non-ASCII characters) works for every
subcommand that takes a run, through one resolver (jaxdp.runtime.paths); impossible paths are
one line each. Resolution happens while parsing, so most of this runs with each subcommand's
`run` stubbed (no device work); a few forms then run for real on the session's `tiny_run`."""

import json
import os
import shutil

from cli_inprocess import run
import pytest
from test_schema import stub_run

from jaxdp.cli import main as cli_main
from jaxdp.errors import JaxdpError
from jaxdp.runtime.paths import resolve_run

STEP = 2  # conftest.TINY_RUN_FLAGS trains 2 steps and checkpoints at the end.


@pytest.fixture(scope="module")
def forms(tiny_run, tmp_path_factory):
  """(cwd, {form name: (path as the user types it, the step it names or None)}, the run's
  real path). The run is copied under a folder with a space and non-ASCII characters; a symlink
  with the same kind of name points at it."""
  base = tmp_path_factory.mktemp("forms")
  real = base / "my runs ü" / "run 1"
  shutil.copytree(tiny_run[0], real)
  link = base / "link ü"
  os.symlink(real, link)
  step = os.path.join(real, "checkpoints", str(STEP))
  table = {
      "workdir, absolute": (str(real), None),
      "workdir, relative": (os.path.join("my runs ü", "run 1"), None),
      "workdir, trailing slash": (str(real) + "/", None),
      "checkpoints/": (os.path.join(real, "checkpoints"), None),
      "checkpoints/, relative": (os.path.join("my runs ü", "run 1", "checkpoints") + "/", None),
      "step directory": (step, STEP),
      "step directory, relative": (os.path.relpath(step, base), STEP),
      "symlink to the workdir": (str(link), None),
      "step directory through a symlink": (os.path.join(link, "checkpoints", str(STEP)), STEP),
  }
  return str(base), table, os.path.realpath(real)


def argv_for(command, path, out):
  return {
      "inspect": ["inspect", path],
      "plot": ["plot", path, "--out", os.path.join(out, "p.png")],
      "generate": ["generate", "--workdir", path],
      "export": ["export", "--workdir", path, "--out", os.path.join(out, "hf")],
      "evaluate": ["evaluate", "--workdir", path, "--text", "t.txt"],
      "replay": ["replay", "--workdir", path, "--step", "1"],
      "train": ["train", "--workdir", path],
      "plan": ["plan", "--advise", "--workdir", path],
      "stacks": ["stacks", "--workdir", path],
  }[command]


RUN_COMMANDS = ("inspect", "plot", "generate", "export", "evaluate", "replay", "train", "plan",
                "stacks")


def test_every_subcommand_that_takes_a_run_is_covered():
  takers = {name for name, m in cli_main.MODULES.items()  # Other path kinds are no run.
            if m.COMMAND.positional_path
            or any(f.path in ("run", "workdir") for f in m.COMMAND.flags)}
  assert takers == set(RUN_COMMANDS) & set(cli_main.MODULES)


@pytest.mark.parametrize("command", RUN_COMMANDS)
def test_every_form_resolves_to_the_run_and_its_step(forms, monkeypatch, capfd, command):
  if command not in cli_main.MODULES:
    pytest.skip(f"no `jaxdp {command}` here")
  cwd, table, real = forms
  monkeypatch.chdir(cwd)
  seen = []
  module = cli_main.MODULES[command]
  monkeypatch.setattr(module, "run", stub_run(module, lambda args: seen.append(args) or 0))
  with open(os.path.join(cwd, "t.txt"), "w") as f:
    f.write("some text\n")
  for form, (path, step) in table.items():
    seen.clear()
    result = run(capfd, *argv_for(command, path, cwd))
    assert result.returncode == 0, (form, result.stderr)
    args = seen[0]
    workdir = args.positional[0] if command in ("inspect", "plot") else args.workdir
    assert os.path.realpath(workdir) == real, (form, workdir)
    if command in ("inspect", "plot"):
      assert args.positional_steps == [step], form
    elif command == "train":
      assert (args.restore_from is not None) == (step is not None), form
      if step is not None:
        assert os.path.realpath(args.restore_from) == os.path.join(real, "checkpoints", str(step))
    elif command not in ("replay", "plan", "stacks"):  # No checkpoint to pick (replay: a step).
      assert args.step == step, form


@pytest.mark.parametrize("command", ["inspect", "plot", "generate", "export", "evaluate", "train"])
def test_impossible_paths_are_one_line(tmp_path, monkeypatch, capfd, command):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "notes.txt").write_text("x")
  (tmp_path / "t.txt").write_text("some text\n")  # evaluate's --text, read before --workdir.
  os.symlink(tmp_path / "gone", tmp_path / "dangling")
  for path, said in [("", "is empty"), ("dangling", "symlink"), ("notes.txt", "is a file"),
                     ("notes.txt/run", "which is a file")]:
    result = run(capfd, *argv_for(command, path, str(tmp_path)))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and said in lines[0], (path, result.stderr)
    assert "Traceback" not in result.stderr
  assert sorted(os.listdir(tmp_path)) == ["dangling", "notes.txt", "t.txt"]


def test_a_step_directory_and_a_different_step_flag_are_refused(forms, capfd):
  _, table, _ = forms
  path, _ = table["step directory"]
  result = run(capfd, "export", "--workdir", path, "--step", "1", "--out", "x")
  assert result.returncode == 2 and f"names checkpoint step {STEP} but --step=1" in result.stderr


def test_resolver_keeps_relative_paths_relative(forms, monkeypatch):
  cwd, table, _ = forms
  monkeypatch.chdir(cwd)
  resolved = resolve_run(table["step directory, relative"][0])
  assert resolved.workdir == os.path.join("my runs ü", "run 1") and resolved.step == STEP
  with pytest.raises(JaxdpError, match="no such directory"):
    resolve_run("my runs ü/absent")


# ---- the forms for real (a few: each loads the checkpoint) -----------------------------------

def test_inspect_a_step_directory_shows_that_checkpoint(forms, capfd):
  _, table, _ = forms
  for form in ("step directory", "step directory through a symlink", "checkpoints/"):
    result = run(capfd, "inspect", table[form][0])
    assert result.returncode == 0, result.stderr
    assert f"step {STEP}:" in result.stdout and "no checkpoints" not in result.stdout, form


def test_generate_and_plot_from_a_step_directory_under_a_symlinked_non_ascii_path(forms, capfd):
  cwd, table, _ = forms
  path = table["step directory through a symlink"][0]
  result = run(capfd, "generate", "--workdir", path, "--max_new_tokens", "2", "--prompt", "a",
               "--cpu_devices", "8")
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("a")
  out = os.path.join(cwd, "plot ü.png")
  result = run(capfd, "plot", table["checkpoints/"][0], "--out", out)
  assert result.returncode == 0 and os.path.getsize(out) > 0, result.stderr


def test_plot_reads_a_metrics_file_whose_last_line_a_crash_cut_short(forms, tmp_path, capfd):
  _, table, _ = forms
  run_dir = tmp_path / "cut"
  run_dir.mkdir()
  lines = open(os.path.join(table["workdir, absolute"][0], "metrics.jsonl")).read().splitlines()
  (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:7])
  result = run(capfd, "plot", str(run_dir), "--out", str(tmp_path / "p.png"))
  assert result.returncode == 0, result.stderr
  # A broken line before the last is no crash's doing: named, one line.
  (run_dir / "metrics.jsonl").write_text(lines[0][:7] + "\n" + "\n".join(lines) + "\n")
  result = run(capfd, "plot", str(run_dir), "--out", str(tmp_path / "p.png"))
  assert result.returncode == 2 and "line 1 is not a JSON record" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert all(isinstance(json.loads(l), dict) for l in lines)
