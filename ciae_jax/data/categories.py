"""Panoptic categories and their contiguous indices (no TensorFlow).

The model works with contiguous class indices: stuff `0..num_stuff-1` first, then
things `num_stuff..num_classes-1`; within each group, ordered by COCO id
(docs/interfaces.md, paper III-A). Thing class `j` of the detector is contiguous
class `num_stuff + j`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np

PathLike = str | os.PathLike


@dataclasses.dataclass(frozen=True)
class CategoryInfo:
  """Panoptic categories in contiguous order (stuff first, then things).

  Attributes:
    coco_ids: contiguous index -> COCO (dataset) category id.
    names: contiguous index -> category name.
    isthing: contiguous index -> True for thing classes.
    colors: contiguous index -> RGB colour (for visualisation).
    num_stuff: number of stuff classes (contiguous `0..num_stuff-1`).
    num_things: number of thing classes.
    num_classes: `num_stuff + num_things`.
  """
  coco_ids: tuple[int, ...]
  names: tuple[str, ...]
  isthing: tuple[bool, ...]
  colors: tuple[tuple[int, int, int], ...]
  num_stuff: int
  num_things: int
  num_classes: int

  def __post_init__(self):
    # Built once; a dict makes `contiguous_index` O(1) (frozen: set via object).
    object.__setattr__(self, "_index_of_coco_id",
                       {cid: c for c, cid in enumerate(self.coco_ids)})

  def contiguous_index(self, coco_id: int) -> int:
    """Contiguous index of a COCO category id; KeyError naming an unknown id."""
    try:
      return self._index_of_coco_id[int(coco_id)]
    except KeyError:
      raise KeyError(f"unknown category id {coco_id!r} (known ids: "
                     f"{sorted(self.coco_ids)})") from None

  def coco_id(self, contiguous: int) -> int:
    """COCO category id of a contiguous index (the way back)."""
    if not 0 <= int(contiguous) < self.num_classes:
      raise IndexError(f"contiguous class {contiguous} outside "
                       f"[0, {self.num_classes})")
    return self.coco_ids[int(contiguous)]

  def contiguous_indices(self, coco_ids: Sequence[int] | np.ndarray
                         ) -> np.ndarray:
    """Vectorised `contiguous_index` (int32 array of the same shape)."""
    ids = np.asarray(coco_ids)
    flat = [self.contiguous_index(i) for i in ids.reshape(-1)]
    return np.asarray(flat, np.int32).reshape(ids.shape)

  def coco_ids_of(self, contiguous: Sequence[int] | np.ndarray) -> np.ndarray:
    """Vectorised `coco_id` (int64 array of the same shape)."""
    table = np.asarray(self.coco_ids, np.int64)  # [C]
    c = np.asarray(contiguous)
    if c.size and (c.min() < 0 or c.max() >= self.num_classes):
      raise IndexError(f"contiguous classes outside [0, {self.num_classes})")
    return table[c]

  def thing_class(self, contiguous: int) -> int:
    """Detector thing index `j` (0..num_things-1) of a contiguous thing class."""
    if not self.num_stuff <= int(contiguous) < self.num_classes:
      raise ValueError(f"contiguous class {contiguous} is not a thing class")
    return int(contiguous) - self.num_stuff


def categories_from_list(entries: Sequence[dict[str, Any]], *,
                         source: str = "<list>") -> CategoryInfo:
  """Builds a CategoryInfo from COCO category dicts (`id`, `isthing`, ...).

  Args:
    entries: dicts with at least `id` and `isthing`; `name` and `color` are
      optional (default: the id as a string, and grey).
    source: where the list came from, for error messages.

  Returns:
    The categories in contiguous order.
  """
  if not isinstance(entries, (list, tuple)) or not entries:
    raise ValueError(f"{source}: categories must be a non-empty list")
  seen = set()
  for e in entries:
    if not isinstance(e, dict) or "id" not in e or "isthing" not in e:
      raise ValueError(f"{source}: each category needs 'id' and 'isthing', "
                       f"got {e!r}")
    if e["id"] in seen:
      raise ValueError(f"{source}: duplicate category id {e['id']}")
    seen.add(e["id"])
  # Stuff first, then things; by COCO id within each group (interfaces.md).
  ordered = sorted(entries, key=lambda e: (bool(e["isthing"]), int(e["id"])))
  num_things = sum(bool(e["isthing"]) for e in entries)
  return CategoryInfo(
      coco_ids=tuple(int(e["id"]) for e in ordered),
      names=tuple(str(e.get("name", e["id"])) for e in ordered),
      isthing=tuple(bool(e["isthing"]) for e in ordered),
      colors=tuple(tuple(int(v) for v in e.get("color", (128, 128, 128)))
                   for e in ordered),
      num_stuff=len(ordered) - num_things,
      num_things=num_things,
      num_classes=len(ordered),
  )


def read_category_list(path: PathLike) -> list[dict[str, Any]]:
  """The raw category dicts of a file, in file order.

  Args:
    path: a COCO panoptic annotation JSON (a dict with `categories`) or a bare
      JSON list of categories.

  Returns:
    The list of category dicts exactly as stored.
  """
  path = os.fspath(path)
  try:
    with open(path) as f:
      data = json.load(f)
  except FileNotFoundError:
    raise FileNotFoundError(f"categories file not found: {path}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON ({e})") from None
  if isinstance(data, dict):
    if "categories" not in data:
      raise ValueError(f"{path}: JSON object has no 'categories' field "
                       f"(keys: {sorted(data)})")
    data = data["categories"]
  if not isinstance(data, list):
    raise ValueError(f"{path}: expected a list of categories or a dict with "
                     f"'categories', got {type(data).__name__}")
  return data


def load_categories(path: PathLike) -> CategoryInfo:
  """Loads categories from a panoptic annotation JSON or a bare list.

  Args:
    path: a COCO panoptic annotation file (its `categories` list is used) or a
      JSON file holding just the list of categories.

  Returns:
    The CategoryInfo (contiguous order: stuff, then things, each by COCO id).

  Raises:
    ValueError: naming the file when it has no `categories` or they are bad.
  """
  return categories_from_list(read_category_list(path), source=os.fspath(path))
