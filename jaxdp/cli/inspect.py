"""`jaxdp inspect`: what the checkpoints of a run hold (steps, config, arrays), without devices."""

from __future__ import annotations

import shlex
import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="inspect",
    summary="List a run's checkpoints: steps, eval loss, config, arrays.",
    description=(
        "Describes every checkpoint in CHECKPOINT_DIR (a workdir or its checkpoints/ folder): "
        "step, examples seen, eval loss, size on disk, the strategy and device count it was saved "
        "with, its config and every array's shape and dtype. Reads metadata only."),
    positional="CHECKPOINT_DIR", nargs="1", positional_path="run",
    no_config_hint="the config shown is the one saved with each checkpoint",
)


def run(args: types.SimpleNamespace) -> int:
  """Prints each checkpoint of a workdir: step, metadata, config and arrays; exit 0."""
  from jaxdp.runtime.checkpoint import describe
  path, step = args.positional[0], args.positional_steps[0]
  steps = describe(path)
  if step is not None:  # Given a step directory: that checkpoint only.
    steps = [info for info in steps if info["step"] == step]
  if not steps:
    print(f"no checkpoints in {path!r}" if step is None else
          f"no checkpoint at step {step} in {path!r} (`jaxdp inspect {shlex.quote(path)}` lists its steps)")
  previous = None
  for info in steps:
    meta = info["meta"]
    print(f"step {info['step']}: examples_seen {meta.get('examples_seen')}, eval_loss "
          f"{info['eval_loss']}, {info['disk_bytes']} bytes on disk, saved with strategy "
          f"{meta.get('strategy')!r} on {meta.get('num_devices')} devices")
    if meta.get("config") == previous:
      print("  config: as above")
    else:
      print("  config: " + ", ".join(f"{k}={v!r}" for k, v in _flat(meta.get("config", {}))))
      previous = meta.get("config")
    for array_path, shape, dtype, nbytes in info["arrays"]:
      print(f"  {array_path} {dtype}{list(shape)} {nbytes} bytes")
  return 0


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
  out: list[tuple[str, object]] = []
  for key, value in tree.items():
    out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
  return out
