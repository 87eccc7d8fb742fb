"""`jaxdp generate`: continue a prompt with a trained model, streaming the text to stdout."""

from __future__ import annotations

import sys
import time
import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="generate",
    summary="Continue a prompt with the model trained in --workdir, streaming to stdout.",
    description=(
        "Loads the latest checkpoint in --workdir and its tokenizer, prints the prompt and then "
        "each sampled token as soon as it completes a character, then reports tokens/s on "
        "stderr. The prompt runs once and each token after it reads a key/value cache; the same "
        "--seed gives the same text, with or without --cache."),
    no_config_hint="the model and its config come from the checkpoint in --workdir",
    flags=(
        c.string("workdir", "runs/default", "Run directory written by `jaxdp train` (its latest "
                 "checkpoint is used).", metavar="DIR", path="run"),
        c.string("prompt", "\n", "Text to continue."),
        c.integer("max_new_tokens", 200, "Tokens to sample after the prompt.", min=0),
        c.real("temperature", 0.8, "Softmax temperature; 0 is greedy.", metavar="T", min=0),
        c.integer("top_k", 0, "Sample among the K most likely tokens; 0 keeps all.", metavar="K",
                  min=0),
        c.real("top_p", 1.0, "Nucleus sampling: the smallest set of tokens with this much "
               "probability mass; 1 keeps all.", metavar="P", min=0, min_open=True, max=1),
        c.integer("seed", 0, "Sampling seed (same seed, same text).", metavar="S", min=0,
                  max=2**32 - 1),
        c.boolean("cache", True, "Decode from a key/value cache (prefill the prompt once, then "
                  "one position per token); --nocache recomputes the whole window per token."),
        c.CPU_DEVICES,
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Streams a continuation of --prompt to stdout and the tokens/s line to stderr; exit 0."""
  c.setup_devices(args.cpu_devices)
  from jaxdp.lm import load_for_inference
  from jaxdp.models.sampling import generate
  # A step directory given as --workdir picks that checkpoint (jaxdp.runtime.paths).
  params, model, tokenizer = load_for_inference(args.workdir, args.step)
  sys.stdout.write(args.prompt)
  tokens, shown = [], 0
  times = [time.perf_counter()]  # Start, then when each token arrived.
  for token in generate(params, model, tokenizer.encode(args.prompt), args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        seed=args.seed, cache=args.cache):
    times.append(time.perf_counter())
    tokens.append(token)
    text = tokenizer.decode(tokens)
    if not text.endswith("\ufffd"):  # Hold back a multi-byte character until it is complete.
      sys.stdout.write(text[shown:])
      sys.stdout.flush()
      shown = len(text)
  sys.stdout.write(tokenizer.decode(tokens)[shown:] + "\n")
  sys.stdout.flush()
  print(speed_line(times, args.cache), file=sys.stderr)
  return 0


def speed_line(times: list[float], cache: bool) -> str:
  """The tokens/s report: `times` are the start and each token's arrival (perf_counter s).

  The first token includes the prompt's prefill and compiling it, the second compiling the
  decode step, so the steady rate is taken from the second token's arrival on.
  """
  n = len(times) - 1
  total = f"jaxdp: {n} tokens in {times[-1] - times[0]:.2f} s"
  if n < 3:
    return f"{total} ({'cached' if cache else 'uncached'})"
  return (f"{total}: {(n - 2) / (times[-1] - times[2]):.1f} tokens/s decoding "
          f"({'cached' if cache else 'uncached'}; the first 2 tokens, with the prompt and "
          f"compilation, took {times[2] - times[0]:.2f} s)")
