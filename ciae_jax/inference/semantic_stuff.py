"""Stuff from the semantic branch at inference (paper V-F.1, Table III, first row).

With `model.stuff_from="semantic"` the model predicts `semantic_logits [H/4, W/4, N_st + 1]`
(stuff classes, then one merged "thing" class) and `inference.panoptic.panoptic_inference` combines
them with the embedding's instance assignment:
  * a pixel whose (nearest-upsampled) semantic argmax is stuff class c takes stuff query c;
  * a pixel whose argmax is "thing" takes the instance query of highest similarity, among the
    instance queries only (stuff queries at -inf for it), box filter as usual;
  * a "thing" pixel that no usable instance reaches (no usable detection, or every usable one
    at -inf there with `outside_box_similarity=-inf`) is void. Void, not the best stuff class:
    the semantic branch has already said the pixel is not stuff, and Panoptic FPN's merge
    (Kirillov et al.) likewise leaves thing pixels without an instance unlabelled.
The helpers here are the array steps of that rule; `inference` runs the assignment itself.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from ciae_jax import ops

Array = jax.Array


def semantic_argmax(semantic_logits: Array, image_hw: tuple[int, int]) -> Array:
  """`[H, W]` int32: the argmax of `semantic_logits [h, w, C]`, each cell repeated s x s.

  Nearest upsampling by the whole stride `s = H / h`: pixel (y, x) reads cell (y // s, x // s),
  whose s x s block holds the pixel `(s * i + s // 2, s * j + s // 2)` whose label the cell is
  trained on (`losses.semantic.semantic_labels`).
  """
  cells_h, cells_w, _ = semantic_logits.shape
  height, width = image_hw
  stride = height // cells_h
  if stride < 1 or (cells_h * stride, cells_w * stride) != (height, width):
    raise ValueError(f"semantic_logits {cells_h} x {cells_w} are not the embedding map "
                     f"{height} x {width} at one whole stride")
  label = jnp.argmax(semantic_logits, axis=-1).astype(jnp.int32)  # [h, w]
  return jnp.repeat(jnp.repeat(label, stride, axis=0), stride, axis=1)  # [H, W]


def instance_reaches(instance: Array, thing_boxes: Array, thing_usable: Array, *,
                     box_expand: float, outside_box_similarity: float) -> Array:
  """`[H, W]` bool: whether the similarity of each pixel to its argmax instance was finite.

  `instance [H, W]` is the argmax over the instance queries alone (`panoptic.assign_pixels`
  with no stuff query): the first index when every instance is at -inf. So the pixel was
  reached iff its argmax instance is usable and, when the outside-box similarity is -inf,
  the pixel lies inside that instance's (expanded) box: no `[H, W, K]` array is needed.
  """
  num_rows, num_cols = instance.shape
  usable = thing_usable[instance]  # [H, W]
  if outside_box_similarity > -math.inf:
    return usable  # [H, W]
  box = ops.expand_boxes(thing_boxes, box_expand)[instance]  # [H, W, 4]
  pixel_y = jnp.arange(num_rows, dtype=jnp.float32)[:, None] + 0.5  # [H, 1]
  pixel_x = jnp.arange(num_cols, dtype=jnp.float32)[None, :] + 0.5  # [1, W]
  in_box = ((pixel_x >= box[..., 0]) & (pixel_x <= box[..., 2])
            & (pixel_y >= box[..., 1]) & (pixel_y <= box[..., 3]))  # [H, W]
  return usable & in_box  # [H, W]


def combine(semantic: Array, instance: Array, reached: Array, inside: Array, *,
            num_stuff: int) -> tuple[Array, Array]:
  """`(assignment, labelled)`, `[H, W]` each: query indices (stuff first) and the pixels that
  keep a label (`inside`, less the "thing" pixels no instance reached, which become void)."""
  is_stuff = semantic < num_stuff  # [H, W]
  assignment = jnp.where(is_stuff, semantic, num_stuff + instance).astype(jnp.int32)  # [H, W]
  return assignment, inside & (is_stuff | reached)  # [H, W] x 2
