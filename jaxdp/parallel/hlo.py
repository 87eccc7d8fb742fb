"""Bytes moved by a compiled program's collectives, read from its HLO text.

Pure text parsing (no JAX): `collective_bytes(compiled.as_text())` is how every communication
figure in jaxdp is measured (plan, bench, the comm_bytes_per_step of each log line).
"""

from __future__ import annotations

import re
from typing import Any

_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
                "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1}
_KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\S+)\s+"
                    r"(?P<op>" + "|".join(_KINDS) + r")(?P<start>-start)?\((?P<rest>.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+(?:fn)?)?)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")


def _array_bytes(shape_text: str) -> list[int]:
  sizes = []
  for dtype, dims in _ARRAY.findall(shape_text):
    count = 1
    for dim in filter(None, dims.split(",")):
      count *= int(dim)
    sizes.append(count * _DTYPE_BYTES.get(dtype, 4))
  return sizes


def _iota(text: str) -> list[int]:
  """Device ids of an iota expression "[2,4]T(1,0)" (arange reshaped, transposed, flattened).

  Raises ValueError for any other text (callers pass what their own pattern matched).
  """
  match = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", text.strip())
  if match is None:
    raise ValueError(f"not an HLO iota expression: {text!r}")
  dims = [int(d) for d in match.group(1).split(",")]
  perm = [int(p) for p in match.group(2).split(",")] if match.group(2) else list(range(len(dims)))
  count = 1
  for d in dims:
    count *= d
  # Transpose by index arithmetic (pure Python: this module imports no array library).
  strides = [1] * len(dims)
  for i in range(len(dims) - 2, -1, -1):
    strides[i] = strides[i + 1] * dims[i + 1]
  out_dims = [dims[p] for p in perm]
  out = []
  for flat in range(count):
    index, rest = [], flat
    for d in reversed(out_dims):
      index.append(rest % d)
      rest //= d
    index.reverse()
    out.append(sum(index[k] * strides[perm[k]] for k in range(len(perm))))
  return out


def replica_groups(rest: str, n_all: int) -> list[list[int]]:
  """The device groups of one collective, from its attributes (`rest` of the HLO line).

  Three spellings: explicit `{{0,1},{2,3}}`; iota `[2,4]<=[8]` or `[4,2]<=[2,4]T(1,0)`; and the
  mesh form `mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_0'}` (device ids laid
  on a named mesh; each group is the devices that differ only along the listed axes). Without
  any, one group of all `n_all` devices.
  """
  listed = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", rest)
  if listed and listed.group(1):
    return [[int(i) for i in g.split(",") if i] for g in re.findall(r"\{([\d,]*)\}", listed.group(1))]
  iota = re.search(r"replica_groups=\[(\d+),(\d+)\]<=(\[[\d,]+\](?:T\([\d,]+\))?)", rest)
  if iota:
    ids, size = _iota(iota.group(3)), int(iota.group(2))
    return [ids[i:i + size] for i in range(0, len(ids), size)]
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?)\))?\s*\{([^}]*)\}",
                   rest)
  if mesh:
    axes = re.findall(r"'([^']+)'=(\d+)", mesh.group(1))
    names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
    count = 1
    for n in sizes:
      count *= n
    ids = _iota(mesh.group(2)) if mesh.group(2) else list(range(count))
    grouped = set(re.findall(r"'([^']+)'", mesh.group(3)))
    groups: dict[tuple, list[int]] = {}
    for flat, device in enumerate(ids):
      index, left = [], flat
      for n in reversed(sizes):
        index.append(left % n)
        left //= n
      index.reverse()
      key = tuple(i for name, i in zip(names, index) if name not in grouped)
      groups.setdefault(key, []).append(device)
    return list(groups.values())
  return [list(range(n_all))]


def _group_size(rest: str, num_partitions: int) -> int:
  return len(replica_groups(rest, num_partitions)[0])


def _sent_bytes(op: str, async_start: bool, shape: str, rest: str,
                n_all: int) -> tuple[list[float], float, int]:
  """(bytes each device 0..n_all-1 sends, the op's full buffer, its number of operands) of one
  collective (XLA's combiners merge many arrays into one tuple-shaped collective).

  Bandwidth-optimal algorithms: all-reduce 2(N-1)/N x size (ring), all-gather and all-to-all
  (N-1)/N x the full result, reduce-scatter (N-1) x the result shard; a collective-permute
  sends its operand from each source device listed in source_target_pairs.
  """
  arrays = _array_bytes(shape)
  if async_start and op in ("all-gather", "collective-permute"):
    # Async starts return (operands..., results..., [contexts]); take the results' half.
    arrays = arrays[len(arrays) // 2:] if op == "all-gather" else arrays[:1]
  size = float(sum(arrays))
  if op == "collective-permute":
    listed = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", rest)
    sent = [0.0] * n_all
    for source, target in re.findall(r"\{(\d+),(\d+)\}", listed.group(1) if listed else ""):
      if source != target and int(source) < n_all:
        sent[int(source)] += size
    return sent, size, len(arrays)
  n = _group_size(rest, n_all)
  factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "all-to-all": (n - 1) / n,
            "reduce-scatter": n - 1}[op]
  return [size * factor] * n_all, size * n if op == "reduce-scatter" else size, len(arrays)


def collective_bytes(hlo_text: str) -> dict[str, Any]:
  """Bytes each device sends per execution of a compiled program, from `compiled.as_text()`.

  Returns {"bytes": mean over devices, summing every collective once, "max_device_bytes": the
  busiest device (a parameter server), "conditional_bytes": the part inside conditional
  branches (e.g. a periodic sync; the caller weights it by how often the branch runs),
  "by_kind": {op: bytes}, "count": number of collectives, "buffers": {op: {"count", "bytes",
  "operands"}} with each op's full buffer (an all-gather's result, a reduce-scatter's input), for
  accountings such as the ZeRO paper's, and its arrays summed over the op's instructions, "conditionals": [[bytes of branch 0, branch 1, ...], ...] per
  conditional instruction holding collectives (branch i is `lax.switch`'s index i; a `lax.cond`
  is [false, true]), for a caller that knows which branch runs when}. Collectives inside loops
  are counted once per appearance, not per iteration.
  """
  header = re.search(r"num_partitions=(\d+)", hlo_text)
  n_all = int(header.group(1)) if header else 1
  # Per computation, each collective: (bytes sent by each device, full buffer bytes, operands, op).
  computations: dict[str, list[tuple[list[float], float, int, str]]] = {}
  callees: dict[str, set[str]] = {}
  branches: set[str] = set()
  ordered: list[list[str]] = []  # Each conditional's branches, in index order.
  current = None
  for line in hlo_text.splitlines():
    head = _COMPUTATION.match(line)
    if head:
      current = head.group("name")
      computations[current], callees[current] = [], set()
      continue
    if current is None:
      continue
    for key, names in re.findall(r"(calls|to_apply|body|condition|branch_computations|"
                                 r"true_computation|false_computation)=\{?([%\w.\-, ]+)\}?", line):
      found = {name.strip().lstrip("%") for name in names.split(",") if name.strip()}
      callees[current] |= found
      if key in ("branch_computations", "true_computation", "false_computation"):
        branches |= found
      if key == "branch_computations":
        ordered.append([name.strip().lstrip("%") for name in names.split(",") if name.strip()])
    instr = _INSTR.match(line)
    if instr:
      sent, buffer, operands = _sent_bytes(instr.group("op"), bool(instr.group("start")),
                                           instr.group("shape"), instr.group("rest"), n_all)
      computations[current].append((sent, buffer, operands, instr.group("op")))
  conditional: set[str] = set()
  frontier = list(branches)
  while frontier:  # Everything called from a conditional branch runs only when it does.
    name = frontier.pop()
    if name in conditional or name not in computations:
      continue
    conditional.add(name)
    frontier += list(callees[name])
  per_device = [0.0] * n_all
  result: dict[str, Any] = {"conditional_bytes": 0.0, "by_kind": {}, "count": 0, "buffers": {}}
  for name, ops in computations.items():
    for sent, buffer, operands, op in ops:
      entry = result["buffers"].setdefault(op, {"count": 0, "bytes": 0.0, "operands": 0})
      entry["count"] += 1
      entry["bytes"] += buffer
      entry["operands"] += operands
      mean = sum(sent) / n_all
      per_device = [a + b for a, b in zip(per_device, sent)]
      result["by_kind"][op] = result["by_kind"].get(op, 0.0) + mean
      result["count"] += 1
      if name in conditional:
        result["conditional_bytes"] += mean
  result["bytes"] = sum(per_device) / n_all
  result["max_device_bytes"] = max(per_device)
  own = {name: sum(sum(sent) / n_all for sent, _, _, _ in ops) for name, ops in computations.items()}

  def reachable(name: str, seen: set[str]) -> float:
    if name in seen or name not in computations:
      return 0.0
    seen.add(name)
    return own[name] + sum(reachable(c, seen) for c in callees[name])
  result["conditionals"] = [
      per_branch for per_branch in ([reachable(b, set()) for b in names] for names in ordered)
      if any(per_branch)]
  return result


def group_axes(group: list[int], axis_sizes: dict[str, int]) -> tuple[str, ...]:
  """The mesh axes a device group spans: those along which its devices' coordinates differ.

  Device ids are positions in the mesh's device order (row-major over `axis_sizes`, whose keys
  are in mesh order), which is how SPMD programs number devices (use_global_device_ids).
  """
  names, sizes = list(axis_sizes), list(axis_sizes.values())
  coords = []
  for device in group:
    index, left = [], device
    for n in reversed(sizes):
      index.append(left % n)
      left //= n
    coords.append(index[::-1])
  return tuple(name for k, name in enumerate(names) if len({c[k] for c in coords}) > 1)


def bytes_by_axes(hlo_text: str, axis_sizes: dict[str, int]) -> dict[str, dict[str, Any]]:
  """Bytes each device sends per execution, grouped by the mesh axes each collective spans.

  `axis_sizes`: the mesh's {axis name: size} in mesh order (`dict(mesh.shape)`). Returns
  {"replica+data": {"bytes": mean bytes per device, "ops": {op: count}}, ...}, keys joining the
  spanned axes in mesh order ("none" for a collective within one device). Counted like
  `collective_bytes` (each appearance once, conditional branches included).
  """
  header = re.search(r"num_partitions=(\d+)", hlo_text)
  n_all = int(header.group(1)) if header else 1
  out: dict[str, dict[str, Any]] = {}
  for line in hlo_text.splitlines():
    instr = _INSTR.match(line)
    if not instr:
      continue
    op, rest = instr.group("op"), instr.group("rest")
    sent, _, _ = _sent_bytes(op, bool(instr.group("start")), instr.group("shape"), rest, n_all)
    if op == "collective-permute":
      pairs = re.findall(r"\{(\d+),(\d+)\}", rest.split("source_target_pairs=", 1)[-1])
      spanned = {a for s, t in pairs if s != t for a in group_axes([int(s), int(t)], axis_sizes)}
      axes = tuple(a for a in axis_sizes if a in spanned)
    else:
      axes = group_axes(replica_groups(rest, n_all)[0], axis_sizes)
    entry = out.setdefault("+".join(axes) or "none", {"bytes": 0.0, "ops": {}})
    entry["bytes"] += sum(sent) / n_all
    entry["ops"][op] = entry["ops"].get(op, 0) + 1
  return out
