"""The window of steps a run traces with `jax.profiler` ("START:STOP"), parsed without JAX so
that a bad value is refused before anything heavy is imported."""

from __future__ import annotations

from jaxdp.errors import need


def parse_profile_steps(text: str) -> tuple[int, int] | None:
  """config.profile_steps "START:STOP" -> (START, STOP); "" -> None (no trace).

  Raises:
    JaxdpError: not two integers with 0 <= START < STOP.
  """
  if text == "":
    return None
  parts = str(text).split(":")
  try:
    start, stop = (int(p) for p in parts) if len(parts) == 2 else (-1, -1)
  except ValueError:
    start, stop = -1, -1
  need(0 <= start < stop, f"config.profile_steps={text!r} must be 'START:STOP' with 0 <= START < "
       "STOP (e.g. '10:15' traces the 5 steps after step 10), or '' for no trace")
  return start, stop
