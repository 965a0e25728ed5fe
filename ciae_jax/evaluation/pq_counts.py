"""Panoptic quality (PQ, SQ, RQ) counts, numerically identical to panopticapi.

`panopticapi.evaluation.pq_compute` is the reference protocol (Kirillov et al.):
per image, a ground-truth segment and a predicted segment of the same category
match when IoU > 0.5, where the union leaves out the prediction's pixels on
VOID (gt id 0); gt crowd segments are never matched and never counted as false
negatives; an unmatched prediction is not a false positive when more than half
of it lies on VOID or on the crowd region of its own category. PQ/SQ/RQ are
averaged over the categories that have any TP, FP or FN, for All, Things and
Stuff. The ground-truth segment area is the JSON `area` (as in pq_compute),
the predicted one is counted in the PNG.

Differences from the reference, on input it handles badly:
  * a Things/Stuff group with no counted category gives 0 with `n = 0`
    (pq_compute divides by zero);
  * a segment id 0 in either JSON is rejected (0 is VOID in the PNG).

`PQAccumulator` counts id maps in memory (training's evaluation, the runner) through the
run-length counting of `pq_runs`; `pq` reads the COCO files and is the command line.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import numpy as np

from ciae_jax.evaluation.pq_runs import _FIRST_SEGMENT
from ciae_jax.evaluation.pq_runs import _UNLISTED
from ciae_jax.evaluation.pq_runs import _VOID_LABEL
from ciae_jax.evaluation.pq_runs import VOID
from ciae_jax.evaluation.pq_runs import _compact_labels
from ciae_jax.evaluation.pq_runs import _intersections
from ciae_jax.evaluation.pq_runs import _runs

OFFSET = 256 * 256 * 256


class PanopticFormatError(KeyError, ValueError):
  """Malformed prediction or ground truth (a KeyError as in pq_compute, and a
  ValueError for callers that catch bad input)."""

  def __str__(self) -> str:
    return str(self.args[0]) if self.args else ""



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
