"""`jaxdp plot`: the train and eval loss curves of one or more runs, as a PNG."""

from __future__ import annotations

import types

from jaxdp.cli import command as c

COMMAND = c.Command(
    name="plot",
    summary="Plot the loss curves of one or more run directories to a PNG (--out FILE).",
    description="Draws the train and eval loss of each WORKDIR (its metrics.jsonl) in one figure.",
    positional="WORKDIR", nargs="+", positional_path="run",
    flags=(
        c.string("out", None, "The PNG file to write.", metavar="FILE", required=True,
                 path="file"),
    ),
)


def run(args: types.SimpleNamespace) -> int:
  """Saves the loss curves of the given runs to --out and prints the file written; exit 0."""
  from jaxdp.analysis.viz import save_loss_plot
  print(f"wrote {save_loss_plot(args.positional, args.out)}")
  return 0
