"""Dotted field names ("model.n_layer") in nested configs, without JAX: a checkpoint's saved
config (a dict) and the app's ConfigDict are read with the same function."""

from __future__ import annotations

from typing import Any


def dotted_get(tree: Any, name: str, default: Any = None) -> Any:
  """The value of the dotted field `name` ("model.n_layer") in nested mappings (dicts, a
  ConfigDict), or `default` where a part is missing or its parent is not a mapping."""
  for part in name.split("."):
    try:
      tree = tree[part]
    except (KeyError, TypeError, IndexError, AttributeError):
      return default
  return tree
