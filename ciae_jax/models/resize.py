"""Bilinear resizing by whole factors without dense interpolation matrices.

`jax.image.resize(x, shape, "bilinear", antialias=False)` contracts each spatial axis with a
dense `[in, out]` weight matrix: `2 * in` FLOPs per output value and axis where bilinear
interpolation needs two taps. For CIAE's last step, P2 (H/4 x W/4, 32 channels) to the full
image, that is 0.55 GFLOP at 256 x 384, 4.4 GFLOP at 512 x 768 and ~27 GFLOP at 800 x 1344, in
the forward pass and again in the backward pass (measurements: tools/profiling/resize_micro.py).

`resize_bilinear` gives the same values (half-pixel centres, no antialiasing, edges clamped:
PyTorch's `interpolate(mode="bilinear", align_corners=False)`) with two taps per output: an axis
whose output size is a whole multiple `s` of its input size is upsampled by `s` phase-shifted
blends of each value with its edge-clamped neighbours, which XLA fuses into one elementwise loop.
Any other axis (e.g. FCOS's ceil-sized P6 / P7 of an 800-pixel side) falls back to
`jax.image.resize` along that axis. Differences from `jax.image.resize` are float32 rounding only
(values <= a few ulps, gradients ~1e-6 relative; the weights are the same numbers).

The whole-factor path has a custom VJP (reverse mode: `grad`, `vjp`, also of higher order);
forward-mode differentiation (`jvp`, `jacfwd`) of it is not supported.
"""
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _phase_weights(factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Weights of (previous, itself, following) for each of the `factor` output phases.

  Output pixel `factor * j + r` samples the input at `j + offset_r`, `|offset_r| < 0.5`: a blend
  of pixel j with its edge-clamped neighbour before (offset < 0) or after (offset > 0).
  """
  offset = (np.arange(factor) + 0.5) / factor - 0.5  # [factor]
  return (np.where(offset < 0, -offset, 0.0), 1.0 - np.abs(offset),
          np.where(offset > 0, offset, 0.0))


def _shift(x: jax.Array, axis: int, step: int) -> jax.Array:
  """x[clip(j + step, 0, size - 1)] along `axis` (step = -1: previous, +1: following)."""
  size = x.shape[axis]
  if step < 0:
    return jnp.concatenate([jax.lax.slice_in_dim(x, 0, 1, axis=axis),
                            jax.lax.slice_in_dim(x, 0, size - 1, axis=axis)], axis)
  return jnp.concatenate([jax.lax.slice_in_dim(x, 1, size, axis=axis),
                          jax.lax.slice_in_dim(x, size - 1, size, axis=axis)], axis)


def _unshift(g: jax.Array, axis: int, step: int) -> jax.Array:
  """The adjoint of `_shift`: where each input pixel's copies went, their cotangents summed."""
  size = g.shape[axis]
  if size == 1:
    return g
  zero = jnp.zeros_like(jax.lax.slice_in_dim(g, 0, 1, axis=axis))
  piece = functools.partial(jax.lax.slice_in_dim, g, axis=axis)
  if step < 0:  # previous[0] = x[0], previous[j] = x[j - 1].
    return jnp.concatenate([piece(0, 1) + piece(1, 2), piece(2, size), zero], axis)
  # following[j] = x[j + 1], following[size - 1] = x[size - 1].
  return jnp.concatenate([zero, piece(0, size - 2), piece(size - 2, size - 1) +
                          piece(size - 1, size)], axis)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Bilinear upsampling of `x` along `axis` by the whole `factor` (half-pixel centres).

  Forward: one broadcast expression over `[..., size, factor, ...]` (no concatenation of the
  phases), which XLA emits as one vectorised loop. Backward (custom VJP, the exact adjoint):
  static slices of the cotangent per phase, weighted and summed, with the neighbours' shares
  shifted back; no reduce op, because XLA:CPU hands reductions to YNNPACK (jaxlib 0.10.2's
  default), whose strided reductions made the automatic transpose 5-30x slower than this.
  """
  shape = [1] * (x.ndim + 1)
  shape[axis + 1] = factor
  out = sum(jnp.expand_dims(v, axis + 1) * jnp.asarray(w.reshape(shape), x.dtype)
            for v, w in zip((_shift(x, axis, -1), x, _shift(x, axis, 1)),
                            _phase_weights(factor)))  # [..., size, factor, ...]
  return out.reshape(x.shape[:axis] + (x.shape[axis] * factor,) + x.shape[axis + 1:])


def _upsample_axis_fwd(x, axis, factor):
  return _upsample_axis(x, axis, factor), None


def _upsample_axis_bwd(axis, factor, _, g):
  size = g.shape[axis] // factor
  g = g.reshape(g.shape[:axis] + (size, factor) + g.shape[axis + 1:])
  phases = [jax.lax.index_in_dim(g, r, axis + 1, keepdims=False) for r in range(factor)]
  totals = []
  for weights in _phase_weights(factor):  # previous, itself, following
    terms = [phase * float(w) for phase, w in zip(phases, weights) if w]
    totals.append(sum(terms) if terms else None)
  previous, itself, following = totals
  grad = itself
  if previous is not None:
    grad = grad + _unshift(previous, axis, -1)
  if following is not None:
    grad = grad + _unshift(following, axis, 1)
  return (grad,)


_upsample_axis.defvjp(_upsample_axis_fwd, _upsample_axis_bwd)


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
  """Bilinear resize of `[B, h, w, C]` to `[B, size[0], size[1], C]`, as `jax.image.resize`.

  Half-pixel centres, no antialiasing (PyTorch's `interpolate(align_corners=False)`).
  """
  out_h, out_w = int(size[0]), int(size[1])
  for axis, out in ((1, out_h), (2, out_w)):
    current = x.shape[axis]
    if out == current:
      continue
    if out % current == 0:
      x = _upsample_axis(x, axis, out // current)
    else:
      shape = x.shape[:axis] + (out,) + x.shape[axis + 1:]
      x = jax.image.resize(x, shape, method="bilinear", antialias=False)
  return x
