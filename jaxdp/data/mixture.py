"""Weighted mixtures of datasets: `config.data.sources = "PATH:WEIGHT,PATH:WEIGHT,..."`.

Example j of the mixed training stream comes from a source chosen by a fixed interleaving of
period Q = RESOLUTION: weights are rounded to integer counts q_i (summing to Q) and one period
lists source i exactly q_i times, spread by smooth weighted round-robin (nginx's algorithm:
every slot, each source gains q_i credit and the richest source is taken and pays Q). So

  source(j) = order[j mod Q]
  index within that source = (j div Q) * q_i + rank[j mod Q]

is a pure function of j, each source's position advances deterministically (its own shuffled,
repeated stream, seeded from config.seed and the source's place in the list), the batch of step
s is still a function of (seed, s), and the realised share of source i among the first n examples
is within k/n of q_i/Q (k sources) at every n.
"""

from __future__ import annotations

import os

import numpy as np

from jaxdp.errors import JaxdpError

RESOLUTION = 1000  # Weights are rounded to multiples of 1/RESOLUTION.


def parse_sources(spec: str) -> list[tuple[str, float]]:
  """[(path, weight)] of config.data.sources ("" -> []); weights are normalised to sum to 1.

  Raises:
    JaxdpError: an entry without ":WEIGHT", a weight that is not a positive number, or a
      weight too small to be represented (below 1/RESOLUTION of the total).
  """
  if not spec or not spec.strip():
    return []
  entries: list[tuple[str, float]] = []
  for item in spec.split(","):
    path, sep, weight = item.strip().rpartition(":")
    try:
      value = float(weight)
    except ValueError:
      value = -1.0
    if not sep or not path or not value > 0 or not np.isfinite(value):
      raise JaxdpError(f"config.data.sources entry {item.strip()!r} is not PATH:WEIGHT with a "
                       "positive weight; write e.g. --config.data.sources=a:0.7,b:0.3")
    if any(os.path.abspath(path) == os.path.abspath(seen) for seen, _ in entries):
      raise JaxdpError(f"config.data.sources names {path!r} twice; give each source once, with "
                       "the sum of its weights")
    entries.append((path, value))
  total = sum(w for _, w in entries)
  for path, value in entries:
    if value / total < 1 / RESOLUTION:
      raise JaxdpError(f"config.data.sources: {path!r} has weight {value / total:.5f} of the "
                       f"total, below the resolution 1/{RESOLUTION}; raise it or leave it out")
  return [(path, w / total) for path, w in entries]


def quantise(weights: list[float], resolution: int = RESOLUTION) -> np.ndarray:
  """Integer counts q_i >= 1 summing to `resolution`, q_i ~ weights[i] * resolution (largest
  remainder)."""
  raw = np.asarray(weights, np.float64) * resolution
  counts = np.maximum(np.floor(raw).astype(np.int64), 1)
  while counts.sum() < resolution:
    counts[int(np.argmax(raw - counts))] += 1
  while counts.sum() > resolution:
    counts[int(np.argmax(np.where(counts > 1, counts - raw, -np.inf)))] -= 1
  return counts


class Mixture:
  """The interleaving of sources with integer counts `counts` (see the module docstring)."""

  def __init__(self, weights: list[float], resolution: int = RESOLUTION):
    self.counts = quantise(weights, resolution)
    self.period = int(self.counts.sum())
    credit = np.zeros(len(self.counts), np.int64)
    order, rank, seen = [], [], np.zeros(len(self.counts), np.int64)
    for _ in range(self.period):
      credit += self.counts
      pick = int(np.argmax(credit))
      credit[pick] -= self.period
      order.append(pick)
      rank.append(seen[pick])
      seen[pick] += 1
    self.order, self.rank = np.asarray(order), np.asarray(rank)
    # prefix[r, i]: examples of source i among the first r slots of a period.
    self.prefix = np.zeros((self.period + 1, len(self.counts)), np.int64)
    self.prefix[np.arange(1, self.period + 1), self.order] = 1
    self.prefix = np.cumsum(self.prefix, axis=0)

  def locate(self, j: int) -> tuple[int, int]:
    """(source, index within that source's stream) of example j of the mixed stream."""
    period, slot = divmod(int(j), self.period)
    source = int(self.order[slot])
    return source, period * int(self.counts[source]) + int(self.rank[slot])

  def taken(self, n: int) -> np.ndarray:
    """Examples taken from each source among the first n of the mixed stream (int64 [k])."""
    period, slot = divmod(int(n), self.period)
    return period * self.counts + self.prefix[slot]


class MixedExamples:
  """Example j of the mixed stream: `streams[source][index]` for (source, index) = locate(j)."""

  def __init__(self, mixture: Mixture, streams: list):
    self.mixture, self._streams = mixture, streams

  def __getitem__(self, j: int):
    source, index = self.mixture.locate(j)
    return self._streams[source][index]
