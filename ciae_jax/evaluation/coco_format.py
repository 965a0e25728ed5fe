"""COCO formats of predictions: panoptic PNG + JSON, detection results, on the host (NumPy).

COCO panoptic layout: one RGB PNG per image whose colour encodes a segment id (`panoptic_png`)
and a JSON entry per image listing its segments (`id`, `category_id`, `iscrowd`, `area`, `bbox`
as inclusive pixel `[x, y, w, h]`, as panopticapi's converters write them).

  `to_coco_panoptic`     an inference result -> id map at the original size + segments_info.
  `detections_to_coco`   an inference result -> COCO detection results (original pixels).
  `write_panoptic_prediction`, `write_panoptic_json`, `write_detections_json`: the files.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ciae_jax import files
from ciae_jax import panoptic_png


def segment_areas_and_boxes(
    id_map: np.ndarray, segment_ids: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Pixel area and inclusive COCO box of each listed segment, vectorised.

  Args:
    id_map: [H, W] integer segment ids.
    segment_ids: [S] ids to measure (ids absent from the map get area 0 and
      box [0, 0, 0, 0]).

  Returns:
    areas [S] int64 and boxes [S, 4] int64 `[x, y, w, h]` with
    `w = x_max - x_min + 1` (the panopticapi convention).
  """
  id_map = np.asarray(id_map)
  segment_ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)  # [S]
  height, width = id_map.shape
  num = segment_ids.size
  # Compact label per pixel: 0 for ids not listed, k + 1 for segment_ids[k].
  order = np.argsort(segment_ids, kind="stable")  # [S]
  sorted_ids = segment_ids[order]  # [S]
  flat = id_map.reshape(-1).astype(np.int64)  # [H*W]
  if num:
    pos = np.minimum(np.searchsorted(sorted_ids, flat), num - 1)  # [H*W]
    found = sorted_ids[pos] == flat  # [H*W]
    labels = np.where(found, order[pos] + 1, 0).reshape(height, width)  # [H, W]
  else:
    labels = np.zeros((height, width), np.int64)  # [H, W]
  areas = np.bincount(labels.reshape(-1), minlength=num + 1)[1:]  # [S]
  # Per-segment row / column occupancy, then first and last occupied index.
  rows = np.bincount(
      (labels * height + np.arange(height)[:, None]).reshape(-1),
      minlength=(num + 1) * height).reshape(num + 1, height)[1:] > 0  # [S, H]
  cols = np.bincount(
      (labels * width + np.arange(width)[None, :]).reshape(-1),
      minlength=(num + 1) * width).reshape(num + 1, width)[1:] > 0  # [S, W]
  y0 = np.argmax(rows, axis=1)  # [S]
  y1 = height - 1 - np.argmax(rows[:, ::-1], axis=1)  # [S]
  x0 = np.argmax(cols, axis=1)  # [S]
  x1 = width - 1 - np.argmax(cols[:, ::-1], axis=1)  # [S]
  boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)  # [S, 4]
  boxes[areas == 0] = 0
  return areas.astype(np.int64), boxes.astype(np.int64)


def segments_from_id_map(
    panoptic: np.ndarray,
    query_category_ids: Sequence[int] | np.ndarray,
    *,
    query_valid: Sequence[bool] | np.ndarray | None = None,
    query_scores: Sequence[float] | np.ndarray | None = None,
    image_id: int | None = None,
) -> list[dict[str, Any]]:
  """COCO `segments_info` for an inference map (0 void, else query index + 1).

  The segment id is the map value itself (query index + 1), so the map can be
  written as the PNG unchanged. Queries that own no pixel give no segment
  (COCO requires each listed segment to appear in the PNG).

  Args:
    panoptic: [H, W] int, 0 = void, `q + 1` = pixel assigned to query `q`.
    query_category_ids: [Q] COCO category id of each query (the caller maps
      contiguous classes through `CategoryInfo.coco_ids`).
    query_valid: optional [Q] bool; a pixel on an invalid query is an error.
    query_scores: optional [Q] float, copied to each segment as `score`.
    image_id: only used in error messages.

  Returns:
    One dict per non-empty segment, in query order: `id`, `category_id`,
    `iscrowd` (0), `area`, `bbox` ([x, y, w, h], inclusive), [`score`].
  """
  panoptic = np.asarray(panoptic)
  category_ids = np.asarray(query_category_ids).reshape(-1)  # [Q]
  num_queries = category_ids.size
  where = f" in image {image_id}" if image_id is not None else ""
  if panoptic.ndim != 2 or not np.issubdtype(panoptic.dtype, np.integer):
    raise ValueError(f"panoptic{where} must be a 2-D integer map, got "
                     f"{panoptic.dtype} {panoptic.shape}")
  if panoptic.size and (panoptic.min() < 0 or panoptic.max() > num_queries):
    raise ValueError(
        f"panoptic{where} holds values outside [0, {num_queries}] (0 = void, "
        f"q + 1 = query q): [{panoptic.min()}, {panoptic.max()}]")
  segment_ids = np.arange(1, num_queries + 1)  # [Q]
  areas, boxes = segment_areas_and_boxes(panoptic, segment_ids)
  if query_valid is not None:
    invalid_used = (~np.asarray(query_valid, bool).reshape(-1)) & (areas > 0)
    if invalid_used.any():
      raise ValueError(f"panoptic{where} assigns pixels to invalid queries "
                       f"{np.nonzero(invalid_used)[0].tolist()}")
  scores = None if query_scores is None else np.asarray(
      query_scores, np.float64).reshape(-1)  # [Q]
  segments = []
  for q in np.nonzero(areas > 0)[0]:
    segment = {
        "id": int(segment_ids[q]),
        "category_id": int(category_ids[q]),
        "iscrowd": 0,
        "area": int(areas[q]),
        "bbox": [int(v) for v in boxes[q]],
    }
    if scores is not None:
      segment["score"] = float(scores[q])
    segments.append(segment)
  return segments


def write_panoptic_prediction(
    out_folder: str | os.PathLike[str],
    image_id: int,
    file_name: str,
    panoptic: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
  """Writes one image's panoptic PNG and returns its COCO annotation entry.

  Areas and boxes are recomputed from the map. Listed segments that own no
  pixel are dropped (pq_compute rejects a JSON segment missing from the PNG);
  a non-zero map value that no segment lists is an error.

  Args:
    out_folder: folder of the PNGs (created if needed).
    image_id: COCO image id.
    file_name: the image's file name; the PNG takes its stem + ".png".
    panoptic: [H, W] int segment ids, 0 = void.
    segments_info: dicts with at least `id` and `category_id` (other keys,
      e.g. `iscrowd` or `score`, are kept).

  Returns:
    `{"image_id", "file_name", "segments_info"}` with `area` and `bbox` set.
  """
  panoptic = np.asarray(panoptic)
  ids = np.asarray([int(s["id"]) for s in segments_info], np.int64)  # [S]
  if len(set(ids.tolist())) != ids.size:
    raise ValueError(f"image {image_id}: duplicate segment ids in segments_info")
  if (ids <= 0).any():
    raise ValueError(f"image {image_id}: segment ids must be > 0 (0 is VOID), "
                     f"got {ids[ids <= 0].tolist()}")
  png = panoptic_png.encode_panoptic_png(panoptic)
  present = np.unique(panoptic)  # [U]
  unlisted = np.setdiff1d(present[present != 0], ids)
  if unlisted.size:
    raise ValueError(f"image {image_id}: panoptic map holds segment ids "
                     f"{unlisted.tolist()} that segments_info does not list")
  areas, boxes = segment_areas_and_boxes(panoptic, ids)
  png_name = os.path.splitext(os.path.basename(file_name))[0] + ".png"
  os.makedirs(out_folder, exist_ok=True)
  with open(os.path.join(out_folder, png_name), "wb") as f:
    f.write(png)
  out_segments = []
  for segment, area, box in zip(segments_info, areas, boxes):
    if area == 0:
      continue
    entry = files.to_builtin(dict(segment))
    entry["id"] = int(segment["id"])
    entry["category_id"] = int(segment["category_id"])
    entry.setdefault("iscrowd", 0)
    entry["area"] = int(area)
    entry["bbox"] = [int(v) for v in box]
    out_segments.append(entry)
  return {"image_id": int(image_id), "file_name": png_name,
          "segments_info": out_segments}


def write_panoptic_json(
    path: str | os.PathLike[str],
    annotations: Sequence[Mapping[str, Any]],
    categories_list: Sequence[Mapping[str, Any]],
    images_list: Sequence[Mapping[str, Any]],
) -> None:
  """Writes a COCO panoptic JSON (`annotations`, `categories`, `images`)."""
  files.write_json(path, {"annotations": list(annotations),
                          "categories": list(categories_list), "images": list(images_list)})


def detections_from_boxes(
    image_id: int,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
) -> list[dict[str, Any]]:
  """COCO detection results from `[x0, y0, x1, y1]` boxes (`x1 = x0 + w`).

  Args:
    image_id: COCO image id.
    boxes_xyxy: [N, 4] boxes in original-image pixels.
    scores: [N] confidences.
    category_ids: [N] COCO category ids.

  Returns:
    One dict per box: `image_id`, `category_id`, `bbox` [x, y, w, h], `score`.
  """
  boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)  # [N, 4]
  scores = np.asarray(scores, np.float64).reshape(-1)  # [N]
  category_ids = np.asarray(category_ids).reshape(-1)  # [N]
  if not boxes.shape[0] == scores.size == category_ids.size:
    raise ValueError(f"image {image_id}: boxes, scores and category_ids differ "
                     f"in length: {boxes.shape[0]}, {scores.size}, "
                     f"{category_ids.size}")
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)  # [N, 4]
  return [{"image_id": int(image_id), "category_id": int(c),
           "bbox": [float(v) for v in b], "score": float(s)}
          for b, s, c in zip(xywh, scores, category_ids)]


def write_detections_json(path: str | os.PathLike[str],
                          detections: Iterable[Mapping[str, Any]]) -> None:
  """Writes COCO detection results: a JSON list of `image_id`,
  `category_id`, `bbox` [x, y, w, h], `score`."""
  out = []
  for det in detections:
    missing = {"image_id", "category_id", "bbox", "score"} - set(det)
    if missing:
      raise ValueError(f"detection {det!r} lacks fields {sorted(missing)}")
    out.append({"image_id": int(det["image_id"]),
                "category_id": int(det["category_id"]),
                "bbox": [float(v) for v in det["bbox"]],
                "score": float(det["score"])})
  files.write_json(path, out)


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
    *,
    with_scores: bool = False,
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
    with_scores: also give each segment `isthing` (bool) and `score` (the query's: the
      detection score for instances, 1 for stuff); reads `query_is_thing`, `query_score`.

  Returns:
    `id_map [h0, w0] int32` (0 void, else segment id) and `segments_info`: one dict per
    segment with `id`, `category_id`, `area`, `bbox` ([x, y, w, h], pixel extent) and
    `iscrowd` 0 (and `isthing`, `score` with `with_scores`).
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
  areas, boxes = segment_areas_and_boxes(id_map, segment_ids)  # [n], [n, 4]
  coco_ids = np.asarray(category_coco_ids)[classes]  # [n]
  segments_info = [{"id": int(i), "category_id": int(c), "area": int(a),
                    "bbox": [int(v) for v in b], "iscrowd": 0}
                   for i, c, a, b in zip(segment_ids, coco_ids, areas, boxes)]
  if with_scores:
    is_thing = np.asarray(result["query_is_thing"], bool)[present - 1]  # [n]
    scores = np.asarray(result["query_score"], np.float64)[present - 1]  # [n]
    for segment, thing, score in zip(segments_info, is_thing, scores):
      segment.update(isthing=bool(thing), score=float(score))
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
  return detections_from_boxes(image_id, boxes, np.asarray(result["det_score"])[valid],
                                      np.asarray(category_coco_ids)[classes])
