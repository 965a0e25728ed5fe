"""Small array operations shared by the model, the losses, the memory and inference."""
import functools

import jax
import jax.numpy as jnp

# Norms below this are treated as zero when normalising (empty sums stay zero, no NaN).
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`; all-zero vectors stay zero, with a finite gradient.

  Computed as `x * rsqrt(max(||x||^2, eps^2))` in the dtype of `x`. The gradient is written
  out (`_l2_normalize_bwd`): autodiff's keeps the rsqrt broadcast to the shape of `x` (at the
  embedding branch's full-resolution output, 0.26 GiB of the R50 step at 2 x 800 x 1344);
  this one keeps the output and the `[..., 1]` norms.
  """
  return _l2_normalize(x, axis % x.ndim, float(eps))


def l2_normalize_and_vjp(x: jax.Array, axis: int = -1, eps: float = NORM_EPS):
  """`(l2_normalize(x), vjp)`, `vjp(dy)` the gradient with respect to `x` (`_l2_normalize_bwd`).

  For code that applies the gradient itself (the CIAE loss kernel normalises its pixel chunks).
  """
  axis, eps = axis % x.ndim, float(eps)
  y, residuals = _l2_normalize_fwd(x, axis, eps)
  return y, lambda dy: _l2_normalize_bwd(axis, eps, residuals, dy)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _l2_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
  return _l2_normalize_fwd(x, axis, eps)[0]


def _l2_normalize_fwd(x, axis, eps):
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)  # [..., 1, ...]
  inv_norm = jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))  # [..., 1, ...]
  y = x * inv_norm
  return y, (y, inv_norm, sq_norm > eps * eps)


def _l2_normalize_bwd(axis, eps, residuals, dy):
  # y = x r, r = rsqrt(max(s, eps^2)), s = sum(x^2):  dx = r (dy - [s > eps^2] y sum(dy y)).
  # (At s == eps^2 autodiff splits max's gradient in halves; a measure-zero case.)
  del eps
  y, inv_norm, unclamped = residuals
  projection = jnp.sum(dy * y, axis=axis, keepdims=True)  # [..., 1, ...]
  return (inv_norm * (dy - jnp.where(unclamped, y * projection, 0)),)


_l2_normalize.defvjp(_l2_normalize_fwd, _l2_normalize_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               eps: float, dtype) -> jax.Array:
  """GroupNorm of `x [B, ..., C]` over all but the batch axis per group of channels.

  The same operations as `flax.linen.GroupNorm` (float32 statistics, the fast variance
  `max(0, E[x^2] - E[x]^2)`, `(x - mean) * (rsqrt(var + eps) * scale) + bias`, the result in
  `dtype`), so the values are flax's. The gradient is written out (`_group_norm_bwd`): autodiff
  kept both the input and `x - mean` of every GroupNorm to the backward pass, two full-size
  buffers per layer of the FCOS head towers and the embedding branch; this one keeps the input
  and the `[B, G]` statistics.
  """
  return _group_norm(x, scale, bias, int(num_groups), float(eps), jnp.dtype(dtype))


def _group_stats(x, num_groups):
  """(x in float32, mean, mean of squares, each statistic `[B, G]`) as flax computes them."""
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  grouped = x32.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  return x32, grouped.mean(axes), jnp.square(grouped).mean(axes)


def _per_channel(stat, x, num_groups):
  """`[B, G]` -> `[B, 1, ..., 1, C]` (each group's value repeated over its channels)."""
  repeated = jnp.repeat(stat, x.shape[-1] // num_groups, axis=-1)  # [B, C]
  return repeated.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm(x, scale, bias, num_groups, eps, dtype):
  return _group_norm_fwd(x, scale, bias, num_groups, eps, dtype)[0]


def _group_norm_fwd(x, scale, bias, num_groups, eps, dtype):
  x32, mean, mean_sq = _group_stats(x, num_groups)
  spread = mean_sq - jnp.square(mean)  # [B, G]
  inv_std = jax.lax.rsqrt(_per_channel(jnp.maximum(0.0, spread), x, num_groups) + eps)
  y = (x32 - _per_channel(mean, x, num_groups)) * (inv_std * scale) + bias
  return jnp.asarray(y, dtype), (x, scale, mean, spread, inv_std)


def _group_norm_bwd(num_groups, eps, dtype, residuals, dy):
  # Forward: a = x - mean_c, m = rsqrt(v_c) * scale with v = max(0, E[x^2] - mean^2) + eps per
  # group (`_c`: the group's value on each of its channels), y = a m + bias.
  del dtype
  x, scale, mean, spread, inv_std = residuals
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  dy = dy.astype(x32.dtype)
  batch, spatial = x.shape[0], tuple(range(1, x.ndim - 1))
  group_sum = lambda t: t.reshape(batch, num_groups, -1).sum(-1)  # [B, 1.., C] -> [B, G]
  mean_c = _per_channel(mean, x, num_groups)  # [B, 1.., C]
  d_bias = jnp.sum(dy, axis=(0,) + spatial)  # [C]
  sum_dy = jnp.sum(dy, axis=spatial, keepdims=True)  # [B, 1.., C]
  # sum(dy * a) = sum(dy * x) - mean sum(dy): no `x - mean` of the size of x is kept.
  d_mul = jnp.sum(dy * x32, axis=spatial, keepdims=True) - mean_c * sum_dy  # [B, 1.., C]
  d_scale = jnp.sum(d_mul * inv_std, axis=tuple(range(x.ndim - 1)))  # [C]
  # rsqrt'(v) = -0.5 rsqrt(v) / v, as JAX differentiates it.
  shifted = _per_channel(jnp.maximum(0.0, spread), x, num_groups) + eps  # [B, 1.., C]
  d_var = group_sum(d_mul * scale * (-0.5 * (inv_std / shifted)))  # [B, G]
  # max(0, s): the gradient passes where s > 0 (half of it at s == 0, as JAX's max).
  d_spread = d_var * jnp.where(spread > 0, 1.0, jnp.where(spread == 0, 0.5, 0.0))  # [B, G]
  mul = inv_std * scale  # [B, 1.., C]
  d_mean = -group_sum(sum_dy * mul) - 2.0 * mean * d_spread  # [B, G]
  count = x.size // (batch * num_groups)  # elements per group
  dx = (dy * mul + (2.0 / count) * x32 * _per_channel(d_spread, x, num_groups)
        + _per_channel(d_mean / count, x, num_groups))
  return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias.astype(scale.dtype)


_group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


def chunk_window(index: jax.Array, chunk: int, num_rows: int) -> tuple[jax.Array, jax.Array]:
  """`(start, fresh)` of chunk `index` of a loop over `num_rows` rows in chunks of `chunk`.

  The last chunk is shifted back to end at `num_rows` (as `dynamic_slice` would clamp it), so
  every chunk has the static size; `fresh` (`[chunk]` bool) marks its rows that no earlier
  chunk covered, the only ones it may add or write.
  """
  start = jnp.minimum(index * chunk, num_rows - chunk)  # []
  return start, jnp.arange(chunk) + start >= index * chunk  # [], [chunk]


def varying_zero(tree) -> jax.Array:
  """A float32 0 that depends on every array in `tree`.

  Loop carries start from it: under shard_map (check_vma) a carry must be "varying" over the
  mesh axes any input varies over, as the loop body's outputs are.
  """
  return sum((jnp.sum(jnp.asarray(leaf).reshape(-1)[:0].astype(jnp.float32))
              for leaf in jax.tree.leaves(tree)), jnp.zeros((), jnp.float32))


# Rows per step of `segment_sum_chunked` (16384 x 32 float32 = 2 MiB).
SEGMENT_SUM_CHUNK = 16384


def segment_sum_chunked(data: jax.Array, segment_ids: jax.Array, num_segments: int,
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


def _segment_sum_chunked_bwd(num_segments, chunk_size, kept_ids, cotangent):
  del num_segments, chunk_size
  padded = jnp.concatenate([cotangent, jnp.zeros_like(cotangent[:1])])  # [S + 1, D]
  return padded[kept_ids], None  # [N, D]: 0 for dropped rows


_segment_sum_chunked.defvjp(_segment_sum_chunked_fwd, _segment_sum_chunked_bwd)


def expand_boxes(boxes: jax.Array, factor: float) -> jax.Array:
  """Boxes `[..., 4]` (x0, y0, x1, y1) scaled `factor` times about their centres."""
  if factor == 1.0:
    return boxes
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [..., 2]
  half = (boxes[..., 2:] - boxes[..., :2]) * (factor / 2)  # [..., 2]
  return jnp.concatenate([centre - half, centre + half], axis=-1)  # [..., 4]
