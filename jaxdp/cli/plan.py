"""`jaxdp plan`: per-strategy memory and communication of the config on these devices."""

from __future__ import annotations

import json
import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="plan",
    summary="Compare strategies for the config on these devices: memory, communication.",
    description=(
        "Compiles one training step of the config under each strategy (dp, zero1, zero2, zero3) "
        "for the visible devices, without running it, and prints per-device memory and "
        "communication."),
    config=True,
    flags=(
        c.CPU_DEVICES,
        c.boolean("json", False, "Print JSON instead of a table."),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  c.setup_devices(args.cpu_devices)
  from jaxdp.analysis.plan import format_table, plan
  result = plan(args.config)
  print(json.dumps(result, indent=2) if args.json else format_table(result))
  return 0
