"""`jaxdp prepare`: tokenize text, JSONL, Parquet or saved datasets into a memory-mapped token
file that `jaxdp train` reads."""

from __future__ import annotations

import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="prepare",
    summary="Tokenize text/JSONL/Parquet/datasets into training data (--out DIR).",
    description=(
        "Reads INPUT text files, JSONL files (one JSON object per line), Parquet files, Hugging "
        "Face datasets saved with save_to_disk (or .arrow files), or directories of them; "
        "tokenizes every document (followed by the tokenizer's end-of-text token) in bounded "
        "chunks and writes the token stream, the tokenizer and a manifest to --out. Running it "
        "again with the same inputs does nothing. Train on the result with "
        "--config.data.path=DIR."),
    positional="INPUT", nargs="+",
    no_config_hint="train on the prepared data with `jaxdp train --config.data.path=DIR`",
    flags=(
        c.string("out", None, "Directory to write the prepared data to.", metavar="DIR",
                 required=True, path="dir"),
        c.string("tokenizer", "byte", "'byte' (256 ids, no training), 'bpe' (byte-level BPE "
                 "trained on the inputs), or the path of a Hugging Face tokenizer.json (or a "
                 "folder holding one) or of a .tiktoken file (needs tiktoken); it is copied into "
                 "--out.", metavar="TOKENIZER"),
        c.integer("vocab_size", 4096, "BPE vocabulary size to learn.", metavar="V", min=257,
                  needs=("tokenizer", "bpe")),
        c.string("text_field", "text", "The field holding the text in JSONL, Parquet and dataset "
                 "inputs.", metavar="NAME"),
        c.PROGRESS,
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Tokenises the inputs into a prepared directory (--out) and prints a summary; exit 0."""
  from jaxdp.data.prepare import prepare
  out = args.out
  manifest = prepare(args.positional, out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                     text_field=args.text_field, progress=args.progress)
  state = "already up to date" if manifest["up_to_date"] else "prepared"
  print(f"{out}: {state}: {manifest['num_documents']} documents from {len(manifest['inputs'])} "
        f"inputs, {manifest['num_tokens']} tokens ({manifest['tokenizer']['kind']}, vocab "
        f"{manifest['tokenizer']['vocab_size']}, {manifest['dtype']}); train with "
        f"--config.data.path={out}")
  learned = manifest["tokenizer"]["vocab_size"]
  if args.tokenizer == "bpe" and learned < args.vocab_size:
    print(f"note: the corpus yields only {learned} BPE tokens (merges of pairs that occur), "
          f"fewer than --vocab_size={args.vocab_size}; the model uses {learned}")
  return 0
