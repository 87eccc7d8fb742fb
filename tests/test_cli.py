"""The command line: a real run end to end, and one-line errors for bad input.

Runs and refusals that reach device setup run the real CLI in a subprocess; refusals and help
answered before any device work run the same `main()` in this process (tests/cli_inprocess.py).
Each subcommand accepts only its own flags, so the refusals below (foreign flags, out-of-range
numbers) are also the tests of "no silent no-ops".
"""

import importlib.metadata
import json
import os
import subprocess
import sys

import cli_inprocess
from conftest import TINY_RUN_FLAGS, cli_env
import pytest

CLI = [sys.executable, "-m", "jaxdp.cli.main"]
SUBCOMMANDS = ("train", "generate", "launch", "prepare", "plot", "inspect", "plan", "verify", "export",
               "evaluate", "replay", "stacks")


def jaxdp(*args, cwd=None):
  return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, env=cli_env(),
                        timeout=300)


def assert_refused(result, *messages):
  """Exit status 2 and exactly one line, `jaxdp: error: ...`, holding every message."""
  assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
  assert "Traceback" not in result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error:"), result.stderr
  for message in messages:
    assert message in lines[0]
  return lines[0]


def with_closed_stdout(*args):
  """Runs the CLI with its stdout a pipe whose reader has already gone (like `| head` done)."""
  process = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env=cli_env())
  process.stdout.close()
  stderr = process.stderr.read()
  return process.wait(timeout=300), stderr


def test_train_then_generate_from_the_command_line(tiny_run):
  # The session's canonical `jaxdp train` (conftest.TINY_RUN_FLAGS); generate only reads it.
  workdir, result = str(tiny_run[0]), tiny_run[1]
  num_steps = int(next(f for f in TINY_RUN_FLAGS if f.startswith("--config.num_steps=")).split("=")[1])
  assert result.returncode == 0, result.stderr
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert records[0]["num_devices"] == 2
  # The run's last measurement is the final evaluation; only the end-of-run goodput event follows.
  assert records[-1]["event"] == "goodput"
  last = [r for r in records if "event" not in r][-1]
  assert last == {"step": num_steps, "eval_loss": pytest.approx(last["eval_loss"])}
  out = jaxdp("generate", "--workdir", workdir, "--prompt", "ROMEO:", "--max_new_tokens", "20",
              "--seed", "3", "--cpu_devices", "1")
  assert out.returncode == 0, out.stderr
  assert out.stdout.startswith("ROMEO:") and len(out.stdout.encode()) >= len("ROMEO:") + 20
  again = jaxdp("generate", "--workdir", workdir, "--prompt", "ROMEO:", "--max_new_tokens", "20",
                "--seed", "3", "--cpu_devices", "1")
  assert again.stdout == out.stdout


# needs_devices: refused after device setup, so that CLI runs in a subprocess.
@pytest.mark.parametrize("args, message, needs_devices", [
    (["--config.nonsense=1"], "unknown config field 'nonsense'", False),
    (["--config.global_batch_size=10", "--cpu_devices", "4"],
     "config.global_batch_size=10 is not divisible by data devices x grad_accum_steps = 4 x 1",
     True),
    (["--config.data.path=/no/such.txt"], "config.data.path='/no/such.txt' does not exist", True),
    (["--config", "no_such_preset"], "no such file or preset", False),
    (["--config", "README.md"], "'README.md' is not a Python file", False),
    (["--config.seq_len=abc"], "--config.seq_len=abc", False),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capfd, args, message, needs_devices):
  args = ["train", "--config", "tiny_cpu", "--workdir", str(tmp_path), *args]
  result = jaxdp(*args) if needs_devices else cli_inprocess.run(capfd, *args)
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


# --- Help and version ------------------------------------------------------------------------

# A flag of each subcommand and how its help must show it with its default.
HELP_SHOWS = {
    "train": ["--workdir=DIR  (default: runs/default)", "--init_timeout_s=S  (default: 300)",
              "--[no]allow_config_change  (default: false)", "--config=PRESET|PATH",
              "--help_config", "docs/configuration.md"],
    "generate": ["--max_new_tokens=N  (default: 200)", "--temperature=T  (default: 0.8)",
                 "--top_k=K  (default: 0)", "--top_p=P  (default: 1)", "Valid: 0 < P <= 1.",
                 "--seed=S  (default: 0)", "--prompt=TEXT  (default: '\\n')"],
    # The usage line wraps inside the trailer "-- train [train flags]".
    "launch": ["--nprocs=P  (required)", "Valid: P >= 1.", "[--min_nprocs M] -- train [train",
               "--max_restarts=R  (default: 0)", "--min_nprocs=M  (default: --nprocs (never fewer))"],
    "prepare": ["--out=DIR  (required)", "--tokenizer=TOKENIZER  (default: byte)",
                "--vocab_size=V  (default: 4096)", "INPUT ..."],
    "plot": ["--out=FILE  (required)", "WORKDIR ..."],
    "inspect": ["CHECKPOINT_DIR"],
    "plan": ["--[no]json  (default: false)", "--cpu_devices=N  (default:", "--help_config"],
    "verify": ["--steps=K  (default: 3)", "Valid: K >= 1.", "--help_config"],
    "evaluate": ["--workdir=DIR  (default: runs/default)", "--task=KIND:FILE[,...]  (default: none)",
                 "--text=FILE[,...]  (default: none)", "Valid: N >= 1.", "docs/evaluation.md"],
    "export": ["--out=DIR  (required)", "--step=S  (default: the latest)", "Valid: S >= 0.",
               "--workdir=DIR  (default: runs/default)"],
    "replay": ["--step=S  (required)", "Valid: S >= 1.", "--[no]json  (default: false)",
               "--workdir=DIR  (default: runs/default)", "docs/troubleshooting.md"],
    "stacks": ["--workdir=DIR  (required)", "--wait_s=S  (default: 10)", "SIGUSR2"],
}


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_each_subcommand_prints_its_own_help(capfd, command, flag):
  result = cli_inprocess.run(capfd, command, flag)
  assert result.returncode == 0 and not result.stderr, result.stderr
  assert result.stdout.startswith(f"usage: jaxdp {command}")
  for text in HELP_SHOWS[command]:
    assert text in result.stdout, text
  others = {"train": "--max_new_tokens", "generate": "--steps", "verify": "--workdir"}
  if command in others:  # Only its own flags.
    assert others[command] not in result.stdout


def test_top_level_help_lists_the_subcommands_and_version_prints_the_version(capfd):
  result = cli_inprocess.run(capfd, "--help")
  assert result.returncode == 0
  assert all(f"  {command} " in result.stdout for command in SUBCOMMANDS)
  result = cli_inprocess.run(capfd, "--version")
  assert result.returncode == 0
  assert result.stdout == f"jaxdp {importlib.metadata.version('jaxdp')}\n"


def test_help_config_lists_every_field_with_the_value_used_and_its_meaning(capfd):
  # The override comes before --config: the order of the two does not matter.
  result = cli_inprocess.run(capfd, "train", "--config.num_steps=3", "--config", "tiny_cpu", "--help_config")
  assert result.returncode == 0, result.stderr
  assert "--config.num_steps=3\n" in result.stdout  # The override, not tiny_cpu's 20.
  assert "--config.model.n_layer=2\n      Transformer blocks." in result.stdout  # tiny_cpu's.
  assert "--config.strategy=dp\n" in result.stdout


# --- Refusals: foreign flags, did-you-mean, ranges -------------------------------------------

@pytest.mark.parametrize("command, args, messages", [
    ("train", ["--steps", "7"], ["unknown flag --steps for `jaxdp train`",
                                 "a flag of `jaxdp verify`"]),
    ("train", ["--seed", "5"], ["unknown flag --seed", "did you mean --config.seed?"]),
    ("generate", ["--config.num_steps=5"], ["`jaxdp generate` takes no config"]),
    ("generate", ["--steps", "2"], ["unknown flag --steps for `jaxdp generate`"]),
    ("launch", ["--nprocs", "2", "--config", "tiny_cpu", "--", "train"],
     ["`jaxdp launch` takes no config", "after `--`"]),
    ("prepare", ["in.txt", "--out", "d", "--workdir", "w"],
     ["unknown flag --workdir for `jaxdp prepare`"]),
    ("plot", ["run", "--out", "x.png", "--tokenizer", "bpe"],
     ["unknown flag --tokenizer for `jaxdp plot`", "a flag of `jaxdp prepare`"]),
    ("inspect", ["run", "--json"], ["unknown flag --json for `jaxdp inspect`"]),
    ("inspect", ["run", "--help_config"], ["unknown flag --help_config for `jaxdp inspect`"]),
    ("plan", ["--steps", "3"], ["unknown flag --steps for `jaxdp plan`"]),
    ("verify", ["--json"], ["unknown flag --json for `jaxdp verify`", "a flag of `jaxdp plan`"]),
])
def test_a_flag_of_another_subcommand_is_refused(capfd, command, args, messages):
  assert_refused(cli_inprocess.run(capfd, command, *args), *messages)


def test_did_you_mean_looks_among_this_subcommands_flags_and_config_fields(capfd):
  def jaxdp(*args):
    return cli_inprocess.run(capfd, *args)
  line = assert_refused(jaxdp("train", "--num_steps", "7"), "did you mean --config.num_steps?")
  assert "--steps" not in line.split("did you mean")[1]  # verify's flag is no suggestion here.
  assert_refused(jaxdp("train", "--config.num_step=7"), "unknown config field 'num_step'",
                 "did you mean --config.num_steps?")
  assert_refused(jaxdp("generate", "--max_tokens", "7"), "did you mean --max_new_tokens?")
  assert_refused(jaxdp("trian"), "unknown command 'trian'; did you mean train?")


@pytest.mark.parametrize("command, args, message", [
    ("generate", ["--top_k", "-3"], "--top_k=-3 is out of range; valid: K >= 0"),
    ("generate", ["--max_new_tokens", "-1"], "--max_new_tokens=-1 is out of range; valid: N >= 0"),
    ("generate", ["--temperature", "-1"], "--temperature=-1 is out of range; valid: T >= 0"),
    ("generate", ["--top_p", "0"], "--top_p=0 is out of range; valid: 0 < P <= 1"),
    ("generate", ["--top_p=1.5"], "--top_p=1.5 is out of range; valid: 0 < P <= 1"),
    ("generate", ["--seed", "-1"], "--seed=-1 is out of range; valid: 0 <= S <= 4294967295"),
    ("generate", ["--cpu_devices", "0"], "--cpu_devices=0 is out of range; valid: N >= 1"),
    ("verify", ["--steps", "0"], "--steps=0 is out of range; valid: K >= 1"),
    ("plan", ["--cpu_devices=0"], "--cpu_devices=0 is out of range; valid: N >= 1"),
    ("train", ["--num_processes", "0"], "--num_processes=0 is out of range; valid: P >= 1"),
    ("train", ["--process_id=-1"], "--process_id=-1 is out of range; valid: I >= 0"),
    ("train", ["--init_timeout_s", "0"], "--init_timeout_s=0 is out of range; valid: S > 0"),
    ("launch", ["--nprocs", "0", "--", "train"], "--nprocs=0 is out of range; valid: P >= 1"),
    ("prepare", ["in.txt", "--out", "d", "--vocab_size", "10"],
     "--vocab_size=10 is out of range; valid: V >= 257"),
    ("generate", ["--top_k", "many"], "--top_k=many is not a whole number; give e.g. --top_k=100"),
    ("train", ["--config.num_steps=abc"], "--config.num_steps=abc is not a whole number"),
    ("train", ["--config.learning_rate=fast"], "--config.learning_rate=fast is not a number"),
    ("train", ["--config.model.tie_embeddings=maybe"], "is not true or false"),
])
def test_a_number_out_of_range_is_refused_before_any_work(tmp_path, capfd, command, args, message):
  # A workdir without a checkpoint: generate would fail there, so the range check came first.
  args = [*args, "--workdir", str(tmp_path)] if command == "generate" else args
  assert_refused(cli_inprocess.run(capfd, command, *args), message)


@pytest.mark.parametrize("args, message", [
    (["inspect"], "`jaxdp inspect` takes exactly one CHECKPOINT_DIR; got 0"),
    (["plan", "extra"], "`jaxdp plan` takes no arguments besides flags; got 'extra'"),
    (["prepare", "in.txt"], "`jaxdp prepare` needs --out DIR"),
    (["launch", "--", "train"], "`jaxdp launch` needs --nprocs P"),
    (["launch", "--nprocs", "2", "--", "generate"], "launch runs training"),
    (["launch", "--nprocs", "2", "--", "train", "--steps", "7"],
     "after '--': unknown flag --steps for `jaxdp train`"),
    (["--workdir", "w", "train"], "flags go after it"),
])
def test_missing_or_extra_arguments_are_refused(capfd, args, message):
  assert_refused(cli_inprocess.run(capfd, *args), message)


def test_refusals_come_before_jax_is_imported():
  """Bad input is refused in well under a second: parsing never imports JAX."""
  code = ("import sys, jaxdp\n"
          "if 'jax' in sys.modules: print('jaxdp imports jax'); sys.exit(0)\n"
          "sys.modules['jax'] = None  # From here on, `import jax` fails.\n"
          "from jaxdp.cli.main import main\n"
          "for argv in (['generate', '--top_k=-3'], ['train', '--num_steps', '7'],\n"
          "             ['launch', '--nprocs', '2', '--', 'train', '--seed', '1']):\n"
          "  assert main(['jaxdp', *argv]) == 2, argv\n"
          "assert main(['jaxdp', 'train', '--config', 'tiny_cpu', '--help_config']) == 0\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=cli_env(), timeout=120)
  assert result.returncode == 0, result.stderr
  if result.stdout.startswith("jaxdp imports jax"):
    pytest.skip("`import jaxdp` itself imports JAX (jaxdp/__init__.py), so no CLI path avoids it")


# --- A closed stdout ---------------------------------------------------------------------------

def test_a_closed_stdout_ends_quietly_with_status_141():
  status, stderr = with_closed_stdout("train", "--help_config")
  assert (status, stderr) == (141, "")


def test_generate_into_a_reader_that_closes_early_prints_no_traceback(tiny_run):
  workdir = str(tiny_run[0])  # Only read: generate writes nothing into the run.
  status, stderr = with_closed_stdout("generate", "--workdir", workdir, "--max_new_tokens", "50",
                                      "--cpu_devices", "1")
  assert (status, stderr) == (141, "")
  # The real thing: `| head -c 10` (the shell reports the pipeline's last status, head's 0).
  shell = subprocess.run(f"{' '.join(CLI)} generate --workdir {workdir} --max_new_tokens 300 "
                         "--cpu_devices 1 | head -c 10", shell=True, capture_output=True,
                         env=cli_env(), timeout=300)
  assert shell.returncode == 0 and len(shell.stdout) == 10 and shell.stderr == b""
