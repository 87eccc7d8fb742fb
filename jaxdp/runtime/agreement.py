"""Start-up agreement of the processes of one run: the same config, data and versions everywhere.

Processes started with different flags (a different `--config.learning_rate` on one host, another
jaxdp or JAX version on a stale image, another copy of the data) would otherwise train on, each
taking its own steps over shared collectives, their numbers silently diverging. `check` gathers a
digest of every field from every process (`process_allgather`, one small collective of int32s)
and refuses, on every process alike, naming the first field that differs and the processes that
hold another value than process 0.

The fields compared: the jaxdp and JAX versions, the data fingerprint (RunRecord.data_digest) and
every config field except those naming local paths (the data's content is compared through its
digest instead, so the same bytes under another mount point agree).
"""

from __future__ import annotations

from collections.abc import Mapping
import hashlib
import json
import time
from typing import Any

import numpy as np

from jaxdp.errors import JaxdpError

# Config fields that name files on each host: their content is compared by the data digest.
LOCAL_PATHS = frozenset({"data.path", "data.sources", "data.tokenizer", "init_from", "eval_tasks"})


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out: dict[str, Any] = {}
  for key, value in tree.items():
    name = prefix + str(key)
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def fields(config: Mapping[str, Any] | None, data_digest: str | None) -> dict[str, Any]:
  """{name: value} every process of a run must agree on: "jaxdp version", "JAX version",
  "data fingerprint" and "config.FIELD" for each config field but LOCAL_PATHS."""
  from importlib import metadata

  import jax
  try:
    version = metadata.version("jaxdp")
  except metadata.PackageNotFoundError:  # A source tree on PYTHONPATH, not installed.
    version = "unknown"
  out: dict[str, Any] = {"jaxdp version": version,
                         "JAX version": jax.__version__, "data fingerprint": data_digest}
  for name, value in sorted(_flatten(config or {}).items()):
    if name not in LOCAL_PATHS:
      out[f"config.{name}"] = value
  return out


def _digest(value: Any) -> np.ndarray:
  """Two int32s of the sha256 of `value`'s JSON text (repr for what JSON cannot say)."""
  text = json.dumps(value, sort_keys=True, default=repr)
  return np.frombuffer(hashlib.sha256(text.encode()).digest()[:8], np.int32).copy()


def _shown(value: Any) -> str:
  text = repr(value)
  return text if len(text) <= 60 else text[:57] + "..."


def check(config: Mapping[str, Any] | None, data_digest: str | None) -> None:
  """On a run of several processes, refuses unless every process holds the same `fields`.

  A collective: every process of the run must call it at the same point (fit does, before it
  touches the workdir). A no-op on one process.

  Raises:
    JaxdpError: on every process, one line naming the first field (in the order of `fields`)
      that differs, the processes whose value is not process 0's, and this process's value.
  """
  import jax
  if jax.process_count() == 1:
    return
  from jax.experimental.multihost_utils import process_allgather
  mine = fields(config, data_digest)
  names = list(mine)
  # Round 1, fixed size: versions, data and the set of field names, then everything at once.
  head = ["jaxdp version", "JAX version", "data fingerprint"]
  summary = np.concatenate([_digest(mine[n]) for n in head] + [_digest(names), _digest(mine)])
  gathered = np.asarray(process_allgather(summary)).reshape(jax.process_count(), -1, 2)
  if (gathered == gathered[0]).all():
    return
  me = jax.process_index()
  for i, name in enumerate(head + ["the config's field names"]):
    others = [p for p in range(len(gathered)) if not (gathered[p, i] == gathered[0, i]).all()]
    if others:
      value = _shown(mine[name]) if name in mine else f"{len(names)} fields"
      _refuse(_message(name, others, me, value))
  # Round 2: the same names everywhere, so one digest per field lines up across processes.
  per_field = np.asarray(process_allgather(np.stack([_digest(mine[n]) for n in names])))
  for i, name in enumerate(names):
    others = [p for p in range(len(per_field)) if not (per_field[p, i] == per_field[0, i]).all()]
    if others:
      _refuse(_message(name, others, me, _shown(mine[name])))
  _refuse("the processes of this run disagree on their config, but no single field differs; "
          "start every process with the same flags")


REFUSED_KEY = "jaxdp/agreement/refused/"
GRACE_S = 0.3  # How long process 0 outlives the others' acknowledgements (they print at once).


def _refuse(message: str) -> None:
  """Raises JaxdpError(message) on every process, process 0 last: every process reached the same
  verdict, but when process 0 (the coordinator) exits first, JAX aborts the others natively
  before they can say why. So the others acknowledge through its key-value store, and process 0
  waits for them (at most 30 s) and GRACE_S more before raising."""
  import jax
  from jax._src import distributed
  client = distributed.global_state.client
  me = jax.process_index()
  try:
    assert client is not None, "several processes have a distributed client"
    if me != 0:
      client.key_value_set(f"{REFUSED_KEY}{me}", "1")
    else:
      for p in range(1, jax.process_count()):
        client.blocking_key_value_get(f"{REFUSED_KEY}{p}", 30_000)
      time.sleep(GRACE_S)
  except Exception:  # noqa: BLE001 - a store that fails changes nothing about the verdict.
    pass
  raise JaxdpError(message)


def _message(name: str, others: list[int], me: int, value: str) -> str:
  which = ", ".join(map(str, others))
  return (f"the processes of this run disagree on {name}: process{'es' if len(others) > 1 else ''} "
          f"{which} {'have' if len(others) > 1 else 'has'} another value than process 0 (process "
          f"{me} has {value}); start every process with the same flags, data and jaxdp/JAX "
          "versions")
