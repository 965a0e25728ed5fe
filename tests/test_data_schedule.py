"""The host plan of the input (NumPy only): buckets, per-bucket streams, augmentation, resume."""
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.data import canvas
from ciae_jax.data import schedule

HP = hparams.DatasetHParams(canvas_sizes=((256, 384), (384, 256), (288, 288)),
                            train_min_size_range=(160, 224), max_size=384,
                            eval_min_size=192, eval_max_size=320)
G = 8


def _sizes(num, seed=0):
  """Original sizes: landscape, portrait and square-ish images."""
  rng = np.random.default_rng(seed)
  short = rng.integers(200, 480, num)  # [n]
  ratio = rng.choice([1.6, 1.0 / 1.6, 1.05], num)  # width / height
  return np.stack([short * np.maximum(1, 1 / ratio),
                   short * np.maximum(1, ratio)], 1).astype(np.int64)  # [n, 2]


def _assert_same(a, b):
  assert (a.index, a.bucket, a.canvas) == (b.index, b.bucket, b.canvas)
  for field in ("positions", "records", "sizes", "flips", "valid"):
    np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


def test_train_plan_is_a_pure_function_of_seed_and_batch_index():
  sizes = _sizes(50)
  plan = schedule.TrainSchedule(sizes, HP, seed=4, global_batch_size=G)
  again = schedule.TrainSchedule(sizes, HP, seed=4, global_batch_size=G)
  # Sequential from 0 == random access == sequential from a later start, also across a
  # chunk of bucket draws (BUCKET_CHUNK = 1024).
  sequential = [p for _, p in zip(range(1100), plan.plans(0))]
  for b in (0, 1, 7, 999, 1023, 1024, 1099):
    _assert_same(sequential[b], again.plan(b))
  resumed = again.plans(1020)
  for b in range(1020, 1030):
    _assert_same(next(resumed), sequential[b])
  other = schedule.TrainSchedule(sizes, HP, seed=5, global_batch_size=G)
  assert any(not np.array_equal(other.plan(b).records, sequential[b].records) for b in range(5))


def test_every_batch_is_one_bucket_and_its_sizes_fit_that_canvas():
  sizes = _sizes(60)
  plan = schedule.TrainSchedule(sizes, HP, seed=1, global_batch_size=G)
  options = canvas.canvases(HP)
  seen = set()
  for p in (plan.plan(b) for b in range(200)):
    seen.add(p.bucket)
    assert p.canvas == options[p.bucket]
    np.testing.assert_array_equal(p.positions, p.index * G + np.arange(G))
    assert p.valid.all()
    for record, (h, w) in zip(p.records, p.sizes):
      # Each image's bucket: the canvas of its size at the largest training size.
      at_largest = canvas.resized_shape(*sizes[record], min_size=224, max_size=384)
      assert canvas.canvas_for(at_largest, options) == p.bucket
      assert h <= p.canvas[0] and w <= p.canvas[1]
  assert seen == {0, 1, 2}


def test_each_bucket_streams_seeded_permutations_and_images_are_seen_evenly():
  sizes = _sizes(40)
  plan = schedule.TrainSchedule(sizes, HP, seed=2, global_batch_size=G)
  batches = [p for _, p in zip(range(3000), plan.plans(0))]
  for k in plan.buckets:
    stream = np.concatenate([p.records for p in batches if p.bucket == k])
    n = plan.counts[k]
    epochs = len(stream) // n
    expected = np.concatenate([plan.members[k][schedule.epoch_permutation(2, e, n, k)]
                               for e in range(epochs)])
    np.testing.assert_array_equal(stream[:epochs * n], expected)
  # Bucket probabilities follow the image counts: every image at the same average rate.
  seen = np.bincount(np.concatenate([p.records for p in batches]), minlength=len(sizes))
  rate = seen / (3000 * G / len(sizes))
  assert abs(rate.mean() - 1) < 1e-9 and rate.min() > 0.9 and rate.max() < 1.1, rate


def test_an_empty_bucket_is_never_drawn():
  landscape = np.tile([[300, 450]], (10, 1))
  plan = schedule.TrainSchedule(landscape, HP, seed=0, global_batch_size=G)
  assert plan.buckets == [0]
  assert {plan.bucket_of(b) for b in range(2000)} == {0}
  np.testing.assert_array_equal(plan.batches_before(1500), [1500, 0, 0])


def test_augmentation_is_drawn_per_position_and_flip_off_keeps_the_sizes():
  shorts, flips = schedule.augmentation(3, 17, 64, (160, 224), True)
  assert shorts.min() >= 160 and shorts.max() <= 224 and len(set(shorts)) > 10
  assert 0 < flips.sum() < 64
  shorts_off, flips_off = schedule.augmentation(3, 17, 64, (160, 224), False)
  np.testing.assert_array_equal(shorts_off, shorts)
  assert not flips_off.any()
  other, _ = schedule.augmentation(3, 18, 64, (160, 224), True)
  assert not np.array_equal(other, shorts)
  sizes = _sizes(30)
  plan = schedule.TrainSchedule(sizes, HP, seed=3, global_batch_size=G).plan(5)
  shorts, flips = schedule.augmentation(3, 5, G, (160, 224), True)
  np.testing.assert_array_equal(plan.flips, flips)
  for record, short, size in zip(plan.records, shorts, plan.sizes):
    expected = canvas.fit_to_canvas(
        canvas.resized_shape(*sizes[record], min_size=short, max_size=384), plan.canvas)
    assert tuple(size) == expected


def test_eval_covers_each_image_once_grouped_by_canvas_with_padding_per_bucket():
  sizes = _sizes(45)
  plan = schedule.EvalSchedule(sizes, HP, global_batch_size=G)
  plans = list(plan.plans())
  assert [p.index for p in plans] == list(range(len(plan)))
  buckets = [p.bucket for p in plans]
  assert buckets == sorted(buckets) and set(buckets) == {0, 1, 2}
  valid = np.concatenate([p.records[p.valid] for p in plans])
  assert sorted(valid) == list(range(45))  # Each once.
  for k in set(buckets):
    mine = [p for p in plans if p.bucket == k]
    assert all(p.valid.all() for p in mine[:-1])  # Only a bucket's last batch is filled.
    last = mine[-1]
    assert last.valid[0] and np.all(np.diff(last.valid.astype(int)) <= 0)
    np.testing.assert_array_equal(last.records[~last.valid], last.records[last.valid][-1])
    ids = np.concatenate([p.records[p.valid] for p in mine])
    assert list(ids) == sorted(ids)  # By image id within a bucket.
    for p in mine:
      for record, size in zip(p.records, p.sizes):
        assert canvas.place(*sizes[record], min_size=192, max_size=320,
                            options=canvas.canvases(HP)) == (k, tuple(size))
  assert not any(p.flips.any() for p in plans)


def test_host_rows_and_errors():
  plan = schedule.TrainSchedule(_sizes(20), HP, seed=0, global_batch_size=G).plan(3)
  half = plan.rows(4, 4)
  np.testing.assert_array_equal(half.positions, plan.positions[4:])
  np.testing.assert_array_equal(half.sizes, plan.sizes[4:])
  assert (half.bucket, half.canvas, half.index) == (plan.bucket, plan.canvas, 3)
  with pytest.raises(ValueError, match="no training images"):
    schedule.TrainSchedule(np.zeros((0, 2)), HP, seed=0, global_batch_size=G)
  assert not len(schedule.EvalSchedule(np.zeros((0, 2)), HP, global_batch_size=G))
