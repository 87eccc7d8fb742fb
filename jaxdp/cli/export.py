"""`jaxdp export`: a run's checkpoint as a Hugging Face transformers model directory."""

from __future__ import annotations

import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="export",
    summary="Write a run's checkpoint as a Hugging Face model (config.json, model.safetensors, "
            "tokenizer).",
    description=(
        "Converts the checkpoint --step (the latest by default) of the run in --workdir into a "
        "directory that transformers loads with AutoModelForCausalLM.from_pretrained(DIR) and "
        "AutoTokenizer.from_pretrained(DIR): a gpt model (learned positions) as GPT-2, a llama "
        "model as Llama, or as Qwen2, Qwen3 or Mistral by config.model.variant. Weights past "
        "--max_shard_size go into model-0000k-of-0000n.safetensors shards with "
        "model.safetensors.index.json. Needs only the workdir (its checkpoint and tokenizer "
        "copy), not the data."),
    no_config_hint="the model and its config come from the checkpoint in --workdir",
    flags=(
        c.string("workdir", "runs/default", "Run directory written by `jaxdp train`.",
                 metavar="DIR", path="run"),
        c.integer("step", None, "Checkpoint step to export.", metavar="S", min=0,
                  default_text="the latest"),
        c.string("out", None, "Directory to write the Hugging Face model into (created if "
                 "missing; an earlier export there is replaced, other files are never).",
                 metavar="DIR", required=True, path="dir"),
        c.string("max_shard_size", "5GB", "Largest weights file; a larger model is written in "
                 "shards of at most this size (GB is 10^9 bytes, GiB 2^30; a tensor larger than "
                 "it gets a shard of its own).", metavar="SIZE"),
        c.enum("dtype", "float32", ("float32", "bfloat16"), "Type of the exported tensors: "
               "float32 is exact, bfloat16 rounds to nearest (half the bytes)."),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Writes the run's checkpoint (--step, default the latest) as a Hugging Face folder; exit 0."""
  c.setup_devices(1)  # One CPU device: the conversion is host work.
  from jaxdp.lm.hf_export import export
  result = export(args.workdir, args.out, args.step, max_shard_size=args.max_shard_size,
                  dtype=args.dtype)
  print(f"exported step {result['step']} of {args.workdir} ({result['architecture']}) to {args.out}: "
        f"{', '.join(result['files'])}")
  return 0
