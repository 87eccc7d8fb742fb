"""The `jaxdp` command line: a thin layer over the library.

  jaxdp train    [--config PATH|PRESET] [--config.FIELD=VALUE ...] [--workdir DIR] [--cpu_devices N]
  jaxdp generate --workdir DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K --top_p P --seed S]
  jaxdp plan     [--config PATH|PRESET] [--cpu_devices N] [--json]
  jaxdp verify   [--config PATH|PRESET] [--cpu_devices N] [--steps K]

Bad input ends with one line, `jaxdp: error: ...`, and exit status 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from jaxdp.errors import JaxdpError

USAGE = __doc__.split("\n\n")[1]
COMMANDS = ("train", "generate", "plan", "verify")

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and metrics.jsonl.")
flags.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices (default on a CPU-only "
                     "host: one per core, at least 2).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("allow_config_change", False, "Resume even if run-defining config fields changed.")
flags.DEFINE_string("prompt", "\n", "generate: text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "generate: tokens to sample.")
flags.DEFINE_float("temperature", 0.8, "generate: softmax temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "generate: keep the k most likely tokens; 0 keeps all.")
flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass; 1 keeps all.")
flags.DEFINE_integer("seed", 0, "generate: sampling seed (same seed, same text).")
flags.DEFINE_bool("json", False, "plan: print JSON instead of a table.")
flags.DEFINE_integer("steps", 3, "verify: training steps to compare against one device.")


def _resolve_config_arg(argv: list[str]) -> list[str]:
  """Lets --config take a preset name as well as a path."""
  from jaxdp.config import preset_path
  out = []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      arg = "--config=" + preset_path(arg.split("=", 1)[1])
    elif i > 0 and argv[i - 1] == "--config":
      arg = preset_path(arg)
    out.append(arg)
  return out


def _check_overrides(argv: list[str], config_path: str) -> None:
  """Unknown --config.FIELD names fail with the list of valid ones, before anything runs."""
  from jaxdp.config import field_names, load_preset
  valid = set(field_names(load_preset(config_path)))
  for arg in argv:
    if arg.startswith("--config."):
      name = arg[len("--config."):].split("=", 1)[0]
      if name not in valid:
        raise JaxdpError(f"unknown config field {name!r} in {arg!r}; valid fields: "
                         f"{', '.join(sorted(valid))}")


def _config_path(argv: list[str]) -> str:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return DEFAULT_CONFIG


def setup_devices(cpu_devices: int | None) -> None:
  """Sets the emulated CPU device count; must run before JAX initialises its backends."""
  import jax
  if cpu_devices is not None:
    if cpu_devices < 1:
      raise JaxdpError(f"--cpu_devices={cpu_devices} must be >= 1")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", cpu_devices)
  elif "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # Only the CPU backend reads this; on a GPU host the GPUs are used as they are.
    jax.config.update("jax_num_cpu_devices", max(2, os.cpu_count() or 1))


def cmd_train() -> None:
  from jaxdp.train import train_and_evaluate
  result = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                              allow_config_change=FLAGS.allow_config_change)
  print(f"done: step {result['step']}, eval_loss {result['eval_loss']}, "
        f"stop reason {result['stop_reason']}; metrics in {os.path.join(FLAGS.workdir, 'metrics.jsonl')}")


def cmd_generate() -> None:
  from jaxdp.train import load_for_inference
  from jaxdp.sampling import generate
  params, model, tokenizer = load_for_inference(FLAGS.workdir)
  sys.stdout.write(FLAGS.prompt)
  tokens, shown = [], 0
  for token in generate(params, model, tokenizer.encode(FLAGS.prompt), FLAGS.max_new_tokens,
                        temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p,
                        seed=FLAGS.seed):
    tokens.append(token)
    text = tokenizer.decode(tokens)
    if not text.endswith("\ufffd"):  # Hold back a multi-byte character until it is complete.
      sys.stdout.write(text[shown:])
      sys.stdout.flush()
      shown = len(text)
  sys.stdout.write(tokenizer.decode(tokens)[shown:] + "\n")


def cmd_plan() -> None:
  import json
  from jaxdp.plan import format_table, plan
  result = plan(FLAGS.config)
  print(json.dumps(result, indent=2) if FLAGS.json else format_table(result))


def cmd_verify() -> int:
  """Exit status 1 when any strategy differs from one device beyond the tolerance."""
  import jax
  from jaxdp.verify import DEFAULT_TOLERANCE, verify
  if FLAGS.steps < 1:
    raise JaxdpError(f"--steps={FLAGS.steps} must be >= 1")
  devices = jax.devices()
  print(f"{FLAGS.steps} steps on 1 device vs {len(devices)} devices; tolerance "
        f"loss {DEFAULT_TOLERANCE['loss']:g}, params {DEFAULT_TOLERANCE['params']:g} (relative)")
  results = verify(FLAGS.config, devices, FLAGS.steps, report=lambda line: print(line, flush=True))
  failed = [name for name, r in results.items() if not r["ok"]]
  print(f"FAILED: {', '.join(failed)}" if failed else "all strategies match one device")
  return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(USAGE)
    return 0
  command = argv[1]
  try:
    if command not in COMMANDS:
      raise JaxdpError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    rest = _resolve_config_arg(argv[2:])
    _check_overrides(rest, _config_path(rest))
    if "config" not in FLAGS:
      # Defined only now: config_flags reads sys.argv overrides when the flag is defined.
      config_flags.DEFINE_config_file(
          "config", DEFAULT_CONFIG,
          "Config file or preset name (default, tiny_cpu); override fields with --config.FIELD=VALUE.",
          lock_config=True)
    try:
      FLAGS([argv[0]] + rest)
    except flags.Error as e:
      raise JaxdpError(str(e).splitlines()[0]) from None
    setup_devices(FLAGS.cpu_devices)
    status = {"train": cmd_train, "generate": cmd_generate, "plan": cmd_plan,
              "verify": cmd_verify}[command]()
  except JaxdpError as e:
    print(f"jaxdp: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("jaxdp: interrupted", file=sys.stderr)
    return 130
  return status or 0


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
