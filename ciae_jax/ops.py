"""Small array operations shared by the model, the losses, the memory and inference.

Each is plain JAX; `l2_normalize`, `group_norm` and `segment_sum` take a platform's fast path
where `ciae_jax.platforms` says one pays (the same values; `ciae_jax.fast_paths`).
"""
import functools

import jax
import jax.numpy as jnp

from ciae_jax import platforms
from ciae_jax.fast_paths import norms
from ciae_jax.fast_paths import segment_sums

# Norms below this are treated as zero when normalising (empty sums stay zero, no NaN).
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`; all-zero vectors stay zero, with a finite gradient.

  Computed as `x * rsqrt(max(||x||^2, eps^2))` in the dtype of `x`.
  """
  axis, eps = axis % x.ndim, float(eps)
  return platforms.switch(
      "norm_grads", x, fast=functools.partial(norms.l2_normalize, axis=axis, eps=eps),
      plain=functools.partial(_l2_normalize, axis=axis, eps=eps))


def _l2_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)  # [..., 1, ...]
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int,
               eps: float, dtype) -> jax.Array:
  """GroupNorm of `x [B, ..., C]` over all but the batch axis per group of channels.

  The operations of `flax.linen.GroupNorm` (float32 statistics, the fast variance
  `max(0, E[x^2] - E[x]^2)`, `(x - mean) * (rsqrt(var + eps) * scale) + bias`, the result in
  `dtype`), so the values are flax's.
  """
  args = (int(num_groups), float(eps), jnp.dtype(dtype))
  return platforms.switch("norm_grads", x, scale, bias,
                          fast=lambda *a: norms.group_norm(*a, *args),
                          plain=lambda *a: _group_norm(*a, *args))


def _group_norm(x, scale, bias, num_groups, eps, dtype):
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  grouped = x32.reshape(x.shape[:-1] + (num_groups, x.shape[-1] // num_groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = grouped.mean(axes)  # [B, G]
  var = jnp.maximum(0.0, jnp.square(grouped).mean(axes) - jnp.square(mean))  # [B, G]
  per_channel = lambda stat: jnp.repeat(stat, x.shape[-1] // num_groups, axis=-1).reshape(
      (x.shape[0],) + (1,) * (x.ndim - 2) + (x.shape[-1],))  # [B, G] -> [B, 1.., C]
  y = (x32 - per_channel(mean)) * (jax.lax.rsqrt(per_channel(var) + eps) * scale) + bias
  return jnp.asarray(y, dtype)


def segment_sum(data: jax.Array, segment_ids: jax.Array, num_segments: int) -> jax.Array:
  """`jax.ops.segment_sum(data, segment_ids, num_segments)` of `[N, D]` rows; ids outside
  `[0, num_segments)` are dropped, as there.

  On CPU a loop of in-place scatter-adds (the same sums bit for bit); on accelerators one
  one-hot matmul at full float32 precision, deterministic where scatter-adds are not
  (`fast_paths.segment_sums`); `jax.ops.segment_sum` elsewhere.
  """
  num_segments = int(num_segments)
  return platforms.select(
      data, segment_ids,
      plain=lambda d, i: jax.ops.segment_sum(d, i, num_segments=num_segments),
      segment_sums_loop=lambda d, i: segment_sums.segment_sum_loop(d, i, num_segments),
      segment_sums_matmul=lambda d, i: segment_sums.segment_sum_matmul(d, i, num_segments))


def top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """`jax.lax.top_k(x, k)`: the `k` largest entries of each row and their indices.

  On CPU the indices pass an optimization barrier: it keeps XLA:CPU from merging their readers
  into top_k's own slice, which stops it from using its TopK call (a full sort instead, ~20x
  slower in the CIAE loss).
  """
  values, index = jax.lax.top_k(x, k)
  index = platforms.switch("top_k_call", index, fast=jax.lax.optimization_barrier,
                           plain=lambda i: i)
  return values, index


def expand_boxes(boxes: jax.Array, factor: float) -> jax.Array:
  """Boxes `[..., 4]` (x0, y0, x1, y1) scaled `factor` times about their centres."""
  if factor == 1.0:
    return boxes
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [..., 2]
  half = (boxes[..., 2:] - boxes[..., :2]) * (factor / 2)  # [..., 2]
  return jnp.concatenate([centre - half, centre + half], axis=-1)  # [..., 4]
