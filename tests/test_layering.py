"""The package's layers: pure code at the core, side effects at the edge.

Every `import` in every module (including imports inside functions) is checked against the
table below, so a layer cannot quietly start depending on one above it.
"""

import ast
import os

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxdp")

# Layer -> the jaxdp modules it may import (a prefix matches the module and its children).
# Order: errors < core < models, data < parallel < runtime < lm < analysis < cli, jaxdp.
LOWER = {"jaxdp.errors": (), "jaxdp.core": ("jaxdp.errors",)}
LOWER["jaxdp.models"] = LOWER["jaxdp.core"] + ("jaxdp.core",)
LOWER["jaxdp.data"] = ("jaxdp.errors",)
LOWER["jaxdp.parallel"] = LOWER["jaxdp.core"] + ("jaxdp.core",)
# runtime/ is what any model's run needs: it imports neither the built-in models nor the app.
LOWER["jaxdp.runtime"] = LOWER["jaxdp.parallel"] + ("jaxdp.data", "jaxdp.parallel")
LOWER["jaxdp.lm"] = LOWER["jaxdp.runtime"] + ("jaxdp.models", "jaxdp.runtime", "jaxdp.configs")
LOWER["jaxdp.analysis"] = LOWER["jaxdp.lm"] + ("jaxdp.lm",)
ALLOWED = {layer: below + (layer,) for layer, below in LOWER.items()}
ALLOWED["jaxdp.configs"] = ("jaxdp.configs",)
ALLOWED["jaxdp.cli"] = ("jaxdp",)
ALLOWED["jaxdp"] = ("jaxdp",)  # The package's __init__: the public API re-exports every layer.
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


def test_runtime_imports_no_config_built_in_model_or_app_module():
  """runtime/ serves any model: the built-in app (jaxdp.lm, its config) and the built-in models
  stay out of it, also through imports inside functions."""
  found = {module_name(path): [name for name in imports(path)
                               if allowed(name, ("jaxdp.lm", "jaxdp.models", "jaxdp.configs"))]
           for path in python_files() if layer_of(module_name(path)) == "jaxdp.runtime"}
  assert found and not any(found.values()), {m: names for m, names in found.items() if names}


def module_imports(path: str, modules: set[str]) -> set[str]:
  """The jaxdp modules `path` imports, at module level or inside functions: `from P import N`
  counts as an import of module P.N when N is a module, else of P."""
  tree = ast.parse(open(path).read(), path)
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for alias in node.names:
        found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                  else node.module)
  return {name for name in found if name in modules}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Every circle of the import graph {module: modules it imports}: the strongly connected
  components with more than one module, or a module importing itself (Tarjan's algorithm)."""
  index, low, on_stack, stack, cycles = {}, {}, set(), [], []

  def visit(node: str) -> None:
    index[node] = low[node] = len(index)
    stack.append(node)
    on_stack.add(node)
    for other in sorted(graph.get(node, ())):
      if other not in index:
        visit(other)
        low[node] = min(low[node], low[other])
      elif other in on_stack:
        low[node] = min(low[node], index[other])
    if low[node] == index[node]:
      component = []
      while True:
        member = stack.pop()
        on_stack.discard(member)
        component.append(member)
        if member == node:
          break
      if len(component) > 1 or node in graph.get(node, ()):
        cycles.append(sorted(component))

  for node in sorted(graph):
    if node not in index:
      visit(node)
  return cycles


def package_graph() -> dict[str, set[str]]:
  paths = {module_name(path): path for path in python_files()}
  return {module: module_imports(path, set(paths)) - {module} for module, path in paths.items()}


def test_no_import_circle_between_modules_also_inside_a_layer():
  """No module reaches itself through imports (at module level or inside functions), also
  between modules of one layer (e.g. runtime/observe -> runtime/trainer -> runtime/observe)."""
  assert import_cycles(package_graph()) == []


def test_the_cycle_finder_catches_a_planted_circle(tmp_path):
  """The check itself: three modules of one layer importing each other in a ring, one of them
  inside a function, are reported as one circle; a chain is not."""
  modules = {"jaxdp.runtime.a", "jaxdp.runtime.b", "jaxdp.runtime.c", "jaxdp.runtime.d"}
  sources = {"a": "from jaxdp.runtime import b\n", "b": "import jaxdp.runtime.c\n",
             "c": "def f():\n  from jaxdp.runtime.a import thing\n", "d": "from jaxdp.runtime import a\n"}
  graph = {}
  for name, text in sources.items():
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    graph[f"jaxdp.runtime.{name}"] = module_imports(str(path), modules)
  assert import_cycles(graph) == [["jaxdp.runtime.a", "jaxdp.runtime.b", "jaxdp.runtime.c"]]
  del graph["jaxdp.runtime.c"]
  assert import_cycles(graph) == []
