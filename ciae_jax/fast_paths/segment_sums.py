"""Segment sums for the platforms: a loop of in-place scatter-adds (CPU) and one one-hot
matmul (accelerators); `ops.segment_sum` switches between them (`ciae_jax.platforms`).

Both equal `jax.ops.segment_sum(data, ids, num_segments)` of `[N, D]` rows (ids outside
`[0, num_segments)` dropped): the loop bit for bit, the matmul up to float32 summation order
(tests/test_segment_sums.py). Both have the gradient autodiff gives `segment_sum`, the gather of
the cotangent at the ids.
"""
import functools

import jax
import jax.numpy as jnp

from ciae_jax.loops import chunk_window
from ciae_jax.loops import varying_zero

# Rows per step of `segment_sum_loop` (16384 x 32 float32 = 2 MiB).
SEGMENT_SUM_CHUNK = 16384


def segment_sum_loop(data: jax.Array, segment_ids: jax.Array, num_segments: int,
                     chunk_size: int = SEGMENT_SUM_CHUNK) -> jax.Array:
  """`jax.ops.segment_sum(data, segment_ids, num_segments)` of `[N, D]` rows, in a loop over
  chunks of rows; ids outside `[0, num_segments)` are dropped, as there.

  The same scatter-adds in the same order (each chunk adds into the running sums in place), so
  the sums are bit-identical. Why a loop: XLA:CPU fuses the producer of `data` into each of its
  consumers, and a scatter wants its updates in its own shape, so `data` (the full-resolution
  embedding of the CIAE loss) was materialised once more for the scatter (0.26 GiB at
  2 x 800 x 1344); a loop takes the array its other consumers (the loss kernel's loop) read.
  The gradient is the gather of the cotangent at the ids, as autodiff's of `segment_sum`.
  """
  return _segment_sum_chunked(data, segment_ids, int(num_segments), int(chunk_size))


def _kept_ids(segment_ids, num_segments):
  """`[N]` int32 ids, those outside `[0, num_segments)` replaced by the extra bucket S."""
  segment_ids = jnp.asarray(segment_ids, jnp.int32)  # [N]
  inside = (segment_ids >= 0) & (segment_ids < num_segments)  # [N]
  return jnp.where(inside, segment_ids, num_segments)  # [N]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _segment_sum_chunked(data, segment_ids, num_segments, chunk_size):
  num_rows = data.shape[0]
  chunk = min(chunk_size, num_rows)
  if chunk == 0:
    return jnp.zeros((num_segments,) + data.shape[1:], data.dtype)
  # Dropped rows (out-of-range ids, or rows a shifted last chunk already added) go to an extra
  # bucket that is cut off at the end.
  segment_ids = _kept_ids(segment_ids, num_segments)  # [N]

  def body(i, sums):
    start, fresh = chunk_window(i, chunk, num_rows)  # [], [C]
    ids = jnp.where(fresh, jax.lax.dynamic_slice_in_dim(segment_ids, start, chunk),
                    num_segments)  # [C]
    return sums.at[ids].add(jax.lax.dynamic_slice_in_dim(data, start, chunk))  # [S + 1, D]

  zero = varying_zero(data).astype(data.dtype)  # []
  sums = jnp.zeros((num_segments + 1,) + data.shape[1:], data.dtype) + zero  # [S + 1, D]
  return jax.lax.fori_loop(0, -(-num_rows // chunk), body, sums)[:num_segments]


def _segment_sum_chunked_fwd(data, segment_ids, num_segments, chunk_size):
  sums = _segment_sum_chunked(data, segment_ids, num_segments, chunk_size)
  return sums, _kept_ids(segment_ids, num_segments)


def _gather_cotangent(num_segments, kept_ids, cotangent):
  del num_segments
  padded = jnp.concatenate([cotangent, jnp.zeros_like(cotangent[:1])])  # [S + 1, D]
  return padded[kept_ids], None  # [N, D]: 0 for dropped rows


def _segment_sum_chunked_bwd(num_segments, chunk_size, kept_ids, cotangent):
  del chunk_size
  return _gather_cotangent(num_segments, kept_ids, cotangent)


_segment_sum_chunked.defvjp(_segment_sum_chunked_fwd, _segment_sum_chunked_bwd)


def segment_sum_matmul(data: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """The same sums as one matmul `onehot(ids)^T @ data`, `[S, N] x [N, D]`, at full float32
  precision (no TF32) and accumulated in float32.

  One pass and no atomics: the result does not depend on thread scheduling, where GPU
  scatter-adds of floats do. The one-hot operand is `[N, S]` (XLA may build it inside the
  matmul's fusion); rows with ids outside `[0, S)` match no column and drop out.
  """
  return _segment_sum_matmul(data, segment_ids, int(num_segments))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _segment_sum_matmul(data, segment_ids, num_segments):
  ids = jnp.asarray(segment_ids, jnp.int32)  # [N]
  onehot = (ids[:, None] == jnp.arange(num_segments, dtype=jnp.int32)).astype(data.dtype)  # [N, S]
  sums = jnp.einsum("ns,nd->sd", onehot, data, precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=jnp.float32)  # [S, D]
  return sums.astype(data.dtype)


def _segment_sum_matmul_fwd(data, segment_ids, num_segments):
  return (_segment_sum_matmul(data, segment_ids, num_segments),
          _kept_ids(segment_ids, num_segments))


_segment_sum_matmul.defvjp(_segment_sum_matmul_fwd, _gather_cotangent)
