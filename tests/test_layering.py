"""The package's layers: pure code at the core, side effects at the edge.

Every `import` in every module (including imports inside functions) is checked against the
table below, so a layer cannot quietly start depending on one above it.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdp")

# Layer -> the jaxdp modules it may import (a prefix matches the module and its children).
ALLOWED = {
    "jaxdp.errors": (),
    "jaxdp.core": ("jaxdp.errors", "jaxdp.core"),
    "jaxdp.models": ("jaxdp.errors", "jaxdp.core", "jaxdp.models"),
    "jaxdp.data": ("jaxdp.errors", "jaxdp.data"),
    "jaxdp.analysis.hlo": (),
    "jaxdp.parallel": ("jaxdp.errors", "jaxdp.core", "jaxdp.parallel", "jaxdp.analysis.hlo"),
    "jaxdp.config": ("jaxdp.errors", "jaxdp.core", "jaxdp.models", "jaxdp.parallel", "jaxdp.data"),
    "jaxdp.configs": ("jaxdp.configs",),
    "jaxdp.runtime": ("jaxdp.errors", "jaxdp.config", "jaxdp.core", "jaxdp.models", "jaxdp.data",
                      "jaxdp.parallel", "jaxdp.analysis.hlo", "jaxdp.runtime"),
    "jaxdp.analysis": ("jaxdp.errors", "jaxdp.config", "jaxdp.core", "jaxdp.models", "jaxdp.data",
                       "jaxdp.parallel", "jaxdp.runtime", "jaxdp.analysis"),
    "jaxdp.cli": ("jaxdp",),
    "jaxdp": ("jaxdp",),  # The package's __init__: the public API re-exports every layer.
}
# Third-party imports a layer must not make: the data pipeline runs without JAX.
FORBIDDEN = {"jaxdp.data": ("jax", "flax", "optax", "orbax")}


def module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(ROOT))[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def layer_of(module: str) -> str:
  return max((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")),
             key=len)


def imports(path: str) -> list[str]:
  tree = ast.parse(open(path).read(), path)
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found += [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names
                                if node.module == "jaxdp"]
  return found


def python_files():
  for folder, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        yield os.path.join(folder, name)


def allowed(imported: str, prefixes) -> bool:
  return any(imported == p or imported.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", sorted(python_files()), ids=lambda p: module_name(p))
def test_module_imports_only_its_own_and_lower_layers(path):
  module = module_name(path)
  layer = layer_of(module)
  bad = [name for name in imports(path)
         if (name == "jaxdp" or name.startswith("jaxdp.")) and name != "jaxdp"
         and not allowed(name, ALLOWED[layer])]
  bad += [name for name in imports(path) if allowed(name, FORBIDDEN.get(layer, ()))]
  assert not bad, f"{module} (layer {layer}) imports {bad}"


def test_the_table_catches_a_violation(tmp_path):
  """The check itself: a core module importing the runtime is reported."""
  path = tmp_path / "bad.py"
  path.write_text("def f():\n  from jaxdp.runtime import loop\n")
  assert [n for n in imports(str(path)) if not allowed(n, ALLOWED["jaxdp.core"])] == ["jaxdp.runtime"]
