"""CIAE inference: FCOS decoding, class-wise NMS and panoptic assignment (paper IV-C, Eq. 16).

Device side: jittable, static shapes, one image at a time (the caller vmaps, or jits with batch 1;
`image_size` may be traced, every keyword argument is static):
  `decode_detections`   per-level top-k FCOS candidates, boxes clipped to the valid image region.
  `class_nms`           greedy class-wise NMS that returns the `max_detections` best survivors.
  `panoptic_inference`  detections -> queries V -> S = P V^T -> box filter -> argmax -> filters.
  `oracle_inference`    the same assignment with ground-truth boxes, masks and classes (Table V).
Host side (NumPy, not jitted):
  `to_coco_panoptic`    crop, nearest resize to the original size, COCO `segments_info`.
  `detections_to_coco`  COCO detection results in original-image coordinates, for box AP.

Keys read from the model output dict of docs/interfaces.md (batch axis removed); a hand-made
dict needs only these:
  `panoptic_inference`: `cls_logits`, `centerness`, `box_reg` (lists over levels), `embedding`.
  `oracle_inference`:   `embedding`, `embedding_prenorm`.

Conventions:
  * boxes are `(x0, y0, x1, y1)` in input pixels, continuous, `x1 = x0 + w` (as `seg_box`);
  * pixel (row y, column x) lies inside a box when its centre `(x + 0.5, y + 0.5)` does;
  * the location of cell `(y, x)` at stride `s` is `(x*s + s//2, y*s + s//2)` (as the targets);
  * `resize_scale` = input size / original size; area thresholds are given in ORIGINAL-image
    pixels (COCO practice, paper "stuff regions smaller than 4096") and are multiplied by
    `resize_scale ** 2` to compare with areas counted at the input resolution.

Output dict of `panoptic_inference` / `oracle_inference` (Q queries, stuff queries first):
  `panoptic [H, W] int32`   0 void (also outside `image_size`), else query index + 1;
  `query_class [Q] int32`   contiguous class; `query_score [Q] float32` (1 for stuff);
  `query_is_thing [Q] bool`, `query_valid [Q] bool` (false: no pixel left after the filters);
  `query_box [Q, 4] float32` (the detection box for things, zeros for stuff);
  `query_area [Q] int32`    pixels at the input resolution after the filters;
  `det_box [K, 4]`, `det_score [K]`, `det_class [K]` (contiguous), `det_thing_class [K]`
  (`0..C_th-1`), `det_valid [K]`: the detections after NMS, for box AP (not score-filtered).
`Q = num_stuff + K`, `K = max_detections` (prediction) or `S = max_segments` (oracle, where
instance query `num_stuff + k` belongs to segment row `k`).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax.evaluation import export
from ciae_jax.losses import ciae as ciae_losses

Array = jax.Array

_EPS = 1e-12
_CATEGORY_SOURCES = ("box", "memory")


# ----------------------------------------------------------------------------------------------
# Small helpers.


def _l2_normalize(x: Array, axis: int = -1) -> Array:
  """Unit vectors along `axis`; an all-zero vector stays zero instead of becoming NaN."""
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True))
  return x / jnp.maximum(norm, _EPS)


def _image_hw(image_size: Any) -> tuple[Array, Array]:
  """(height, width) of the valid region as int32 scalars (possibly traced)."""
  image_size = jnp.asarray(image_size, jnp.int32)
  if image_size.shape != (2,):
    raise ValueError(f"image_size must be (height, width); got shape {image_size.shape}")
  return image_size[0], image_size[1]


def _require(outputs: Mapping[str, Any], keys: Sequence[str]) -> None:
  missing = [key for key in keys if key not in outputs]
  if missing:
    raise ValueError(f"model outputs lack key(s) {missing}; present: {sorted(outputs)}")


def _check_embedding(outputs: Mapping[str, Any], key: str) -> Array:
  embedding = jnp.asarray(outputs[key])
  if embedding.ndim != 3:
    raise ValueError(
        f"outputs['{key}'] must be [H, W, D] for one image (remove the batch axis or vmap); "
        f"got shape {embedding.shape}")
  return embedding


def _check_memory(memory: Any, num_stuff: int, embed_dim: int) -> Array:
  memory = jnp.asarray(memory)
  if memory.ndim != 2 or memory.shape[1] != embed_dim or memory.shape[0] < num_stuff:
    raise ValueError(
        f"memory must be [num_memory >= num_stuff={num_stuff}, D={embed_dim}]; "
        f"got shape {memory.shape}")
  return memory


def box_iou_one_to_many(box: Array, boxes: Array) -> Array:
  """IoU of one box `[4]` with `boxes [N, 4]` (x0, y0, x1, y1; continuous coordinates)."""
  inter_w = jnp.clip(jnp.minimum(box[2], boxes[:, 2]) - jnp.maximum(box[0], boxes[:, 0]), 0)  # [N]
  inter_h = jnp.clip(jnp.minimum(box[3], boxes[:, 3]) - jnp.maximum(box[1], boxes[:, 1]), 0)  # [N]
  inter = inter_w * inter_h  # [N]
  area = (box[2] - box[0]) * (box[3] - box[1])  # []
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # [N]
  union = area + areas - inter  # [N]
  return inter / jnp.maximum(union, _EPS)  # [N]


def expand_boxes(boxes: Array, factor: float) -> Array:
  """Boxes `[N, 4]` scaled `factor` times about their centres (identity for factor 1)."""
  if factor == 1.0:
    return boxes
  center = (boxes[:, :2] + boxes[:, 2:]) / 2  # [N, 2]
  half = (boxes[:, 2:] - boxes[:, :2]) * (factor / 2)  # [N, 2]
  return jnp.concatenate([center - half, center + half], axis=-1)  # [N, 4]


# ----------------------------------------------------------------------------------------------
# 1. FCOS decoding.


def decode_detections(
    cls_logits: Sequence[Array],
    centerness: Sequence[Array],
    box_reg: Sequence[Array],
    image_size: Any,
    *,
    strides: Sequence[int] = (8, 16, 32, 64, 128),
    pre_nms_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
) -> dict[str, Array]:
  """FCOS candidates of one image, `pre_nms_top_n` per level, padded with a valid mask.

  A (location, class) pair is a candidate when `sigmoid(cls) > pre_nms_thresh`; its score is
  `sigmoid(cls) * sigmoid(centerness)` (FCOS), and the `pre_nms_top_n` best candidates of each
  level are kept (`lax.top_k` over the flattened `[Hl * Wl * C]` scores). Boxes are
  `(x - l, y - t, x + r, y + b)` around the cell location, clipped to the valid region
  `image_size`; a box clipped to zero width or height (a location that saw only padding) is
  not valid.

  Args:
    cls_logits: L arrays `[Hl, Wl, C_th]`, thing-class logits.
    centerness: L arrays `[Hl, Wl]`, centerness logits.
    box_reg: L arrays `[Hl, Wl, 4]`, `l, t, r, b` distances in input pixels.
    image_size: `(height, width)` of the valid region inside the padding.
    strides: stride of each level.
    pre_nms_thresh: threshold on `sigmoid(cls)`.
    pre_nms_top_n: candidates kept per level.

  Returns:
    Dict over `N = sum_l min(pre_nms_top_n, Hl * Wl * C_th)` candidates, level by level:
    `box [N, 4]`, `score [N]` (-inf where invalid), `thing_class [N] int32`, `valid [N] bool`,
    `location [N, 2] int32` (x, y of the cell in input pixels, unclipped), `level [N] int32`,
    `flat_index [N] int32` (index into `flatten_levels` order: level, then row-major cell).
  """
  num_levels = len(strides)
  for name, value in (("cls_logits", cls_logits), ("centerness", centerness),
                      ("box_reg", box_reg)):
    if len(value) != num_levels:
      raise ValueError(f"outputs['{name}'] has {len(value)} levels; strides {tuple(strides)} "
                       f"need {num_levels}")
  height, width = _image_hw(image_size)
  parts = []
  level_offset = 0
  for level, (logits, ctr, reg, stride) in enumerate(
      zip(cls_logits, centerness, box_reg, strides)):
    parts.append(_decode_level(
        jnp.asarray(logits), jnp.asarray(ctr), jnp.asarray(reg), level=level, stride=stride,
        level_offset=level_offset, height=height, width=width,
        pre_nms_thresh=pre_nms_thresh, pre_nms_top_n=pre_nms_top_n))
    level_offset += logits.shape[0] * logits.shape[1]
  return {key: jnp.concatenate([part[key] for part in parts]) for key in parts[0]}


def _decode_level(logits: Array, ctr: Array, reg: Array, *, level: int, stride: int,
                  level_offset: int, height: Array, width: Array, pre_nms_thresh: float,
                  pre_nms_top_n: int) -> dict[str, Array]:
  """Top-k candidates of one level (see `decode_detections`)."""
  if logits.ndim != 3 or ctr.shape != logits.shape[:2] or reg.shape != logits.shape[:2] + (4,):
    raise ValueError(
        f"level {level}: expected cls_logits [Hl, Wl, C], centerness [Hl, Wl], box_reg "
        f"[Hl, Wl, 4]; got {logits.shape}, {ctr.shape}, {reg.shape} (batch axis not removed?)")
  level_h, level_w, num_things = logits.shape
  probs = jax.nn.sigmoid(logits.astype(jnp.float32))  # [Hl, Wl, C]
  scores = probs * jax.nn.sigmoid(ctr.astype(jnp.float32))[..., None]  # [Hl, Wl, C]
  scores = jnp.where(probs > pre_nms_thresh, scores, -jnp.inf).reshape(-1)  # [Hl*Wl*C]
  top_k = min(pre_nms_top_n, scores.shape[0])
  top_scores, top_index = jax.lax.top_k(scores, top_k)  # [k], [k]
  cell = top_index // num_things  # [k]
  thing_class = (top_index % num_things).astype(jnp.int32)  # [k]
  cell_x = (cell % level_w).astype(jnp.int32)  # [k]
  cell_y = (cell // level_w).astype(jnp.int32)  # [k]
  loc_x = cell_x * stride + stride // 2  # [k]
  loc_y = cell_y * stride + stride // 2  # [k]
  ltrb = reg.reshape(level_h * level_w, 4).astype(jnp.float32)[cell]  # [k, 4]
  x0 = jnp.clip(loc_x - ltrb[:, 0], 0, width)  # [k]
  y0 = jnp.clip(loc_y - ltrb[:, 1], 0, height)  # [k]
  x1 = jnp.clip(loc_x + ltrb[:, 2], 0, width)  # [k]
  y1 = jnp.clip(loc_y + ltrb[:, 3], 0, height)  # [k]
  valid = jnp.isfinite(top_scores) & (x1 > x0) & (y1 > y0)  # [k]
  return {
      "box": jnp.stack([x0, y0, x1, y1], axis=-1),  # [k, 4]
      "score": jnp.where(valid, top_scores, -jnp.inf),  # [k]
      "thing_class": thing_class,  # [k]
      "valid": valid,  # [k]
      "location": jnp.stack([loc_x, loc_y], axis=-1),  # [k, 2]
      "level": jnp.full((top_k,), level, jnp.int32),  # [k]
      "flat_index": (level_offset + cell).astype(jnp.int32),  # [k]
  }


# ----------------------------------------------------------------------------------------------
# 2. Class-wise NMS.


def class_nms(
    boxes: Array,
    scores: Array,
    classes: Array,
    valid: Array,
    *,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
) -> tuple[Array, Array]:
  """Greedy class-wise NMS, then the `max_detections` best survivors, with static shapes.

  Greedy NMS visits boxes by decreasing score and keeps a box unless a kept box of the same
  class overlaps it with IoU > `nms_thresh`; its survivors come out in score order, so the
  first `max_detections` of them are exactly "NMS, then top-k". The loop below produces them
  directly: `max_detections` times, take the best live box and kill the live boxes of its class
  that overlap it. Work O(N * max_detections), memory O(N). Ties in score go to the lower index
  (as a stable sort would).

  Args:
    boxes: `[N, 4]` (x0, y0, x1, y1).
    scores: `[N]`.
    classes: `[N]` int, NMS runs within each class.
    valid: `[N]` bool, invalid boxes are never kept.
    nms_thresh: IoU above which a lower-scored box of the same class is suppressed.
    max_detections: number of output slots K.

  Returns:
    `keep [K] int32` indices into the inputs, by decreasing score, and `keep_valid [K] bool`
    (false for the slots left over when fewer than K boxes survive; their index is arbitrary).
  """
  boxes = jnp.asarray(boxes, jnp.float32)  # [N, 4]
  classes = jnp.asarray(classes)  # [N]
  live_scores = jnp.where(valid, jnp.asarray(scores, jnp.float32), -jnp.inf)  # [N]

  def keep_next(slot, carry):
    live_scores, keep, keep_valid = carry
    best = jnp.argmax(live_scores)  # []
    found = live_scores[best] > -jnp.inf  # []
    iou = box_iou_one_to_many(boxes[best], boxes)  # [N]
    suppress = ((iou > nms_thresh) & (classes == classes[best])).at[best].set(True)  # [N]
    live_scores = jnp.where(suppress & found, -jnp.inf, live_scores)  # [N]
    keep = keep.at[slot].set(best.astype(jnp.int32))
    keep_valid = keep_valid.at[slot].set(found)
    return live_scores, keep, keep_valid

  init = (live_scores, jnp.zeros((max_detections,), jnp.int32),
          jnp.zeros((max_detections,), bool))
  _, keep, keep_valid = jax.lax.fori_loop(0, max_detections, keep_next, init)
  return keep, keep_valid  # [K], [K]


# ----------------------------------------------------------------------------------------------
# 3. Panoptic assignment (Eq. 16) and the segment filters.


def _assign_pixels(
    embedding: Array,
    stuff_queries: Array,
    thing_queries: Array,
    thing_boxes: Array,
    thing_usable: Array,
    height: Array,
    width: Array,
    *,
    box_expand: float,
    outside_box_similarity: float,
) -> tuple[Array, Array]:
  """Per-pixel argmax of S = P V^T with the box filter; returns (query index, inside image)."""
  num_rows, num_cols, _ = embedding.shape
  num_stuff = stuff_queries.shape[0]
  queries = jnp.concatenate([stuff_queries, thing_queries], axis=0)  # [Q, D]
  similarity = jnp.einsum("hwd,qd->hwq", embedding, queries,
                          precision=jax.lax.Precision.HIGHEST)  # [H, W, Q]
  boxes = expand_boxes(thing_boxes, box_expand)  # [K, 4]
  pixel_y = jnp.arange(num_rows, dtype=jnp.float32) + 0.5  # [H]
  pixel_x = jnp.arange(num_cols, dtype=jnp.float32) + 0.5  # [W]
  # Stuff queries pass the box filter everywhere: one mask over all queries, so that XLA fuses
  # the filter into the argmax instead of materialising the thing part separately.
  stuff_true = jnp.ones((num_stuff,), bool)
  row_in = ((pixel_y[:, None] >= boxes[None, :, 1])
            & (pixel_y[:, None] <= boxes[None, :, 3]))  # [H, K]
  col_in = ((pixel_x[:, None] >= boxes[None, :, 0])
            & (pixel_x[:, None] <= boxes[None, :, 2]))  # [W, K]
  row_in = jnp.concatenate([jnp.broadcast_to(stuff_true, (num_rows, num_stuff)), row_in],
                           axis=1)  # [H, Q]
  col_in = jnp.concatenate([jnp.broadcast_to(stuff_true, (num_cols, num_stuff)), col_in],
                           axis=1)  # [W, Q]
  usable = jnp.concatenate([stuff_true, thing_usable])  # [Q]
  in_box = row_in[:, None, :] & col_in[None, :, :]  # [H, W, Q]
  # Paper IV-B: outside its box, a pixel's similarity to an instance is 0 (not -inf).
  similarity = jnp.where(in_box, similarity, outside_box_similarity)  # [H, W, Q]
  similarity = jnp.where(usable, similarity, -jnp.inf)  # [H, W, Q]
  assignment = jnp.argmax(similarity, axis=-1).astype(jnp.int32)  # [H, W]
  inside = (jnp.arange(num_rows)[:, None] < height) & (jnp.arange(num_cols)[None, :] < width)
  return assignment, inside  # [H, W], [H, W]


def _filter_segments(
    assignment: Array,
    inside: Array,
    query_usable: Array,
    query_is_thing: Array,
    *,
    stuff_area: float,
    instance_min_area: float,
    resize_scale: Any,
) -> tuple[Array, Array, Array]:
  """Voids segments that are unusable, empty or under their area threshold."""
  num_queries = query_usable.shape[0]
  area = jax.ops.segment_sum(inside.reshape(-1).astype(jnp.int32), assignment.reshape(-1),
                             num_segments=num_queries)  # [Q]
  area_scale = jnp.square(jnp.asarray(resize_scale, jnp.float32))  # []
  min_area = jnp.where(query_is_thing, instance_min_area, stuff_area) * area_scale  # [Q]
  query_valid = query_usable & (area > 0) & (area >= min_area)  # [Q]
  keep_pixel = inside & query_valid[assignment]  # [H, W]
  panoptic = jnp.where(keep_pixel, assignment + 1, 0).astype(jnp.int32)  # [H, W]
  return panoptic, query_valid, jnp.where(query_valid, area, 0).astype(jnp.int32)


def panoptic_inference(
    outputs: Mapping[str, Any],
    memory: Array,
    image_size: Any,
    *,
    num_stuff: int,
    strides: Sequence[int] = (8, 16, 32, 64, 128),
    merge_things: bool = True,
    pre_nms_thresh: float = 0.05,
    pre_nms_top_n: int = 1000,
    nms_thresh: float = 0.6,
    max_detections: int = 100,
    stuff_area: float = 4096,
    instance_min_area: float = 64,
    instance_score_thresh: float = 0.0,
    category_from: str = "box",
    box_expand_infer: float = 1.0,
    outside_box_similarity: float = 0.0,
    resize_scale: Any = 1.0,
) -> dict[str, Array]:
  """Panoptic segmentation of one image from the CIAE outputs (paper IV-C, Eq. 16).

  Detections: FCOS decoding, class-wise NMS, the `max_detections` best. Queries V: the stuff
  memory rows `0..num_stuff-1`, then for each detection the pixel embedding P at the location
  it was generated from (clipped to the valid region). Every pixel takes the query of highest
  cosine similarity `S = P V^T`, where a pixel outside a detection's box (expanded
  `box_expand_infer` times about its centre) has similarity `outside_box_similarity` (paper:
  0) to it, and unusable detections have -inf. Segments then become void when empty, when
  stuff and smaller than `stuff_area`, or when an instance smaller than `instance_min_area`.

  Readings where the paper is silent: detections scored below `instance_score_thresh` do not
  take part in the argmax (their pixels go to the next best query, as Panoptic FPN drops
  low-score instances before pasting), default 0 = all NMS survivors as in the paper;
  `instance_min_area` 64 (original pixels) voids the slivers that duplicate detections leave
  (an instance that small can match, at IoU > 0.5, only a ground-truth segment under ~128 px).

  Args:
    outputs: model outputs of one image; reads `cls_logits`, `centerness`, `box_reg` (lists of
      `[Hl, Wl, ...]`) and `embedding [H, W, D]` (unit vectors).
    memory: `[num_memory, D]` memory embeddings (rows `0..num_stuff-1` are the stuff classes).
    image_size: `(height, width)` of the valid region; pixels outside it are void.
    num_stuff: number of stuff classes; thing class j is contiguous class `num_stuff + j`.
    strides: stride of each level.
    merge_things: whether the memory has one shared thing row (True) or one per thing class.
    pre_nms_thresh: candidate threshold on `sigmoid(cls)`.
    pre_nms_top_n: candidates per level.
    nms_thresh: class-wise NMS IoU threshold.
    max_detections: detections kept after NMS (K).
    stuff_area: minimum stuff segment area, in original-image pixels.
    instance_min_area: minimum instance segment area, in original-image pixels.
    instance_score_thresh: detections scored below it take no pixels.
    category_from: "box" (box classifier, paper default) or "memory" (argmax of the
      similarity between the query and the thing memory rows, Table IV 'E'; needs
      `merge_things=False`).
    box_expand_infer: factor by which predicted boxes are expanded for the box filter.
    outside_box_similarity: similarity to an instance outside its box (paper: 0; -inf makes
      the box a hard limit).
    resize_scale: input size / original size; scales the area thresholds by its square.

  Returns:
    The output dict described in the module docstring, `Q = num_stuff + max_detections`.
  """
  if category_from not in _CATEGORY_SOURCES:
    raise ValueError(f"category_from must be one of {_CATEGORY_SOURCES}; got {category_from!r}")
  if category_from == "memory" and merge_things:
    raise ValueError("category_from='memory' needs one memory row per thing class "
                     "(merge_things=False); with merge_things=True all things share one row")
  _require(outputs, ("cls_logits", "centerness", "box_reg", "embedding"))
  embedding = _check_embedding(outputs, "embedding").astype(jnp.float32)  # [H, W, D]
  memory = _check_memory(memory, num_stuff, embedding.shape[-1]).astype(jnp.float32)
  _check_level_sizes(outputs["cls_logits"], strides, embedding.shape[:2])
  num_things = outputs["cls_logits"][0].shape[-1]
  expected_rows = num_stuff + 1 if merge_things else num_stuff + num_things
  if memory.shape[0] != expected_rows:
    raise ValueError(f"memory has {memory.shape[0]} rows; merge_things={merge_things} with "
                     f"num_stuff={num_stuff} and {num_things} thing classes needs {expected_rows}")
  height, width = _image_hw(image_size)

  candidates = decode_detections(
      outputs["cls_logits"], outputs["centerness"], outputs["box_reg"], image_size,
      strides=strides, pre_nms_thresh=pre_nms_thresh, pre_nms_top_n=pre_nms_top_n)
  keep, det_valid = class_nms(
      candidates["box"], candidates["score"], candidates["thing_class"], candidates["valid"],
      nms_thresh=nms_thresh, max_detections=max_detections)  # [K], [K]
  det_box = jnp.where(det_valid[:, None], candidates["box"][keep], 0.0)  # [K, 4]
  det_score = jnp.where(det_valid, candidates["score"][keep], 0.0)  # [K]
  det_thing_class = jnp.where(det_valid, candidates["thing_class"][keep], 0)  # [K]
  location = candidates["location"][keep]  # [K, 2]

  # Query of a detection: P at the location it was generated from (paper IV-C).
  query_x = jnp.clip(location[:, 0], 0, width - 1)  # [K]
  query_y = jnp.clip(location[:, 1], 0, height - 1)  # [K]
  thing_queries = _l2_normalize(embedding[query_y, query_x])  # [K, D]
  stuff_queries = _l2_normalize(memory[:num_stuff])  # [num_stuff, D]
  if category_from == "memory":
    thing_memory = _l2_normalize(memory[num_stuff:])  # [C_th, D]
    det_category = jnp.argmax(thing_queries @ thing_memory.T, axis=-1)  # [K]
  else:
    det_category = det_thing_class  # [K]

  thing_usable = det_valid & (det_score >= instance_score_thresh)  # [K]
  assignment, inside = _assign_pixels(
      embedding, stuff_queries, thing_queries, det_box, thing_usable, height, width,
      box_expand=box_expand_infer, outside_box_similarity=outside_box_similarity)
  result = _finish(
      assignment, inside, num_stuff=num_stuff, thing_usable=thing_usable,
      thing_class=num_stuff + det_category, thing_score=det_score, thing_box=det_box,
      stuff_area=stuff_area, instance_min_area=instance_min_area, resize_scale=resize_scale)
  result.update(det_box=det_box, det_score=det_score, det_class=num_stuff + det_thing_class,
                det_thing_class=det_thing_class, det_valid=det_valid)
  return result


def _check_level_sizes(cls_logits: Sequence[Any], strides: Sequence[int],
                       image_hw: tuple[int, int]) -> None:
  """Each level must tile the embedding map: `Hl = H / stride`."""
  if len(cls_logits) != len(strides):
    raise ValueError(f"outputs['cls_logits'] has {len(cls_logits)} levels; strides "
                     f"{tuple(strides)} need {len(strides)}")
  for level, (logits, stride) in enumerate(zip(cls_logits, strides)):
    expected = (image_hw[0] // stride, image_hw[1] // stride)
    if tuple(logits.shape[:2]) != expected or image_hw[0] % stride or image_hw[1] % stride:
      raise ValueError(
          f"outputs['cls_logits'][{level}] has shape {tuple(logits.shape)}; an embedding map "
          f"{tuple(image_hw)} at stride {stride} needs [{expected[0]}, {expected[1]}, C]")


def _finish(assignment: Array, inside: Array, *, num_stuff: int, thing_usable: Array,
            thing_class: Array, thing_score: Array, thing_box: Array, stuff_area: float,
            instance_min_area: float, resize_scale: Any) -> dict[str, Array]:
  """Per-query arrays and the filtered panoptic map, shared by prediction and oracle."""
  num_instances = thing_usable.shape[0]
  query_is_thing = jnp.concatenate([jnp.zeros((num_stuff,), bool),
                                    jnp.ones((num_instances,), bool)])  # [Q]
  query_usable = jnp.concatenate([jnp.ones((num_stuff,), bool), thing_usable])  # [Q]
  panoptic, query_valid, query_area = _filter_segments(
      assignment, inside, query_usable, query_is_thing, stuff_area=stuff_area,
      instance_min_area=instance_min_area, resize_scale=resize_scale)
  return {
      "panoptic": panoptic,  # [H, W]
      "query_class": jnp.concatenate([jnp.arange(num_stuff, dtype=jnp.int32),
                                      thing_class.astype(jnp.int32)]),  # [Q]
      "query_score": jnp.concatenate([jnp.ones((num_stuff,), jnp.float32),
                                      thing_score.astype(jnp.float32)]),  # [Q]
      "query_is_thing": query_is_thing,  # [Q]
      "query_valid": query_valid,  # [Q]
      "query_box": jnp.concatenate([jnp.zeros((num_stuff, 4), jnp.float32),
                                    thing_box.astype(jnp.float32)]),  # [Q, 4]
      "query_area": query_area,  # [Q]
  }


# ----------------------------------------------------------------------------------------------
# 4. Oracle mode (paper Table V).


def oracle_inference(
    outputs: Mapping[str, Any],
    memory: Array,
    segment_map: Array,
    seg_class: Array,
    seg_is_thing: Array,
    seg_is_crowd: Array,
    seg_box: Array,
    seg_valid: Array,
    *,
    image_size: Any,
    num_stuff: int,
    stuff_area: float = 4096,
    instance_min_area: float = 64,
    box_expand_infer: float = 1.0,
    outside_box_similarity: float = 0.0,
    include_crowd: bool = True,
    resize_scale: Any = 1.0,
) -> dict[str, Array]:
  """Panoptic assignment with ground-truth instances (paper Table V, "oracle").

  Instance queries are the mean embeddings inside the ground-truth masks (L2norm of the sum of
  `embedding_prenorm`, as the instance means of the loss), boxes and classes are the
  ground truth, stuff queries are still the stuff memory rows. Every thing segment row is an
  instance query (crowd rows too unless `include_crowd=False`: PQ ignores predictions inside
  crowd regions, and without a query their pixels would go to another segment).

  Args:
    outputs: reads `embedding [H, W, D]` and `embedding_prenorm [H, W, D]`.
    memory: `[num_memory, D]`; rows `0..num_stuff-1` are used.
    segment_map: `[H, W] int32`, 0 void, `k` = segment row `k-1` (docs/interfaces.md).
    seg_class, seg_is_thing, seg_is_crowd, seg_box, seg_valid: `[S]` segment rows.
    image_size: `(height, width)` of the valid region.
    num_stuff: number of stuff classes.
    stuff_area, instance_min_area, box_expand_infer, outside_box_similarity, resize_scale:
      as in `panoptic_inference`.
    include_crowd: whether crowd thing segments become queries.

  Returns:
    The output dict of `panoptic_inference` with `K = S`: instance query `num_stuff + k` (and
    detection `k`) is segment row `k`; scores are 1.
  """
  _require(outputs, ("embedding", "embedding_prenorm"))
  embedding = _check_embedding(outputs, "embedding").astype(jnp.float32)  # [H, W, D]
  prenorm = _check_embedding(outputs, "embedding_prenorm").astype(jnp.float32)  # [H, W, D]
  memory = _check_memory(memory, num_stuff, embedding.shape[-1]).astype(jnp.float32)
  segment_map = jnp.asarray(segment_map, jnp.int32)
  num_segments = jnp.asarray(seg_valid).shape[0]
  if segment_map.shape != embedding.shape[:2]:
    raise ValueError(f"segment_map has shape {segment_map.shape}; the embedding map is "
                     f"{embedding.shape[:2]}")
  if jnp.asarray(seg_box).shape != (num_segments, 4):
    raise ValueError(f"seg_box must be [S={num_segments}, 4]; got {jnp.asarray(seg_box).shape}")
  height, width = _image_hw(image_size)

  # The instance means of the loss (Eq. 4): one definition for training and the oracle.
  thing_queries = ciae_losses.instance_means(prenorm, segment_map, num_segments)  # [S, D]
  counts = jax.ops.segment_sum(jnp.ones(segment_map.size, jnp.int32), segment_map.reshape(-1),
                               num_segments=num_segments + 1)[1:]  # [S]
  usable = (jnp.asarray(seg_valid, bool) & jnp.asarray(seg_is_thing, bool)
            & (counts > 0))  # [S]
  if not include_crowd:
    usable &= ~jnp.asarray(seg_is_crowd, bool)
  seg_box = jnp.where(usable[:, None], jnp.asarray(seg_box, jnp.float32), 0.0)  # [S, 4]
  seg_class = jnp.asarray(seg_class, jnp.int32)  # [S]
  score = usable.astype(jnp.float32)  # [S]

  assignment, inside = _assign_pixels(
      embedding, _l2_normalize(memory[:num_stuff]), thing_queries, seg_box, usable, height,
      width, box_expand=box_expand_infer, outside_box_similarity=outside_box_similarity)
  result = _finish(
      assignment, inside, num_stuff=num_stuff, thing_usable=usable, thing_class=seg_class,
      thing_score=score, thing_box=seg_box, stuff_area=stuff_area,
      instance_min_area=instance_min_area, resize_scale=resize_scale)
  result.update(det_box=seg_box, det_score=score, det_class=seg_class,
                det_thing_class=jnp.where(usable, seg_class - num_stuff, 0), det_valid=usable)
  return result


# ----------------------------------------------------------------------------------------------
# 5. Host side: COCO formats.


def _nearest_source_index(size_out: int, size_in: int) -> np.ndarray:
  """Source index of each output pixel for nearest resizing with aligned pixel centres.

  `floor((i + 0.5) * size_in / size_out)` in exact integer arithmetic (floating point may land
  just under an integer; PIL's NEAREST agrees except on such exact ties).
  """
  index = (2 * np.arange(size_out, dtype=np.int64) + 1) * size_in // (2 * size_out)
  return np.minimum(index, size_in - 1)


def to_coco_panoptic(
    result: Mapping[str, Any],
    image_size: Sequence[int],
    orig_size: Sequence[int],
    category_coco_ids: Sequence[int],
) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """COCO panoptic prediction of one image at its original size.

  Crops `result['panoptic']` to `image_size`, resizes it to `orig_size` by nearest neighbour
  (pixel centres aligned, as PIL's NEAREST), renumbers the surviving segments 1..n in query
  order and describes each one.

  Args:
    result: the output of `panoptic_inference` for one image (NumPy or JAX arrays); reads
      `panoptic [H, W]` and `query_class [Q]`.
    image_size: `(height, width)` of the resized image inside the padding.
    orig_size: `(height, width)` of the original image.
    category_coco_ids: contiguous class -> COCO category id (`CategoryInfo.coco_ids`).

  Returns:
    `id_map [h0, w0] int32` (0 void, else segment id) and `segments_info`: one dict per
    segment with `id`, `category_id`, `area`, `bbox` ([x, y, w, h], pixel extent) and
    `iscrowd` 0.
  """
  panoptic = np.asarray(result["panoptic"])
  query_class = np.asarray(result["query_class"])
  height, width = int(image_size[0]), int(image_size[1])
  orig_h, orig_w = int(orig_size[0]), int(orig_size[1])
  if panoptic.ndim != 2:
    raise ValueError(f"result['panoptic'] must be [H, W] for one image; got {panoptic.shape}")
  if not (0 < height <= panoptic.shape[0] and 0 < width <= panoptic.shape[1]):
    raise ValueError(f"image_size {(height, width)} does not fit result['panoptic'] "
                     f"{panoptic.shape}")
  if orig_h <= 0 or orig_w <= 0:
    raise ValueError(f"orig_size must be positive; got {(orig_h, orig_w)}")
  if panoptic.max(initial=0) > query_class.shape[0]:
    raise ValueError(f"result['panoptic'] holds query {panoptic.max()} but result['query_class']"
                     f" has only {query_class.shape[0]} queries")
  resized = panoptic[:height, :width][_nearest_source_index(orig_h, height)[:, None],
                                      _nearest_source_index(orig_w, width)[None, :]]

  present = np.flatnonzero(np.bincount(resized.ravel(), minlength=query_class.shape[0] + 1))
  present = present[present > 0]  # query index + 1, increasing
  renumber = np.zeros(query_class.shape[0] + 1, np.int32)
  renumber[present] = np.arange(1, present.size + 1, dtype=np.int32)
  id_map = renumber[resized]  # [h0, w0]

  classes = query_class[present - 1]  # [n] contiguous classes
  if classes.size and not (0 <= classes.min() and classes.max() < len(category_coco_ids)):
    raise ValueError(f"query classes {classes.tolist()} fall outside category_coco_ids "
                     f"(length {len(category_coco_ids)})")
  segment_ids = np.arange(1, present.size + 1)  # [n]
  areas, boxes = export.segment_areas_and_boxes(id_map, segment_ids)  # [n], [n, 4]
  coco_ids = np.asarray(category_coco_ids)[classes]  # [n]
  segments_info = [{"id": int(i), "category_id": int(c), "area": int(a),
                    "bbox": [int(v) for v in b], "iscrowd": 0}
                   for i, c, a, b in zip(segment_ids, coco_ids, areas, boxes)]
  return id_map, segments_info


def detections_to_coco(
    result: Mapping[str, Any],
    image_id: int,
    scale: float | Sequence[float],
    category_coco_ids: Sequence[int],
) -> list[dict[str, Any]]:
  """COCO detection results (`loadRes` format) of one image, in original-image coordinates.

  Args:
    result: output of `panoptic_inference`; reads `det_box`, `det_score`, `det_class`,
      `det_valid`.
    image_id: COCO image id.
    scale: input size / original size, one number or `(scale_y, scale_x)`.
    category_coco_ids: contiguous class -> COCO category id.

  Returns:
    One dict per valid detection: `image_id`, `category_id`, `bbox` [x, y, w, h], `score`.
  """
  scale_y, scale_x = (float(scale), float(scale)) if np.ndim(scale) == 0 else map(float, scale)
  if scale_y <= 0 or scale_x <= 0:
    raise ValueError(f"image {image_id}: scale must be positive; got {scale}")
  valid = np.asarray(result["det_valid"], bool)  # [K]
  boxes = np.asarray(result["det_box"], np.float64)[valid]  # [k, 4] input pixels
  boxes = boxes / np.array([scale_x, scale_y, scale_x, scale_y])  # [k, 4] original pixels
  classes = np.asarray(result["det_class"])[valid]  # [k]
  return export.detections_from_boxes(image_id, boxes, np.asarray(result["det_score"])[valid],
                                      np.asarray(category_coco_ids)[classes])
