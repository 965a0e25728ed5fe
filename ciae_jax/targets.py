"""FCOS target assignment on device, static shapes (paper IV-A.3, FCOS).

Locations of the FPN levels P3..P7 are flattened in level order, then row-major within a level,
as `ciae_jax.models.ciae.flatten_levels` does: `N = sum_l Hl * Wl`. The location of cell `(y, x)`
at stride `s` is the point `(x * s + s // 2, y * s + s // 2)` in input pixels.

A location is positive for segment `k` only if
  * `k` is a valid, non-crowd thing segment,
  * the location lies inside `k`'s mask (`positive_region="mask"`, the paper: the pixel at the
    location, clipped to the image, has `segment_map == k + 1`, and the location is not outside
    `k`'s box, which only happens when box and mask disagree) or strictly inside `k`'s box
    (`positive_region="box"`, original FCOS, where boxes overlap),
  * `max(l, t, r, b)` lies in the level's range `[lo, hi]` (both ends inclusive as in FCOS;
    `[0, 64], [64, 128], [128, 256], [256, 512], [512, inf)` for `sizes=(64, 128, 256, 512)`).
A location positive for several segments goes to the one with the smallest box area (the lowest
row among equal areas).
"""
import math
from typing import Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import hparams
from ciae_jax.segments import Segments

Array = jax.Array


def level_shapes_for(image_hw: Tuple[int, int],
                     strides: Sequence[int] = hparams.LEVEL_STRIDES) -> Tuple[Tuple[int, int], ...]:
  """Feature-map shape `(ceil(H / s), ceil(W / s))` of each level, as a static tuple."""
  height, width = (int(v) for v in image_hw)
  if height <= 0 or width <= 0:
    raise ValueError(f"image_hw must be positive, got {image_hw}")
  return tuple((-(-height // s), -(-width // s)) for s in strides)


def fcos_locations(level_shapes: Sequence[Tuple[int, int]],
                   strides: Sequence[int] = hparams.LEVEL_STRIDES) -> Tuple[np.ndarray, np.ndarray]:
  """Static location points and level index of every flattened location.

  Returns:
    `(points [N, 2] int32 as (x, y) in input pixels, level [N] int32)`, NumPy arrays
    (constants at trace time).
  """
  if len(level_shapes) != len(strides):
    raise ValueError(f"{len(level_shapes)} level_shapes but {len(strides)} strides")
  points, levels = [], []
  for level, ((rows, cols), stride) in enumerate(zip(level_shapes, strides)):
    ys, xs = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")  # [Hl, Wl] each
    xy = np.stack([xs * stride + stride // 2, ys * stride + stride // 2], -1)  # [Hl, Wl, 2]
    points.append(xy.reshape(-1, 2))
    levels.append(np.full((rows * cols,), level))
  return (np.concatenate(points).astype(np.int32),  # [N, 2]
          np.concatenate(levels).astype(np.int32))  # [N]


def _size_ranges(sizes: Sequence[float], num_levels: int) -> np.ndarray:
  """`[L, 2]` inclusive ranges of max(l, t, r, b): `[0, s0], [s0, s1], ..., [s_last, inf]`."""
  if len(sizes) != num_levels - 1:
    raise ValueError(f"sizes {tuple(sizes)} must have one entry fewer than the {num_levels} "
                     "levels")
  if any(a >= b for a, b in zip(sizes[:-1], sizes[1:])):
    raise ValueError(f"sizes {tuple(sizes)} must increase")
  bounds = [0.0] + [float(s) for s in sizes] + [math.inf]
  return np.array(list(zip(bounds[:-1], bounds[1:])), np.float32)  # [L, 2]


def centerness_from_ltrb(ltrb: Array) -> Array:
  """`sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`, 0 where a side pair is degenerate."""
  left, top, right, bottom = jnp.moveaxis(jnp.maximum(ltrb, 0.0), -1, 0)  # 4 x [...]
  horiz = jnp.minimum(left, right) / jnp.maximum(jnp.maximum(left, right), 1e-12)  # [...]
  vert = jnp.minimum(top, bottom) / jnp.maximum(jnp.maximum(top, bottom), 1e-12)  # [...]
  return jnp.sqrt(horiz * vert)  # [...]


def fcos_targets(segments: Segments,
                 *,
                 num_stuff: int,
                 hp: hparams.FcosHParams,
                 strides: Sequence[int] = hparams.LEVEL_STRIDES,
                 level_shapes: Optional[Sequence[Tuple[int, int]]] = None) -> Dict[str, Array]:
  """FCOS classification, box and centerness targets of one image (vmap over the batch).

  Args:
    segments: the image's ground truth (`segment_map [H, W]`, rows `[S]`; things are classes
      `num_stuff..`; crowd segments give no positives).
    num_stuff: number of stuff classes (thing index = class - num_stuff).
    hp: `sizes` (the `L - 1` boundaries of the per-level ranges of max(l, t, r, b)) and
      `positive_region` (`"mask"`, the paper, or `"box"`, original FCOS).
    strides: stride of each level (P3..P7).
    level_shapes: static `(Hl, Wl)` per level; default `level_shapes_for(segment_map.shape)`.

  Returns:
    dict with `cls_target [N] int32` (thing index, -1 background), `box_target [N, 4]` float32
    (l, t, r, b; 0 on negatives), `centerness_target [N]` float32 (0 on negatives),
    `positive [N] bool`, `matched_segment [N] int32` (segment row, -1).
  """
  segment_map = jnp.asarray(segments.segment_map)
  seg_class, seg_is_thing, seg_is_crowd, seg_valid = (
      jnp.asarray(a) for a in (segments.seg_class, segments.seg_is_thing,
                               segments.seg_is_crowd, segments.seg_valid))
  seg_box = jnp.asarray(segments.seg_box)
  if segment_map.ndim != 2:
    raise ValueError(f"segment_map must be [H, W], got shape {segment_map.shape}")
  num_segments = seg_class.shape[0]
  for name, value in (("seg_is_thing", seg_is_thing), ("seg_is_crowd", seg_is_crowd),
                      ("seg_valid", seg_valid)):
    if value.shape != (num_segments,):
      raise ValueError(f"{name} has shape {value.shape}, expected ({num_segments},)")
  if seg_box.shape != (num_segments, 4):
    raise ValueError(f"seg_box has shape {seg_box.shape}, expected ({num_segments}, 4)")
  height, width = segment_map.shape
  if level_shapes is None:
    level_shapes = level_shapes_for((height, width), strides)
  points, level = fcos_locations(level_shapes, strides)  # [N, 2], [N]
  ranges = _size_ranges(hp.sizes, len(strides))[level]  # [N, 2]

  seg_box = jnp.asarray(seg_box, jnp.float32)  # [S, 4]
  px = jnp.asarray(points[:, 0], jnp.float32)[:, None]  # [N, 1]
  py = jnp.asarray(points[:, 1], jnp.float32)[:, None]  # [N, 1]
  ltrb = jnp.stack([px - seg_box[None, :, 0], py - seg_box[None, :, 1],
                    seg_box[None, :, 2] - px, seg_box[None, :, 3] - py], -1)  # [N, S, 4]

  if hp.positive_region == "mask":
    # The pixel at the location, clipped to the image (ceil-divided levels may overhang).
    pix_y = np.minimum(points[:, 1], height - 1)  # [N]
    pix_x = np.minimum(points[:, 0], width - 1)  # [N]
    seg_at_loc = segment_map[pix_y, pix_x].astype(jnp.int32)  # [N]
    in_region = seg_at_loc[:, None] == jnp.arange(1, num_segments + 1)[None, :]  # [N, S]
    # Guard against boxes that disagree with masks (negative regression targets).
    in_region &= jnp.min(ltrb, -1) >= 0.0  # [N, S]
  else:
    in_region = jnp.min(ltrb, -1) > 0.0  # [N, S]

  max_side = jnp.max(ltrb, -1)  # [N, S]
  fits_level = (max_side >= ranges[:, 0:1]) & (max_side <= ranges[:, 1:2])  # [N, S]
  eligible = seg_valid & seg_is_thing & ~seg_is_crowd  # [S]
  candidate = in_region & fits_level & eligible[None, :]  # [N, S]

  area = (seg_box[:, 2] - seg_box[:, 0]) * (seg_box[:, 3] - seg_box[:, 1])  # [S]
  masked_area = jnp.where(candidate, area[None, :], jnp.inf)  # [N, S]
  best = jnp.argmin(masked_area, axis=1).astype(jnp.int32)  # [N] first minimum = lowest row
  positive = jnp.any(candidate, axis=1)  # [N]

  box_target = jnp.take_along_axis(ltrb, best[:, None, None], axis=1)[:, 0]  # [N, 4]
  box_target = jnp.where(positive[:, None], box_target, 0.0)  # [N, 4]
  centerness_target = jnp.where(positive, centerness_from_ltrb(box_target), 0.0)  # [N]
  thing_index = seg_class.astype(jnp.int32)[best] - num_stuff  # [N]
  return {
      "cls_target": jnp.where(positive, thing_index, -1).astype(jnp.int32),  # [N]
      "box_target": box_target,  # [N, 4]
      "centerness_target": centerness_target,  # [N]
      "positive": positive,  # [N]
      "matched_segment": jnp.where(positive, best, -1).astype(jnp.int32),  # [N]
  }
