"""Small facts about pytrees that several layers read: key paths as names, sizes."""

from __future__ import annotations

from typing import Any

import jax


def path_names(path: tuple, drop_value: bool = False) -> tuple[str, ...]:
  """A pytree key path (from `jax.tree_util.tree_leaves_with_path`) as plain strings.

  Dict keys, attribute names and sequence indices become their text, so the same array gets the
  same names in a state, its abstract twin and orbax's metadata. `drop_value` drops a trailing
  "value": an NNX Variable's array, which orbax names ".../value" and a tree of Variables does not.
  """
  def name(key) -> str:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  names = tuple(name(k) for k in path)
  if drop_value and len(names) > 1 and names[-1] == "value":
    names = names[:-1]
  return names


def count_params(params: Any) -> int:
  """Number of scalars in a parameter tree (any pytree of arrays or ShapeDtypeStructs)."""
  return sum(x.size for x in jax.tree.leaves(params))
