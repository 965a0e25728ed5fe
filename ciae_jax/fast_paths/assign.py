"""The per-pixel assignment of `inference.panoptic.assign_pixels` in row bands, for XLA:CPU;
`assign_pixels` switches to it (`ciae_jax.platforms`, "assign_bands").

The plain path computes the whole `[H, W, Q]` similarity array at once (one expression and
no sequential steps, what a GPU wants; 0.66 GB of float32 per image at 800 x 1344 with the
153 queries of COCO, 0.86 GB with 200, times the images of a vmapped batch). On a
CPU that array goes to memory and back for each of the matmul, the box filter and the two
reductions; in bands of `BAND_ELEMENTS` similarities it stays in cache (2.7x faster at
512 x 768 with 153 queries; benchmarks/RESULTS.md). Every pixel's result is the same
expression of the same values either way, so the two paths agree exactly
(tests/test_inference.py).
"""
from typing import Callable

import jax
from jax import lax
import jax.numpy as jnp

Array = jax.Array

# Similarity elements per row band (4 MiB of float32): a band's `[rows, W, Q]` similarities
# stay in cache between the matmul, the box filter and the two reductions, where the whole
# `[H, W, Q]` array would go to memory and back for each (2.7x slower at 512 x 768 with 153
# queries on CPU; benchmarks/RESULTS.md, "Where the time goes").
BAND_ELEMENTS = 2**20


def assign_in_bands(assign_rows: Callable[[Array, Array], Array], embedding: Array,
                    row_in: Array, band_elements: int = BAND_ELEMENTS) -> Array:
  """`assign_rows(embedding, row_in)` (`[H, W, D]`, `[H, Q]` -> `[H, W]`) in row bands.

  `assign_rows` must treat each row on its own (as the per-pixel assignment does); it runs
  once per band of `rows = band_elements // (W * Q)` rows (at least 1), one loop step per
  band; the last band is padded with rows that are computed, then dropped. A band that holds
  the whole image is `assign_rows(embedding, row_in)` itself, no loop.
  """
  num_rows, num_cols, dim = embedding.shape
  num_queries = row_in.shape[1]
  rows = max(1, min(num_rows, band_elements // max(1, num_cols * num_queries)))
  num_bands = -(-num_rows // rows)
  if num_bands == 1:
    return assign_rows(embedding, row_in)  # [H, W]
  pad = num_bands * rows - num_rows
  banded_embedding = jnp.pad(embedding, ((0, pad), (0, 0), (0, 0))).reshape(
      num_bands, rows, num_cols, dim)  # [N, R, W, D]
  banded_row_in = jnp.pad(row_in, ((0, pad), (0, 0))).reshape(
      num_bands, rows, num_queries)  # [N, R, Q]
  assignment = lax.map(lambda band: assign_rows(*band),
                       (banded_embedding, banded_row_in))  # [N, R, W]
  return assignment.reshape(num_bands * rows, num_cols)[:num_rows]  # [H, W]


def first_argmax(values: Array, axis: int = -1) -> Array:
  """`jnp.argmax(values, axis)` (first index of the maximum; a NaN counts as the maximum) from
  a max and a min reduction, which XLA:CPU vectorises, where argmax's (value, index) reduction
  runs one element at a time."""
  axis = axis % values.ndim
  maximum = jnp.max(values, axis=axis, keepdims=True)
  index = lax.broadcasted_iota(jnp.int32, values.shape, axis)
  hit = (values == maximum) | jnp.isnan(values)
  return jnp.min(jnp.where(hit, index, values.shape[axis]), axis=axis)
