"""Generated from the declared schema (jaxdp/lm/schema.py for config fields, each subcommand's
Flag declarations for flags): every field and flag is tried with wrong types, out-of-range,
boundary and inapplicable values and with each declared dependency broken. Each refusal is one
line `jaxdp: error: ...` naming the field, exit status 2, no traceback, nothing written. Run
in-process (tests/cli_inprocess.py); a subcommand's `run` is replaced by a failure, so a value
that should be refused but is accepted fails the test instead of starting work.
"""

import math
import os
import re

from cli_inprocess import run
import pytest

from jaxdp.cli import main as cli_main
from jaxdp.errors import JaxdpError
from jaxdp.lm import schema
from jaxdp.lm.config import field_names, load_preset

CONFIG_COMMANDS = ("train", "plan", "verify")


def _shown(value):
  return str(value).lower() if isinstance(value, bool) else schema._shown(value) \
      if isinstance(value, float) else str(value)


def bad_values(name, field):
  """[(text after --config.NAME=, what it tries)] that the schema must refuse on its own."""
  out = []
  if field.kind is int:
    out += [("abc", "wrong type"), ("1.5", "wrong type")]
  elif field.kind is float:
    out += [("abc", "wrong type"), ("nan", "not finite"), ("inf", "not finite")]
  elif field.kind is bool:
    out += [("maybe", "wrong type")]
  if field.kind in (int, float):
    if field.min is not None:
      out.append((_shown(field.min if field.min_open else field.min - 1), "below range"))
    if field.max is not None:
      out.append((_shown(field.max if field.max_open else field.max + 1), "above range"))
  if field.choices or field.lazy_choices:
    out.append(("bogus_choice", "not a choice"))
  if field.parse is not None:
    out.append((_shown(field.bad), "refused by its parser"))
  return out


CASES = [(name, value, why) for name, field in sorted(schema.SCHEMA.items())
         for value, why in bad_values(name, field)]
NEEDS = sorted((name, field) for name, field in schema.SCHEMA.items() if field.needs)


def test_every_config_field_has_a_schema_entry_and_every_entry_a_field():
  """A field added to configs/default.py without its declaration fails here (and in
  tools/gen_config_docs.py), so no field exists without its checks."""
  names = field_names(load_preset("default"))
  assert schema.missing_entries(names) == [], "declare these in jaxdp/lm/schema.py SCHEMA"
  assert sorted(set(schema.SCHEMA) - set(names)) == []


def test_every_preset_passes_the_schema():
  from jaxdp.lm.config import list_presets
  for name in list_presets():
    schema.check(load_preset(name))
  for name, value in schema.defaults().items():  # Including the parsers `check` skips for it.
    if schema.SCHEMA[name].parse is not None:
      schema.SCHEMA[name].parse(value)


def test_every_entry_is_refusable_and_has_a_valid_example():
  for name, field in schema.SCHEMA.items():
    assert bad_values(name, field) or field.kind is str, name  # Something to try on it.
    assert field.example is not None, name
    assert (field.parse is None) == (field.bad is None), f"{name}: declare `bad` for its parse"
    schema.check_value(name, field.example, field)  # The example itself is valid.


@pytest.fixture
def no_work(monkeypatch, tmp_path):
  """Every subcommand's `run` fails the test; the working directory is an empty tmp_path."""
  for module in cli_main.MODULES.values():
    monkeypatch.setattr(module, "run", stub_run(module))
  monkeypatch.chdir(tmp_path)
  return tmp_path


def stub_run(module, then=None):
  """A subcommand's `run` that does only its path resolution (for the commands that do it in
  `run`), then `then(args)`, by default failing the test: the input was accepted."""
  def run_(args):
    if not module.COMMAND.resolve_before_run:
      module.COMMAND.resolve_paths(args)
    if then is not None:
      return then(args)
    raise AssertionError(f"accepted: {args}")
  return run_


def assert_refused(result, *named):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr
  assert len(lines) == 1 and lines[0].startswith("jaxdp: error: "), result.stderr
  assert "Traceback" not in result.stderr
  for text in named:
    assert text in lines[0], (text, lines[0])
  assert_config_advice_is_valid(lines[0])


def _typed(field, text):
  """The value `--config.F=text` gives field F, as the command line parses it."""
  if field.nullable and text == "None":
    return None
  if field.kind is bool:
    return {"true": True, "false": False}.get(text.lower(), text)
  if field.kind in (int, float):
    try:
      return field.kind(text)
    except ValueError:
      return text
  return text


def assert_config_advice_is_valid(line):
  """Every `--config.F=V` a message advises names a real field and a value valid for it."""
  for name, text in re.findall(r"--config\.([\w.]+)=([^\s,;`)]*)", line):
    text = text.rstrip(".")
    if name not in schema.SCHEMA or line.split(f"--config.{name}={text}")[0].endswith("jaxdp: error: "):
      continue  # The refused value itself, as the user gave it.
    if f"config.{name}={text}" in line.split(":", 2)[-1].split(";")[0]:
      continue  # Restating the refused setting, not advising it.
    field = schema.SCHEMA[name]
    schema.check_value(name, _typed(field, text), field)


@pytest.mark.parametrize("name,value,why", CASES, ids=[f"{n}={v}" for n, v, _ in CASES])
def test_a_bad_value_of_every_field_is_one_line_naming_it(capfd, no_work, name, value, why):
  result = run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", f"--config.{name}={value}")
  assert_refused(result, f"config.{name}")
  assert os.listdir(no_work) == []  # Nothing written: not even the workdir.


def test_the_other_config_commands_refuse_by_the_same_schema(capfd, no_work):
  for command in CONFIG_COMMANDS:
    assert_refused(run(capfd, command, "--config.learning_rate=nan"), "config.learning_rate")
  assert os.listdir(no_work) == []


@pytest.mark.parametrize("name", sorted(schema.SCHEMA))
def test_the_api_refuses_a_wrong_type_and_accepts_the_closed_bounds(name):
  field = schema.SCHEMA[name]
  wrong = {int: "3", float: "0.5", bool: 1, str: 5}[field.kind]
  with pytest.raises(JaxdpError, match=f"config.{name}="):
    schema.check_value(name, wrong)
  if field.kind is float:
    with pytest.raises(JaxdpError, match="finite"):
      schema.check_value(name, math.nan)
  if field.kind is int and field.min is not None and not field.min_open and field.parse is None:
    schema.check_value(name, field.min)  # The boundary is inside.
  if field.kind in (int, float) and field.max is not None and not field.max_open \
      and field.parse is None:
    schema.check_value(name, field.max)
  if field.nullable:
    schema.check_value(name, None)


NULLABLE = sorted(name for name, field in schema.SCHEMA.items() if field.nullable)


def test_every_field_that_can_be_none_is_declared_nullable():
  """A preset's None that the schema does not declare would be refused as the wrong type."""
  from jaxdp.lm.config import list_presets
  for preset in list_presets():
    config = load_preset(preset)
    for name in field_names(config):
      if schema.dotted_get(config, name) is None:
        assert schema.SCHEMA[name].nullable, f"{preset}: {name} is None; declare nullable=True"


@pytest.mark.parametrize("name", NULLABLE)
def test_a_nullable_field_a_preset_sets_can_be_set_back_to_none(capfd, no_work, monkeypatch, name):
  """`--help_config` says "or None": the command line takes `--config.F=None` even where the
  config file gives F a number (absl would parse "None" by the number's type), last one wins."""
  field = schema.SCHEMA[name]
  with open(no_work / "preset.py", "w") as f:
    f.write("from jaxdp.configs import tiny_cpu\n\n\ndef get_config():\n"
            f"  c = tiny_cpu.get_config()\n  c.{name} = {field.example!r}\n  return c\n")
  seen = []
  module = cli_main.MODULES["train"]
  monkeypatch.setattr(module, "run",
                      stub_run(module, then=lambda args: seen.append(schema.dotted_get(args.config, name))))
  for overrides, wanted in (([], field.example), ([f"--config.{name}=None"], None),
                            ([f"--config.{name}=None", f"--config.{name}={_shown(field.example)}"],
                             field.example),
                            ([f"--config.{name}={_shown(field.example)}", f"--config.{name}=None"], None)):
    result = run(capfd, "train", "--config", str(no_work / "preset.py"), "--workdir", "w", *overrides)
    assert result.returncode == 0, result.stderr
    assert seen[-1] == wanted, (overrides, seen)
  result = run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", "--config.num_steps=None")
  assert_refused(result, "config.num_steps")  # A field that may not be None still may not.


NOT_NULLABLE = sorted(name for name, field in schema.SCHEMA.items() if not field.nullable)


@pytest.mark.parametrize("name", NOT_NULLABLE)
def test_none_for_a_field_that_cannot_be_none_is_one_line_naming_its_valid_values(capfd, no_work,
                                                                                 name):
  """`--config.F=None` means None for every field (not the word "None" as a text field's value,
  nor "not a whole number"): refused naming what F takes, with advice the command line accepts."""
  field = schema.SCHEMA[name]
  result = run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", f"--config.{name}=None")
  kind = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}[field.kind]
  valid = "one of " if field.choices or field.lazy_choices else kind
  assert_refused(result, f"jaxdp: error: config.{name}=None: config.{name} cannot be None; it takes "
                 f"{valid}", f"give e.g. --config.{name}=")
  assert os.listdir(no_work) == []
  with pytest.raises(JaxdpError, match=f"config.{re.escape(name)}=None: .* cannot be None"):
    schema.check_value(name, None)  # The API's config (a config file's None) says the same.
  # The last override wins: None then a value is that value.
  with pytest.raises(AssertionError, match="accepted"):
    run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", f"--config.{name}=None",
        f"--config.{name}={_shown(field.example)}", *needed(field))


def needed(field):
  """The overrides that meet `field`'s declared need (none if it has none)."""
  return field.needs.advice().split() if field.needs else []


@pytest.mark.parametrize("name,field", NEEDS, ids=[n for n, _ in NEEDS])
def test_every_declared_dependency_broken_is_refused_and_its_advice_works(capfd, no_work, name,
                                                                          field):
  rule = field.needs
  broken = [f"--config.{k}={_shown(v)}" for k, v in rule.breaks.items()]
  setting = f"--config.{name}={_shown(field.example)}"
  result = run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", setting, *broken)
  assert_refused(result, f"config.{name}=", "has no effect without", rule.advice())
  assert os.listdir(no_work) == []
  # The advice printed is a command line the parser accepts (the run itself is stubbed out).
  with pytest.raises(AssertionError, match="accepted"):
    run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", setting, *broken,
        *rule.advice().split())


EXCLUDES = sorted((name, field) for name, field in schema.SCHEMA.items() if field.excludes)


@pytest.mark.parametrize("name,field", EXCLUDES, ids=[n for n, _ in EXCLUDES])
def test_every_declared_exclusion_broken_is_refused_naming_both(capfd, no_work, name, field):
  other = field.excludes.other
  both = [f"--config.{name}={_shown(field.example)}",
          f"--config.{other}={_shown(schema.SCHEMA[other].example)}"]
  result = run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", *both)
  assert_refused(result, f"config.{other} and config.{name}=", "are both set", field.excludes.why)
  assert os.listdir(no_work) == []
  for one in both:  # Either alone is accepted (the run itself is stubbed out).
    with pytest.raises(AssertionError, match="accepted"):
      run(capfd, "train", "--config", "tiny_cpu", "--workdir", "w", one)


# ---- flags -------------------------------------------------------------------------------------

def base_argv(command, tmp):
  """The smallest valid command line of each subcommand (so only the flag under test is wrong)."""
  run_dir = os.path.join(tmp, "run")
  os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
  text = os.path.join(tmp, "in.txt")
  if not os.path.exists(text):
    with open(text, "w") as f:
      f.write("hello\n")
  return {
      "train": ["--workdir", os.path.join(tmp, "new")],
      "generate": ["--workdir", run_dir],
      "evaluate": ["--workdir", run_dir, "--text", text],
      "launch": ["--nprocs", "2", "--", "train"],
      "replay": ["--workdir", run_dir, "--step", "1"],
      "prepare": [text, "--out", os.path.join(tmp, "out")],
      "plot": [run_dir, "--out", os.path.join(tmp, "plot.png")],
      "inspect": [run_dir],
      "plan": [],
      "verify": [],
      "export": ["--workdir", run_dir, "--out", os.path.join(tmp, "hf")],
      "stacks": ["--workdir", run_dir],
  }[command]


def flag_cases():
  """(command, flag, value, why) for every flag of every subcommand."""
  for command, module in sorted(cli_main.MODULES.items()):
    for flag in module.COMMAND.flags:
      values = []
      if flag.kind == "integer":
        values += [("abc", "wrong type"), ("1.5", "wrong type")]
      if flag.kind == "float":
        values += [("abc", "wrong type"), ("nan", "not finite"), ("inf", "not finite")]
      if flag.kind == "bool":
        values += [("maybe", "wrong type")]
      if flag.kind == "enum":
        values += [("bogus_choice", "not a choice")]
      if flag.kind in ("integer", "float"):
        if flag.min is not None:
          values.append((_shown(flag.min if flag.min_open else flag.min - 1), "below range"))
        if flag.max is not None:
          values.append((_shown(flag.max + 1), "above range"))
      if flag.path:  # A file to write (plot's --out) may exist already: it is replaced.
        values += [("", "empty path")] + ([("FILE", "a file")] if flag.path != "file" else []) + \
            [("DANGLING", "dangling symlink"), ("FILE/under", "under a file")]
      if flag.required and flag.kind == "string":
        values.append(("", "required, empty"))
      if flag.needs:
        values.append(("NEEDS", "dependency broken"))
      if flag.kind == "string" and not flag.path:
        values.append(("bad\udcffbytes", "not UTF-8"))
      for value, why in values:
        yield command, flag, value, why


FLAG_CASES = list(flag_cases())


def test_every_subcommand_has_a_base_command_line(tmp_path):
  for command in cli_main.MODULES:
    base_argv(command, str(tmp_path))  # KeyError: add the new subcommand to base_argv.


@pytest.mark.parametrize("command,flag,value,why", FLAG_CASES,
                         ids=[f"{c}--{f.name}={v!r}" for c, f, v, _ in FLAG_CASES])
def test_a_bad_value_of_every_flag_is_one_line_naming_it(capfd, no_work, command, flag, value,
                                                          why):
  tmp = str(no_work)
  base = base_argv(command, tmp)
  if f"--{flag.name}" in base:  # The flag under test replaces the base's own value.
    i = base.index(f"--{flag.name}")
    base = base[:i] + base[i + 2:]
  with open("FILE", "w") as f:
    f.write("x")
  os.symlink("nowhere", "DANGLING")
  before = sorted(os.listdir(tmp))
  if value == "NEEDS":
    wanted = flag.default + 1 if flag.kind == "integer" else not flag.default
    argv = [f"--{flag.name}={_shown(wanted)}"]
    named = [f"--{flag.name}=", f"--{flag.needs[0]}={_shown(flag.needs[1])}"]
  else:
    argv = [f"--{flag.name}={value}"]
    named = [f"--{flag.name}"]
  if command == "launch":  # Its own flags come before `--`.
    argv = argv + base
  else:
    argv = base + argv if "--" not in base else argv + base
  result = run(capfd, command, *argv)
  assert_refused(result, *named)
  assert sorted(os.listdir(tmp)) == before  # Nothing written.
  for advised in re.findall(rf"give e\.g\. --{flag.name}=([^\s;,]+)", result.stderr):
    if flag.kind in ("integer", "float"):  # The advice is a value in the flag's range.
      flag.check(int(advised) if flag.kind == "integer" else float(advised))
    else:
      assert flag.kind != "bool" or advised in ("true", "false")


def test_a_flags_stated_need_is_accepted_when_met(capfd, no_work):
  tmp = str(no_work)
  for command, module in cli_main.MODULES.items():
    for flag in module.COMMAND.flags:
      if flag.needs:
        wanted = flag.default + 1 if flag.kind == "integer" else not flag.default
        with pytest.raises(AssertionError, match="accepted"):
          run(capfd, command, *base_argv(command, tmp), f"--{flag.name}={_shown(wanted)}",
              f"--{flag.needs[0]}={_shown(flag.needs[1])}")


def test_run_defining_fields_are_the_schemas_array_setting_and_declared_fields():
  """One declaration (the schema) says which fields define a run: every field that sets the
  train state's arrays, and those declared `defines_run` (seed, batch, data split, ...). The
  builder's checkpoint record and its defaults for older checkpoints cover each of them."""
  from jaxdp.lm.builder import RUN_DEFINING_FIELDS, run_defining_defaults
  arrays = {n for n, f in schema.SCHEMA.items() if f.shapes is not None}
  declared = {n for n, f in schema.SCHEMA.items() if f.defines_run}
  assert set(RUN_DEFINING_FIELDS) == arrays | declared
  assert {"model.qkv_bias", "model.qk_norm", "model.head_dim", "seed", "global_batch_size",
          "data.val_fraction"} <= set(RUN_DEFINING_FIELDS)
  assert not {"learning_rate", "num_steps", "eval_every"} & set(RUN_DEFINING_FIELDS)
  assert set(run_defining_defaults()) == set(RUN_DEFINING_FIELDS)
