"""The `jaxdp` command line: a thin layer over the library.

  jaxdp train    [--config PATH|PRESET] [--config.FIELD=VALUE ...] [--workdir DIR] [--cpu_devices N]
                 [--coordinator HOST:PORT --num_processes P --process_id I] [--init_timeout_s S]
                 [--restore_from WORKDIR/checkpoints/STEP] [--allow_config_change]
  jaxdp launch   --nprocs P [--cpu_devices D] -- train [train flags ...]
  jaxdp inspect  CHECKPOINT_DIR   (a workdir or its checkpoints/ folder: steps, config, arrays)
  jaxdp generate --workdir DIR --prompt TEXT [--max_new_tokens N --temperature T --top_k K --top_p P --seed S]
  jaxdp prepare  INPUT... --out DIR [--tokenizer byte|bpe --vocab_size V]
  jaxdp plot     WORKDIR [WORKDIR...] --out PNG
  jaxdp plan     [--config PATH|PRESET] [--cpu_devices N] [--json]
  jaxdp verify   [--config PATH|PRESET] [--cpu_devices N] [--steps K]

Bad input ends with one line, `jaxdp: error: ...`, and exit status 2.
"""

from __future__ import annotations

import os
import sys
import traceback

from absl import flags
from ml_collections import config_flags

from jaxdp.errors import JaxdpError

USAGE = __doc__.split("\n\n")[1]
COMMANDS = ("train", "generate", "launch", "prepare", "plot", "inspect", "plan", "verify")

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")
flags.DEFINE_string("workdir", "runs/default", "Directory for checkpoints and metrics.jsonl.")
flags.DEFINE_integer("cpu_devices", None, "Emulate this many CPU devices (default on a CPU-only "
                     "host: one per core, at least 2).")
flags.DEFINE_string("coordinator", None, "train: HOST:PORT where process 0 serves the multi-process "
                    "coordinator (default: from SLURM or Open MPI, else one process).")
flags.DEFINE_integer("num_processes", None, "train: processes in the run (default: from SLURM or "
                     "Open MPI, else 1).")
flags.DEFINE_integer("process_id", None, "train: this process's index in [0, num_processes).")
flags.DEFINE_float("init_timeout_s", 300, "train: seconds to wait for every process to join.")
flags.DEFINE_integer("nprocs", None, "launch: local processes to start.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("allow_config_change", False, "Resume even if run-defining config fields changed.")
flags.DEFINE_string("restore_from", None, "Resume from this checkpoint step directory "
                    "(WORKDIR/checkpoints/STEP) instead of the latest one in --workdir.")
flags.DEFINE_string("prompt", "\n", "generate: text to continue.")
flags.DEFINE_integer("max_new_tokens", 200, "generate: tokens to sample.")
flags.DEFINE_float("temperature", 0.8, "generate: softmax temperature; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "generate: keep the k most likely tokens; 0 keeps all.")
flags.DEFINE_float("top_p", 1.0, "generate: nucleus sampling mass; 1 keeps all.")
flags.DEFINE_integer("seed", 0, "generate: sampling seed (same seed, same text).")
flags.DEFINE_string("out", None, "prepare: output directory; plot: PNG file to write.")
flags.DEFINE_enum("tokenizer", "byte", ["byte", "bpe"], "prepare: 'byte' (256 ids, no training) "
                  "or 'bpe' (byte-level BPE trained on the inputs, saved with the data).")
flags.DEFINE_integer("vocab_size", 4096, "prepare: BPE vocabulary size (with --tokenizer=bpe).")
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
  from jaxdp.runtime.trainer import train_and_evaluate
  result = train_and_evaluate(FLAGS.config, FLAGS.workdir, progress=FLAGS.progress,
                              allow_config_change=FLAGS.allow_config_change,
                              restore_from=FLAGS.restore_from)
  print(f"done: step {result['step']}, eval_loss {result['eval_loss']}, "
        f"stop reason {result['stop_reason']}; metrics in {os.path.join(FLAGS.workdir, 'metrics.jsonl')}")


def cmd_inspect(paths: list[str]) -> None:
  from jaxdp.runtime.checkpoint import describe
  if len(paths) != 1:
    raise JaxdpError("inspect takes one CHECKPOINT_DIR (a workdir or its checkpoints/ folder)")
  steps = describe(paths[0])
  if not steps:
    print(f"no checkpoints in {paths[0]!r}")
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
    for path, shape, dtype, nbytes in info["arrays"]:
      print(f"  {path} {dtype}{list(shape)} {nbytes} bytes")


def _flat(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
  out = []
  for key, value in tree.items():
    out += _flat(value, f"{prefix}{key}.") if isinstance(value, dict) else [(prefix + key, value)]
  return out


def cmd_generate() -> None:
  from jaxdp.runtime.trainer import load_for_inference
  from jaxdp.models.sampling import generate
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


def cmd_launch(command: list[str]) -> int:
  from jaxdp.runtime.launch import launch
  if FLAGS.nprocs is None:
    raise JaxdpError("launch needs --nprocs P, the number of processes to start")
  return launch(FLAGS.nprocs, command, FLAGS.cpu_devices)


def _require_out(command: str, what: str) -> str:
  if not FLAGS.out:
    raise JaxdpError(f"{command}: --out is required ({what})")
  return FLAGS.out


def cmd_prepare(inputs: list[str]) -> None:
  from jaxdp.data.prepare import prepare
  out = _require_out("prepare", "the directory to write the prepared data to")
  manifest = prepare(inputs, out, tokenizer=FLAGS.tokenizer, vocab_size=FLAGS.vocab_size,
                     progress=FLAGS.progress)
  state = "already up to date" if manifest["up_to_date"] else "prepared"
  print(f"{out}: {state}: {manifest['num_documents']} documents from {len(manifest['inputs'])} "
        f"files, {manifest['num_tokens']} tokens ({manifest['tokenizer']['kind']}, vocab "
        f"{manifest['tokenizer']['vocab_size']}) in {len(manifest['shards'])} shards; train with "
        f"--config.data.path={out}")


def cmd_plot(workdirs: list[str]) -> None:
  from jaxdp.analysis.viz import save_loss_plot
  out = _require_out("plot", "the PNG file to write")
  print(f"wrote {save_loss_plot(workdirs, out)}")


def cmd_plan() -> None:
  import json
  from jaxdp.analysis.plan import format_table, plan
  result = plan(FLAGS.config)
  print(json.dumps(result, indent=2) if FLAGS.json else format_table(result))


def cmd_verify() -> int:
  """Exit status 1 when any strategy differs from one device beyond the tolerance."""
  import jax
  from jaxdp.analysis.verify import DEFAULT_TOLERANCE, verify
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
  multiprocess = False
  try:
    if command not in COMMANDS:
      raise JaxdpError(f"unknown command {command!r}; commands: {', '.join(COMMANDS)}")
    if command == "launch":  # `launch [flags] -- train ...`: what follows "--" is the children's.
      own, launched = (argv[2:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv \
          else (argv[2:], [])
      try:
        FLAGS([argv[0]] + own)
      except flags.Error as e:
        raise JaxdpError(str(e).splitlines()[0]) from None
      return cmd_launch(launched)
    rest = _resolve_config_arg(argv[2:])
    _check_overrides(rest, _config_path(rest))
    if "config" not in FLAGS:
      # Defined only now: config_flags reads sys.argv overrides when the flag is defined.
      config_flags.DEFINE_config_file(
          "config", DEFAULT_CONFIG,
          "Config file or preset name (default, tiny_cpu); override fields with --config.FIELD=VALUE.",
          lock_config=True)
    try:
      positional = FLAGS([argv[0]] + rest)[1:]
    except flags.Error as e:
      raise JaxdpError(str(e).splitlines()[0]) from None
    if command in ("prepare", "plot", "inspect"):  # Host-only work: no devices.
      {"prepare": cmd_prepare, "plot": cmd_plot, "inspect": cmd_inspect}[command](positional)
      return 0
    if positional:
      raise JaxdpError(f"{command}: unexpected arguments {' '.join(positional)!r}")
    setup_devices(FLAGS.cpu_devices)
    if command == "train":  # Before any device is touched.
      from jaxdp.runtime import distributed
      multiprocess = distributed.initialize(FLAGS.coordinator, FLAGS.num_processes,
                                            FLAGS.process_id, FLAGS.init_timeout_s).num_processes > 1
    status = {"train": cmd_train, "generate": cmd_generate, "plan": cmd_plan,
              "verify": cmd_verify}[command]()
  except JaxdpError as e:
    print(f"jaxdp: error: {e}", file=sys.stderr)
    return _exit_now(2) if multiprocess else 2
  except KeyboardInterrupt:
    print("jaxdp: interrupted", file=sys.stderr)
    return _exit_now(130) if multiprocess else 130
  except BaseException:
    if not multiprocess:
      raise
    traceback.print_exc()
    return _exit_now(1)
  return status or 0


def _exit_now(status: int) -> int:
  """A failed process of a multi-process run exits at once: JAX's exit handler would wait for
  the other processes, which may be waiting for this one."""
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(status)


def run() -> None:
  sys.exit(main())


if __name__ == "__main__":
  run()
