"""Where each array of the train state lives: logical axes, tensor parallelism and ZeRO.

A strategy decides only where arrays live; the model, loss, optimizer, data and step bodies are
shared. Two independent choices make an array's PartitionSpec:

- the "model" mesh axis (tensor parallelism) splits the dimensions a model *annotates* with
  logical axis names (Flax `nn.with_logical_partitioning`, NNX `nnx.with_partitioning`, or
  `param_dims` given to `DataParallel`), mapped to mesh axes by rules such as
  `(("heads", "model"), ("mlp", "model"))`, as Flax's logical partitioning does;
- the "data" axis (ZeRO, Rajbhandari et al. 2020) splits the optimizer state (zero1), also the
  gradients (zero2) and also the parameters (zero3) on the largest dimension it divides that
  the model axis left free, so shards are even and need no padding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import sys
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from jaxdp.core.tree import path_names
from jaxdp.errors import JaxdpError
from jaxdp.parallel.mesh import DATA, MODEL, replicated

# The parts of the train state each strategy splits over "data" (ZeRO stages 1, 2, 3).
ZERO_PARTS = {"dp": (), "zero1": ("opt_state",), "zero2": ("opt_state", "grads"),
              "zero3": ("opt_state", "grads", "params")}

# Logical axis name -> mesh axis, Megatron-style: attention heads and the MLP hidden dimension
# go to "model", which keeps each block's math local to a device until the one reduction after
# its output projection. Names not listed stay whole; a name that is itself a mesh axis maps to it.
DEFAULT_RULES: tuple[tuple[str, str | None], ...] = (
    ("heads", MODEL), ("kv_heads", MODEL), ("mlp", MODEL),
    ("vocab", None), ("embed", None), ("head_dim", None), ("qkv", None), ("layers", None))

# Logical names of each dimension of one parameter; None for a dimension with no name.
Names = tuple[str | None, ...]
# param_dims given to DataParallel: a pytree shaped like the params whose leaves are Names (or
# None for "no annotation"), or a function (path names, shape) -> Names | None.
ParamDims = Any | Callable[[tuple[str, ...], tuple[int, ...]], Names | None]


def _is_boxed(x) -> bool:
  """A Flax Linen AxisMetadata box (LogicallyPartitioned, Partitioned) or an NNX Variable."""
  from flax.core import meta
  if isinstance(x, meta.AxisMetadata):
    return True
  # An NNX Variable exists only where flax.nnx was imported (by the model's own code); importing it
  # here would cost every Linen or plain-functions run a third of a second of start-up.
  nnx = sys.modules.get("flax.nnx")
  return nnx is not None and isinstance(x, nnx.Variable)


def _box_names(x) -> Names | None:
  from flax.core import meta
  if isinstance(x, meta.AxisMetadata):
    return tuple(getattr(x, "names", ()) or ()) or None
  metadata = x.get_metadata() if hasattr(x, "get_metadata") else {}
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = metadata.get(key)
    if names:
      return tuple(names)
  return None


def split_annotations(params) -> tuple[Any, dict[tuple[str, ...], Names]]:
  """(params without Linen boxes, {param path: logical names}) of an `init_fn`'s output.

  Linen's `LogicallyPartitioned` boxes are removed (their values kept), so the state holds
  plain arrays; NNX Variables stay (they are the model's own pytree nodes) and their sharding
  metadata is read. Paths are the names of the unboxed tree, without NNX's trailing "value".
  """
  from flax.core import meta
  names: dict[tuple[str, ...], Names] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=_is_boxed):
    if _is_boxed(leaf):
      found = _box_names(leaf)
      if found is not None:
        names[path_names(path)] = found
  unboxed = jax.tree.map(lambda x: x.unbox() if isinstance(x, meta.AxisMetadata) else x, params,
                         is_leaf=lambda x: isinstance(x, meta.AxisMetadata))
  return unboxed, names


def explicit_annotations(params, param_dims: ParamDims) -> dict[tuple[str, ...], Names]:
  """{param path: logical names} from `param_dims` (a pytree like params, or a function)."""
  out: dict[tuple[str, ...], Names] = {}
  if callable(param_dims):
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
      key = _param_key(path)
      names = param_dims(key, tuple(leaf.shape))
      if names is not None:
        out[key] = tuple(names)
    return out
  leaves = jax.tree_util.tree_leaves_with_path(
      param_dims, is_leaf=lambda x: x is None or isinstance(x, (tuple, P)))
  for path, names in leaves:
    if names is not None:
      out[_param_key(path)] = tuple(names)
  return out


def _param_key(path) -> tuple[str, ...]:
  names = path_names(path)
  return names[:-1] if names and names[-1] == "value" else names  # NNX Variable's leaf.


def mesh_axes(names: Names | None, ndim: int, mesh: Mesh,
              rules: Sequence[tuple[str, str | None]]) -> list[str | None]:
  """The mesh axis (or None) of each dimension: logical names mapped by `rules`."""
  table = dict(rules)
  spec: list[str | None] = [None] * ndim
  if not names:
    return spec
  if len(names) != ndim:
    raise JaxdpError(f"a parameter of rank {ndim} is annotated with {len(names)} logical axis "
                     f"names {names}; give one name (or None) per dimension")
  for d, name in enumerate(names):
    if name is None:  # An unnamed dimension stays whole.
      continue
    axis = table.get(name, name if name in mesh.axis_names else None)
    if axis is not None and mesh.shape[axis] > 1:
      spec[d] = axis
  return spec


class Layout:
  """The PartitionSpec of every array of a train state under one strategy on one mesh.

  Built from the logical names of the parameters; an optimizer-state array shaped like a
  parameter (Adam's moments, momentum) gets that parameter's names, found by the longest suffix
  of its path that is a parameter's path with the same shape.
  """

  def __init__(self, mesh: Mesh, annotations: dict[tuple[str, ...], Names],
               param_shapes: dict[tuple[str, ...], tuple[int, ...]],
               rules: Sequence[tuple[str, str | None]] = DEFAULT_RULES):
    self.mesh = mesh
    self.rules = tuple(rules)
    self._names = annotations
    self._shapes = param_shapes
    if mesh.shape[MODEL] > 1 and not any(
        MODEL in mesh_axes(names, len(param_shapes.get(path, names)), mesh, self.rules)
        for path, names in annotations.items()):
      raise JaxdpError(
          f"mesh.model={mesh.shape[MODEL]} but no parameter has a dimension whose logical axis "
          f"the rules map to 'model' (rules {dict(self.rules)}); annotate the model's "
          "parameters (flax.linen.with_logical_partitioning, nnx.with_partitioning, or "
          "DataParallel(param_dims=...)), or set mesh.model=1")

  def names(self, path) -> Names | None:
    """Logical names of the array at `path` (a parameter, or optimizer state ending in a
    parameter's path); None when unannotated."""
    key = _param_key(path)
    for start in range(len(key)):
      suffix = key[start:]
      if suffix in self._names:
        return self._names[suffix]
    return None

  def spec(self, path, shape: tuple[int, ...], split_data: bool) -> tuple[P, str | None]:
    """(PartitionSpec, why it stays whole over "data" or None) of one state array."""
    names = self.names(path)
    key = _param_key(path)
    matched = next((key[s:] for s in range(len(key)) if key[s:] in self._shapes), None)
    if names is not None and matched is not None and tuple(self._shapes[matched]) != tuple(shape):
      names = None  # Same path, other shape (e.g. a factored Adafactor moment): no annotation.
    spec = mesh_axes(names, len(shape), self.mesh, self.rules)
    data = self.mesh.shape[DATA]
    if not split_data or data == 1:
      return P(*spec), None
    free = [d for d in range(len(shape)) if spec[d] is None and shape[d] % data == 0]
    if not free:
      why = ("a scalar" if not shape else
             f"no free dimension of shape {tuple(shape)} is divisible by data={data}")
      return P(*spec), why
    spec[max(free, key=lambda d: shape[d])] = DATA
    return P(*spec), None

  def tree(self, tree, split_data: bool, memory_kind: str | None = None):
    """NamedShardings for a tree of arrays (params, gradients or optimizer state)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(self.mesh, self.spec(path, x.shape, split_data)[0],
                                      memory_kind=memory_kind), tree)

  def params_per_device(self, abstract_params) -> int:
    """Parameters one device holds before any ZeRO split (tensor-parallel dims divided)."""
    total = 0
    for path, x in jax.tree_util.tree_leaves_with_path(abstract_params):
      spec = self.spec(path, x.shape, split_data=False)[0]
      divisor = int(np.prod([self.mesh.shape[a] for a in spec if a is not None]))
      total += int(np.prod(x.shape)) // divisor
    return total


def replicated_report(strategy: str, layout: Layout, abstract_state) -> list[dict[str, Any]]:
  """The arrays that `strategy` would split over "data" but keeps whole, and why."""
  report = []
  for part in ZERO_PARTS[strategy]:
    tree = abstract_state.params if part == "grads" else getattr(abstract_state, part)
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
      _, why = layout.spec(path, x.shape, split_data=True)
      if why is not None:
        report.append({"array": part + jax.tree_util.keystr(path), "shape": tuple(x.shape),
                       "bytes": int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize, "why": why})
  return report


def check_offload(mesh: Mesh) -> None:
  """Raises unless the devices have host memory distinct from their own (GPU, TPU)."""
  device = mesh.devices.flat[0]
  kinds = {m.kind for m in device.addressable_memories()}
  if device.platform == "cpu" or "pinned_host" not in kinds:
    raise JaxdpError(
        f"offload_optimizer=True: {device.platform} devices have no host memory apart from "
        f"their own (memory kinds {sorted(kinds)}), so there is nothing to offload to; set "
        "config.offload_optimizer=False, or run on GPU/TPU")


def state_shardings(strategy: str, layout: Layout, abstract_state,
                    offload_optimizer: bool = False) -> Any:
  """The sharding of every array of the train state under `strategy`.

  dp replicates everything. The ZeRO stages split their parts over "data" (see ZERO_PARTS);
  with `offload_optimizer` the optimizer state lives in pinned host memory (ZeRO-Offload).
  Scalars (step, rng, counters, loss scale) are replicated; per-device comm rows
  (parallel/exchange.py) are split over "data", one row per device.
  """
  mesh = layout.mesh
  everywhere = jax.tree.map(lambda _: replicated(mesh), abstract_state).replace(
      comm=jax.tree.map(lambda _: NamedSharding(mesh, P(DATA)), abstract_state.comm))
  if strategy == "dp":
    return everywhere
  if offload_optimizer:
    check_offload(mesh)
  parts = ZERO_PARTS[strategy]
  return everywhere.replace(
      params=layout.tree(abstract_state.params, "params" in parts),
      opt_state=layout.tree(abstract_state.opt_state, True,
                            "pinned_host" if offload_optimizer else None))


def gradient_shardings(strategy: str, layout: Layout, abstract_params) -> Any:
  """Where the summed gradients live: split over "data" from zero2 on (reduce-scatter)."""
  if strategy == "dp":
    return jax.tree.map(lambda _: replicated(layout.mesh), abstract_params)
  return layout.tree(abstract_params, "grads" in ZERO_PARTS[strategy])
