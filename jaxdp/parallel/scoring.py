"""Per-row scores of a `DataParallel`'s loss, data-parallel over its mesh: what downstream evaluation
(multiple-choice log-likelihoods, perplexity) needs, where `DataParallel.evaluate` sums every row.

  totals = row_losses(dp, params, {"inputs": x, "targets": y, "weights": w}, batch_size=64)
  totals["loss_sum"][i], totals["count"][i]   # row i's loss_fn(params, row i, None)

The rows are split into global batches of `batch_size` rows (a multiple of the data devices), the
last one padded with zero rows whose results are dropped, each batch split over the devices like a
training batch; the model enters only through `dp.loss_fn`, called on each row alone (vmap), so a
row's score never depends on the rows batched with it.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdp.core import precision
from jaxdp.core.step import LossFn
from jaxdp.errors import JaxdpError
from jaxdp.parallel.mesh import batch_sharding, batch_size_of, process_rows, put_batch, replicated


def row_losses(dp: Any, params: Any, rows: dict[str, np.ndarray], *,
               batch_size: int) -> dict[str, np.ndarray]:
  """`dp.loss_fn(params, row, None)` of every row, run data-parallel on `dp.mesh`.

  Args:
    dp: a jaxdp.DataParallel (its loss_fn, mesh and compute precision are used).
    params: the parameters, placed on `dp.mesh` (a train state's `.params`, or `replicate`'s
      output); under bf16/fp16 precision they are cast for the loss as in `dp.evaluate`.
    rows: dict of host arrays [n, ...], every array with the same n >= 1 (the whole set, on
      every process).
    batch_size: rows per global batch; a multiple of the data devices (`dp.data_size`).

  Returns:
    {"loss_sum": float64 [n], "count": float64 [n]}: each row's (loss_sum, weight_sum).

  Raises:
    JaxdpError: `batch_size` is not a positive multiple of the data devices, or `rows` is empty
      or ragged.
  """
  mesh = dp.mesh
  devices = batch_size_of(mesh)
  if batch_size < 1 or batch_size % devices:
    raise JaxdpError(f"batch_size={batch_size} rows must be a positive multiple of the "
                     f"{devices} data devices; use {max(1, -(-batch_size // devices)) * devices}")
  sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in rows.items()}
  if not rows or len(set(sizes.values())) != 1 or None in sizes.values():
    raise JaxdpError(f"rows must be a non-empty dict of arrays with one leading dimension; got "
                     f"{sizes}")
  n = next(size for size in sizes.values() if size is not None)
  if n == 0:
    raise JaxdpError("rows: no rows to score")
  step = _compiled(dp.loss_fn, mesh, dp.compute_dtype)
  mine = process_rows(mesh, batch_size)
  results = []
  for start in range(0, n, batch_size):
    batch = {k: _padded(np.asarray(v[start:start + batch_size]), batch_size)[mine][None]
             for k, v in rows.items()}
    results.append(step(params, put_batch(batch, batch_sharding(mesh), batch_size)))
  results = jax.device_get(results)  # One wait, after every batch is queued.
  return {key: np.concatenate([np.asarray(r[key], np.float64) for r in results])[:n]
          for key in ("loss_sum", "count")}


def replicate(params: Any, mesh: jax.sharding.Mesh) -> Any:
  """`params` (host or single-device arrays) copied whole onto every device of `mesh`."""
  return jax.device_put(params, replicated(mesh))


def _padded(x: np.ndarray, rows: int) -> np.ndarray:
  """x [m, ...] with zero rows appended up to `rows` (m <= rows)."""
  if x.shape[0] == rows:
    return x
  return np.concatenate([x, np.zeros((rows - x.shape[0],) + x.shape[1:], x.dtype)])


@functools.lru_cache(maxsize=16)
def _compiled(loss_fn: LossFn, mesh: jax.sharding.Mesh, compute_dtype: Any) -> Callable:
  """(params, batch [1, b, ...]) -> {"loss_sum", "count"} [b], replicated on every device.

  Cached per (loss_fn, mesh, precision), so a periodic evaluation compiles once. The parameters
  keep the shardings they arrive with (replicated, ZeRO-3 split or split over "model"); the
  rows are split over the batch axes, so each device scores its own rows.
  """
  def one(params, row):
    loss, count = loss_fn(params, jax.tree.map(lambda x: x[None], row), None)
    return jnp.asarray(loss, jnp.float32), jnp.asarray(count, jnp.float32)

  def scores(params, batch):
    params = precision.cast_floating(params, compute_dtype)
    flat = jax.tree.map(lambda x: x[0], batch)
    loss, count = jax.vmap(one, in_axes=(None, 0))(params, flat)
    return {"loss_sum": loss, "count": count}
  return jax.jit(scores, out_shardings=replicated(mesh))
