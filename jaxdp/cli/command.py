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
import os
import re
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

  def range_text(self) -> str:
    """'N >= 1', '0 < P <= 1'; '' when any value is valid."""
    if self.min is not None and self.max is None:  # 'N >= 1' reads better than '1 <= N'.
      return f"{self.metavar} {'>' if self.min_open else '>='} {_number(self.min)}"
    low = "" if self.min is None else f"{_number(self.min)} {'<' if self.min_open else '<='} "
    high = "" if self.max is None else f" <= {_number(self.max)}"
    return f"{low}{self.metavar}{high}" if low or high else ""

  def check(self, value: Any) -> None:
    """Raises JaxdpError naming the flag and its valid range if `value` is outside it."""
    if value is None or self.kind not in ("integer", "float"):
      return
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


def _number(x: float) -> str:
  """1, 0.8, 1e-05: integers in full, floats in their shortest form."""
  return str(x) if isinstance(x, int) else f"{x:g}"


def string(name: str, default: str | None, help: str, *, metavar: str = "TEXT",
           required: bool = False, default_text: str | None = None) -> Flag:
  """A string flag."""
  return Flag(name, "string", default, help, metavar=metavar, required=required,
              default_text=default_text)


def integer(name: str, default: int | None, help: str, *, metavar: str = "N",
            min: int | None = None, max: int | None = None, required: bool = False,
            default_text: str | None = None) -> Flag:
  """An integer flag, valid in [min, max] (either bound optional)."""
  return Flag(name, "integer", default, help, metavar=metavar, min=min, max=max,
              required=required, default_text=default_text)


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
      raise JaxdpError(_value_message(_first_line(e))) from None
    args = types.SimpleNamespace(positional=positional)
    if self.passthrough:
      args.launched = launched
    for flag in self.flags:
      value = values[flag.name].value
      flag.check(value)
      if flag.required and value in (None, ""):
        raise JaxdpError(f"`jaxdp {self.name}` needs --{flag.name} {flag.metavar}: {flag.help}")
      setattr(args, flag.name, value)
    self._check_positional(positional)
    if self.config:
      args.config, args.config_path = values.config, config_path
      args.help_config = values.help_config
    return args

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


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]


# absl's words for a value of the wrong type -> what the value must be, and an example.
_KINDS = (("invalid literal for int()", "a whole number", "100"),
          ("could not convert string to float", "a number", "0.001"),
          ("Non-boolean argument", "true or false", "true"))


def _value_message(line: str) -> str:
  """absl's "flag --X=V: <Python's parse error>" as "--X=V is not <kind>; give e.g. --X=<ex>"."""
  match = re.match(r"flag (--[\w.]+)=(.*?): (.*)$", line)
  if match:
    for words, kind, example in _KINDS:
      if words in match.group(3):
        name, value = match.group(1), match.group(2)
        return f"{name}={value} is not {kind}; give e.g. {name}={example}"
  return line


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


def _define_config(values: Any, path: str, argv: list[str]) -> None:
  """Defines --config on `values`, with one flag per --config.FIELD override found in argv."""
  from absl import flags as absl_flags
  from ml_collections import config_flags
  try:
    # config_flags defines the override flags from `sys_argv` as soon as it parses the default.
    config_flags.DEFINE_config_file("config", path, "", flag_values=values, lock_config=True,
                                    sys_argv=["jaxdp"] + argv)
  except absl_flags.Error as e:
    raise JaxdpError(_first_line(e)) from None


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


def setup_devices(cpu_devices: int | None) -> None:
  """Sets the emulated CPU device count; must run before JAX initialises its backends."""
  import jax
  if cpu_devices is not None:
    if cpu_devices < 1:
      raise JaxdpError(f"--cpu_devices={cpu_devices} must be >= 1")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  elif "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU backend reads this; on a GPU host the GPUs are used as they are.
    jax.config.update("jax_num_cpu_devices", max(2, os.cpu_count() or 1))
