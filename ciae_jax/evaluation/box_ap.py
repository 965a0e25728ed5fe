"""Box AP of the detector through pycocotools' COCOeval (iouType 'bbox').

The ground truth is built in memory from the COCO panoptic annotations: every
thing segment becomes a box annotation with its `bbox`, `area` (the mask
area, as in COCO instances files) and `iscrowd`; stuff segments are left out.
No TensorFlow, no JAX.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# COCOeval.stats[0:6] with their usual names.
BOX_AP_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def panoptic_to_box_gt(
    panoptic_gt: Mapping[str, Any],
    image_ids: Iterable[int] | None = None,
) -> dict[str, Any]:
  """A COCO detection dataset dict from panoptic annotations (things only).

  Args:
    panoptic_gt: a COCO panoptic dict (`annotations`, `categories`, and
      optionally `images`).
    image_ids: keep only these images (default: every annotated image).

  Returns:
    `{"images", "annotations", "categories"}` for `pycocotools.coco.COCO`,
    annotation ids numbered from 1 (panoptic segment ids repeat across
    images, COCO annotation ids may not).
  """
  categories = [c for c in panoptic_gt["categories"] if c.get("isthing") == 1]
  thing_ids = {c["id"] for c in categories}
  wanted = None if image_ids is None else {int(i) for i in image_ids}
  image_info = {im["id"]: im for im in panoptic_gt.get("images", [])}
  images, annotations = [], []
  for ann in panoptic_gt["annotations"]:
    image_id = ann["image_id"]
    if wanted is not None and image_id not in wanted:
      continue
    info = image_info.get(image_id, {})
    images.append({k: info[k] for k in ("height", "width", "file_name")
                   if k in info} | {"id": image_id})
    for segment in ann["segments_info"]:
      if segment["category_id"] not in thing_ids:
        continue
      for field in ("bbox", "area"):
        if field not in segment:
          raise ValueError(f"image {image_id}: segment {segment.get('id')} "
                           f"has no '{field}' (needed for box AP)")
      annotations.append({
          "id": len(annotations) + 1,
          "image_id": image_id,
          "category_id": segment["category_id"],
          "bbox": [float(v) for v in segment["bbox"]],
          "area": float(segment["area"]),
          "iscrowd": int(segment.get("iscrowd", 0)),
      })
  if wanted is not None:
    missing = wanted - {im["id"] for im in images}
    if missing:
      raise ValueError(f"image ids {sorted(missing)} have no panoptic "
                       f"annotation")
  return {"images": images, "annotations": annotations,
          "categories": [{"id": c["id"], "name": c.get("name", str(c["id"]))}
                         for c in categories]}


def _coco_from_dict(dataset: Mapping[str, Any]) -> COCO:
  """A pycocotools COCO object indexed from an in-memory dict."""
  coco = COCO()
  coco.dataset = dict(dataset)
  coco.createIndex()
  return coco


def box_ap(
    panoptic_gt: str | os.PathLike[str] | Mapping[str, Any],
    detections: Sequence[Mapping[str, Any]],
    *,
    image_ids: Iterable[int] | None = None,
    verbose: bool = False,
) -> dict[str, float]:
  """COCO box AP of detections against the panoptic ground-truth things.

  Args:
    panoptic_gt: COCO panoptic JSON path or its loaded dict.
    detections: dicts with `image_id`, `category_id` (COCO id of a thing
      class), `bbox` [x, y, w, h] in original-image pixels, `score`.
    image_ids: evaluate these images only (default: every annotated image).
    verbose: print pycocotools' own summary.

  Returns:
    `{"AP", "AP50", "AP75", "APs", "APm", "APl"}` as fractions, COCOeval's
    numbers (-1 where a group has no ground truth, e.g. no small objects).
    With no detections at all, every AP over existing ground truth is 0.
  """
  if not isinstance(panoptic_gt, Mapping):
    with open(panoptic_gt) as f:
      panoptic_gt = json.load(f)
  gt_dataset = panoptic_to_box_gt(panoptic_gt, image_ids)
  image_set = {im["id"] for im in gt_dataset["images"]}
  thing_ids = {c["id"] for c in gt_dataset["categories"]}
  results = []
  for det in detections:
    missing = {"image_id", "category_id", "bbox", "score"} - set(det)
    if missing:
      raise ValueError(f"detection {dict(det)!r} lacks fields {sorted(missing)}")
    if det["image_id"] not in image_set:
      raise ValueError(f"detection on image {det['image_id']}, which is not "
                       f"among the evaluated ground-truth images")
    if det["category_id"] not in thing_ids:
      raise ValueError(f"detection on image {det['image_id']} has category_id "
                       f"{det['category_id']}, not a thing category")
    bbox = np.asarray(det["bbox"], np.float64).reshape(-1)  # [4]
    if bbox.size != 4:
      raise ValueError(f"detection on image {det['image_id']}: bbox must be "
                       f"[x, y, w, h], got {det['bbox']!r}")
    results.append({"image_id": det["image_id"],
                    "category_id": int(det["category_id"]),
                    "bbox": bbox.tolist(), "score": float(det["score"])})

  quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(
      io.StringIO())
  with quiet:
    gt = _coco_from_dict(gt_dataset)
    if results:
      dt = gt.loadRes(results)
    else:  # loadRes cannot take an empty list; COCOeval can.
      dt = _coco_from_dict({"images": gt_dataset["images"],
                            "categories": gt_dataset["categories"],
                            "annotations": []})
    evaluator = COCOeval(gt, dt, iouType="bbox")
    evaluator.params.imgIds = sorted(image_set)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  return {k: float(v) for k, v in zip(BOX_AP_KEYS, evaluator.stats[:6])}
