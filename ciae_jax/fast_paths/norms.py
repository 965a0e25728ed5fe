"""Normalisations with written-out gradients (the CPU fast path of `ops.l2_normalize` and
`ops.group_norm`; `ciae_jax.platforms`, "norm_grads").

Values are those of the plain functions in `ciae_jax.ops` (the same operations); only the
backward pass differs: autodiff keeps full-size intermediates to the backward pass that these
recompute from the input and small statistics (measured in the XLA:CPU memory plan of the R50
step, benchmarks/RESULTS.md). tests/test_ops_memory.py checks values and gradients against the
plain functions and a float64 reference.
"""
import functools

import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, axis: int, eps: float) -> jax.Array:
  """`ops.l2_normalize` with its gradient written out (`_l2_normalize_bwd`): autodiff's keeps
  the rsqrt broadcast to the shape of `x` (at the embedding branch's full-resolution output,
  0.26 GiB of the R50 step at 2 x 800 x 1344 on XLA:CPU); this one keeps the output and the
  `[..., 1]` norms."""
  return _l2_normalize(x, axis % x.ndim, float(eps))


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
  """`ops.group_norm` with its gradient written out (`_group_norm_bwd`): autodiff keeps both
  the input and `x - mean` of every GroupNorm to the backward pass, two full-size buffers per
  layer of the FCOS head towers and the embedding branch; this one keeps the input and the
  `[B, G]` statistics."""
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
