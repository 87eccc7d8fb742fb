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
        "communication. With --measure it also times all-reduce, reduce-scatter, all-gather and "
        "ppermute on the mesh, fits latency and bandwidth (alpha-beta) per mesh axis, predicts "
        "each strategy's and communication method's step time from its compiled collectives, "
        "runs each step to measure it beside the prediction, and recommends one."),
    config=True,
    flags=(
        c.CPU_DEVICES,
        c.boolean("json", False, "Print JSON instead of a table."),
        c.boolean("measure", False, "Time collectives and steps on these devices and predict "
                  "each candidate's step time (runs steps: takes a minute or more)."),
        c.integer("repeats", 10, "Timed repetitions per measurement (--measure); the fastest is "
                  "used.", min=1),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Prints each strategy's memory and traffic for the config (--json, --measure); exit 0."""
  c.setup_devices(args.cpu_devices)
  from jaxdp.analysis.plan import format_table, plan
  result = plan(args.config)
  if args.measure:
    from jaxdp.analysis.measure import format_measure, measure_plan
    result["measure"] = measure_plan(args.config, repeats=args.repeats)
  if args.json:
    print(json.dumps(result, indent=2))
  else:
    print(format_table(result))
    if args.measure:
      print(format_measure(result["measure"]))
  return 0
