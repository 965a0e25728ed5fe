"""CIAE panoptic inference on device: detections -> queries -> S = P V^T -> segments (IV-C, Eq. 16).

Jittable, static shapes, one image at a time (the caller vmaps; `image_size` may be traced):
  `panoptic_inference`  FCOS detections (`inference.detection`) -> queries V -> S = P V^T ->
                        box filter -> argmax -> the segment filters.
  `oracle_inference`    the same assignment with ground-truth boxes, masks and classes (Table V).
Turning the result into COCO files is the evaluation's job (`evaluation.coco_format`).

Keys read from the model output dict of docs/interfaces.md (batch axis removed); a hand-made
dict needs only these:
  `panoptic_inference`: `cls_logits`, `centerness`, `box_reg` (lists over levels), `embedding`;
                        with `stuff_from="semantic"` also `semantic_logits`.
  `oracle_inference`:   `embedding`, `embedding_prenorm`.

Conventions:
  * boxes are `(x0, y0, x1, y1)` in input pixels, continuous, `x1 = x0 + w` (as `seg_box`);
  * pixel (row y, column x) lies inside a box when its centre `(x + 0.5, y + 0.5)` does;
  * level l of an `H x W` input is `ceil(H / s_l) x ceil(W / s_l)` (inputs: multiples of 32);
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
import functools
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax import platforms
from ciae_jax import segments as segments_lib
from ciae_jax.fast_paths import assign
from ciae_jax.inference import detection
from ciae_jax.inference import semantic_stuff

Array = jax.Array


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


def assign_pixels(
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
    band_elements: int | None = None,
) -> tuple[Array, Array]:
  """Per-pixel argmax of S = P V^T with the box filter; returns (query index, inside image).

  One expression over the whole image; on CPU it runs in row bands that stay in cache
  (`fast_paths.assign`, the same values). `band_elements` forces bands of about that many
  similarities on every platform (one that holds the whole image: the plain expression).
  """
  num_rows, num_cols, _ = embedding.shape
  num_stuff = stuff_queries.shape[0]
  queries = jnp.concatenate([stuff_queries, thing_queries], axis=0)  # [Q, D]
  boxes = ops.expand_boxes(thing_boxes, box_expand)  # [K, 4]
  pixel_y = jnp.arange(num_rows, dtype=jnp.float32) + 0.5  # [H]
  pixel_x = jnp.arange(num_cols, dtype=jnp.float32) + 0.5  # [W]
  # Stuff queries pass the box filter everywhere: one mask over all queries, so that XLA fuses
  # the filter into the reductions instead of materialising the thing part separately.
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

  def assign_rows(rows_embedding: Array, rows_in: Array) -> Array:
    similarity = jnp.einsum("hwd,qd->hwq", rows_embedding, queries,
                            precision=lax.Precision.HIGHEST)  # [R, W, Q], no TF32 on GPUs
    in_box = rows_in[:, None, :] & col_in[None, :, :]  # [R, W, Q]
    # Paper IV-B: outside its box, a pixel's similarity to an instance is 0 (not -inf).
    similarity = jnp.where(in_box, similarity, outside_box_similarity)  # [R, W, Q]
    similarity = jnp.where(usable, similarity, -jnp.inf)  # [R, W, Q]
    return platforms.switch(
        "argmax_reductions", similarity, fast=functools.partial(assign.first_argmax, axis=-1),
        plain=functools.partial(jnp.argmax, axis=-1))  # [R, W]

  if band_elements is not None:
    assignment = assign.assign_in_bands(assign_rows, embedding, row_in, band_elements)
  else:
    assignment = platforms.switch("assign_bands", embedding, row_in,
                                  fast=functools.partial(assign.assign_in_bands, assign_rows),
                                  plain=assign_rows)  # [H, W]
  inside = (jnp.arange(num_rows)[:, None] < height) & (jnp.arange(num_cols)[None, :] < width)
  return assignment.astype(jnp.int32), inside  # [H, W], [H, W]


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
    hp: hparams.InferenceHParams,
    *,
    num_stuff: int,
    merge_things: bool,
    strides: Sequence[int] = hparams.LEVEL_STRIDES,
    resize_scale: Any = 1.0,
    stuff_from: str = "embedding",
) -> dict[str, Array]:
  """Panoptic segmentation of one image from the CIAE outputs (paper IV-C, Eq. 16).

  Detections: FCOS decoding, class-wise NMS, the `max_detections` best. Queries V: the stuff
  memory rows `0..num_stuff-1`, then for each detection the pixel embedding P at the location
  it was generated from (clipped to the valid region). Every pixel takes the query of highest
  cosine similarity `S = P V^T`, where a pixel outside a detection's box (expanded
  `box_expand_infer` times about its centre) has similarity `outside_box_similarity` (paper:
  0) to it, and unusable detections have -inf. Segments then become void when empty, when
  stuff and smaller than `stuff_area`, or when an instance smaller than `instance_min_area`.

  Readings where the paper is silent: detections scored below `hp.instance_score_thresh` do not
  take part in the argmax (their pixels go to the next best query, as Panoptic FPN drops
  low-score instances before pasting); `hp.instance_min_area` (original pixels) voids the
  slivers that duplicate detections leave (an instance of 64 px can match, at IoU > 0.5, only a
  ground-truth segment under ~128 px).

  Args:
    outputs: model outputs of one image; reads `cls_logits`, `centerness`, `box_reg` (lists of
      `[Hl, Wl, ...]`) and `embedding [H, W, D]` (unit vectors).
    memory: `[num_memory, D]` memory embeddings (rows `0..num_stuff-1` are the stuff classes).
    image_size: `(height, width)` of the valid region; pixels outside it are void.
    hp: the inference hyper-parameters (`hparams.InferenceHParams`): `pre_nms_thresh`,
      `pre_nms_top_n` (candidates per level), `nms_thresh`, `max_detections` (K),
      `stuff_area` / `instance_min_area` (original-image pixels), `instance_score_thresh`,
      `category_from` ("box", the box classifier, paper default; or "memory", the argmax of
      the similarity between the query and the thing memory rows, Table IV 'E', which needs
      `merge_things=False`), `box_expand_infer` (scale of the boxes of the box filter),
      `outside_box_similarity` (paper: 0; -inf makes the box a hard limit).
    num_stuff: number of stuff classes; thing class j is contiguous class `num_stuff + j`.
    merge_things: whether the memory has one shared thing row (True) or one per thing class.
    strides: stride of each level.
    resize_scale: input size / original size; scales the area thresholds by its square.
    stuff_from: `model.stuff_from`. "semantic" (Table III, first row): stuff pixels come from
      `outputs["semantic_logits"] [H/4, W/4, num_stuff + 1]`, thing pixels go to the instance
      queries alone (the rule of `ciae_jax.inference.semantic_stuff`); the stuff queries stay in the
      output, and the same filters apply.

  Returns:
    The output dict described in the module docstring, `Q = num_stuff + max_detections`.
  """
  if hp.category_from == "memory" and merge_things:
    raise ValueError("category_from='memory' needs one memory row per thing class "
                     "(merge_things=False); with merge_things=True all things share one row")
  if stuff_from not in ("embedding", "semantic"):
    raise ValueError(f"stuff_from must be 'embedding' or 'semantic', got {stuff_from!r}")
  _require(outputs, ("cls_logits", "centerness", "box_reg", "embedding")
           + (("semantic_logits",) if stuff_from == "semantic" else ()))
  embedding = _check_embedding(outputs, "embedding").astype(jnp.float32)  # [H, W, D]
  memory = _check_memory(memory, num_stuff, embedding.shape[-1]).astype(jnp.float32)
  detection.check_level_sizes(outputs["cls_logits"], strides, embedding.shape[:2])
  num_things = outputs["cls_logits"][0].shape[-1]
  expected_rows = num_stuff + 1 if merge_things else num_stuff + num_things
  if memory.shape[0] != expected_rows:
    raise ValueError(f"memory has {memory.shape[0]} rows; merge_things={merge_things} with "
                     f"num_stuff={num_stuff} and {num_things} thing classes needs {expected_rows}")
  height, width = detection.image_hw(image_size)

  candidates = detection.decode_detections(
      outputs["cls_logits"], outputs["centerness"], outputs["box_reg"], image_size,
      strides=strides, pre_nms_thresh=hp.pre_nms_thresh, pre_nms_top_n=hp.pre_nms_top_n)
  keep, det_valid = detection.class_nms(
      candidates["box"], candidates["score"], candidates["thing_class"], candidates["valid"],
      nms_thresh=hp.nms_thresh, max_detections=hp.max_detections)  # [K], [K]
  det_box = jnp.where(det_valid[:, None], candidates["box"][keep], 0.0)  # [K, 4]
  det_score = jnp.where(det_valid, candidates["score"][keep], 0.0)  # [K]
  det_thing_class = jnp.where(det_valid, candidates["thing_class"][keep], 0)  # [K]
  location = candidates["location"][keep]  # [K, 2]

  # Query of a detection: P at the location it was generated from (paper IV-C).
  query_x = jnp.clip(location[:, 0], 0, width - 1)  # [K]
  query_y = jnp.clip(location[:, 1], 0, height - 1)  # [K]
  thing_queries = ops.l2_normalize(embedding[query_y, query_x])  # [K, D]
  stuff_queries = ops.l2_normalize(memory[:num_stuff])  # [num_stuff, D]
  if hp.category_from == "memory":
    thing_memory = ops.l2_normalize(memory[num_stuff:])  # [C_th, D]
    det_category = jnp.argmax(jnp.matmul(thing_queries, thing_memory.T,
                                         precision=lax.Precision.HIGHEST), axis=-1)  # [K]
  else:
    det_category = det_thing_class  # [K]

  thing_usable = det_valid & (det_score >= hp.instance_score_thresh)  # [K]
  if stuff_from == "semantic":
    assignment, inside = _assign_with_semantic(
        embedding, jnp.asarray(outputs["semantic_logits"]), thing_queries, det_box,
        thing_usable, height, width, num_stuff=num_stuff, hp=hp)
  else:
    assignment, inside = assign_pixels(
        embedding, stuff_queries, thing_queries, det_box, thing_usable, height, width,
        box_expand=hp.box_expand_infer, outside_box_similarity=hp.outside_box_similarity)
  result = finish(
      assignment, inside, num_stuff=num_stuff, thing_usable=thing_usable,
      thing_class=num_stuff + det_category, thing_score=det_score, thing_box=det_box,
      hp=hp, resize_scale=resize_scale)
  result.update(det_box=det_box, det_score=det_score, det_class=num_stuff + det_thing_class,
                det_thing_class=det_thing_class, det_valid=det_valid)
  return result


def _assign_with_semantic(embedding: Array, semantic_logits: Array, thing_queries: Array,
                          thing_boxes: Array, thing_usable: Array, height: Array, width: Array,
                          *, num_stuff: int, hp: hparams.InferenceHParams
                          ) -> tuple[Array, Array]:
  """`assign_pixels` with stuff from the semantic branch: (query index, labelled) `[H, W]`."""
  if semantic_logits.ndim != 3 or semantic_logits.shape[-1] != num_stuff + 1:
    raise ValueError(f"outputs['semantic_logits'] must be [H/4, W/4, num_stuff + 1 = "
                     f"{num_stuff + 1}] for one image; got shape {semantic_logits.shape}")
  semantic = semantic_stuff.semantic_argmax(semantic_logits, embedding.shape[:2])  # [H, W]
  # Instances only: no stuff query, i.e. every stuff query at -inf for these pixels.
  no_stuff = jnp.zeros((0, embedding.shape[-1]), jnp.float32)  # [0, D]
  instance, inside = assign_pixels(
      embedding, no_stuff, thing_queries, thing_boxes, thing_usable, height, width,
      box_expand=hp.box_expand_infer, outside_box_similarity=hp.outside_box_similarity)
  reached = semantic_stuff.instance_reaches(
      instance, thing_boxes, thing_usable, box_expand=hp.box_expand_infer,
      outside_box_similarity=hp.outside_box_similarity)  # [H, W]
  return semantic_stuff.combine(semantic, instance, reached, inside, num_stuff=num_stuff)


def finish(assignment: Array, inside: Array, *, num_stuff: int, thing_usable: Array,
           thing_class: Array, thing_score: Array, thing_box: Array,
           hp: hparams.InferenceHParams, resize_scale: Any) -> dict[str, Array]:
  """Per-query arrays and the filtered panoptic map, shared by prediction and oracle."""
  num_instances = thing_usable.shape[0]
  query_is_thing = jnp.concatenate([jnp.zeros((num_stuff,), bool),
                                    jnp.ones((num_instances,), bool)])  # [Q]
  query_usable = jnp.concatenate([jnp.ones((num_stuff,), bool), thing_usable])  # [Q]
  panoptic, query_valid, query_area = _filter_segments(
      assignment, inside, query_usable, query_is_thing, stuff_area=hp.stuff_area,
      instance_min_area=hp.instance_min_area, resize_scale=resize_scale)
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
    segments: segments_lib.Segments,
    hp: hparams.InferenceHParams,
    *,
    image_size: Any,
    num_stuff: int,
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
    segments: the ground truth of the image (`segment_map [H, W]`, rows `[S]`).
    hp: as in `panoptic_inference` (`stuff_area`, `instance_min_area`, `box_expand_infer`,
      `outside_box_similarity` are read).
    image_size: `(height, width)` of the valid region.
    num_stuff: number of stuff classes.
    include_crowd: whether crowd thing segments become queries.
    resize_scale: as in `panoptic_inference`.

  Returns:
    The output dict of `panoptic_inference` with `K = S`: instance query `num_stuff + k` (and
    detection `k`) is segment row `k`; scores are 1.
  """
  _require(outputs, ("embedding", "embedding_prenorm"))
  embedding = _check_embedding(outputs, "embedding").astype(jnp.float32)  # [H, W, D]
  prenorm = _check_embedding(outputs, "embedding_prenorm").astype(jnp.float32)  # [H, W, D]
  memory = _check_memory(memory, num_stuff, embedding.shape[-1]).astype(jnp.float32)
  segment_map = jnp.asarray(segments.segment_map, jnp.int32)
  seg_class, seg_is_thing, seg_is_crowd, seg_box, seg_valid = (
      segments.seg_class, segments.seg_is_thing, segments.seg_is_crowd, segments.seg_box,
      segments.seg_valid)
  num_segments = jnp.asarray(seg_valid).shape[0]
  if segment_map.shape != embedding.shape[:2]:
    raise ValueError(f"segment_map has shape {segment_map.shape}; the embedding map is "
                     f"{embedding.shape[:2]}")
  if jnp.asarray(seg_box).shape != (num_segments, 4):
    raise ValueError(f"seg_box must be [S={num_segments}, 4]; got {jnp.asarray(seg_box).shape}")
  height, width = detection.image_hw(image_size)

  # The instance means of the loss (Eq. 4): one definition for training and the oracle.
  thing_queries = segments_lib.instance_means(prenorm, segment_map, num_segments)  # [S, D]
  counts = jax.ops.segment_sum(jnp.ones(segment_map.size, jnp.int32), segment_map.reshape(-1),
                               num_segments=num_segments + 1)[1:]  # [S]
  usable = (jnp.asarray(seg_valid, bool) & jnp.asarray(seg_is_thing, bool)
            & (counts > 0))  # [S]
  if not include_crowd:
    usable &= ~jnp.asarray(seg_is_crowd, bool)
  seg_box = jnp.where(usable[:, None], jnp.asarray(seg_box, jnp.float32), 0.0)  # [S, 4]
  seg_class = jnp.asarray(seg_class, jnp.int32)  # [S]
  score = usable.astype(jnp.float32)  # [S]

  assignment, inside = assign_pixels(
      embedding, ops.l2_normalize(memory[:num_stuff]), thing_queries, seg_box, usable, height,
      width, box_expand=hp.box_expand_infer, outside_box_similarity=hp.outside_box_similarity)
  result = finish(
      assignment, inside, num_stuff=num_stuff, thing_usable=usable, thing_class=seg_class,
      thing_score=score, thing_box=seg_box, hp=hp, resize_scale=resize_scale)
  result.update(det_box=seg_box, det_score=score, det_class=seg_class,
                det_thing_class=jnp.where(usable, seg_class - num_stuff, 0), det_valid=usable)
  return result
