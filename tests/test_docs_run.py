"""Every shell command shown in README.md and docs/ runs: each document's commands are executed in
order, as its reader would type them, in a fresh folder, shortened by flags where the full command
would take minutes (fewer steps, a smaller batch, fewer new tokens). A command that cannot run here
is listed in NOT_RUN with the reason; a new command in the docs fails here until it is run or listed.

One document's commands run in one process (tests/cli_inprocess.py), each through the CLI's own
`main()`, so the interpreter start, the imports and the compiled steps are paid once per document
instead of once per command; a command that asks for another device count gets its own process.
"""

import json
import os
import re
import shlex
import subprocess
import sys

from conftest import cli_env
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, "tests", "cli_inprocess.py")
DOCS = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                              if f.endswith(".md"))

# Commands (by prefix) shown in the docs that are not run by this test, and why.
NOT_RUN = {
    "pip install": "installs the package: the README's two commands are what CI runs "
                   "(.ci/run) and tests/test_install.py installs a wheel into a fresh venv",
    "ruff check": "part of the README's test command, which is .ci/run itself",
    "python -m pytest": "the README's test command, which is .ci/run itself",
    "python -m mypy": "part of the README's test command, which is .ci/run itself",
    "tensorboard": "a viewer that serves a web page until stopped (an optional install); the "
                   "events it reads are checked in tests/test_train_loop.py",
    "sbatch": "needs a SLURM cluster; the script's environment is simulated in test_distributed",
    "grep -e": "searches a run's metrics.jsonl; the events it finds are written and checked in "
               "tests/test_run_health.py",
    "mpirun": "needs Open MPI across hosts; its environment is simulated in test_distributed",
    "jaxdp train --coordinator 10.0.0.1": "a real two-host run; the same flags run in test_multihost "
                                          "through `jaxdp launch`",
    "jaxdp train --config gpt2_124m --config.attention=cudnn": "needs an NVIDIA GPU (cuDNN "
        "attention); tools/gpu_check.sh trains gpt2_124m with it, and test_gpt2_preset trains the "
        "preset on CPU",
    "jaxdp plan --config tiny_cpu --cpu_devices 4 --measure": "times collectives for minutes; "
        "tests/test_measure.py runs `plan --measure` on 4 and 8 devices",
    "jaxdp plan --config tiny_cpu --cpu_devices 8 --measure": "as above (tests/test_measure.py)",
    "jaxdp plan --config default --advise": "measures step times on every device count for "
        "minutes after a finished run; tests/test_advise.py runs `plan --advise` on 1 and 2 "
        "devices after a real run",
    "jaxdp plan --config tiny_cpu --cpu_devices 2 --advise": "as above (tests/test_advise.py); "
        "the run before it is run here",
    "pip download": "downloads wheels for an offline GPU machine (needs the network)",
    "tools/gpu_check.sh": "needs an NVIDIA GPU; its --dry-run runs in tests/test_gpu_check.py",
    "jaxdp prepare corpus.txt --out data/qwen": "needs the downloaded Qwen2.5-0.5B checkpoint; "
        "tests/test_qwen_mistral.py imports, trains and exports tiny Qwen2/Qwen3/Mistral models "
        "built there",
    "jaxdp train --config qwen2_5_0_5b": "as above (a 0.5B checkpoint that is not on this machine)",
    "jaxdp export --workdir runs/qwen": "as above; sharded and bfloat16 export run in "
        "tests/test_qwen_mistral.py",
}

# Flags appended per subcommand so that a documented command takes seconds, not minutes. A flag
# the command already gives is not appended (the documented value stands).
SHORTER = {
    # 16 steps: the docs export step 10 and profile steps 10:15. One layer (where the command
    # does not choose): compiling the default 4-layer model is most of a short run's time.
    "train": ["--config.num_steps=16", "--config.eval_every=0", "--config.eval_steps=1",
              "--config.global_batch_size=8", "--config.seq_len=32", "--progress=false",
              "--cpu_devices=2", "--config.model.n_layer=1"],
    "generate": ["--max_new_tokens=4"],
    "verify": ["--steps=1", "--config.model.n_layer=1", "--config.global_batch_size=8",
               "--config.seq_len=32"],
    # The shortened train's and verify's batch and context: smaller programs to compile, and
    # verify finds plan's compiled gradient functions in conftest's shared compilation cache.
    "plan": ["--cpu_devices=2", "--config.model.n_layer=1", "--config.global_batch_size=8",
             "--config.seq_len=32"],
}
# Flags whose documented value is replaced: verify on 8 emulated devices trains every strategy
# on 8 devices; the same command on 2 checks what the reader's command checks, in a quarter the time.
REPLACE = {"verify": ["--cpu_devices=2"]}


def shell_commands(path):
  """(line number, command) of every command in the ```bash blocks of `path`, in order."""
  text = open(os.path.join(ROOT, path)).read()
  for match in re.finditer(r"```(?:bash|sh)\n(.*?)```", text, re.S):
    if match.group(1).startswith("#!"):
      continue  # A script file's text (examples/...), run by `sbatch`, which NOT_RUN lists.
    first = text[:match.start()].count("\n") + 2
    for offset, line in enumerate(match.group(1).replace("\\\n", " ").splitlines()):
      line = line.split("  #")[0].strip()
      for part in re.split(r"&&|\|", line):
        if part.strip():
          yield first + offset, part.strip()


# Paths the docs name by a full-length run's step (default num_steps 600): the shortened train
# above ends, and saves its last checkpoint, at step 16.
STEP_PATHS = {"runs/first/checkpoints/600": "runs/first/checkpoints/16"}


def shortened(argv):
  argv = [STEP_PATHS.get(a, a) for a in argv]
  if argv[0] == "launch":
    split = argv.index("--")
    return argv[:split + 1] + [a for a in shortened(argv[split + 1:])  # launch gives it.
                               if not a.startswith("--cpu_devices")]
  for flag in REPLACE.get(argv[0], []):
    name = flag.split("=")[0]
    at = [i for i, a in enumerate(argv) if a == name or a.startswith(name + "=")]
    for i in reversed(at):
      del argv[i:i + (1 if "=" in argv[i] else 2)]
    argv = argv + [flag]
  given = {a.split("=")[0] for a in argv if a.startswith("--")}
  return argv + [f for f in SHORTER.get(argv[0], []) if f.split("=")[0] not in given]


def inputs(folder):
  """The files the docs' examples name: my_texts/, books/, notes.txt, chats.jsonl, a GPT-2-like
  gpt2/tokenizer.json (trained here, no download), corpus.parquet, token files in fineweb10B/,
  data/books prepared with that tokenizer, hellaswag_val.jsonl and valid.txt."""
  corpus = open(os.path.join(ROOT, "jaxdp", "assets", "tinyshakespeare.txt")).read()[:60000]
  for sub in ("my_texts", "books"):
    os.makedirs(os.path.join(folder, sub))
    for i in range(2):
      with open(os.path.join(folder, sub, f"part{i}.txt"), "w") as f:
        f.write(corpus[i * 20000:(i + 1) * 20000])
  with open(os.path.join(folder, "notes.txt"), "w") as f:
    f.write(corpus[40000:50000])
  with open(os.path.join(folder, "chats.jsonl"), "w") as f:
    for line in corpus[50000:].split("\n\n"):
      f.write(json.dumps({"text": line}) + "\n")
  import numpy as np
  import pyarrow as pa
  import pyarrow.parquet as pq
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from jaxdp.data import prepare, tokenfiles
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator([corpus], trainers.BpeTrainer(
      vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  os.makedirs(os.path.join(folder, "gpt2"))
  tokenizer = os.path.join(folder, "gpt2", "tokenizer.json")
  tok.save(tokenizer)
  pq.write_table(pa.table({"content": corpus.split("\n\n")}), os.path.join(folder, "corpus.parquet"))
  os.makedirs(os.path.join(folder, "fineweb10B"))
  ids = np.asarray(tok.encode(corpus).ids, np.uint16)
  tokenfiles.write_token_file(os.path.join(folder, "fineweb10B", "fineweb_train_000001.bin"), ids[2000:])
  tokenfiles.write_token_file(os.path.join(folder, "fineweb10B", "fineweb_val_000000.bin"), ids[:2000])
  prepare.prepare([os.path.join(folder, "books")], os.path.join(folder, "data", "books"),
                  tokenizer=tokenizer, progress=False)
  # docs/evaluation.md: a HellaSwag-format file (context, four endings, label) and a text file.
  # Short lines: the docs' runs are shortened to a context of 32 byte tokens.
  lines = [x for x in corpus.split("\n") if 8 < len(x) < 28][:40]
  with open(os.path.join(folder, "hellaswag_val.jsonl"), "w") as f:
    for i in range(8):
      f.write(json.dumps({"ctx": lines[i][:10], "endings": lines[8 + 4 * i:12 + 4 * i], "label": i % 4}) + "\n")
  with open(os.path.join(folder, "valid.txt"), "w") as f:
    f.write(corpus[50000:52000])


def test_every_documented_command_is_run_or_listed():
  unlisted = [(doc, n, c) for doc in DOCS for n, c in shell_commands(doc)
              if not c.startswith("jaxdp ") and not any(c.startswith(p) for p in NOT_RUN)]
  assert not unlisted, f"shell commands neither run by this test nor listed in NOT_RUN: {unlisted}"


DOCS_WITH_JAXDP = [d for d in DOCS if any(c.startswith("jaxdp ") for _, c in shell_commands(d))]


@pytest.mark.slow
@pytest.mark.parametrize("doc", DOCS_WITH_JAXDP)
def test_documented_commands_run_in_order(doc, tmp_path):
  env = cli_env()  # With conftest's shared compilation cache.
  inputs(str(tmp_path))
  runs = [(line, command, shortened(shlex.split(command)[1:]))
          for line, command in shell_commands(doc)
          if command.startswith("jaxdp ") and not any(command.startswith(p) for p in NOT_RUN)]
  listed, results = tmp_path / "commands.json", tmp_path / "results.jsonl"
  listed.write_text(json.dumps([argv for _, _, argv in runs]))
  try:  # About 100 s for the README on a quiet 2-core machine: 900 s is a hang.
    runner = subprocess.run([sys.executable, RUNNER, str(listed), str(results)], cwd=tmp_path,
                            capture_output=True, text=True, env=env, timeout=900)
  except subprocess.TimeoutExpired as e:  # Name the command that hung (below), with its output.
    err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
    runner = subprocess.CompletedProcess(e.cmd, -9, "", err + "\n(killed: timed out after 900 s)")
  done = [json.loads(l) for l in results.read_text().splitlines()] if results.exists() else []
  for (line, command, _), result in zip(runs, done):  # Shown with -s: where a document's time goes.
    print(f"{result['seconds']:7.1f} s  {doc}:{line}: {command}")
  for (line, command, argv), result in zip(runs, done):
    assert result["returncode"] == 0, (f"{doc}:{line}: `{command}` (run as {argv}) exited "
                                       f"{result['returncode']}:\n{result['stderr']}")
  assert runner.returncode == 0 and len(done) == len(runs), (
      f"{doc}: the runner exited {runner.returncode} after {len(done)} of {len(runs)} commands"
      + (f", in `{runs[len(done)][1]}`" if len(done) < len(runs) else "")
      + f":\n{runner.stderr[-3000:]}")
