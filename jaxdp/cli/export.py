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
        "model as Llama. Needs only the workdir (its checkpoint and tokenizer copy), not the "
        "data."),
    no_config_hint="the model and its config come from the checkpoint in --workdir",
    flags=(
        c.string("workdir", "runs/default", "Run directory written by `jaxdp train`.",
                 metavar="DIR"),
        c.integer("step", None, "Checkpoint step to export.", metavar="S", min=0,
                  default_text="the latest"),
        c.string("out", None, "Directory to write the Hugging Face model into (created; files "
                 "of the same names are replaced).", metavar="DIR", required=True),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  c.setup_devices(1)  # One CPU device: the conversion is host work.
  from jaxdp.runtime.hf import export
  result = export(args.workdir, args.out, args.step)
  print(f"exported step {result['step']} of {args.workdir} ({result['family']}) to {args.out}: "
        f"{', '.join(result['files'])}")
  return 0
