"""Canvas buckets through the tf.data pipeline: landscape and portrait copies of the COCO sample.

Every batch is one canvas and equals the host plan (`data/schedule.py`): the records, the
jittered size and the flip the graph applied (checked against the NumPy reference); training
resumes exactly and splits over hosts across buckets; evaluation covers each image once,
grouped by canvas, each bucket's last batch filled with blank rows.
"""
import shutil

import jax
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.data import canvas
from ciae_jax.data import coco
from ciae_jax.data import pipeline
from ciae_jax.data import schedule
from test_data_helpers import check_example
from test_data_helpers import decoded_by_id
from test_data_helpers import flat
from test_data_helpers import make_dataset
from test_data_helpers import row
from test_data_helpers import take
from test_data_helpers import tiny_config

NUM_IMAGES = 12
PORTRAIT = (2, 5, 6, 9)  # Two copies of each sample image, transposed.
G = 8  # One row per fake device.
# Derived canvases: (224, 384) and (384, 224) for shorter sides up to 224, longer up to 384.
CANVASES = ((224, 384), (384, 224))


@pytest.fixture(scope="module")
def data_root(coco_sample_root, tmp_path_factory):
  return make_dataset(coco_sample_root, tmp_path_factory.mktemp("buckets"), NUM_IMAGES,
                      portrait_ids=PORTRAIT)


def _config(root, **overrides):
  return tiny_config(root, canvas_sizes=(), **overrides)


def _train(cfg, *, seed, start_step=0, num):
  return take(pipeline.build_input(cfg, "val2017", train=True, global_batch_size=G, seed=seed,
                                   start_step=start_step), num)


def _plan(root, cfg, seed):
  sizes = np.asarray([[r.height, r.width] for r in coco.load_records(root, "val2017")])
  return schedule.TrainSchedule(sizes, cfg, seed=seed, global_batch_size=G)


def test_every_batch_is_one_canvas_with_the_host_decided_sizes_and_flips(data_root):
  cfg = _config(data_root)
  assert canvas.canvases(cfg) == CANVASES
  plan = _plan(data_root, cfg, seed=3)
  decoded = decoded_by_id(data_root)
  flips = []
  buckets = set()
  for b, batch in enumerate(_train(cfg, seed=3, num=6)):
    expected = plan.plan(b)
    buckets.add(expected.bucket)
    assert batch["image"].shape[1:3] == expected.canvas
    np.testing.assert_array_equal(batch["image_id"], expected.records + 1)  # Ids 1..12.
    np.testing.assert_array_equal(batch["image_size"], expected.sizes)
    portrait = np.isin(batch["image_id"], PORTRAIT)
    assert portrait.all() or not portrait.any()
    for i in range(G):
      flipped = check_example(row(batch, i), decoded[int(batch["image_id"][i])],
                              size_range=(160, 224), max_size=384, canvas=expected.canvas,
                              max_segments=40)
      assert flipped == expected.flips[i]  # The graph applied the host's flip.
      flips.append(flipped)
  assert buckets == {0, 1} and 0 < sum(flips) < len(flips)


def test_resume_is_exact_across_buckets(data_root):
  cfg = _config(data_root)
  full = _train(cfg, seed=7, num=6)
  assert len({b["image"].shape for b in full}) == 2  # Both canvases among them.
  for start in (1, 4, 5):
    resumed = _train(cfg, seed=7, start_step=start, num=1)[0]
    for key in resumed:
      np.testing.assert_array_equal(resumed[key], full[start][key], err_msg=key)


def test_hosts_split_each_bucketed_global_batch(data_root, monkeypatch):
  cfg = _config(data_root)

  def two_batches():
    return take(pipeline.build_input(cfg, "val2017", train=True, global_batch_size=2 * G,
                                     seed=2), 2)

  single = two_batches()
  per_host = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda h=host: h)
    per_host.append(two_batches())
  for step in range(2):
    for key in ("image_id", "image_size", "segment_map", "seg_box", "image"):
      joined = np.concatenate([per_host[0][step][key], per_host[1][step][key]])
      np.testing.assert_array_equal(joined, single[step][key], err_msg=key)


def test_eval_covers_each_image_once_grouped_by_canvas(data_root):
  cfg = _config(data_root)
  decoded = decoded_by_id(data_root)
  batches = [flat(b) for b in pipeline.build_input(cfg, "val2017", train=False,
                                                   global_batch_size=G, seed=0)]
  # 8 landscape images: one full batch on (224, 384); 4 portrait: one batch on (384, 224)
  # with 4 blank rows.
  assert [b["image"].shape[1:3] for b in batches] == list(CANVASES)
  landscape = [i for i in range(1, NUM_IMAGES + 1) if i not in PORTRAIT]
  np.testing.assert_array_equal(batches[0]["image_id"], landscape)
  assert batches[0]["example_valid"].all()
  last = batches[1]
  np.testing.assert_array_equal(last["example_valid"], np.arange(G) < len(PORTRAIT))
  np.testing.assert_array_equal(last["image_id"], [*PORTRAIT, -1, -1, -1, -1])
  for key in ("image", "segment_map", "seg_valid", "image_size", "orig_size"):
    assert not last[key][len(PORTRAIT):].any(), key
  for batch, canvas_hw in zip(batches, CANVASES):
    for i in np.flatnonzero(batch["example_valid"]):
      out = row(batch, i)
      assert not check_example(out, decoded[int(out["image_id"])], size_range=(192, 192),
                               max_size=320, canvas=canvas_hw, max_segments=40)


def test_a_bad_image_in_a_later_bucket_is_named(data_root, tmp_path):
  root = tmp_path / "broken"
  shutil.copytree(data_root, root)
  bad = PORTRAIT[1]
  (root / "val2017" / f"{bad:012d}.jpg").write_bytes(b"not a JPEG" * 40)
  cfg = _config(root)
  first_bad = next(b for b in range(50) if bad - 1 in _plan(root, cfg, 0).plan(b).records)
  batches = pipeline.build_input(cfg, "val2017", train=True, global_batch_size=G, seed=0)
  for _ in range(first_bad):
    next(batches)  # The batches before it decode.
  with pytest.raises(ValueError, match=f"{bad:012d}.jpg.*image id {bad}"):
    next(batches)


def test_padding_on_the_coco_sample_at_the_papers_sizes(coco_sample_root):
  cfg = hparams.DatasetHParams(root=str(coco_sample_root), train_split="val2017",
                               val_split="val2017")
  assert canvas.canvases(cfg) == ((800, 1344), (1344, 800))
  batch = flat(next(pipeline.build_input(cfg, "val2017", train=False, global_batch_size=G,
                                         seed=0)))
  valid = batch["example_valid"]
  assert valid.sum() == 2 and batch["image"].shape[1:3] == (800, 1344)
  ratios = 800 * 1344 / batch["image_size"][valid].prod(-1)
  assert ratios.mean() <= 1.15, ratios  # 1.098: (800 x 1199) and (750 x 1333) on 800 x 1344.
  # Training at the paper's fixed shorter side pads the same; over the plan of 100 batches.
  sizes = np.asarray([[r.height, r.width] for r in coco.load_records(coco_sample_root,
                                                                     "val2017")])
  plans = schedule.TrainSchedule(sizes, cfg, seed=0, global_batch_size=16).plans(0)
  train = [p.canvas[0] * p.canvas[1] / np.prod(s) for _, p in zip(range(100), plans)
           for s in p.sizes]
  assert np.mean(train) <= 1.15
