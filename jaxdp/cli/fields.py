"""Config field documentation, read from the comments of the default preset's source.

The comment on a field's assignment line (`c.model.n_layer = 4  # Transformer blocks.`) is its
documentation. `tools/gen_config_docs.py` renders it as docs/configuration.md and
`jaxdp train --help_config` prints it next to the values a command would use; both parse it here.
"""

from __future__ import annotations

import ast
import io
import textwrap
import tokenize
from typing import Any

_WIDTH = 100


class UndocumentedFieldError(ValueError):
  """A config field's assignment has no trailing comment."""


def _dotted(node: ast.AST) -> str | None:
  """'model.n_layer' for the target `c.model.n_layer`; None for anything else."""
  parts = []
  while isinstance(node, ast.Attribute):
    parts.append(node.attr)
    node = node.value
  if isinstance(node, ast.Name) and parts:
    return ".".join(reversed(parts))
  return None


def parse_fields(source: str, filename: str = "<config>", strict: bool = True) -> list[dict]:
  """[{name, default, doc, line}] for every `c.FIELD = VALUE  # doc` assignment, in file order;
  ConfigDict() assignments open a section: {name, section: True, line}.

  strict: a field without a comment raises UndocumentedFieldError (named by `filename` and
  line); otherwise its doc is "".
  """
  comments = {tok.start[0]: tok.string.lstrip("#").strip()
              for tok in tokenize.generate_tokens(io.StringIO(source).readline)
              if tok.type == tokenize.COMMENT}
  fields = []
  for node in ast.walk(ast.parse(source)):
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
      continue
    name = _dotted(node.targets[0])
    if name is None:
      continue
    value = ast.get_source_segment(source, node.value) or ""  # None only without positions.
    if value.endswith("ConfigDict()"):
      fields.append({"name": name, "section": True, "line": node.lineno})
      continue
    doc = comments.get(node.end_lineno or node.lineno, "")
    if not doc and strict:
      raise UndocumentedFieldError(f"{filename}:{node.lineno}: field {name!r} has no comment; "
                                   "document it with a trailing `# ...` on the same line")
    if value.startswith("config_dict.placeholder("):
      value = "None"
    fields.append({"name": name, "default": value, "doc": doc, "line": node.lineno})
  return sorted(fields, key=lambda f: f["line"])


def default_preset_source() -> tuple[str, str]:
  """(path, text) of the default preset, whose comments document every field."""
  from jaxdp.lm.config import preset_path
  path = preset_path("default")
  with open(path) as f:
    return path, f.read()


def field_docs() -> dict[str, str]:
  """{dotted field name: its one-line documentation} from the default preset."""
  path, source = default_preset_source()
  return {f["name"]: f["doc"] for f in parse_fields(source, path, strict=False)
          if not f.get("section")}


def _shown(value: Any) -> str:
  """A value as it is written after --config.FIELD= (strings bare, None as None)."""
  return value if isinstance(value, str) else repr(value)


def describe(config: Any, config_path: str, command: str) -> str:
  """The text of `jaxdp COMMAND --help_config`: every field, its value in `config`, its meaning.

  Fields come in the default preset's order, one block per section (top level first); fields
  the default preset lacks come last in their section.
  """
  from jaxdp.lm.config import field_names
  from jaxdp.lm.schema import SCHEMA
  docs = field_docs()
  order = {name: i for i, name in enumerate(docs)}
  names = sorted(field_names(config), key=lambda n: (order.get(n, len(order)), n))
  sections: dict[str, list[str]] = {"": []}
  for name in names:
    sections.setdefault(name.rpartition(".")[0], []).append(name)
  lines = [f"Config fields of {config_path}, as `jaxdp {command}` would use them (after the "
           "--config.FIELD overrides given).",
           "Set any with --config.FIELD=VALUE; the same reference: docs/configuration.md."]
  for section, members in sections.items():
    if not members:
      continue
    lines.append(f"\n{section}.*:" if section else "\ntop-level fields:")
    for name in members:
      value = config
      for part in name.split("."):
        value = value[part]
      lines.append(f"  --config.{name}={_shown(value)}")
      lines.append(textwrap.fill(docs.get(name) or "(undocumented)", _WIDTH,
                                 initial_indent=" " * 6, subsequent_indent=" " * 6))
      if name in SCHEMA:
        lines.append(textwrap.fill(f"Valid: {SCHEMA[name].valid_text(resolve=False).replace('`', '')}.",
                                   _WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
  return "\n".join(lines)
