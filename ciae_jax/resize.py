"""Bilinear resizing by whole factors without dense interpolation matrices.

`jax.image.resize(x, shape, "bilinear", antialias=False)` contracts each spatial axis with a
dense `[in, out]` weight matrix: `2 * in` FLOPs per output value and axis where bilinear
interpolation needs two taps. For CIAE's last step, P2 (H/4 x W/4, 32 channels) to the full
image, that is 0.55 GFLOP at 256 x 384, 4.4 GFLOP at 512 x 768 and ~27 GFLOP at 800 x 1344, in
the forward pass and again in the backward pass (measurements: benchmarks/resize_micro.py).

`resize_bilinear` gives the same values (half-pixel centres, no antialiasing, edges clamped:
PyTorch's `interpolate(mode="bilinear", align_corners=False)`) with two taps per output: an axis
whose output size is a whole multiple `s` of its input size is upsampled by `s` phase-shifted
blends of each value with its edge-clamped neighbours, which XLA fuses into one elementwise loop.
Any other axis (e.g. FCOS's ceil-sized P6 / P7 of an 800-pixel side) falls back to
`jax.image.resize` along that axis. Differences from `jax.image.resize` are float32 rounding only
(<= a few ulps; the weights are the same numbers).
"""
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def _upsample_axis(x: jax.Array, axis: int, factor: int) -> jax.Array:
  """Bilinear upsampling of `x` along `axis` by the whole `factor` (half-pixel centres).

  Output pixel `factor * j + r` samples the input at `j + offset_r`, `|offset_r| < 0.5`: a blend
  of pixel j with its edge-clamped neighbour before (offset < 0) or after (offset > 0). The
  blend is written as one broadcast expression over `[..., size, factor, ...]` (no
  concatenation of the phases), which XLA emits as one vectorised loop.
  """
  size = x.shape[axis]
  first = jax.lax.slice_in_dim(x, 0, 1, axis=axis)
  last = jax.lax.slice_in_dim(x, size - 1, size, axis=axis)
  previous = jnp.concatenate([first, jax.lax.slice_in_dim(x, 0, size - 1, axis=axis)], axis)
  following = jnp.concatenate([jax.lax.slice_in_dim(x, 1, size, axis=axis), last], axis)
  offset = (np.arange(factor) + 0.5) / factor - 0.5  # [factor]
  weights = (np.where(offset < 0, -offset, 0.0),  # previous
             1.0 - np.abs(offset),  # the pixel itself
             np.where(offset > 0, offset, 0.0))  # following
  shape = [1] * (x.ndim + 1)
  shape[axis + 1] = factor
  out = sum(jnp.expand_dims(v, axis + 1) * jnp.asarray(w.reshape(shape), x.dtype)
            for v, w in zip((previous, x, following), weights))  # [..., size, factor, ...]
  return out.reshape(x.shape[:axis] + (size * factor,) + x.shape[axis + 1:])


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
