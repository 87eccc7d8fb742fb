"""PowerSGD: rank-r gradient compression by one step of subspace iteration (Vogels, Karimireddy &
Jaggi 2019, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed Optimization",
Algorithm 1 with the error feedback of their Algorithm 2).

Each parameter with two or more dimensions is viewed as a matrix M [n, m] (its first axis by the
product of the others, as the paper reshapes convolution kernels) and, per step:

  P = M Q            [n, r]   Q [m, r] is last step's averaged Q (warm start)
  P = mean_i P_i               one all-reduce of every matrix's P, packed together
  P = orthonormalise(P)        reduced QR: P^T P = I
  Q = M^T P          [m, r]
  Q = mean_i Q_i               one all-reduce of every Q, packed together
  applied = P Q^T              the same on every device: P P^T mean_i(M_i)

Because P and Q are averaged before use, P Q^T is the projection of the *mean* gradient onto
span(P): at full rank (r = min(n, m)) it is the mean gradient itself. Vectors (biases, norms) and
matrices for which r (n + m) >= n m (low rank would send more) travel dense, in one all-reduce
(the paper does the same). With error feedback each device keeps e = M - P Q^T, so what was
applied plus the new error is the gradient plus the old error, on every device.

Every function runs inside `jax.shard_map` over `axis_name`; Q lives in the communication state
(`TrainState.comm["powersgd_q"]`, all Q's flattened, identical rows) and is checkpointed.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

import jax
from jax import lax
import jax.numpy as jnp

Q_SEED = 0x5EED  # Q's initial draw: the same on every device and every run.


@dataclasses.dataclass(frozen=True)
class Block:
  """One parameter inside the flat gradient: [start, start + n m) viewed as [n, m]."""
  start: int
  n: int
  m: int
  low_rank: bool  # False: sent dense.


def matrix_view(shape: Sequence[int]) -> tuple[int, int]:
  """(n, m) of the matrix a parameter of `shape` is compressed as: first axis x the rest."""
  if len(shape) < 2:
    return (int(math.prod(shape)), 1)
  return int(shape[0]), int(math.prod(shape[1:]))


def plan_blocks(shapes: Sequence[Sequence[int]], rank: int) -> list[Block]:
  """The blocks of a flat vector of parameters of `shapes` (in ravel_pytree's order).

  A parameter is compressed when it has >= 2 dimensions and r (n + m) < n m, i.e. when the
  factors are smaller than the matrix; r is capped at min(n, m) (full rank).
  """
  blocks, start = [], 0
  for shape in shapes:
    n, m = matrix_view(shape)
    r = min(rank, n, m)
    blocks.append(Block(start, n, m, len(shape) >= 2 and r * (n + m) < n * m))
    start += n * m
  return blocks


def q_size(blocks: Sequence[Block], rank: int) -> int:
  """Entries of all Q factors together (the warm-start state)."""
  return sum(b.m * min(rank, b.n, b.m) for b in blocks if b.low_rank)


def initial_q(blocks: Sequence[Block], rank: int) -> jax.Array:
  """Q factors drawn i.i.d. normal from a fixed key (so every device starts with the same Q)."""
  return jax.random.normal(jax.random.PRNGKey(Q_SEED), (q_size(blocks, rank),), jnp.float32)


def orthonormalise(p: jax.Array) -> jax.Array:
  """Columns of p [n, r] made orthonormal (reduced QR's Q), the paper's Gram-Schmidt step.

  QR rather than classical Gram-Schmidt: a zero or rank-deficient P (a parameter that received
  no gradient) then still gives finite, orthonormal columns.
  """
  return jnp.linalg.qr(p, mode="reduced")[0]


def compress_mean(flat: jax.Array, q_flat: jax.Array, blocks: Sequence[Block], rank: int,
                  axis_name: str | tuple[str, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(applied, sent, new Q): the rank-r approximation of the mean over devices of `flat` [d]
  (f32), identical on every device; what this device is credited with sending (P Q^T on the
  compressed blocks, as in the paper's error feedback; its own values on the dense ones, which
  travel exactly); and the averaged Q factors for the next step's warm start.

  Three all-reduces (pmean): every P, every Q, and the dense leftovers, each packed into one
  buffer, so their bytes in the HLO are r (n + m) per compressed matrix and n m per dense one.
  """
  low = [b for b in blocks if b.low_rank]
  dense = [b for b in blocks if not b.low_rank]
  mats, qs, offset = [], [], 0
  for b in low:
    r = min(rank, b.n, b.m)
    mats.append(flat[b.start:b.start + b.n * b.m].reshape(b.n, b.m))
    qs.append(q_flat[offset:offset + b.m * r].reshape(b.m, r))
    offset += b.m * r
  pieces: list[jax.Array] = []
  sent: list[jax.Array] = []
  new_q = q_flat
  if low:
    ps = [m @ q for m, q in zip(mats, qs)]
    ps = _unpack(lax.pmean(_pack(ps), axis_name), [p.shape for p in ps])
    ps = [orthonormalise(p) for p in ps]
    qs = [m.T @ p for m, p in zip(mats, ps)]
    qs = _unpack(lax.pmean(_pack(qs), axis_name), [q.shape for q in qs])
    new_q = _pack(qs)
    approx = iter(p @ q.T for p, q in zip(ps, qs))
  if dense:
    rest = lax.pmean(_pack([flat[b.start:b.start + b.n * b.m] for b in dense]), axis_name)
    rest = iter(_unpack(rest, [(b.n * b.m,) for b in dense]))
  for b in blocks:
    pieces.append((next(approx) if b.low_rank else next(rest)).reshape(-1))
    sent.append(pieces[-1] if b.low_rank else flat[b.start:b.start + b.n * b.m])
  if not pieces:
    return flat, flat, new_q
  return jnp.concatenate(pieces), jnp.concatenate(sent), new_q


def _pack(arrays: Sequence[jax.Array]) -> jax.Array:
  return jnp.concatenate([a.reshape(-1) for a in arrays])


def _unpack(flat: jax.Array, shapes: Sequence[tuple[int, ...]]) -> list[jax.Array]:
  out, start = [], 0
  for shape in shapes:
    size = math.prod(shape)
    out.append(flat[start:start + size].reshape(shape))
    start += size
  return out
