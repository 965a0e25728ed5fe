"""Run-length counting of two panoptic id maps, the core of PQ (`pq_counts`, `pq`).

Instead of panopticapi's per-pixel sorts and per-pair Python loop: one pass finds the runs (in
row-major order) over which both the gt and the predicted id are constant, segment ids are
mapped to compact labels on the run starts only (a 16-bit direct-mapped table, sorted search
on a slot clash), and `np.bincount` weighted by run lengths gives the [gt, pred] intersection
matrix, whose non-zero entries `pq_counts.PQAccumulator` matches and counts.

The underscored names are private to the PQ modules of this package (`pq_counts`, `pq`).
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np

VOID = 0
# Compact labels: 0 = id not listed in the JSON, 1 = VOID, 2 + k = segment k.
_UNLISTED, _VOID_LABEL, _FIRST_SEGMENT = 0, 1, 2
# Slots of the table that maps ids to compact labels (by their low bits).
_HASH_SIZE = 1 << 16


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
