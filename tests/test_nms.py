"""Class-wise NMS against a greedy NumPy reference written here: the plain loop
(`detection.class_nms` on CPU) and the accelerator fixed point (`fast_paths.nms`, run here on
CPU directly) give the same survivors, slot for slot; the program lowered for cuda holds the
fixed point, not the `max_detections` steps of the loop."""
import functools

import jax
import lowered_loops
import numpy as np
import pytest

from ciae_jax.fast_paths import nms
from ciae_jax.inference import detection


def reference_iou(box_a: np.ndarray, box_b: np.ndarray) -> float:
  """IoU of two (x0, y0, x1, y1) boxes, plain Python floats."""
  inter_w = max(0.0, min(box_a[2], box_b[2]) - max(box_a[0], box_b[0]))
  inter_h = max(0.0, min(box_a[3], box_b[3]) - max(box_a[1], box_b[1]))
  inter = inter_w * inter_h
  area_a = (box_a[2] - box_a[0]) * (box_a[3] - box_a[1])
  area_b = (box_b[2] - box_b[0]) * (box_b[3] - box_b[1])
  return inter / max(area_a + area_b - inter, 1e-12)


def reference_nms(boxes, scores, classes, valid, thresh, max_detections):
  """Textbook greedy NMS per class: visit by score (stable order), keep, suppress later ones.

  A score of -inf marks an invalid candidate (as `detection.decode_detections` writes them).
  """
  order = [i for i in np.argsort(-scores, kind="stable") if valid[i] and scores[i] > -np.inf]
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


def check_paths_agree(problem, nms_thresh, max_detections):
  """The loop, the fixed point and the reference: the same survivors; both paths the same slots
  (empty ones included, index 0)."""
  kwargs = dict(nms_thresh=nms_thresh, max_detections=max_detections)
  loop = jax.device_get(jax.jit(functools.partial(detection.class_nms, **kwargs))(*problem))
  fast = jax.device_get(jax.jit(functools.partial(nms.class_nms_fixed_point, **kwargs))(
      *problem))
  expected = reference_nms(*problem, nms_thresh, max_detections)
  for keep, keep_valid in (loop, fast):
    assert keep.shape == keep_valid.shape == (max_detections,)
    np.testing.assert_array_equal(keep[:len(expected)], expected)
    np.testing.assert_array_equal(keep_valid, np.arange(max_detections) < len(expected))
  np.testing.assert_array_equal(fast[0], loop[0])
  return expected


def problem_with(seed, num_boxes, num_classes=3, score_step=0.1):
  boxes, _, _, valid = random_problem(np.random.default_rng(seed), max(num_boxes, 6))
  rng = np.random.default_rng(seed + 100)
  scores = np.round(rng.uniform(0, 1, len(boxes)) / score_step) * score_step  # ties
  classes = rng.integers(0, num_classes, len(boxes))
  problem = (boxes, scores.astype(np.float32), classes.astype(np.int32), valid)
  return tuple(part[:num_boxes] for part in problem)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("num_boxes, num_classes, score_step, max_detections", [
    (1, 1, 0.1, 3),  # one candidate, more slots than candidates
    (2, 1, 0.5, 2),
    (7, 2, 0.5, 10),
    (48, 3, 0.1, 4),  # more survivors than slots
    (48, 3, 0.1, 40),  # fewer survivors than slots
    (300, 60, 0.01, 100),  # many classes
    (300, 1, 0.25, 30),  # one class, four score values
])
def test_fixed_point_equals_loop_and_reference(seed, num_boxes, num_classes, score_step,
                                               max_detections):
  problem = problem_with(seed, num_boxes, num_classes, score_step)
  check_paths_agree(problem, 0.5, max_detections)


def test_fixed_point_with_equal_scores_duplicates_and_invalid_boxes():
  boxes, _, classes, valid = random_problem(np.random.default_rng(7), 64)
  boxes[32:], classes[32:] = boxes[:32], classes[:32]  # every candidate twice
  scores = np.full(64, 0.5, np.float32)  # one score: index order decides
  scores[3], scores[4] = 0.0, -0.0  # the loop's argmax ties +0 and -0
  scores[9] = -np.inf  # valid but never kept
  valid[40:44] = False
  expected = check_paths_agree((boxes, scores, classes, valid), 0.5, 64)
  assert 9 not in expected and not set(range(40, 44)) & set(expected)
  assert not {i + 32 for i in expected} & set(expected), "a duplicate of a kept box survived"
  nothing = (boxes, scores, classes, np.zeros(64, bool))
  assert check_paths_agree(nothing, 0.5, 5) == []


def test_fixed_point_vmaps_over_images():
  problems = [problem_with(seed, 40) for seed in (3, 4)]
  stacked = [np.stack(parts) for parts in zip(*problems)]
  fast = functools.partial(nms.class_nms_fixed_point, nms_thresh=0.6, max_detections=12)
  keep, keep_valid = jax.vmap(fast)(*stacked)
  for image, problem in enumerate(problems):
    expected = reference_nms(*problem, 0.6, 12)
    np.testing.assert_array_equal(np.asarray(keep[image])[np.asarray(keep_valid[image])],
                                  expected)


def test_iou_matrix_rows_are_the_loops_iou():
  boxes = random_problem(np.random.default_rng(8), 50)[0]
  matrix = np.asarray(jax.jit(nms.box_iou_matrix)(boxes))
  rows = np.asarray(jax.jit(jax.vmap(detection.box_iou_one_to_many, (0, None)))(boxes, boxes))
  np.testing.assert_array_equal(matrix, rows)


def clustered_candidates(rng, num_boxes=5000, num_objects=50, num_classes=5):
  """FCOS-like candidates in an 800 x 1344 image: boxes jittered by 10% of their size around
  50 objects, mostly of the object's class (20% of another), scores uniform."""
  size = rng.uniform(20, 300, (num_objects, 2))
  centre = rng.uniform([0, 0], [1344, 800], (num_objects, 2))
  obj = rng.integers(0, num_objects, num_boxes)
  half = np.concatenate([-size[obj], size[obj]], axis=1) / 2
  boxes = np.tile(centre[obj], 2) + half + rng.normal(0, 0.1, (num_boxes, 4)) * np.tile(
      size[obj], 2)
  boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
  classes = rng.integers(0, num_classes, num_objects)[obj]
  classes = np.where(rng.uniform(size=num_boxes) < 0.2, rng.integers(0, num_classes, num_boxes),
                     classes)
  return (boxes.astype(np.float32), rng.uniform(0, 1, num_boxes).astype(np.float32),
          classes.astype(np.int32), np.ones(num_boxes, bool))


def test_fixed_point_steps_on_clustered_candidates():
  """The figure recorded in `fast_paths.nms` (2-6 steps at K = 100, 6-9 until all settle)."""
  problem = clustered_candidates(np.random.default_rng(0))
  steps = {}
  for max_detections in (100, 5000):
    fast = functools.partial(nms.class_nms_fixed_point, nms_thresh=0.6,
                             max_detections=max_detections, return_steps=True)
    keep, keep_valid, steps[max_detections] = jax.device_get(jax.jit(fast)(*problem))
    if max_detections == 100:  # The loop (the plain path on CPU); the reference is too slow.
      loop = functools.partial(detection.class_nms, nms_thresh=0.6, max_detections=100)
      np.testing.assert_array_equal(keep, jax.jit(loop)(*problem)[0])
      assert keep_valid.all()
  assert 2 <= steps[100] <= 6 and steps[100] < steps[5000] <= 9, steps


def test_cuda_program_holds_the_fixed_point_and_cpu_the_loop():
  problem = problem_with(0, 50)
  nms_fn = functools.partial(detection.class_nms, nms_thresh=0.5, max_detections=37)
  text = {platform: lowered_loops.lowered_text(nms_fn, *problem, platform=platform)
          for platform in ("cpu", "cuda")}
  assert lowered_loops.static_trip_counts(text["cpu"]) == [37]
  assert lowered_loops.num_loops(text["cpu"]) == 1
  assert lowered_loops.static_trip_counts(text["cuda"]) == []
  assert lowered_loops.num_loops(text["cuda"]) == 1  # the fixed point
  assert "tensor<50x50xi1>" in text["cuda"]  # its suppression matrix
