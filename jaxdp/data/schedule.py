"""Where each step's batch starts in the training examples: the data position as examples consumed.

The global batch of step `s` takes the examples `[start(s), start(s) + size(s))` of the run's
shuffled order (data/pipeline.py). With one batch size throughout, start(s) = s x B. A run whose
global batch changes (`config.batch_ramp` growing it over the first steps, or a resume with
`--allow_config_change` and another `global_batch_size`) continues exactly where the data
stopped: the schedule is a list of segments, each a first step, the example it starts at and its
batch size, so every example is consumed once, none skipped, none repeated. Checkpoints store the
segments (meta "data_schedule"), so a resume, a rollback to an earlier step or another batch size
later all agree on the past.

Each distinct batch size is another shape for the compiled train step: one compilation each, so
a ramp should have few stages (2-4).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
import dataclasses

from jaxdp.errors import JaxdpError


@dataclasses.dataclass(frozen=True)
class DataSchedule:
  """Segments (first_step, first_example, batch_size), first_step increasing from 0; the last
  segment goes on forever."""
  segments: tuple[tuple[int, int, int], ...]

  @classmethod
  def constant(cls, batch_size: int) -> DataSchedule:
    """One batch size from step 0."""
    return cls(((0, 0, int(batch_size)),))

  def _segment(self, step: int) -> tuple[int, int, int]:
    i = bisect.bisect_right([s[0] for s in self.segments], step) - 1
    return self.segments[max(i, 0)]

  def batch_size(self, step: int) -> int:
    """Global batch size of step `step`."""
    return self._segment(step)[2]

  def start(self, step: int) -> int:
    """Examples consumed before step `step` (the index of its batch's first example)."""
    first, example, size = self._segment(step)
    return example + (step - first) * size

  def sizes(self) -> list[int]:
    """The distinct batch sizes, in order of first use (one compiled step each)."""
    return list(dict.fromkeys(s[2] for s in self.segments))

  def continued(self, step: int, new: DataSchedule) -> DataSchedule:
    """This schedule up to `step` (the step a run resumes at), then `new`'s batch sizes from
    `step` on, starting where this one's data stopped (examples start(step) onwards)."""
    out = [s for s in self.segments if s[0] < step]

    def add(first: int, size: int) -> None:
      if out and out[-1][2] == size:
        return  # The same size goes on: the segment before covers it.
      out.append((first, DataSchedule(tuple(out)).start(first) if out else 0, size))

    add(step, new.batch_size(step))
    for first, _, size in new.segments:
      if first > step:
        add(first, size)
    return DataSchedule(tuple(out))

  def to_meta(self) -> list[list[int]]:
    """The segments as JSON (checkpoint meta "data_schedule")."""
    return [list(s) for s in self.segments]

  @classmethod
  def from_meta(cls, meta: Sequence[Sequence[int]]) -> DataSchedule:
    """The schedule `to_meta` wrote."""
    return cls(tuple((int(a), int(b), int(c)) for a, b, c in meta))


def parse_ramp(text: str, global_batch_size: int, field: str = "config.batch_ramp") -> DataSchedule:
  """The schedule of config.batch_ramp "BATCH:STEPS,BATCH:STEPS,...": the first STEPS steps at
  BATCH examples, then the next stage, then config.global_batch_size for the rest of the run
  ("" is global_batch_size throughout). E.g. "8:100,16:100" with global_batch_size 32: steps
  0-99 take 8 examples, 100-199 take 16, then 32.

  Raises:
    JaxdpError: a malformed stage, a non-positive batch or step count, or a stage larger than
      `global_batch_size`, naming `field`.
  """
  segments: list[tuple[int, int, int]] = []
  step = example = 0
  for stage in [s.strip() for s in str(text).split(",") if s.strip()]:
    batch, sep, steps = stage.partition(":")
    try:
      size, count = int(batch), int(steps)
    except ValueError:
      size = count = 0
    if not sep or size <= 0 or count <= 0:
      raise JaxdpError(f"{field}={text!r}: stage {stage!r} is not BATCH:STEPS with positive whole "
                       "numbers; give e.g. '8:100,16:100' (8 examples a step for 100 steps, then "
                       "16 for 100, then global_batch_size)")
    if size > global_batch_size:  # A "ramp" that shrinks to global_batch_size is a mistake.
      raise JaxdpError(f"{field}={text!r}: stage {stage!r} takes {size} examples a step, more than "
                       f"config.global_batch_size={global_batch_size} that the ramp grows to; give "
                       f"stages of at most {global_batch_size} examples, or raise it with "
                       f"--config.global_batch_size={size} or more")
    if not segments or segments[-1][2] != size:
      segments.append((step, example, size))
    step, example = step + count, example + count * size
  if not segments or segments[-1][2] != global_batch_size:
    segments.append((step, example, int(global_batch_size)))
  return DataSchedule(tuple(segments))
