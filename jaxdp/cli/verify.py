"""`jaxdp verify`: every strategy trains like one device, within a tolerance (exit 1 if not)."""

from __future__ import annotations

import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="verify",
    summary="Check that every strategy matches one-device training (exit status 1 if not).",
    description=(
        "Trains --steps steps of the config on one device, then under each strategy on all "
        "visible devices, and compares losses and parameters within a relative tolerance. Exit "
        "status 1 when any strategy differs."),
    config=True,
    flags=(
        c.CPU_DEVICES,
        c.integer("steps", 3, "Training steps to compare against one device.", metavar="K", min=1),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Exit status 1 when any strategy differs from one device beyond the tolerance."""
  c.setup_devices(args.cpu_devices)
  import jax

  from jaxdp.analysis.verify import DEFAULT_TOLERANCE, verify
  devices = jax.devices()
  print(f"{args.steps} steps on 1 device vs {len(devices)} devices; tolerance "
        f"loss {DEFAULT_TOLERANCE['loss']:g}, params {DEFAULT_TOLERANCE['params']:g} (relative)")
  results = verify(args.config, devices, args.steps, report=lambda line: print(line, flush=True))
  failed = [name for name, r in results.items() if not r["ok"]]
  print(f"FAILED: {', '.join(failed)}" if failed else "all strategies match one device")
  return 1 if failed else 0
