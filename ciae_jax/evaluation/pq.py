"""Panoptic quality (PQ, SQ, RQ), numerically identical to panopticapi.

`panopticapi.evaluation.pq_compute` is the reference protocol (Kirillov et al.):
per image, a ground-truth segment and a predicted segment of the same category
match when IoU > 0.5, where the union leaves out the prediction's pixels on
VOID (gt id 0); gt crowd segments are never matched and never counted as false
negatives; an unmatched prediction is not a false positive when more than half
of it lies on VOID or on the crowd region of its own category. PQ/SQ/RQ are
averaged over the categories that have any TP, FP or FN, for All, Things and
Stuff. The ground-truth segment area is the JSON `area` (as in pq_compute),
the predicted one is counted in the PNG.

Differences from the reference, all on input it handles badly:
  * a Things/Stuff group with no counted category gives 0 with `n = 0`
    (pq_compute divides by zero);
  * a segment id 0 in either JSON is rejected (0 is VOID in the PNG);
  * a PNG whose zlib checksum is wrong while every chunk CRC is right (only
    a file edited on purpose) is read where Pillow raises, when kornia-rs
    decodes it (see below).

This file replaces the reference's per-pixel sorts and per-pair Python loop
by run-length counting: one pass finds the runs (in row-major order) over which
both the gt and the predicted id are constant, segment ids are mapped to
compact labels on the run starts only (a 16-bit direct-mapped table, sorted
search on a slot clash), `np.bincount` weighted by run lengths gives the
[gt, pred] intersection matrix, and matching, false negatives and false
positives are array operations on its non-zero entries.

PNG decoding is most of the time (Pillow's Paeth reconstruction above all):
8-bit RGB files are decoded by kornia-rs (Rust, pinned in requirements.txt;
the same pixels as Pillow, tested) when it is installed, by Pillow otherwise
or when `$CIAE_PNG_DECODER=pillow` (see `panoptic_png.decode_rgb8_png`).

Command line (a drop-in for the COCO panoptic API):
  python -m ciae_jax.evaluation.pq --gt_json F --gt_folder D \
      --pred_json F --pred_folder D [--output RESULT.json] [--workers N]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ciae_jax.panoptic_png import decode_rgb8_png
from ciae_jax.panoptic_png import fast_png_decoder
from ciae_jax.panoptic_png import read_panoptic_png_pillow
from ciae_jax.panoptic_png import rgb_bytes_to_ids

OFFSET = 256 * 256 * 256
VOID = 0
# Compact labels: 0 = id not listed in the JSON, 1 = VOID, 2 + k = segment k.
_UNLISTED, _VOID_LABEL, _FIRST_SEGMENT = 0, 1, 2
# Slots of the table that maps ids to compact labels (by their low bits).
_HASH_SIZE = 1 << 16


class PanopticFormatError(KeyError, ValueError):
  """Malformed prediction or ground truth (a KeyError as in pq_compute, and a
  ValueError for callers that catch bad input)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""


def _png_ids(path: str, buffer_name: str, fast: bool = True
             ) -> tuple[np.ndarray, tuple[int, int]]:
  """Flat segment ids of a panoptic PNG, read as pq_compute reads them.

  8-bit RGB files (all COCO and exported ones) are decoded by kornia-rs when
  installed (same pixels as Pillow, `panoptic_png.decode_rgb8_png`), else by
  Pillow, and their packed bytes converted into a per-thread reused uint32
  buffer (valid until the next call with the same `buffer_name`); other
  modes go through `read_panoptic_png_pillow`, which rejects what pq_compute
  cannot read.

  Args:
    path: the PNG file.
    buffer_name: names the scratch buffer the ids go to.
    fast: False skips the kornia-rs attempt (it is known to be absent).

  Returns:
    [H*W] ids and (H, W).
  """
  if fast:
    with open(path, "rb") as f:
      rgb = decode_rgb8_png(f.read())  # [H, W, 3] or None
    if rgb is not None:
      height, width = rgb.shape[:2]
      ids = _scratch(buffer_name, height * width, np.uint32)  # [N]
      return rgb_bytes_to_ids(rgb, ids), (height, width)
  with Image.open(path) as image:
    width, height = image.size
    if image.mode == "RGB" and width * height:
      ids = _scratch(buffer_name, width * height, np.uint32)  # [N]
      return rgb_bytes_to_ids(image.tobytes(), ids), (height, width)
  ids = read_panoptic_png_pillow(path)  # [H, W]
  return ids.reshape(-1), ids.shape


_thread_state = threading.local()


def _scratch(name: str, size: int, dtype: Any) -> np.ndarray:
  """A per-thread reusable [size] buffer, all zero when first made.

  Fresh large arrays per image would each be handed back to the OS when
  freed (glibc trims the heap) and page-faulted in again on the next image.
  """
  buffers = getattr(_thread_state, "buffers", None)
  if buffers is None:
    buffers = _thread_state.buffers = {}
  buffer = buffers.get(name)
  if buffer is None or buffer.size < size or buffer.dtype != dtype:
    buffer = buffers[name] = np.zeros(size, dtype)
  return buffer[:size]


def _runs(gt_ids: np.ndarray, pred_ids: np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
  """Starts [R] and lengths [R] of row-major runs of constant gt and pred id.

  Panoptic maps are piecewise constant, so R is a few per cent of N and
  everything after this pass works on runs, not pixels.

  Args:
    gt_ids, pred_ids: [N] flat id maps.
  """
  num_pixels = gt_ids.size
  if num_pixels == 0:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  change = _scratch("change", num_pixels, np.bool_)  # [N]
  change[0] = True
  np.not_equal(gt_ids[1:], gt_ids[:-1], out=change[1:])
  pred_change = _scratch("pred_change", num_pixels - 1, np.bool_)  # [N-1]
  np.not_equal(pred_ids[1:], pred_ids[:-1], out=pred_change)
  np.logical_or(change[1:], pred_change, out=change[1:])
  starts = np.flatnonzero(change)  # [R]
  lengths = np.empty_like(starts)  # [R]
  np.subtract(starts[1:], starts[:-1], out=lengths[:-1])
  lengths[-1] = num_pixels - starts[-1]
  return starts, lengths


def _compact_labels(ids: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """Compact labels of ids: 0 unlisted, 1 VOID, 2 + k for segment_ids[k].

  A direct-mapped table on the low 16 bits of the id finds each id's label
  candidate and one comparison confirms it (an id whose slot holds another
  id is unlisted); a slot shared by two listed ids (rare with ~100 segments)
  falls back to a sorted search.

  Args:
    ids: [R] integer ids (one per run).
    segment_ids: [S] distinct listed ids, none equal to VOID.

  Returns:
    [R] int64 labels.
  """
  vocabulary = np.concatenate([[-1, VOID], segment_ids]).astype(np.int64)  # [S+2]
  if vocabulary.size <= _HASH_SIZE:
    slots = vocabulary[_VOID_LABEL:] & (_HASH_SIZE - 1)  # [S+1]
    labels = np.arange(_VOID_LABEL, vocabulary.size, dtype=np.int64)  # [S+1]
    table = _scratch("hash_table", _HASH_SIZE, np.int64)  # [T], all 0
    table[slots] = labels
    try:
      if np.array_equal(table[slots], labels):  # no two ids share a slot
        candidate = table[ids & (_HASH_SIZE - 1)]  # [R]
        return np.where(vocabulary[candidate] == ids, candidate,
                        _UNLISTED)  # [R]
    finally:
      table[slots] = _UNLISTED
  order = np.argsort(vocabulary[_VOID_LABEL:], kind="stable")  # [S+1]
  sorted_vocabulary = vocabulary[_VOID_LABEL:][order]  # [S+1]
  pos = np.minimum(np.searchsorted(sorted_vocabulary, ids),
                   sorted_vocabulary.size - 1)  # [R]
  found = sorted_vocabulary[pos] == ids  # [R]
  return np.where(found, order[pos] + _VOID_LABEL, _UNLISTED)  # [R]


def _intersections(gt_labels: np.ndarray, pred_labels: np.ndarray,
                   lengths: np.ndarray, num_gt: int, num_pred: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Non-zero entries of the [num_gt, num_pred] pixel co-occurrence matrix.

  Args:
    gt_labels, pred_labels: [R] compact labels of each run.
    lengths: [R] pixels in each run.

  Returns:
    gt label [K], pred label [K], pixel count [K] (int64), row-major order.
  """
  key = gt_labels * num_pred + pred_labels  # [R]
  cells = num_gt * num_pred
  # Float weights sum integers exactly below 2^53 pixels.
  if cells <= max(4 * key.size, 1 << 16):
    counts = np.bincount(key, weights=lengths, minlength=cells)  # [G*P]
    nonzero = np.flatnonzero(counts)  # [K]
    return (nonzero // num_pred, nonzero % num_pred,
            counts[nonzero].astype(np.int64))
  # Very many segments: a dense matrix would dwarf the runs, sort instead.
  unique_keys, inverse = np.unique(key, return_inverse=True)  # [K], [R]
  counts = np.bincount(inverse.reshape(-1), weights=lengths)  # [K]
  return (unique_keys // num_pred, unique_keys % num_pred,
          counts.astype(np.int64))


def _categories_dict(categories: Any) -> dict[int, Mapping[str, Any]]:
  """{category_id: info} from a list of COCO category dicts or such a dict."""
  if isinstance(categories, Mapping):
    items = list(categories.values())
  else:
    items = list(categories)
  out = {}
  for info in items:
    if "id" not in info or "isthing" not in info:
      raise ValueError(f"category {info!r} needs fields 'id' and 'isthing'")
    out[int(info["id"])] = info
  return out


@dataclasses.dataclass(frozen=True)
class ImageCounts:
  """One image's PQ statistics, over the categories it touches (sparse).

  `category [k]` indexes the accumulator's categories; `iou [k]` float64 sums the IoUs of the
  matches, `tp`, `fp`, `fn [k]` count them. Serialisable (`to_dict` / `from_dict`, exact:
  JSON writes floats that read back bit for bit), so that hosts can send them to one process,
  which adds them in image order: the sums are then the same floats for any split of the
  images over hosts and devices.
  """
  category: np.ndarray
  iou: np.ndarray
  tp: np.ndarray
  fp: np.ndarray
  fn: np.ndarray

  def to_dict(self) -> dict[str, list]:
    return {"category": self.category.tolist(), "iou": self.iou.tolist(),
            "tp": self.tp.tolist(), "fp": self.fp.tolist(), "fn": self.fn.tolist()}

  @classmethod
  def from_dict(cls, data: Mapping[str, Sequence[Any]]) -> ImageCounts:
    return cls(np.asarray(data["category"], np.int64), np.asarray(data["iou"], np.float64),
               *(np.asarray(data[k], np.int64) for k in ("tp", "fp", "fn")))


class PQAccumulator:
  """Streaming per-category PQ statistics (IoU sum, TP, FP, FN).

  Feed images with `add` (or `image_counts` + `add_counts`, to count an image in one place and
  add it in another), combine accumulators with `merge`, save and load them with `state_dict`
  / `from_state_dict`, read PQ with `result`. Equals pq_compute on the same images.
  """

  def __init__(self, categories: Sequence[Mapping[str, Any]]
               | Mapping[int, Mapping[str, Any]]):
    """Args: categories: COCO category dicts (`id`, `isthing`), as a list or
    as pq_compute's `{id: dict}`; their order is the order of `per_class`."""
    self.categories = _categories_dict(categories)
    self.category_ids = tuple(self.categories)
    self._index = {c: i for i, c in enumerate(self.category_ids)}
    num = len(self.category_ids)
    self.iou = np.zeros(num, np.float64)  # [C]
    self.tp = np.zeros(num, np.int64)  # [C]
    self.fp = np.zeros(num, np.int64)  # [C]
    self.fn = np.zeros(num, np.int64)  # [C]
    self.num_images = 0

  def _label_categories(self, segments: Sequence[Mapping[str, Any]]
                        ) -> np.ndarray:
    """[2 + S] category index per compact label: -1 for the unlisted and
    VOID labels and for a category_id not in `categories` (looked up as
    given, as pq_compute's `in categories` does)."""
    index = self._index
    return np.array(
        [-1, -1] + [index.get(s["category_id"], -1) for s in segments],
        np.int64)

  def add(self, gt_ids: np.ndarray, gt_segments: Sequence[Mapping[str, Any]],
          pred_ids: np.ndarray, pred_segments: Sequence[Mapping[str, Any]],
          *, image_id: Any = None) -> None:
    """Adds one image.

    Args:
      gt_ids: [H, W] integer ground-truth segment ids, 0 = VOID.
      gt_segments: COCO dicts with `id`, `category_id`, `iscrowd` (default 0)
        and optionally `area` (used as pq_compute does; else counted).
      pred_ids: [H, W] integer predicted segment ids, 0 = VOID.
      pred_segments: COCO dicts with `id`, `category_id`.
      image_id: named in error messages.

    Raises:
      PanopticFormatError: a predicted id in the map missing from
        `pred_segments` or the reverse, an unknown predicted category, a
        segment id 0, or maps of different shapes.
    """
    self.add_counts(self.image_counts(gt_ids, gt_segments, pred_ids,
                                      pred_segments, image_id=image_id))

  def image_counts(self, gt_ids: np.ndarray,
                   gt_segments: Sequence[Mapping[str, Any]],
                   pred_ids: np.ndarray,
                   pred_segments: Sequence[Mapping[str, Any]],
                   *, image_id: Any = None) -> ImageCounts:
    """One image's statistics, not added (arguments and errors as `add`)."""
    gt_ids = np.asarray(gt_ids)
    pred_ids = np.asarray(pred_ids)
    if gt_ids.shape != pred_ids.shape or gt_ids.ndim != 2:
      raise PanopticFormatError(
          f"In the image with ID {image_id} the ground truth map {gt_ids.shape}"
          f" and the prediction map {pred_ids.shape} differ in shape.")
    for name, ids in (("ground truth", gt_ids), ("prediction", pred_ids)):
      if not np.issubdtype(ids.dtype, np.integer):
        raise PanopticFormatError(
            f"In the image with ID {image_id} the {name} map has dtype "
            f"{ids.dtype}; segment ids must be integers.")
    return self._image_counts(np.ascontiguousarray(gt_ids).reshape(-1), gt_segments,
                              np.ascontiguousarray(pred_ids).reshape(-1),
                              pred_segments, image_id)

  def add_counts(self, counts: ImageCounts) -> None:
    """Adds one image's statistics (from `image_counts` of an accumulator over the same
    categories)."""
    self.iou[counts.category] += counts.iou
    self.tp[counts.category] += counts.tp
    self.fp[counts.category] += counts.fp
    self.fn[counts.category] += counts.fn
    self.num_images += 1

  def _add_flat(self, gt_ids: np.ndarray,
                gt_segments: Sequence[Mapping[str, Any]],
                pred_ids: np.ndarray,
                pred_segments: Sequence[Mapping[str, Any]],
                image_id: Any) -> None:
    """`add` on flat [N] id maps of one image."""
    self.add_counts(self._image_counts(gt_ids, gt_segments, pred_ids,
                                       pred_segments, image_id))

  def _image_counts(self, gt_ids: np.ndarray,
                    gt_segments: Sequence[Mapping[str, Any]],
                    pred_ids: np.ndarray,
                    pred_segments: Sequence[Mapping[str, Any]],
                    image_id: Any) -> ImageCounts:
    """`image_counts` on flat [N] id maps of one image."""
    # Dicts as pq_compute builds them: a repeated id keeps its last entry.
    gt_by_id = {int(s["id"]): s for s in gt_segments}
    pred_by_id = {int(s["id"]): s for s in pred_segments}
    if VOID in gt_by_id or VOID in pred_by_id:
      raise PanopticFormatError(
          f"In the image with ID {image_id} a segment has ID 0, which is VOID.")
    gt_info = list(gt_by_id.values())
    pred_info = list(pred_by_id.values())
    gt_seg_ids = np.fromiter(gt_by_id, np.int64, len(gt_by_id))  # [Sg]
    pred_seg_ids = np.fromiter(pred_by_id, np.int64, len(pred_by_id))  # [Sp]
    num_gt = gt_seg_ids.size + _FIRST_SEGMENT
    num_pred = pred_seg_ids.size + _FIRST_SEGMENT

    starts, lengths = _runs(gt_ids, pred_ids)  # [R], [R]
    pred_run_ids = pred_ids[starts].astype(np.int64)  # [R]
    pred_labels = _compact_labels(pred_run_ids, pred_seg_ids)  # [R]
    gt_labels = _compact_labels(gt_ids[starts], gt_seg_ids)  # [R]
    gi, pj, inter = _intersections(gt_labels, pred_labels, lengths, num_gt,
                                   num_pred)

    pred_area = np.bincount(pj, weights=inter, minlength=num_pred)  # [P]
    pred_cat = self._label_categories(pred_info)  # [P]
    self._check_prediction(image_id, pred_run_ids, pred_labels, pred_area,
                           pred_cat, pred_seg_ids, pred_info)

    gt_cat = self._label_categories(gt_info)  # [G]
    gt_crowd = np.array(
        [False, False] + [s.get("iscrowd", 0) == 1 for s in gt_info],
        bool)  # [G]
    gt_area = np.bincount(gi, weights=inter, minlength=num_gt)  # [G]
    json_area = [s.get("area") for s in gt_info]
    has_area = np.array([a is not None for a in json_area], bool)  # [Sg]
    gt_area[_FIRST_SEGMENT:][has_area] = [a for a in json_area if a is not None]
    # Prediction pixels on VOID: left out of the union, may excuse an FP.
    void_inter = np.zeros(num_pred, np.float64)  # [P]
    on_void = gi == _VOID_LABEL  # [K]
    void_inter[pj[on_void]] = inter[on_void]

    # Matches: same category, gt not crowd, IoU > 0.5.
    candidate = ((gi >= _FIRST_SEGMENT) & (pj >= _FIRST_SEGMENT)
                 & ~gt_crowd[gi] & (gt_cat[gi] == pred_cat[pj])
                 & (gt_cat[gi] >= 0))  # [K]
    gi_c, pj_c, inter_c = gi[candidate], pj[candidate], inter[candidate]
    union = pred_area[pj_c] + gt_area[gi_c] - inter_c - void_inter[pj_c]
    iou = inter_c / union  # [Kc]
    match = iou > 0.5  # [Kc]
    matched_cat = gt_cat[gi_c[match]]  # [M]
    num_cats = len(self.category_ids)
    tp = np.bincount(matched_cat, minlength=num_cats)  # [C]
    iou_sum = np.bincount(matched_cat, weights=iou[match], minlength=num_cats)  # [C]
    gt_matched = np.zeros(num_gt, bool)  # [G]
    gt_matched[gi_c[match]] = True
    pred_matched = np.zeros(num_pred, bool)  # [P]
    pred_matched[pj_c[match]] = True

    # False negatives: unmatched, non-crowd gt segments of known categories.
    is_fn = ~gt_matched & ~gt_crowd & (gt_cat >= 0)  # [G]
    is_fn[:_FIRST_SEGMENT] = False
    fn = np.bincount(gt_cat[is_fn], minlength=num_cats)  # [C]

    # Crowd region of each category: the last crowd segment listed (a dict
    # keyed by category in pq_compute, so a later one overwrites).
    crowd_label_of_cat = np.full(num_cats, -1, np.int64)  # [C]
    for label in np.nonzero(gt_crowd & (gt_cat >= 0))[0]:
      crowd_label_of_cat[gt_cat[label]] = label
    pred_crowd_label = np.where(pred_cat >= 0, crowd_label_of_cat[pred_cat],
                                -1)  # [P]
    on_own_crowd = (pj >= _FIRST_SEGMENT) & (gi == pred_crowd_label[pj])  # [K]
    crowd_inter = np.zeros(num_pred, np.float64)  # [P]
    crowd_inter[pj[on_own_crowd]] = inter[on_own_crowd]

    # False positives: unmatched predictions not mostly on VOID / own crowd.
    ignored_fraction = (void_inter + crowd_inter) / np.maximum(pred_area, 1)
    is_fp = ~pred_matched & ~(ignored_fraction > 0.5)  # [P]
    is_fp[:_FIRST_SEGMENT] = False
    fp = np.bincount(pred_cat[is_fp], minlength=num_cats)  # [C]
    touched = np.flatnonzero((tp > 0) | (fp > 0) | (fn > 0))  # [k]
    return ImageCounts(touched, iou_sum[touched].astype(np.float64),
                       *(c[touched].astype(np.int64) for c in (tp, fp, fn)))

  def _check_prediction(self, image_id: Any, pred_run_ids: np.ndarray,
                        pred_labels: np.ndarray, pred_area: np.ndarray,
                        pred_cat: np.ndarray, pred_seg_ids: np.ndarray,
                        pred_info: Sequence[Mapping[str, Any]]) -> None:
    """pq_compute's sanity checks of one predicted image."""
    if pred_area[_UNLISTED] > 0:
      unlisted = np.unique(pred_run_ids[pred_labels == _UNLISTED])
      raise PanopticFormatError(
          f"In the image with ID {image_id} segment with ID "
          f"{int(unlisted[0])} is presented in PNG and not presented in JSON "
          f"(all such IDs: {unlisted.tolist()}).")
    present = pred_area[_FIRST_SEGMENT:] > 0  # [Sp]
    unknown = present & (pred_cat[_FIRST_SEGMENT:] < 0)  # [Sp]
    if unknown.any():
      k = int(np.nonzero(unknown)[0][0])
      raise PanopticFormatError(
          f"In the image with ID {image_id} segment with ID "
          f"{int(pred_seg_ids[k])} has unknown category_id "
          f"{pred_info[k]['category_id']}.")
    if not present.all():
      raise PanopticFormatError(
          f"In the image with ID {image_id} the following segment IDs "
          f"{pred_seg_ids[~present].tolist()} are presented in JSON and not "
          f"presented in PNG.")

  def merge(self, other: PQAccumulator) -> PQAccumulator:
    """Adds another accumulator's counts (same categories) into this one."""
    if other.category_ids != self.category_ids:
      raise ValueError("cannot merge PQ accumulators over different categories")
    self.iou += other.iou
    self.tp += other.tp
    self.fp += other.fp
    self.fn += other.fn
    self.num_images += other.num_images
    return self

  def state_dict(self) -> dict[str, Any]:
    """The statistics as JSON-able lists (exact); `from_state_dict` reads them back."""
    return {"category_ids": list(self.category_ids), "iou": self.iou.tolist(),
            "tp": self.tp.tolist(), "fp": self.fp.tolist(), "fn": self.fn.tolist(),
            "num_images": self.num_images}

  @classmethod
  def from_state_dict(cls, categories: Sequence[Mapping[str, Any]]
                      | Mapping[int, Mapping[str, Any]],
                      state: Mapping[str, Any]) -> PQAccumulator:
    """An accumulator over `categories` holding `state` (from `state_dict`)."""
    accumulator = cls(categories)
    if [int(c) for c in state["category_ids"]] != list(accumulator.category_ids):
      raise ValueError("PQ state over other categories than the accumulator's")
    accumulator.iou[:] = state["iou"]
    for key in ("tp", "fp", "fn"):
      getattr(accumulator, key)[:] = state[key]
    accumulator.num_images = int(state["num_images"])
    return accumulator

  def _average(self, isthing: bool | None
               ) -> tuple[dict[str, Any], dict[int, dict[str, float]]]:
    """pq_compute's `PQStat.pq_average` over one group of categories."""
    pq = sq = rq = 0.0
    n = 0
    per_class = {}
    for i, cat_id in enumerate(self.category_ids):
      if isthing is not None and (
          (self.categories[cat_id]["isthing"] == 1) != isthing):
        continue
      iou, tp, fp, fn = (float(self.iou[i]), int(self.tp[i]), int(self.fp[i]),
                         int(self.fn[i]))
      if tp + fp + fn == 0:
        per_class[cat_id] = {"pq": 0.0, "sq": 0.0, "rq": 0.0}
        continue
      n += 1
      pq_class = iou / (tp + 0.5 * fp + 0.5 * fn)
      sq_class = iou / tp if tp != 0 else 0.0
      rq_class = tp / (tp + 0.5 * fp + 0.5 * fn)
      per_class[cat_id] = {"pq": pq_class, "sq": sq_class, "rq": rq_class}
      pq += pq_class
      sq += sq_class
      rq += rq_class
    if n == 0:  # pq_compute raises ZeroDivisionError here.
      return {"pq": 0.0, "sq": 0.0, "rq": 0.0, "n": 0}, per_class
    return {"pq": pq / n, "sq": sq / n, "rq": rq / n, "n": n}, per_class

  def result(self) -> dict[str, Any]:
    """pq_compute's return value: `All`, `Things`, `Stuff` ({pq, sq, rq, n},
    fractions) and `per_class` ({category_id: {pq, sq, rq}})."""
    results = {}
    for name, isthing in (("All", None), ("Things", True), ("Stuff", False)):
      results[name], per_class = self._average(isthing)
      if name == "All":
        results["per_class"] = per_class
    return results


def format_pq_table(result: Mapping[str, Any]) -> str:
  """panopticapi's table: PQ, SQ, RQ (percent) and N for All/Things/Stuff."""
  lines = ["{:10s}| {:>5s}  {:>5s}  {:>5s} {:>5s}".format(
      "", "PQ", "SQ", "RQ", "N"), "-" * (10 + 7 * 4)]
  for name in ("All", "Things", "Stuff"):
    row = result[name]
    lines.append("{:10s}| {:5.1f}  {:5.1f}  {:5.1f} {:5d}".format(
        name, 100 * row["pq"], 100 * row["sq"], 100 * row["rq"], row["n"]))
  return "\n".join(lines)


# ---------------------------------------------------------------------------
# Files: COCO panoptic JSON + PNG folders, over worker processes.

_worker_state: dict[str, Any] = {}


def _init_worker(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                 categories: dict[int, Mapping[str, Any]], gt_folder: str,
                 pred_folder: str) -> None:
  """Pool initializer: the inputs, once per process (inherited, not pickled,
  under fork), so that tasks are just lists of image indices."""
  _worker_state.update(pairs=pairs, categories=categories, gt_folder=gt_folder,
                       pred_folder=pred_folder)


def _evaluate_indices(indices: Sequence[int]) -> tuple[Any, ...]:
  """Pool task: scores the worker's pairs at `indices`."""
  state = _worker_state
  return _evaluate_pairs([state["pairs"][i] for i in indices],
                         state["categories"], state["gt_folder"],
                         state["pred_folder"])


def _evaluate_pairs(pairs: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]],
                    categories: dict[int, Mapping[str, Any]], gt_folder: str,
                    pred_folder: str) -> tuple[Any, ...]:
  """Reads and scores (gt, pred) annotations; returns the summed counts."""
  accumulator = PQAccumulator(categories)
  fast = fast_png_decoder() is not None
  for gt_ann, pred_ann in pairs:
    image_id = gt_ann["image_id"]
    gt_path = os.path.join(gt_folder, gt_ann["file_name"])
    pred_path = os.path.join(pred_folder, pred_ann["file_name"])
    gt_ids, gt_shape = _png_ids(gt_path, "gt_ids", fast)  # [N]
    pred_ids, pred_shape = _png_ids(pred_path, "pred_ids", fast)  # [N]
    if gt_shape != pred_shape:
      raise PanopticFormatError(
          f"In the image with ID {image_id} the ground truth {gt_path} "
          f"{gt_shape} and the prediction {pred_path} {pred_shape} "
          f"differ in size.")
    try:
      accumulator._add_flat(gt_ids, gt_ann["segments_info"], pred_ids,  # pylint: disable=protected-access
                            pred_ann["segments_info"], image_id)
    except PanopticFormatError as e:
      raise PanopticFormatError(f"{e} (prediction file {pred_path})") from None
  return (accumulator.iou, accumulator.tp, accumulator.fp, accumulator.fn,
          accumulator.num_images)


def load_json(source: str | os.PathLike[str] | Mapping[str, Any]
               ) -> Mapping[str, Any]:
  """A JSON file's content, or the dict itself."""
  if isinstance(source, Mapping):
    return source
  with open(source) as f:
    return json.load(f)


def _default_context() -> multiprocessing.context.BaseContext:
  """fork when safe (fast start); forkserver once JAX/TF threads exist."""
  if ("fork" in multiprocessing.get_all_start_methods()
      and not any(m in sys.modules for m in ("jax", "tensorflow", "torch"))):
    return multiprocessing.get_context("fork")
  return multiprocessing.get_context("forkserver" if "forkserver" in
                                     multiprocessing.get_all_start_methods()
                                     else "spawn")


def pq_compute_files(
    gt_json: str | os.PathLike[str] | Mapping[str, Any],
    gt_folder: str | os.PathLike[str] | None,
    pred_json: str | os.PathLike[str] | Mapping[str, Any],
    pred_folder: str | os.PathLike[str] | None,
    num_workers: int | None = None,
    mp_context: str | None = None,
) -> dict[str, Any]:
  """PQ of a COCO panoptic prediction (JSON + PNG folder), like pq_compute.

  Args:
    gt_json: ground-truth panoptic JSON path (or its loaded dict).
    gt_folder: ground-truth PNG folder; None: the JSON path without ".json".
    pred_json: predicted panoptic JSON path (or its loaded dict).
    pred_folder: predicted PNG folder; None: the JSON path without ".json".
    num_workers: processes; None: the CPUs this process may use; 1: inline.
    mp_context: multiprocessing start method ("fork", "forkserver",
      "spawn"); None: fork, or forkserver once JAX / TensorFlow are imported
      (forking a process that runs their threads can deadlock).

  Returns:
    pq_compute's result dict (see `PQAccumulator.result`).
  """
  gt = load_json(gt_json)
  pred = load_json(pred_json)
  gt_folder = _default_folder(gt_folder, gt_json, "gt_folder")
  pred_folder = _default_folder(pred_folder, pred_json, "pred_folder")
  for folder, what in ((gt_folder, "ground truth"), (pred_folder, "predicted")):
    if not os.path.isdir(folder):
      raise FileNotFoundError(
          f"Folder {folder} with {what} segmentations doesn't exist")
  categories = _categories_dict(gt["categories"])
  pred_by_image = {a["image_id"]: a for a in pred["annotations"]}
  pairs = []
  for gt_ann in gt["annotations"]:
    if gt_ann["image_id"] not in pred_by_image:
      raise PanopticFormatError(
          f"no prediction for the image with id: {gt_ann['image_id']} "
          f"(in {pred_json if not isinstance(pred_json, Mapping) else 'pred_json'})")
    pairs.append((gt_ann, pred_by_image[gt_ann["image_id"]]))

  if num_workers is None:
    num_workers = len(os.sched_getaffinity(0)) if hasattr(
        os, "sched_getaffinity") else (os.cpu_count() or 1)
  num_workers = max(1, min(num_workers, len(pairs)))
  accumulator = PQAccumulator(categories)
  fast_png_decoder()  # imported once here, inherited by forked workers
  if num_workers == 1:
    chunk_counts = [_evaluate_pairs(pairs, categories, gt_folder, pred_folder)]
  else:
    # A few interleaved chunks per worker balance the load.
    num_chunks = min(len(pairs), 4 * num_workers)
    chunks = [list(range(i, len(pairs), num_chunks)) for i in range(num_chunks)]
    context = (multiprocessing.get_context(mp_context) if mp_context
               else _default_context())
    with context.Pool(num_workers, _init_worker,
                      (pairs, categories, gt_folder, pred_folder)) as pool:
      chunk_counts = pool.map(_evaluate_indices, chunks, chunksize=1)
      pool.close()
      pool.join()
  for iou, tp, fp, fn, num_images in chunk_counts:
    accumulator.iou += iou
    accumulator.tp += tp
    accumulator.fp += fp
    accumulator.fn += fn
    accumulator.num_images += num_images
  return accumulator.result()


def _default_folder(folder: str | os.PathLike[str] | None,
                    json_source: Any, flag: str) -> str:
  """pq_compute's default: the JSON path without its ".json"."""
  if folder is not None:
    return os.fspath(folder)
  if isinstance(json_source, Mapping):
    raise ValueError(f"{flag} is required when the JSON is given as a dict")
  return os.fspath(json_source).replace(".json", "")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """CLI: prints the PQ table and writes the result dict as JSON."""
  parser = argparse.ArgumentParser(
      description="Panoptic quality, identical to panopticapi's pq_compute.")
  parser.add_argument("--gt_json", required=True,
                      help="COCO panoptic ground-truth JSON")
  parser.add_argument("--gt_folder", default=None,
                      help="ground-truth PNG folder (default: gt_json minus .json)")
  parser.add_argument("--pred_json", required=True,
                      help="COCO panoptic prediction JSON")
  parser.add_argument("--pred_folder", default=None,
                      help="predicted PNG folder (default: pred_json minus .json)")
  parser.add_argument("--output", default=None,
                      help="write the result dict to this JSON file")
  parser.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: all usable CPUs)")
  args = parser.parse_args(argv)
  start = time.time()
  result = pq_compute_files(args.gt_json, args.gt_folder, args.pred_json,
                            args.pred_folder, num_workers=args.workers)
  print(format_pq_table(result))
  print(f"Time elapsed: {time.time() - start:0.2f} seconds")
  if args.output:
    parent = os.path.dirname(args.output)
    if parent:
      os.makedirs(parent, exist_ok=True)
    with open(args.output, "w") as f:
      json.dump(result, f, indent=1)
  return result


def cli(argv: Sequence[str] | None = None) -> None:
  """`python -m ciae_jax.evaluation.pq` and the console script `ciae-pq` (pyproject.toml).

  A bad input exits with status 1 and one line naming it (no traceback); `main` returns the
  result dict for callers in Python, which a console script would take for an exit status.
  """
  try:
    main(argv)
  except (PanopticFormatError, FileNotFoundError) as error:
    sys.exit(f"pq: error: {error}")


if __name__ == "__main__":
  cli()
