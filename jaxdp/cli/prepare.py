"""`jaxdp prepare`: tokenize text or JSONL files into shards that `jaxdp train` reads."""

from __future__ import annotations

import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="prepare",
    summary="Tokenize text/JSONL files into training shards (--out DIR).",
    description=(
        "Reads INPUT text files, JSONL files (a string \"text\" field per line) or directories of "
        "them, tokenizes them and writes shards, the tokenizer and a manifest to --out. Running "
        "it again with the same inputs does nothing. Train on the result with "
        "--config.data.path=DIR."),
    positional="INPUT", nargs="+",
    no_config_hint="train on the prepared data with `jaxdp train --config.data.path=DIR`",
    flags=(
        c.string("out", None, "Directory to write the prepared data to.", metavar="DIR",
                 required=True),
        c.enum("tokenizer", "byte", ["byte", "bpe"], "'byte' (256 ids, no training) or 'bpe' "
               "(byte-level BPE trained on the inputs, saved with the data)."),
        c.integer("vocab_size", 4096, "BPE vocabulary size (used with --tokenizer=bpe).",
                  metavar="V", min=257),
        c.PROGRESS,
    ),
)


def run(args: types.SimpleNamespace) -> int:
  from jaxdp.data.prepare import prepare
  out = args.out
  manifest = prepare(args.positional, out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     progress=args.progress)
  state = "already up to date" if manifest["up_to_date"] else "prepared"
  print(f"{out}: {state}: {manifest['num_documents']} documents from {len(manifest['inputs'])} "
        f"files, {manifest['num_tokens']} tokens ({manifest['tokenizer']['kind']}, vocab "
        f"{manifest['tokenizer']['vocab_size']}) in {len(manifest['shards'])} shards; train with "
        f"--config.data.path={out}")
  return 0
