"""What every subcommand shares: flag declarations, parsing with one-line errors, and help.

Each subcommand module declares a `COMMAND = Command(...)` with its own flags and a `run(args)`.
`Command.parse` builds a fresh `absl.flags.FlagValues` holding only that subcommand's flags (and,
for train/plan/verify, its `--config` with one flag per overridden field), so a flag that belongs
to another subcommand is refused instead of silently ignored. Nothing here imports JAX (only
`setup_devices` does), so bad input is refused before any device work starts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
import dataclasses
import difflib
import math
import os
import re
import shlex
import textwrap
import types
from typing import Any

from jaxdp.errors import JaxdpError

HELP_FLAGS = ("-h", "--help", "-help")
# Matches `--config`, `-config=X`, `--config.FIELD=V`, `--noconfig.FIELD` (absl's boolean form).
_CONFIG_ARG = re.compile(r"^--?(no)?config(?P<rest>[.=].*)?$")
_WIDTH = 100


@dataclasses.dataclass(frozen=True)
class Flag:
  """One flag of one subcommand: its absl kind, default, help and, for numbers, valid range.

  The range is checked after parsing, before any work, and appended to the help text, so the
  documented range and the enforced one cannot drift apart.
  """
  name: str
  kind: str  # "string", "integer", "float", "bool" or "enum".
  default: Any
  help: str
  metavar: str = "VALUE"
  min: float | None = None
  max: float | None = None
  min_open: bool = False  # True: the minimum itself is not valid (e.g. --top_p > 0).
  choices: tuple[str, ...] = ()
  required: bool = False
  default_text: str | None = None  # Shown instead of the default (e.g. for None).
  # Given away from its default, the flag does nothing unless this other flag has this value:
  # (flag, value), e.g. prepare's --vocab_size needs ("tokenizer", "bpe"). Refused otherwise.
  needs: tuple[str, Any] | None = None
  # A path flag (PATH_KINDS): "run" (an existing run directory, or its checkpoints/ or a step
  # directory in it), "workdir" (a run directory that may not exist yet), "step" (a checkpoint
  # step directory to read), "dir" (a directory to write, created if missing), "file" (a file
  # to write); "" (not a path). Each is refused in one line when empty, and resolved or checked
  # by `Command.resolve_paths` (jaxdp.runtime.paths) before the command runs.
  path: str = ""

  def range_text(self) -> str:
    """'N >= 1', '0 < P <= 1'; '' when any value is valid."""
    if self.min is not None and self.max is None:  # 'N >= 1' reads better than '1 <= N'.
      return f"{self.metavar} {'>' if self.min_open else '>='} {_number(self.min)}"
    low = "" if self.min is None else f"{_number(self.min)} {'<' if self.min_open else '<='} "
    high = "" if self.max is None else f" <= {_number(self.max)}"
    return f"{low}{self.metavar}{high}" if low or high else ""

  def check(self, value: Any) -> None:
    """Raises JaxdpError naming the flag and its valid range if `value` is outside it, or, for a
    path flag, if it is empty (an empty path would otherwise mean "none": a silent default)."""
    if self.path and isinstance(value, str):
      from jaxdp.runtime.paths import refuse_empty
      optional = not self.required and (self.default is not None or self.default_text)
      refuse_empty(value, f"--{self.name}", *PATH_KINDS[self.path],
                   otherwise=f"leave --{self.name} out ({self.shown_default()})" if optional else "")
    if isinstance(value, str) and not self.path:
      try:  # Bytes that are not UTF-8 reach Python's argv as lone surrogates.
        value.encode("utf-8")
      except UnicodeEncodeError as e:
        raise JaxdpError(f"--{self.name} is not valid UTF-8 text (an undecodable byte at "
                         f"character {e.start}); give it as UTF-8") from None
    if value is None or self.kind not in ("integer", "float"):
      return
    if self.kind == "float" and not math.isfinite(value):
      raise JaxdpError(f"--{self.name}={value} is not a finite number; valid: "
                       f"{self.range_text() or 'any finite number'}")
    too_low = self.min is not None and (value <= self.min if self.min_open else value < self.min)
    too_high = self.max is not None and value > self.max
    if too_low or too_high:
      raise JaxdpError(f"--{self.name}={_number(value)} is out of range; valid: "
                       f"{self.range_text()}")

  def full_help(self) -> str:
    """The help text with the valid range appended (the range that `check` enforces)."""
    text = self.help
    if self.range_text():
      text += f" Valid: {self.range_text()}."
    if self.needs:
      text += f" Needs --{self.needs[0]}={_shown_value(self.needs[1])}."
    return text

  def usage(self) -> str:
    """How the flag is written: '--top_k=K', '--[no]progress', '--tokenizer={byte,bpe}'."""
    if self.kind == "bool":
      return f"--[no]{self.name}"
    if self.kind == "enum":
      return f"--{self.name}={{{','.join(self.choices)}}}"
    return f"--{self.name}={self.metavar}"

  def shown_default(self) -> str:
    """The default as `--help` shows it: default_text, else the value (blank strings quoted)."""
    if self.default_text is not None:
      return self.default_text
    if self.kind == "bool":
      return str(self.default).lower()
    if isinstance(self.default, str):
      # Quoted when blank or padded ('\n', ''), so that the default is visible.
      return self.default if self.default.strip() == self.default != "" else repr(self.default)
    return "unset" if self.default is None else _number(self.default)


# Flag.path kind -> (what the flag wants, in words; an example value, or "").
PATH_KINDS = {"run": ("a run directory", "runs/mine"), "workdir": ("a run directory", "runs/mine"),
              "step": ("a checkpoint step directory", "runs/mine/checkpoints/100"),
              "dir": ("a directory", ""), "file": ("a file path", "")}


def _number(x: float) -> str:
  """1, 0.8, 1e-05: integers in full, floats in their shortest form."""
  return str(x) if isinstance(x, int) else f"{x:g}"


def _shown_value(value: Any) -> str:
  return str(value).lower() if isinstance(value, bool) else str(value)


def string(name: str, default: str | None, help: str, *, metavar: str = "TEXT",
           required: bool = False, default_text: str | None = None, path: str = "") -> Flag:
  """A string flag (`path`: see Flag.path)."""
  return Flag(name, "string", default, help, metavar=metavar, required=required,
              default_text=default_text, path=path)


def integer(name: str, default: int | None, help: str, *, metavar: str = "N",
            min: int | None = None, max: int | None = None, required: bool = False,
            default_text: str | None = None, needs: tuple[str, Any] | None = None) -> Flag:
  """An integer flag, valid in [min, max] (either bound optional)."""
  return Flag(name, "integer", default, help, metavar=metavar, min=min, max=max,
              required=required, default_text=default_text, needs=needs)


def real(name: str, default: float | None, help: str, *, metavar: str = "X",
         min: float | None = None, max: float | None = None, min_open: bool = False,
         default_text: str | None = None) -> Flag:
  """A float flag, valid in [min, max] ((min, max] with `min_open`; either bound optional)."""
  return Flag(name, "float", default, help, metavar=metavar, min=min, max=max,
              min_open=min_open, default_text=default_text)


def boolean(name: str, default: bool, help: str) -> Flag:
  """A boolean flag (--NAME / --noNAME)."""
  return Flag(name, "bool", default, help)


def enum(name: str, default: str, choices: Sequence[str], help: str) -> Flag:
  """A flag that takes one of `choices`."""
  return Flag(name, "enum", default, help, choices=tuple(choices))


# Flags several subcommands share, declared once so their help and range agree.
CPU_DEVICES = integer(
    "cpu_devices", None, "Emulate this many CPU devices (runs on the CPU even on a GPU host).",
    min=1, default_text="on a CPU-only host one per core, at least 2; else the accelerators")
PROGRESS = boolean("progress", True, "Show a progress bar on stderr.")


@dataclasses.dataclass(frozen=True)
class Command:
  """A subcommand's interface: the flags it accepts, its positional arguments, its help."""
  name: str
  summary: str  # One line for `jaxdp --help`.
  description: str  # A paragraph for `jaxdp NAME --help`.
  flags: tuple[Flag, ...] = ()
  config: bool = False  # Takes --config PRESET|PATH, --config.FIELD=VALUE and --help_config.
  positional: str = ""  # Metavar of its positional arguments; "" when it takes none.
  nargs: str = ""  # "1" (exactly one) or "+" (one or more); "" when it takes none.
  trailer: str = ""  # Usage after the flags, e.g. launch's "-- train [train flags]".
  positional_path: str = ""  # The positional arguments are paths of this kind (Flag.path).
  # A checkpoint step directory given as the run picks that checkpoint (--step, --restore_from);
  # False: it names just its run.
  step_dir_is_step: bool = True
  # False: `run` calls resolve_paths itself, after refusing its other arguments (evaluate's
  # tasks are refused before its workdir is looked at).
  resolve_before_run: bool = True
  passthrough: bool = False  # What follows the first `--` is kept, unparsed, as `args.launched`.
  no_config_hint: str = ""  # Why --config is refused here and what to do instead.

  def flag_names(self) -> set[str]:
    """Every flag name this subcommand accepts (config flags included when it takes a config)."""
    return {f.name for f in self.flags} | ({"config", "help_config"} if self.config else set())

  def usage(self) -> str:
    """The `usage:` line of `jaxdp NAME --help`, wrapped to the help width."""
    parts = [f"jaxdp {self.name}"]
    if self.config:
      parts.append("[--config PRESET|PATH] [--config.FIELD=VALUE ...]")
    for flag in self.flags:
      shown = flag.usage().replace("=", " ", 1) if flag.kind != "bool" else flag.usage()
      parts.append(shown if flag.required else f"[{shown}]")
    if self.positional:
      parts.append(self.positional + (" ..." if self.nargs == "+" else ""))
    if self.trailer:
      parts.append(self.trailer)
    return textwrap.fill(" ".join(parts), _WIDTH, initial_indent="usage: ",
                         subsequent_indent=" " * len(f"usage: jaxdp {self.name} "),
                         break_on_hyphens=False)

  def help(self) -> str:
    """The text of `jaxdp NAME --help`: usage, description, every flag with default and help."""
    lines = [self.usage(), "", textwrap.fill(self.description, _WIDTH), "", "flags:"]
    flags = list(self.flags)
    if self.config:
      flags.insert(0, Flag("config", "string", "default", _config_help(), metavar="PRESET|PATH"))
    entries = [(f"{flag.usage()}  "
                + ("(required)" if flag.required else f"(default: {flag.shown_default()})"),
                flag.full_help()) for flag in flags]
    if self.config:
      entries += [("--config.FIELD=VALUE", "Override one field of the config, e.g. "
                   "--config.num_steps=100 or --config.model.n_layer=6."),
                  ("--help_config", "Print every config field with the value this command would "
                   "use (after --config and the overrides given) and its meaning, then exit.")]
    entries.append(("-h, --help", "Print this help and exit."))
    for usage, text in entries:
      lines.append(f"  {usage}")
      lines.append(textwrap.fill(text, _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
    if self.config:
      lines += ["", f"Every config field: docs/configuration.md, or `jaxdp {self.name} "
                    "--help_config [--config PRESET]`."]
    return "\n".join(lines)

  def parse(self, argv: Sequence[str], others: Iterable[Command] = ()) -> types.SimpleNamespace:
    """Parses this subcommand's arguments (those after its name) into a namespace.

    Attributes: one per flag, `positional`, `launched` (passthrough commands only), and for
    config commands `config` (the locked ConfigDict with the overrides applied), `config_path`
    and `help_config`. Raises a one-line JaxdpError for an unknown flag (with a did-you-mean
    among THIS subcommand's flags and config fields, and the subcommands it belongs to), a bad
    value, a number out of range, a missing flag or argument. `others` are the other
    subcommands, named in the error when one of their flags is given here.
    """
    from absl import flags as absl_flags
    argv, launched = list(argv), []
    if self.passthrough and "--" in argv:
      argv, launched = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    config: Any = None
    config_path, fields = "", list[str]()  # Set, and read, only when the command takes a config.
    if self.config:
      config_path, argv = _take_config_arg(argv)
      config, fields = _load_config(config_path)
      _check_overrides(argv, fields, self.name)
      argv, nulls = _take_nulls(argv)
    else:
      for arg in argv:
        if arg == "--":
          break
        if _CONFIG_ARG.match(arg):
          raise JaxdpError(f"`jaxdp {self.name}` takes no config, so {arg!r} would have no effect"
                           f"{'; ' + self.no_config_hint if self.no_config_hint else ''}")
    values = absl_flags.FlagValues()
    for flag in self.flags:
      _define(flag, values)
    if self.config:
      absl_flags.DEFINE_bool("help_config", False, "", flag_values=values)
      _define_config(values, config_path, argv)
    try:
      positional = values(["jaxdp"] + argv)[1:]
    except absl_flags.UnrecognizedFlagError as e:
      raise JaxdpError(self._unknown_flag_message(e.flagname, fields, others)) from None
    except absl_flags.Error as e:
      raise JaxdpError(_value_message(first_line(e), self.flags)) from None
    args = types.SimpleNamespace(positional=positional)
    if self.passthrough:
      args.launched = launched
    for flag in self.flags:
      value = values[flag.name].value
      flag.check(value)
      if flag.required and value in (None, ""):
        raise JaxdpError(f"`jaxdp {self.name}` needs --{flag.name} {flag.metavar}: {flag.help}")
      setattr(args, flag.name, value)
    for flag in self.flags:  # After every value is read: a need may name a later flag.
      if flag.needs and getattr(args, flag.name) != flag.default:
        other, wanted = flag.needs
        if getattr(args, other) != wanted:
          raise JaxdpError(f"--{flag.name}={_shown_value(getattr(args, flag.name))} has no effect "
                           f"without --{other}={_shown_value(wanted)} (--{other} is "
                           f"{_shown_value(getattr(args, other))}); add --{other}="
                           f"{_shown_value(wanted)}, or drop --{flag.name}")
    self._check_positional(positional)
    if self.config:
      for name in nulls:  # A field set to None (absl parses by the preset's type); checked below.
        _set_dotted(values.config, name, None)
      args.config, args.config_path = values.config, config_path
      args.help_config = values.help_config
      if not args.help_config:  # --help_config shows any config, even one that is refused.
        from jaxdp.lm.schema import check
        check(args.config)
    return args

  def resolve_paths(self, args: types.SimpleNamespace) -> None:
    """Path flags and positionals of parsed `args` in every form a user gives them
    (jaxdp.runtime.paths), after `parse` (which reads no files) and before `run`: refused in one
    line when they cannot be what the flag needs; a run given by its checkpoints/ or a step
    directory becomes the run directory, and the step its --step, --restore_from or
    `args.step` (`args.positional_steps` for positionals); a step directory to read, a directory
    or a file to write (Flag.path) is checked, so that nothing is written for a path that
    cannot work.

    Raises:
      JaxdpError: an empty path, a dangling symlink, a file, a path under a file, a run that
        does not exist where one is read, a step directory that disagrees with --step, one that
        is not there (--restore_from), a directory to write in a folder that refuses writes.
    """
    from jaxdp.runtime import paths
    if any(f.path == "run" for f in self.flags) and self.step_dir_is_step and \
        not hasattr(args, "step"):
      args.step = None  # A step directory given as the run sets it (generate).
    for flag in self.flags:
      value, name = getattr(args, flag.name), f"--{flag.name}"
      if value is None or not flag.path:
        continue
      if flag.path in ("run", "workdir"):
        where = paths.resolve_run(value, name, must_exist=flag.path == "run")
        setattr(args, flag.name, where.workdir)
        if where.step is not None and self.step_dir_is_step:
          self._take_step(args, where, f"{name}={value}")
      elif flag.path == "step":
        paths.resolve_step(value, name)
      elif flag.path == "dir":
        paths.check_directory_to_write(value, name, "a directory (it is created if missing)")
      elif flag.path == "file":
        paths.check_file_to_write(value, name)
    if self.positional_path:
      resolved = [paths.resolve_run(p, self.positional, must_exist=True)
                  for p in args.positional]
      args.positional = [r.workdir for r in resolved]
      args.positional_steps = [r.step for r in resolved]

  def _take_step(self, args: types.SimpleNamespace, where: Any, given: str) -> None:
    """A step directory given for a run: the step it names, for the commands that take one."""
    if hasattr(args, "step"):  # export, evaluate: --step must agree if given too.
      if args.step is not None and args.step != where.step:
        raise JaxdpError(f"{given} names checkpoint step {where.step} but --step={args.step}; "
                         "give one of them")
      args.step = where.step
    elif hasattr(args, "restore_from"):  # train: resume from that step.
      if args.restore_from:
        raise JaxdpError(f"{given} is a checkpoint step directory and --restore_from is given "
                         f"too; give --workdir={shlex.quote(where.workdir)} --restore_from="
                         f"{shlex.quote(where.path)}")
      args.restore_from = where.path
      # Refusals about that step name the flag the user gave it with, not --restore_from.
      args.restore_given = tuple(given.split("=", 1))

  def _check_positional(self, positional: list[str]) -> None:
    if not self.nargs and positional:
      raise JaxdpError(f"`jaxdp {self.name}` takes no arguments besides flags; got "
                       f"{' '.join(positional)!r}")
    if self.nargs == "1" and len(positional) != 1:
      raise JaxdpError(f"`jaxdp {self.name}` takes exactly one {self.positional}; got "
                       f"{len(positional)}" + (f": {' '.join(positional)!r}" if positional else ""))
    if self.nargs == "+" and not positional:
      raise JaxdpError(f"`jaxdp {self.name}` needs at least one {self.positional}")

  def _unknown_flag_message(self, name: str, fields: list[str], others: Iterable[Command]) -> str:
    own = {flag.name: f"--{flag.name}" for flag in self.flags}
    if self.config:
      own.update({"config": "--config", "help_config": "--help_config"})
    candidates: dict[str, list[str]] = {}
    for key, shown in own.items():
      candidates.setdefault(key, []).append(shown)
    for field in fields:  # `--num_steps` should find --config.num_steps by its bare name too.
      for key in (field, field.rsplit(".", 1)[-1], f"config.{field}"):
        candidates.setdefault(key, []).append(f"--config.{field}")
    suggestions = suggest(name, candidates)
    bare = name[2:] if name.startswith("no") else name  # absl's --noFLAG form of a boolean.
    owners = [c.name for c in others if c.name != self.name and {name, bare} & c.flag_names()]
    message = f"unknown flag --{name} for `jaxdp {self.name}`"
    if owners:
      message += f" (--{name} is a flag of {', '.join(f'`jaxdp {o}`' for o in owners)})"
    if suggestions:
      message += f"; did you mean {' or '.join(suggestions)}?"
    return message + f" See `jaxdp {self.name} --help`."


def suggest(word: str, candidates: dict[str, list[str]], n: int = 3) -> list[str]:
  """Up to `n` close matches of `word` among the keys of `candidates`, as the texts they map to."""
  out: list[str] = []
  # An exact match (`--num_steps` is the field num_steps) is the answer; others would be noise.
  keys = [word] if word in candidates else \
      difflib.get_close_matches(word, list(candidates), n=n + 2, cutoff=0.6)
  if keys:  # Only the near-best: `num_step` -> num_steps, not also warmup_steps.
    best = difflib.SequenceMatcher(None, word, keys[0]).ratio()
    keys = [k for k in keys if difflib.SequenceMatcher(None, word, k).ratio() >= best - 0.1]
  for key in keys:
    for shown in candidates[key]:
      if shown not in out:
        out.append(shown)
  return out[:n]


def wants_help(argv: Sequence[str]) -> bool:
  """-h/--help anywhere among a subcommand's own arguments (before a `--`) asks for its help."""
  for arg in argv:
    if arg == "--":
      return False
    if arg in HELP_FLAGS:
      return True
  return False


def first_line(error: BaseException) -> str:
  """The first line of an exception's message (its type's name when it has none)."""
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


# absl's words for a value of the wrong type -> what the value must be, and an example.
_KINDS = (("invalid literal for int()", "a whole number", "100"),
          ("could not convert string to float", "a number", "0.001"),
          ("Non-boolean argument", "true or false", "true"))


def _value_message(line: str, flags: Sequence[Flag] = ()) -> str:
  """absl's "flag --X=V: <Python's parse error>" as "--X=V is not <kind>; give e.g. --X=<ex>",
  the example a valid value of X: its declared example (config fields, jaxdp.lm.schema) or
  default (flags), else a generic one."""
  match = re.match(r"flag (--[\w.]+)=(.*?): (.*)$", line)
  if match:
    for words, kind, example in _KINDS:
      if words in match.group(3):
        name, value = match.group(1), match.group(2)
        return f"{name}={value} is not {kind}; give e.g. {name}={_example(name, flags, example)}"
  return line


def _example(name: str, flags: Sequence[Flag], fallback: str) -> str:
  """A valid value of the flag `name` ("--top_k", "--config.seed") for advice."""
  if name.startswith("--config."):
    from jaxdp.lm.schema import SCHEMA, defaults
    field_name = name[len("--config."):]
    field = SCHEMA.get(field_name)
    value = None if field is None else \
        field.example if field.example is not None else defaults().get(field_name)
    return fallback if value is None else _shown_value(value)
  for flag in flags:  # The generic example, unless it is out of the flag's range.
    if f"--{flag.name}" == name and isinstance(flag.default, (int, float)):
      try:
        flag.check(int(fallback) if flag.kind == "integer" else float(fallback))
      except (JaxdpError, ValueError):
        return _shown_value(flag.default)
  return fallback


def _define(flag: Flag, values: Any) -> None:
  from absl import flags as absl_flags
  define: dict[str, Callable[..., Any]] = {
      "string": absl_flags.DEFINE_string, "integer": absl_flags.DEFINE_integer,
      "float": absl_flags.DEFINE_float, "bool": absl_flags.DEFINE_bool}
  if flag.kind == "enum":
    absl_flags.DEFINE_enum(flag.name, flag.default, list(flag.choices), flag.help,
                           flag_values=values)
  else:
    define[flag.kind](flag.name, flag.default, flag.help, flag_values=values)


def _take_config_arg(argv: list[str]) -> tuple[str, list[str]]:
  """Removes `--config PRESET|PATH` from argv; returns the config file path and the rest.

  Taking it out and giving the path to config_flags as the default means `--config.FIELD=V`
  may come before or after `--config` (config_flags alone refuses an override before it).
  Given twice, the last one counts, as for any flag.
  """
  from jaxdp.lm.config import preset_path
  found: list[str] = []
  rest: list[str] = []
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg == "--":
      rest += argv[i:]
      break
    if arg in ("--config", "-config"):
      if i + 1 >= len(argv):
        raise JaxdpError("--config needs a value: a preset name (e.g. tiny_cpu) or a config file")
      found.append(argv[i + 1])
      i += 2
      continue
    if arg.startswith(("--config=", "-config=")):
      found.append(arg.split("=", 1)[1])
    else:
      rest.append(arg)
    i += 1
  # The last one wins, as for every other flag.
  return preset_path(found[-1] if found else "default"), rest


def _load_config(path: str) -> tuple[Any, list[str]]:
  from jaxdp.lm.config import field_names, load_preset
  config = load_preset(path)
  return config, field_names(config)


def _check_overrides(argv: list[str], fields: list[str], command: str) -> None:
  """An unknown --config.FIELD fails with a did-you-mean among the config's fields."""
  valid = set(fields)
  for arg in argv:
    if arg == "--":
      break
    match = _CONFIG_ARG.match(arg.split("=", 1)[0])
    if not match or not (match.group("rest") or "").startswith("."):
      continue
    name = match.group("rest")[1:]
    if name in valid:
      continue
    candidates: dict[str, list[str]] = {}
    for field in fields:
      for key in (field, field.rsplit(".", 1)[-1]):
        candidates.setdefault(key, []).append(f"--config.{field}")
    suggestions = suggest(name, candidates)
    raise JaxdpError(f"unknown config field {name!r} in {arg!r}"
                     + (f"; did you mean {' or '.join(suggestions)}?" if suggestions else ".")
                     + f" Every field: `jaxdp {command} --help_config`.")


def _take_nulls(argv: list[str]) -> tuple[list[str], list[str]]:
  """Takes `--config.F=None` out of argv for each field F of the schema: None, for the schema.

  config_flags parses an override by the type of the preset's value, so once a preset sets a
  nullable field, "None" would be refused as "not a whole number", and a text field would take
  the word "None" itself (a wandb project, a checkpoint folder named None). Returns the rest of
  argv and the fields whose last override is None (an earlier override of such a field is
  dropped too: the last one wins, as for every flag); the schema's check then accepts None for a
  nullable field and refuses it, naming the field's valid values, for every other.
  """
  from jaxdp.lm.schema import SCHEMA
  end = argv.index("--") if "--" in argv else len(argv)
  overrides: list[tuple[str, str] | None] = []  # (field, value) of each schema field's override.
  for arg in argv[:end]:
    match = _CONFIG_ARG.match(arg.split("=", 1)[0])
    rest = (match.group("rest") or "") if match and not match.group(1) else ""
    field = SCHEMA.get(rest[1:]) if rest.startswith(".") and "=" in arg else None
    overrides.append((rest[1:], arg.split("=", 1)[1]) if field else None)
  last = {o[0]: o[1] for o in overrides if o}
  nulls = [name for name, value in last.items() if value == "None"]
  kept = [arg for arg, o in zip(argv[:end], overrides) if not (o and (o[1] == "None" or o[0] in nulls))]
  return kept + argv[end:], nulls


def _set_dotted(config: Any, name: str, value: Any) -> None:
  *parents, leaf = name.split(".")
  for part in parents:
    config = config[part]
  config[leaf] = value


def _define_config(values: Any, path: str, argv: list[str]) -> None:
  """Defines --config on `values`, with one flag per --config.FIELD override found in argv."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  try:
    # config_flags defines the override flags from `sys_argv` as soon as it parses the default.
    config_flags.DEFINE_config_file("config", path, "", flag_values=values, lock_config=True,
                                    sys_argv=["jaxdp"] + argv)
  except absl_flags.Error as e:
    raise JaxdpError(first_line(e)) from None


def _config_help() -> str:
  """--config's help, naming the presets (if they can be listed: help must never fail)."""
  text = ("A preset name or a config file path (a Python file with get_config()); the run is "
          "defined by it and the --config.FIELD overrides.")
  try:
    from jaxdp.lm.config import list_presets
    text += f" Presets: {', '.join(list_presets())}."
  except Exception:  # noqa: BLE001 - a broken preset folder must not break --help.
    pass
  return text


# Top-level modules that provide each accelerator platform JAX_PLATFORMS may name (prefixes).
_PLATFORM_MODULES = {"cuda": ("jax_cuda", "jax_plugins"), "gpu": ("jax_cuda", "jax_rocm", "jax_plugins"),
                     "rocm": ("jax_rocm", "jax_plugins"), "tpu": ("libtpu", "jax_plugins")}


def check_platforms(requested: str) -> None:
  """Refuses a JAX_PLATFORMS entry whose plugin is not installed: JAX would otherwise fail with a
  bare AssertionError at the first device use (JAX 0.10), long after start-up."""
  import pkgutil
  names = None
  for platform in (p.strip() for p in requested.split(",") if p.strip()):
    prefixes = _PLATFORM_MODULES.get(platform)
    if prefixes is None:
      continue
    names = names if names is not None else [m.name for m in pkgutil.iter_modules()]
    if not any(name.startswith(prefixes) for name in names):
      raise JaxdpError(f"JAX_PLATFORMS={requested!r} asks for {platform}, but no JAX {platform} "
                       f"plugin is installed; install one (e.g. pip install -U 'jax[cuda12]') or "
                       "unset JAX_PLATFORMS (or give --cpu_devices N to run on the CPU)")


def setup_devices(cpu_devices: int | None) -> None:
  """Sets the emulated CPU device count; must run before JAX initialises its backends.

  Raises:
    JaxdpError: JAX_PLATFORMS names an accelerator whose plugin is not installed.
  """
  import jax
  if cpu_devices is None:
    check_platforms(os.environ.get("JAX_PLATFORMS", "") or str(getattr(jax.config, "jax_platforms", "") or ""))
  if cpu_devices is not None:
    if cpu_devices < 1:
      raise JaxdpError(f"--cpu_devices={cpu_devices} must be >= 1")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  elif "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU backend reads this; on a GPU host the GPUs are used as they are.
    jax.config.update("jax_num_cpu_devices", max(2, os.cpu_count() or 1))
