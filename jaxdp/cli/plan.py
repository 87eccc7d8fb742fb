"""`jaxdp plan`: per-strategy memory and communication of the config on these devices."""

from __future__ import annotations

import json
import types

from jaxdp.cli import command as c
from jaxdp.errors import JaxdpError

COMMAND = c.Command(
    name="plan",
    summary="Compare strategies for the config on these devices: memory, communication.",
    description=(
        "Compiles one training step of the config under each strategy (dp, zero1, zero2, zero3) "
        "for the visible devices, without running it, and prints per-device memory and "
        "communication. With --measure it also times all-reduce, reduce-scatter, all-gather and "
        "ppermute on the mesh, fits latency and bandwidth (alpha-beta) per mesh axis, predicts "
        "each strategy's and communication method's step time from its compiled collectives, "
        "runs each step to measure it beside the prediction, and recommends one. With --advise "
        "and the --workdir of a finished run of the same config, it fits the gradient noise "
        "model of McCandlish et al. 2018 to that run's logged noise scale and steps to a target "
        "loss, measures step times per strategy on 1, 2, 4, ... of the devices, and predicts "
        "steps, tokens and seconds to the target for candidate global batches and device "
        "counts, recommending the fastest."),
    config=True,
    resolve_before_run=False,  # --workdir is --advise's: its other flags are refused first.
    flags=(
        c.CPU_DEVICES,
        c.boolean("json", False, "Print JSON instead of a table."),
        c.boolean("measure", False, "Time collectives and steps on these devices and predict "
                  "each candidate's step time (runs steps: takes a minute or more)."),
        c.integer("repeats", 10, "Timed repetitions per measurement (--measure, --advise); the "
                  "fastest is used.", min=1),
        c.boolean("advise", False, "Recommend a global batch size and device count from the "
                  "noise scale of the run in --workdir (measures step times: minutes)."),
        c.string("workdir", None, "--advise: the finished run of this config whose metrics.jsonl "
                 "gives the noise scale and the steps to --target.", metavar="DIR", path="run"),
        c.real("target", None, "--advise: the evaluation loss to reach (nats/token); default: the "
               "run's last evaluation loss.", metavar="LOSS", min=0, min_open=True),
        c.string("device_counts", None, "--advise: device counts to consider, comma-separated "
                 "(default: 1, 2, 4, ... up to all visible devices).", metavar="N1,N2,..."),
        c.string("strategies", None, "--advise: strategies to consider, comma-separated (default: "
                 "dp, zero1, zero2, zero3).", metavar="S1,S2,..."),
        c.string("batches", None, "--advise: candidate global batches, comma-separated (default: "
                 "the run's batch times 1/4, 1/2, 1, 2, 4).", metavar="B1,B2,..."),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Prints each strategy's memory and traffic for the config (--json, --measure); exit 0."""
  batches = _numbers(args.batches, "batches")
  counts = _numbers(args.device_counts, "device_counts")
  strategies = _strategies(args.strategies)
  advise_only = {"workdir": args.workdir, "target": args.target, "batches": batches,
                 "device_counts": counts, "strategies": strategies}
  given = [f"--{name}" for name, value in advise_only.items() if value not in (None, [])]
  if not args.advise and given:
    raise JaxdpError(f"{', '.join(given)} belong(s) to --advise: add --advise")
  if args.advise:
    from jaxdp.analysis.advise import fit_noise_model
    if args.workdir is not None:
      COMMAND.resolve_paths(args)  # After the flags above: their mistakes are named first.
    records = _run_records(args.workdir)
    fit = fit_noise_model(records, args.config.global_batch_size, args.target)
    _check_same_run(records, args.config)
  c.setup_devices(args.cpu_devices)
  if args.advise:
    return _advise(args, fit, batches, counts, strategies)
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


def _numbers(text: str | None, flag: str) -> list[int]:
  """A comma-separated flag of positive integers; [] when not given."""
  if text is None:
    return []
  try:
    out = [int(b) for b in text.split(",")]
  except ValueError:
    out = []
  if not out or min(out) < 1:
    raise JaxdpError(f"--{flag}={text!r} must be positive whole numbers separated by commas, "
                     f"e.g. --{flag}=2,4,8")
  return out


def _strategies(text: str | None) -> list[str]:
  """--strategies as a list of known dense strategies; [] when not given."""
  if text is None:
    return []
  from jaxdp.parallel.choices import STRATEGIES
  out = [s.strip() for s in text.split(",")]
  unknown = [s for s in out if s not in STRATEGIES]
  if unknown:
    raise JaxdpError(f"--strategies={text!r}: {', '.join(unknown)} is not a strategy; choose "
                     f"from {', '.join(STRATEGIES)}")
  return out


def _run_records(workdir: str | None) -> list[dict]:
  """The reference run's metrics records, or one line saying what --advise needs."""
  import os

  from jaxdp.runtime.metrics import read_metrics
  if not workdir:
    raise JaxdpError("--advise needs --workdir: a finished run of this config (trained "
                     "data-parallel on 2 or more devices, with evaluation) whose noise scale "
                     "and steps to the target it fits")
  if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
    raise JaxdpError(f"--workdir={workdir!r} holds no metrics.jsonl: give the workdir of a "
                     "finished `jaxdp train` run")
  return read_metrics(workdir)


def _advise(args: types.SimpleNamespace, fit, batches: list[int], counts: list[int],
            strategies: list[str]) -> int:
  """`plan --advise`: the noise model of the run, step times per device count, the table."""
  import jax

  from jaxdp.analysis import advise
  from jaxdp.analysis.measure import measure_plan
  config = args.config
  visible = len(jax.devices())
  too_many = [n for n in counts if n > visible]
  if too_many:
    raise JaxdpError(f"--device_counts={args.device_counts}: {too_many[0]} is more than the "
                     f"{visible} visible devices (set --cpu_devices, or give fewer)")
  counts = counts or [n for n in (1 << k for k in range(visible.bit_length())) if visible % n == 0]
  counts = [n for n in counts if config.global_batch_size % n == 0]
  if not counts:
    raise JaxdpError(f"no --device_counts divides the run's global_batch_size "
                     f"{config.global_batch_size}: give device counts that divide it")
  from jaxdp.parallel.choices import STRATEGIES
  times = advise.measure_device_counts(
      lambda n: measure_plan(config, jax.devices()[:n], repeats=args.repeats, methods={},
                             strategies=strategies or STRATEGIES),
      counts, say=lambda line: None if args.json else print(line, flush=True))
  result = advise.advise(fit, times, batches or advise.candidate_batches(fit.reference_batch,
                                                                          counts),
                         config.seq_len)
  print(json.dumps(result, indent=2) if args.json else advise.format_advice(result))
  return 0


def _check_same_run(records: list[dict], config) -> None:
  """Refuses a --config whose tokens per step differ from the run's (the fit would be scaled by
  the wrong batch): the run's logged tokens/s x step time is its tokens per step."""
  logged = [r["tokens_per_sec"] * r["step_time_s"] for r in records
            if isinstance(r.get("tokens_per_sec"), (int, float))
            and isinstance(r.get("step_time_s"), (int, float))]
  if not logged:
    return
  run_tokens = sorted(logged)[len(logged) // 2]
  ours = config.global_batch_size * config.seq_len
  if abs(run_tokens - ours) > 0.02 * ours:
    raise JaxdpError(f"the run in --workdir trained about {run_tokens:,.0f} tokens per step but "
                       f"this --config gives {ours:,} (global_batch_size x seq_len): pass the "
                       "run's own --config and overrides")
