"""Reading the standard COCO panoptic layout (plain Python, NumPy and PIL; no TF).

Layout under one root (COCO 2017, or any custom dataset with its own
categories and non-contiguous ids):

```
ROOT/{split}/                            images (JPEG or PNG), split e.g. val2017
ROOT/annotations/panoptic_{split}.json   images, annotations, categories
ROOT/annotations/panoptic_{split}/       panoptic PNGs, id = R + 256 G + 256^2 B
```

Segment id 0 in a PNG is void. Everything that is wrong with the data raises a
ValueError naming the file and the image id.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable

import numpy as np
from PIL import Image

from ciae_jax import panoptic_png
from ciae_jax.data import categories as categories_lib

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
  """One entry of `segments_info`, as in the JSON."""
  id: int
  category_id: int
  iscrowd: bool
  bbox: tuple[float, float, float, float]  # x, y, w, h
  area: float


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image of a split: its files, original size and segments (JSON order)."""
  image_id: int
  image_path: str
  png_path: str
  height: int
  width: int
  segments: tuple[SegmentInfo, ...]


@dataclasses.dataclass(frozen=True)
class PanopticGroundTruth:
  """What panoptic evaluation needs: `pq_compute(gt_json, ..., gt_folder)`."""
  gt_json: str
  gt_folder: str
  image_folder: str
  categories: categories_lib.CategoryInfo


def split_paths(root: PathLike, split: str) -> tuple[str, str, str]:
  """(image folder, annotation JSON, PNG folder) of a split under `root`."""
  root = os.fspath(root)
  return (os.path.join(root, split),
          os.path.join(root, "annotations", f"panoptic_{split}.json"),
          os.path.join(root, "annotations", f"panoptic_{split}"))


def _read_json(path: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"panoptic annotation file not found: {path}")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a JSON object")
  for key in ("images", "annotations"):
    if key not in data:
      raise ValueError(f"{path}: missing field {key!r}")
  return data


def ground_truth(root: PathLike, split: str,
                 categories_file: PathLike | None = None) -> PanopticGroundTruth:
  """The ground-truth files of a split, for evaluation (pq_compute)."""
  image_dir, json_path, png_dir = split_paths(root, split)
  if not os.path.isfile(json_path):
    raise FileNotFoundError(f"panoptic annotation file not found: {json_path}")
  if not os.path.isdir(png_dir):
    raise FileNotFoundError(f"panoptic PNG folder not found: {png_dir}")
  cats = categories_lib.load_categories(categories_file or json_path)
  return PanopticGroundTruth(gt_json=json_path, gt_folder=png_dir,
                             image_folder=image_dir, categories=cats)


def _segment(raw: dict[str, Any], json_path: str, image_id: int,
             known_ids: set[int]) -> SegmentInfo:
  """Validates one `segments_info` entry."""
  where = f"{json_path}: image id {image_id}"
  for key in ("id", "category_id"):
    if key not in raw:
      raise ValueError(f"{where}: segment without {key!r}: {raw!r}")
  if raw["category_id"] not in known_ids:
    raise ValueError(f"{where}: segment {raw['id']} has unknown category id "
                     f"{raw['category_id']}")
  if not 0 < int(raw["id"]) < 256**3:
    raise ValueError(f"{where}: segment id {raw['id']} outside [1, 256^3)")
  bbox = raw.get("bbox", (0, 0, 0, 0))
  if len(bbox) != 4:
    raise ValueError(f"{where}: segment {raw['id']} bbox must have 4 numbers")
  return SegmentInfo(id=int(raw["id"]), category_id=int(raw["category_id"]),
                     iscrowd=bool(raw.get("iscrowd", 0)),
                     bbox=tuple(float(v) for v in bbox),
                     area=float(raw.get("area", 0)))


# Called with (image id, image path, PNG path, error) for an image left out.
OnImageError = Callable[[int, str, str, ValueError], None]


def load_records(root: PathLike, split: str, *,
                 categories: categories_lib.CategoryInfo | None = None,
                 check_files: bool = True,
                 on_image_error: OnImageError | None = None) -> list[ImageRecord]:
  """Image records of a split, sorted by image id.

  Args:
    root: dataset root in the COCO panoptic layout.
    split: e.g. "train2017".
    categories: the categories segments must belong to (default: the JSON's).
    check_files: check that every image and PNG exists (cheap: no decoding).
    on_image_error: if given, an error of one image (its segments, its files) is passed to
      it and the image left out, instead of raised; errors of the whole file still raise.

  Returns:
    One record per image of the JSON's `images`; an image without an entry in
    `annotations` has no segments.

  Raises:
    ValueError: naming the JSON file (and image id) for unknown category ids,
      duplicate segment ids, annotations of unknown images, missing files.
  """
  image_dir, json_path, png_dir = split_paths(root, split)
  data = _read_json(json_path)
  if categories is None:
    if "categories" not in data:
      raise ValueError(f"{json_path}: JSON has no 'categories' field")
    categories = categories_lib.categories_from_list(data["categories"],
                                                     source=json_path)
  known_ids = set(categories.coco_ids)
  images, annotations = _index_images(data, json_path)
  records = []
  for image_id in sorted(images):
    im = images[image_id]
    ann = annotations.get(image_id, {})
    png_name = ann.get("file_name",
                       os.path.splitext(im["file_name"])[0] + ".png")
    image_path = os.path.join(image_dir, im["file_name"])
    png_path = os.path.join(png_dir, png_name)
    try:
      segments = tuple(_segment(s, json_path, image_id, known_ids)
                       for s in ann.get("segments_info", []))
      if len({s.id for s in segments}) != len(segments):
        raise ValueError(f"{json_path}: image id {image_id} has duplicate "
                         "segment ids")
      if check_files:
        for path in (image_path, png_path):
          if not os.path.isfile(path):
            raise ValueError(f"{path}: file missing (image id {image_id})")
    except ValueError as error:
      if on_image_error is None:
        raise
      on_image_error(int(image_id), image_path, png_path, error)
      continue
    records.append(ImageRecord(image_id=int(image_id), image_path=image_path,
                               png_path=png_path, height=int(im["height"]),
                               width=int(im["width"]), segments=segments))
  return records


def _index_images(data: dict[str, Any], json_path: str
                  ) -> tuple[dict[Any, dict], dict[Any, dict]]:
  """({image id: image entry}, {image id: annotation}); ValueError for a malformed file."""
  images = {}
  for im in data["images"]:
    for key in ("id", "file_name", "height", "width"):
      if key not in im:
        raise ValueError(f"{json_path}: image entry without {key!r}: {im!r}")
    if im["id"] in images:
      raise ValueError(f"{json_path}: duplicate image id {im['id']}")
    images[im["id"]] = im
  annotations = {}
  for ann in data["annotations"]:
    image_id = ann.get("image_id")
    if image_id not in images:
      raise ValueError(f"{json_path}: annotation for unknown image id "
                       f"{image_id}")
    annotations[image_id] = ann
  return images, annotations


def read_rgb(path: str, image_id: int, what: str) -> np.ndarray:
  """Reads an image file as uint8 RGB; ValueError naming file and image id."""
  if not os.path.isfile(path):
    raise ValueError(f"{path}: {what} missing (image id {image_id})")
  try:
    with Image.open(path) as im:
      im.load()  # Forces full decoding: a truncated file fails here.
      return np.asarray(im.convert("RGB"))  # [H, W, 3]
  except Exception as e:  # PIL raises many kinds (OSError, SyntaxError...).
    raise ValueError(f"{path}: corrupt or unreadable {what} (image id "
                     f"{image_id}): {e}") from None


def decode_example(record: ImageRecord,
                   categories: categories_lib.CategoryInfo) -> dict[str, Any]:
  """Decodes one image with its panoptic ground truth, untransformed (NumPy).

  Args:
    record: from `load_records`.
    categories: to map COCO category ids to contiguous classes.

  Returns:
    A dict: `image` uint8 [h, w, 3]; `segment_map` int32 [h, w] (0 = void,
    `k` = segment row `k-1`, rows in JSON order); per segment `seg_id`,
    `seg_category_id` (COCO), `seg_class` (contiguous), `seg_is_thing`,
    `seg_is_crowd`, `seg_box` float32 [n, 4] (`x0, y0, x0 + w, y0 + h` from the
    JSON bbox), `seg_area` (JSON); `image_id`, `orig_size` (h, w).

  Raises:
    ValueError: naming the file and image id for a missing or corrupt image or
      PNG, a size mismatch, a PNG segment absent from the JSON or the reverse,
      an unknown category id.
  """
  iid = record.image_id
  image = read_rgb(record.image_path, iid, "image")  # [h, w, 3]
  pan = read_rgb(record.png_path, iid, "panoptic PNG")  # [h, w, 3]
  if image.shape != pan.shape:
    raise ValueError(f"{record.png_path}: size {pan.shape[:2]} differs from "
                     f"image {record.image_path} {image.shape[:2]} (image id "
                     f"{iid})")
  if image.shape[:2] != (record.height, record.width):
    raise ValueError(f"{record.image_path}: size {image.shape[:2]} differs "
                     f"from the JSON's {(record.height, record.width)} "
                     f"(image id {iid})")
  ids = panoptic_png.rgb_to_id_map(pan)  # [h, w]
  json_ids = np.asarray([s.id for s in record.segments], np.int64)  # [n]
  png_ids = np.unique(ids)
  png_ids = png_ids[png_ids != 0]
  not_in_json = np.setdiff1d(png_ids, json_ids)
  if not_in_json.size:
    raise ValueError(f"{record.png_path}: segment ids {not_in_json.tolist()} "
                     f"are in the PNG but not in the JSON (image id {iid})")
  not_in_png = np.setdiff1d(json_ids, png_ids)
  if not_in_png.size:
    raise ValueError(f"{record.png_path}: segment ids {not_in_png.tolist()} "
                     f"are in the JSON but not in the PNG (image id {iid})")
  segment_map = np.zeros(ids.shape, np.int32)  # [h, w]
  for row, seg in enumerate(record.segments):
    segment_map[ids == seg.id] = row + 1
  try:
    seg_class = categories.contiguous_indices(
        [s.category_id for s in record.segments])  # [n]
  except KeyError as e:
    raise ValueError(f"{record.png_path}: image id {iid}: {e}") from None
  boxes = np.asarray([(x, y, x + w, y + h) for x, y, w, h in
                      (s.bbox for s in record.segments)],
                     np.float32).reshape(-1, 4)  # [n, 4]
  return {
      "image": image,
      "segment_map": segment_map,
      "seg_id": json_ids.astype(np.int32),
      "seg_category_id": np.asarray([s.category_id for s in record.segments],
                                    np.int32),
      "seg_class": seg_class,
      "seg_is_thing": np.asarray([categories.isthing[c] for c in seg_class],
                                 bool),
      "seg_is_crowd": np.asarray([s.iscrowd for s in record.segments], bool),
      "seg_box": boxes,
      "seg_area": np.asarray([s.area for s in record.segments], np.float32),
      "image_id": np.int32(iid),
      "orig_size": np.asarray([record.height, record.width], np.int32),
  }
