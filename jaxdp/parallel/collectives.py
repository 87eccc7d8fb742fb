"""Collectives for data-parallel gradient exchange, and the bytes they move.

Pure functions meant to run inside `jax.shard_map` over a mesh axis (named by `axis_name`):
  - `ring_allreduce_sum`: reduce-scatter then all-gather, N-1 `lax.ppermute` steps each, on N
    chunks of the flattened array (zero-padded when its size is not divisible by N);
  - `ps_allreduce_sum`: the parameter-server pattern, every device sends to device 0, which sums
    and sends the result back, all as point-to-point `ppermute`s so the HLO shows its real traffic;
  - `allreduce_mean`: "pmean" | "ring" | "ps" over a whole pytree (one flat buffer);
  - sparsifiers (`topk_select`, `randomk_indices`) and their aggregations (`sparse_mean`: values
    and indices all-gathered, then scatter-added, so devices may pick different indices;
    `shared_index_mean`: random-k with a seed shared by all devices, so only values travel);
  - `quantized_mean`: int8 (per-chunk scale) or bf16 all-reduce as an all-to-all reduce-scatter
    of encoded chunks, an f32 sum, and an all-gather of the re-encoded reduced chunks.
Their bytes are counted from the compiled program by `jaxdp.parallel.hlo`.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp

INT8_CHUNK = 256  # Elements sharing one f32 scale in int8 all-reduce (1.6% overhead).


def _pad_to_rows(flat: jax.Array, rows: int, multiple: int = 1) -> jax.Array:
  """[d] -> [rows, c] with c a multiple of `multiple`, zero-padded at the end."""
  cols = -(-flat.size // (rows * multiple)) * multiple
  return jnp.pad(flat, (0, rows * cols - flat.size)).reshape(rows, cols)


def ring_allreduce_sum(x: jax.Array, axis_name: str | tuple[str, ...]) -> jax.Array:
  """Sum of `x` over `axis_name` by ring reduce-scatter + ring all-gather (2(N-1) ppermutes).

  After the reduce-scatter device i holds the full sum of chunk (i+1) mod N; each chunk's sum is
  computed once and then copied, so every device ends with bitwise the same result.
  """
  n = lax.axis_size(axis_name)
  if n == 1:
    return x
  me = lax.axis_index(axis_name)
  buf = _pad_to_rows(x.reshape(-1), n)
  right = [(i, (i + 1) % n) for i in range(n)]
  chunk = lambda b, i: lax.dynamic_index_in_dim(b, i % n, keepdims=False)
  for s in range(n - 1):  # Reduce-scatter: pass partial sums one hop right, add own chunk.
    received = lax.ppermute(chunk(buf, me - s), axis_name, right)
    target = (me - s - 1) % n
    buf = lax.dynamic_update_index_in_dim(buf, chunk(buf, target) + received, target, 0)
  for s in range(n - 1):  # All-gather: pass finished chunks one hop right.
    received = lax.ppermute(chunk(buf, me + 1 - s), axis_name, right)
    buf = lax.dynamic_update_index_in_dim(buf, received, (me - s) % n, 0)
  return buf.reshape(-1)[:x.size].reshape(x.shape)


def ps_allreduce_sum(x: jax.Array, axis_name: str | tuple[str, ...]) -> jax.Array:
  """Sum over `axis_name` via a server (device 0): N-1 sends in, N-1 sends out, all through it."""
  n = lax.axis_size(axis_name)
  me = lax.axis_index(axis_name)
  total = x
  for i in range(1, n):  # Device i -> server; only the server's copy of `total` is the sum.
    total = total + lax.ppermute(x, axis_name, [(i, 0)])
  result = total
  for j in range(1, n):  # Server -> device j; a ppermute delivers zeros to non-targets.
    result = jnp.where(me == j, lax.ppermute(total, axis_name, [(0, j)]), result)
  return result


def allreduce_mean(tree: Any, axis_name: str | tuple[str, ...], method: str) -> Any:
  """Mean of a pytree over `axis_name` by "pmean" (XLA all-reduce), "ring" or "ps"."""
  if method == "pmean":
    return lax.pmean(tree, axis_name)
  flat, unravel = ravel_pytree(tree)
  total = {"ring": ring_allreduce_sum, "ps": ps_allreduce_sum}[method](flat, axis_name)
  return unravel(total / lax.axis_size(axis_name))


def num_kept(ratio: float, size: int) -> int:
  """Entries kept by top-k/random-k at `ratio` of `size` (at least one)."""
  return max(1, min(size, round(ratio * size)))


def topk_select(v: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """(values, int32 indices) of the k largest-magnitude entries of a flat vector [d].

  Top-k sparsification as in Stich et al. 2018 ("Sparsified SGD with Memory") and Deep Gradient
  Compression (Lin et al. 2018); their error feedback lives in exchange.reduce_gradients.
  """
  _, indices = lax.top_k(jnp.abs(v), k)
  return v[indices], indices.astype(jnp.int32)


def randomk_indices(key: jax.Array, size: int, k: int) -> jax.Array:
  """k distinct int32 indices of [0, size), uniform (random-k, Stich et al. 2018); the same key
  gives the same indices on every device."""
  return jax.random.choice(key, size, (k,), replace=False).astype(jnp.int32)


def densify(values: jax.Array, indices: jax.Array, size: int) -> jax.Array:
  """The flat vector with `values` at `indices` and zeros elsewhere (duplicates add)."""
  return jnp.zeros((size,), values.dtype).at[indices.reshape(-1)].add(values.reshape(-1))


def sparse_mean(values: jax.Array, indices: jax.Array, size: int,
                axis_name: str | tuple[str, ...]) -> jax.Array:
  """Mean over devices of sparse vectors whose indices differ per device.

  Values and indices are all-gathered ([N, k] each) and scatter-added, so an index picked by
  several devices sums their values and one picked by a single device keeps its own.
  """
  all_values = lax.all_gather(values, axis_name)
  all_indices = lax.all_gather(indices, axis_name)
  return densify(all_values, all_indices, size) / lax.axis_size(axis_name)


def shared_index_mean(values: jax.Array, indices: jax.Array, size: int, axis_name: str | tuple[str, ...],
                      method: str) -> jax.Array:
  """Mean of sparse vectors that share `indices` on every device: only the values travel."""
  return densify(allreduce_mean(values, axis_name, method), indices, size)


def encode(x: jax.Array, codec: str) -> tuple[jax.Array, jax.Array]:
  """[r, c] -> (payload, scales): int8 with one f32 scale per INT8_CHUNK, or bf16 (no scales)."""
  if codec == "bf16":  # Sent as uint16 bits: XLA:CPU would widen a bf16 collective to f32.
    bits = lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)
    return bits, jnp.zeros(x.shape[:-1] + (0,), jnp.float32)
  blocks = x.reshape(x.shape[:-1] + (-1, INT8_CHUNK))
  scales = jnp.max(jnp.abs(blocks), axis=-1) / 127.0
  safe = jnp.where(scales > 0, scales, 1.0)[..., None]
  q = jnp.clip(jnp.round(blocks / safe), -127, 127).astype(jnp.int8)
  return q.reshape(x.shape), scales


def decode(payload: jax.Array, scales: jax.Array, codec: str) -> jax.Array:
  """The inverse of `encode`: (payload, scales) -> float32 [..., c] (int8: payload times its
  chunk's scale; bf16: the uint16 bits read back as bfloat16)."""
  if codec == "bf16":
    return lax.bitcast_convert_type(payload, jnp.bfloat16).astype(jnp.float32)
  blocks = payload.astype(jnp.float32).reshape(payload.shape[:-1] + (-1, INT8_CHUNK))
  return (blocks * scales[..., None]).reshape(payload.shape)


def quantized_mean(v: jax.Array, codec: str, axis_name: str | tuple[str, ...]) -> tuple[jax.Array, jax.Array]:
  """(mean over devices, this device's decoded contribution) of a flat f32 vector.

  Reduce-scatter is an all-to-all of encoded chunks (each device receives every device's copy
  of its chunk) summed in f32; the reduced chunk is encoded again and all-gathered. Both phases
  move encoded bytes only. The contribution is what the other devices saw of `v` (for error
  feedback).
  """
  n = lax.axis_size(axis_name)
  rows = _pad_to_rows(v, n, INT8_CHUNK if codec == "int8" else 1)
  payload, scales = encode(rows, codec)
  sent = decode(payload, scales, codec).reshape(-1)[:v.size]
  mine = decode(lax.all_to_all(payload, axis_name, 0, 0), lax.all_to_all(scales, axis_name, 0, 0),
                codec)
  reduced = jnp.sum(mine, axis=0) / n
  payload, scales = encode(reduced[None], codec)
  gathered = decode(lax.all_gather(payload[0], axis_name), lax.all_gather(scales[0], axis_name),
                    codec)
  return gathered.reshape(-1)[:v.size], sent


# --- Bytes on the wire, read from compiled HLO ---------------------------------------------------
