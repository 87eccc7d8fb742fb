"""Every `jaxdp` command shown in README.md and docs/ is a command the CLI accepts.

Each command line in a ```bash block, and each complete command quoted in the prose, is parsed by the real subcommand parser (its flags, config
fields and value ranges), so a documented flag that does not exist (`jaxdp inspect --workdir`)
fails here. Running them end to end, shortened, is the job of the CLI tests (train, generate,
inspect, plan, verify, prepare, plot, launch in test_cli, test_models_cli, test_portable_runs,
test_run_behaviour, test_multihost); commands that cannot run here are listed with the reason.
"""

import glob
import os
import re
import shlex

import pytest

from jaxdp.cli import main as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))

# Commands that are shown but not parsed here, and why.
NOT_PARSED = {
    "jaxdp train --coordinator 10.0.0.1:12345": "a real two-host run (the flags are parsed in "
                                                 "test_multihost through `launch`)",
}


def documented_commands():
  for path in DOCS:
    text = open(path).read()
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
      lines = block.replace("\\\n", " ").splitlines()
      for line in lines:
        for part in re.split(r"&&|\|", line.split("  #")[0]):
          part = part.strip()
          if part.startswith("jaxdp "):
            yield os.path.relpath(path, ROOT), part
    # Commands quoted in the prose, except templates (`--config ...`, `--cpu_devices N`).
    for part in re.findall(r"`(jaxdp [a-z]+ [^`]*)`", text):
      if "..." not in part and not any(w.isupper() or w.startswith("<") for w in part.split()):
        yield os.path.relpath(path, ROOT), part


COMMANDS = sorted(set(documented_commands()))


def test_the_docs_show_commands():
  assert len(COMMANDS) >= 15 and any(c.startswith("jaxdp generate") for _, c in COMMANDS)


@pytest.mark.parametrize("source,command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_documented_command_is_accepted_by_the_cli(source, command):
  if any(command.startswith(prefix) for prefix in NOT_PARSED):
    pytest.skip(next(reason for prefix, reason in NOT_PARSED.items() if command.startswith(prefix)))
  argv = shlex.split(command)[1:]
  name = argv[0]
  assert name in cli.MODULES, f"{source}: unknown subcommand in {command!r}"
  module = cli.MODULES[name]
  module.COMMAND.parse(argv[1:], others=[m.COMMAND for m in cli.MODULES.values()])
