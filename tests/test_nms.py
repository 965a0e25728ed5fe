"""Class-wise NMS of ciae_jax.inference against a greedy NumPy reference written here."""
import functools

import jax
import numpy as np
import pytest

from ciae_jax import detection


def reference_iou(box_a: np.ndarray, box_b: np.ndarray) -> float:
  """IoU of two (x0, y0, x1, y1) boxes, plain Python floats."""
  inter_w = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
  inter_h = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
  inter = inter_w * inter_h
  area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
  area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
  return inter / max(area_a + area_b - inter, 1e-12)


def reference_nms(boxes, scores, classes, valid, thresh, max_detections):
  """Textbook greedy NMS per class: visit by score (stable order), keep, suppress later ones."""
  order = [i for i in np.argsort(-scores, kind="stable") if valid[i]]
  suppressed = set()
  keep = []
  for position, i in enumerate(order):
    if i in suppressed:
      continue
    keep.append(int(i))
    for j in order[position + 1:]:
      if classes[j] == classes[i] and reference_iou(boxes[i], boxes[j]) > thresh:
        suppressed.add(j)
  return keep[:max_detections]


def random_problem(rng: np.random.Generator, num_boxes: int):
  """Clustered boxes (so that NMS suppresses), scores with many exact ties, 3 classes."""
  centers = rng.uniform(10, 90, size=(5, 2))[rng.integers(0, 5, num_boxes)]
  centers += rng.normal(0, 4, size=(num_boxes, 2))
  sizes = rng.uniform(8, 30, size=(num_boxes, 2))
  boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], axis=1)
  boxes[5] = boxes[4]  # an exact duplicate
  scores = np.round(rng.uniform(0, 1, num_boxes), 1)  # ties in score
  classes = rng.integers(0, 3, num_boxes)
  valid = rng.uniform(size=num_boxes) > 0.15
  return (boxes.astype(np.float32), scores.astype(np.float32), classes.astype(np.int32), valid)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("max_detections", [4, 40])
def test_nms_matches_greedy_reference(seed, max_detections):
  boxes, scores, classes, valid = random_problem(np.random.default_rng(seed), 48)
  nms = jax.jit(functools.partial(detection.class_nms, nms_thresh=0.5,
                                  max_detections=max_detections))
  keep, keep_valid = map(np.asarray, nms(boxes, scores, classes, valid))
  expected = reference_nms(boxes, scores, classes, valid, 0.5, max_detections)
  assert keep.shape == (max_detections,)
  assert keep_valid.sum() == len(expected)
  np.testing.assert_array_equal(keep[keep_valid], expected)
  # Valid slots come first; the padding slots are marked invalid.
  assert not keep_valid[len(expected):].any()
  if max_detections == 40:
    assert len(expected) < 40, "the problem should leave padding slots"


def test_nms_is_class_wise_and_strict():
  boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 6], [0, 0, 10, 5]], np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6], np.float32)
  classes = np.array([0, 1, 0, 0], np.int32)
  valid = np.ones(4, bool)
  keep, keep_valid = detection.class_nms(boxes, scores, classes, valid, nms_thresh=0.5,
                                         max_detections=4)
  # Box 1 survives (other class); IoU(0, 2) = 0.6 > 0.5 suppressed; IoU(0, 3) = 0.5, kept.
  np.testing.assert_array_equal(np.asarray(keep)[np.asarray(keep_valid)], [0, 1, 3])


def test_nms_vmaps_over_images():
  problems = [random_problem(np.random.default_rng(seed), 32) for seed in (3, 4)]
  stacked = [np.stack(parts) for parts in zip(*problems)]
  nms = functools.partial(detection.class_nms, nms_thresh=0.6, max_detections=10)
  keep, keep_valid = jax.vmap(nms)(*stacked)
  for image, problem in enumerate(problems):
    expected = reference_nms(*problem, 0.6, 10)
    np.testing.assert_array_equal(np.asarray(keep[image])[np.asarray(keep_valid[image])],
                                  expected)
