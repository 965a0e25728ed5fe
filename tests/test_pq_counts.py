"""PQ statistics that add up across processes: per-image counts and saved accumulator states."""
import json

import numpy as np

from ciae_jax.evaluation import pq_counts as pq_lib

CATEGORIES = [{"id": 1, "isthing": 0}, {"id": 2, "isthing": 1}, {"id": 5, "isthing": 1}]


def _image(seed):
  """A ground truth and a perturbed prediction of one 24 x 32 image."""
  rng = np.random.default_rng(seed)
  gt = np.zeros((24, 32), np.int64)
  gt[:12] = 10
  gt[12:, :16] = 11
  gt[12:, 16:] = 12
  pred = gt.copy()
  pred[rng.integers(0, 24, 40), rng.integers(0, 32, 40)] = 0
  pred[:4, :4] = 13
  gt_segments = [{"id": 10, "category_id": 1}, {"id": 11, "category_id": 2},
                 {"id": 12, "category_id": 5, "iscrowd": int(seed % 2)}]
  pred_segments = [{"id": 10, "category_id": 1}, {"id": 11, "category_id": 2},
                   {"id": 12, "category_id": 5}, {"id": 13, "category_id": 2}]
  return gt, gt_segments, pred, pred_segments


def test_counts_sent_as_json_and_added_in_order_equal_add():
  images = [_image(seed) for seed in range(6)]
  direct = pq_lib.PQAccumulator(CATEGORIES)
  for image in images:
    direct.add(*image)
  # Two "hosts" count their images, the counts travel as JSON, one process adds them in order.
  counter = pq_lib.PQAccumulator(CATEGORIES)
  sent = [json.dumps(counter.image_counts(*image).to_dict()) for image in images]
  combined = pq_lib.PQAccumulator(CATEGORIES)
  for payload in sent:
    combined.add_counts(pq_lib.ImageCounts.from_dict(json.loads(payload)))
  assert combined.result() == direct.result()
  np.testing.assert_array_equal(combined.iou, direct.iou)
  assert combined.num_images == direct.num_images == 6


def test_state_dict_round_trips_and_merges():
  images = [_image(seed) for seed in range(4)]
  first, second, both = (pq_lib.PQAccumulator(CATEGORIES) for _ in range(3))
  for index, image in enumerate(images):
    (first if index < 2 else second).add(*image)
    both.add(*image)
  state = json.loads(json.dumps(first.state_dict()))
  restored = pq_lib.PQAccumulator.from_state_dict(CATEGORIES, state)
  assert restored.state_dict() == first.state_dict()
  restored.merge(second)
  for key in ("tp", "fp", "fn"):
    np.testing.assert_array_equal(getattr(restored, key), getattr(both, key))
  np.testing.assert_allclose(restored.iou, both.iou, rtol=1e-15)  # Summed in another order.
