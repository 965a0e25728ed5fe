"""tf.data pipeline on real COCO images: transforms, shapes, determinism, eval (one canvas).

Every output is compared with the independent NumPy reference of `test_data_helpers`; the
batches of several canvases are tested in `test_data_buckets.py`.
"""
import dataclasses
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.data import canvas
from ciae_jax.data import pipeline
from ciae_jax.data import schedule
from test_data_helpers import check_example
from test_data_helpers import decoded_by_id
from test_data_helpers import flat
from test_data_helpers import make_dataset
from test_data_helpers import ref_shape
from test_data_helpers import take
from test_data_helpers import tiny_config

NUM_IMAGES = 12


@pytest.fixture(scope="module")
def data_root(coco_sample_root, tmp_path_factory):
  return make_dataset(coco_sample_root, tmp_path_factory.mktemp("rep"),
                      NUM_IMAGES)


# ------------------------------------------------------------------ tests.


def test_batch_shapes_and_dtypes(data_root):
  assert jax.local_device_count() == 8
  cfg = tiny_config(data_root)
  batch = next(pipeline.build_input(cfg, "val2017", train=True,
                                    global_batch_size=16, seed=0))
  s = cfg.max_segments
  expected = {
      "image": ((8, 2, 256, 384, 3), np.float32),
      "segment_map": ((8, 2, 256, 384), np.int32),
      "seg_class": ((8, 2, s), np.int32),
      "seg_is_thing": ((8, 2, s), np.bool_),
      "seg_is_crowd": ((8, 2, s), np.bool_),
      "seg_box": ((8, 2, s, 4), np.float32),
      "seg_valid": ((8, 2, s), np.bool_),
      "image_id": ((8, 2), np.int32),
      "orig_size": ((8, 2, 2), np.int32),
      "image_size": ((8, 2, 2), np.int32),
      "example_valid": ((8, 2), np.bool_),
  }
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch["example_valid"].all()


def test_train_transforms_match_numpy_reference(data_root):
  cfg = tiny_config(data_root)
  decoded = decoded_by_id(data_root)
  flips = []
  for batch in take(pipeline.build_input(cfg, "val2017", train=True,
                                         global_batch_size=8, seed=3), 2):
    for i in range(8):
      out = {k: v[i] for k, v in batch.items()}
      flips.append(check_example(
          out, decoded[int(out["image_id"])], size_range=(160, 224),
          max_size=384, canvas=(256, 384), max_segments=40))
  assert 0 < sum(flips) < len(flips)  # Both branches were checked.
  sizes = {tuple(s) for b in [batch] for s in b["image_size"]}
  assert len(sizes) > 1  # The jitter varies the size.


def test_eval_shrink_to_fit(data_root):
  # 300 on the shorter side would not fit 128 x 256: shrunk, aspect kept.
  cfg = tiny_config(data_root, canvas_sizes=((128, 256),), eval_min_size=300,
                    eval_max_size=1000)
  decoded = decoded_by_id(data_root)
  batch = flat(next(pipeline.build_input(cfg, "val2017", train=False,
                                         global_batch_size=8, seed=0)))
  for i in range(8):
    out = {k: v[i] for k, v in batch.items()}
    assert not check_example(out, decoded[int(out["image_id"])],
                             size_range=(300, 300), max_size=1000,
                             canvas=(128, 256), max_segments=40)
    assert out["image_size"][0] == 128  # Height limited by the padding.


def test_vanishing_segments_become_invalid(data_root):
  # At about 24 x 36 pixels small segments lose all their pixels.
  cfg = tiny_config(data_root, canvas_sizes=((128, 128),), eval_min_size=24,
                    eval_max_size=40)
  decoded = decoded_by_id(data_root)
  batch = flat(next(pipeline.build_input(cfg, "val2017", train=False,
                                         global_batch_size=8, seed=0)))
  vanished = 0
  for i in range(2):
    out = {k: v[i] for k, v in batch.items()}
    ex = decoded[int(out["image_id"])]
    check_example(out, ex, size_range=(24, 24), max_size=40, canvas=(128, 128),
                  max_segments=40)
    vanished += len(ex["seg_class"]) - out["seg_valid"].sum()
  assert vanished > 0


def test_truncation_keeps_largest_segments(data_root):
  cfg = tiny_config(data_root, max_segments=10)
  decoded = decoded_by_id(data_root)
  batch = flat(next(pipeline.build_input(cfg, "val2017", train=False,
                                         global_batch_size=8, seed=0)))
  for i in range(2):
    out = {k: v[i] for k, v in batch.items()}
    check_example(out, decoded[int(out["image_id"])], size_range=(192, 192),
                  max_size=320, canvas=(256, 384), max_segments=10)
    assert out["seg_valid"].sum() <= 10


def test_flip_mirrors_and_flip_twice_is_identity(data_root):
  def run(flip):
    cfg = tiny_config(data_root, flip=flip)
    return take(pipeline.build_input(cfg, "val2017", train=True,
                                     global_batch_size=8, seed=5), 1)[0]
  plain, maybe = run(False), run(True)
  np.testing.assert_array_equal(plain["image_size"], maybe["image_size"])
  flipped = 0
  for i in range(8):
    nh, nw = plain["image_size"][i]
    a_map, b_map = plain["segment_map"][i, :nh, :nw], maybe["segment_map"][
        i, :nh, :nw]
    a_img, b_img = plain["image"][i, :nh, :nw], maybe["image"][i, :nh, :nw]
    if np.array_equal(a_map, b_map):
      np.testing.assert_array_equal(a_img, b_img)
      continue
    flipped += 1
    np.testing.assert_array_equal(b_map, a_map[:, ::-1])
    np.testing.assert_array_equal(b_map[:, ::-1], a_map)  # Twice: identity.
    # Flipped before the resize: equal up to float32 rounding of positions.
    np.testing.assert_allclose(b_img[:, ::-1], a_img, atol=1e-3)
    a_box, b_box = plain["seg_box"][i], maybe["seg_box"][i]
    valid = plain["seg_valid"][i]
    np.testing.assert_array_equal(valid, maybe["seg_valid"][i])
    mirrored = np.stack([nw - b_box[:, 2], b_box[:, 1], nw - b_box[:, 0],
                         b_box[:, 3]], -1)
    np.testing.assert_array_equal(mirrored[valid], a_box[valid])
  assert 0 < flipped < 8


def test_determinism_and_resume(data_root):
  cfg = tiny_config(data_root)
  def batches(seed, start_step, num):
    return take(pipeline.build_input(cfg, "val2017", train=True,
                                     global_batch_size=8, seed=seed,
                                     start_step=start_step), num)
  full = batches(7, 0, 4)
  again = batches(7, 0, 4)
  for a, b in zip(full, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  # Resuming at step k equals skipping k batches (step 1 crosses an epoch).
  for start in (1, 3):
    resumed = batches(7, start, 1)[0]
    for key in resumed:
      np.testing.assert_array_equal(resumed[key], full[start][key])
  other = batches(8, 0, 1)[0]
  assert not np.array_equal(other["image_size"], full[0]["image_size"])


def test_epoch_order_is_a_seeded_permutation(data_root):
  # One canvas, one bucket: the stream is one seeded permutation of all images per epoch.
  cfg = tiny_config(data_root)
  batches = take(pipeline.build_input(cfg, "val2017", train=True,
                                      global_batch_size=8, seed=11), 3)
  ids = np.concatenate([b["image_id"] for b in batches])  # 24 positions
  sorted_ids = np.arange(1, NUM_IMAGES + 1)
  for epoch in range(2):
    perm = np.random.default_rng(
        np.random.SeedSequence([11, 0, 0, epoch])).permutation(NUM_IMAGES)
    np.testing.assert_array_equal(perm, schedule.epoch_permutation(11, epoch, NUM_IMAGES, 0))
    got = ids[epoch * NUM_IMAGES:(epoch + 1) * NUM_IMAGES]
    np.testing.assert_array_equal(got, sorted_ids[perm])


def test_eval_yields_every_image_once_with_padding(data_root):
  cfg = tiny_config(data_root)
  batches = [flat(b) for b in pipeline.build_input(
      cfg, "val2017", train=False, global_batch_size=8, seed=0)]
  assert len(batches) == 2  # 12 images -> 2 batches of 8, 4 padding rows.
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  valid = rows["example_valid"]
  np.testing.assert_array_equal(valid, np.arange(16) < NUM_IMAGES)
  np.testing.assert_array_equal(rows["image_id"][valid],
                                np.arange(1, NUM_IMAGES + 1))
  assert (rows["image_id"][~valid] == -1).all()
  for key in ("image", "segment_map", "seg_valid", "image_size"):
    assert not rows[key][~valid].any()
  for size, orig in zip(rows["image_size"][valid], rows["orig_size"][valid]):
    assert tuple(size) == ref_shape(*orig, 192, 320, (256, 384))
    # The host-side rule (demo, evaluation) gives the size the graph resized to.
    assert tuple(size) == canvas.fit_to_canvas(
        canvas.resized_shape(*orig, min_size=192, max_size=320), (256, 384))


def test_hosts_split_each_global_batch(data_root, monkeypatch):
  cfg = tiny_config(data_root)
  single = take(pipeline.build_input(cfg, "val2017", train=True,
                                     global_batch_size=16, seed=2), 2)
  per_host = []
  for host in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda h=host: h)
    per_host.append(take(pipeline.build_input(
        cfg, "val2017", train=True, global_batch_size=16, seed=2), 2))
  for step in range(2):
    for key in ("image_id", "image_size", "segment_map", "seg_box"):
      joined = np.concatenate([per_host[0][step][key], per_host[1][step][key]])
      np.testing.assert_array_equal(joined, single[step][key])


def test_empty_images_skipped_in_training_kept_in_eval(coco_sample_root,
                                                       tmp_path):
  root = make_dataset(coco_sample_root, tmp_path / "d", 4, empty_ids=(2,))
  cfg = tiny_config(root)
  train = take(pipeline.build_input(cfg, "val2017", train=True,
                                    global_batch_size=8, seed=0), 2)
  train_ids = np.concatenate([b["image_id"] for b in train])
  assert set(train_ids) == {1, 3, 4}
  evals = [flat(b) for b in pipeline.build_input(
      cfg, "val2017", train=False, global_batch_size=8, seed=0)]
  assert list(evals[0]["image_id"][:4]) == [1, 2, 3, 4]
  assert not evals[0]["seg_valid"][1].any()
  assert not evals[0]["segment_map"][1].any()


def test_config_errors(data_root):
  with pytest.raises(ValueError, match="multiples of 32"):
    tiny_config(data_root, canvas_sizes=((200, 384),))
  with pytest.raises(ValueError, match="global_batch_size 12"):
    pipeline.build_input(tiny_config(data_root), "val2017", train=True,
                         global_batch_size=12, seed=0)
  with pytest.raises(ValueError, match="source"):
    tiny_config(data_root, source="lmdb")
  with pytest.raises(ValueError, match="train_min_size_range"):
    tiny_config(data_root, train_min_size_range=(300, 200))
  with pytest.raises(ValueError, match="seed"):
    pipeline.build_input(tiny_config(data_root), "val2017", train=True, global_batch_size=8,
                         seed=-1)


def test_default_config_fields():
  cfg = hparams.DatasetHParams()
  assert cfg.train_split == "train2017" and cfg.val_split == "val2017"
  assert cfg.tfds_name == "coco/2017_panoptic"
  assert cfg.tfds_data_dir is None and cfg.categories_file is None
  assert (cfg.max_size, cfg.eval_min_size, cfg.eval_max_size) == (1333, 800,
                                                                   1333)
  assert tuple(cfg.train_min_size_range) == (800, 800)
  assert cfg.max_segments == 100 and cfg.flip and not cfg.skip_bad_examples
  assert (cfg.num_parallel_calls, cfg.prefetch) == (-1, 2)
  assert {"num_train", "num_val", "image_size", "seed"} <= set(
      dataclasses.asdict(cfg.synthetic))
  assert cfg.canvas_sizes == ()  # One canvas per orientation, derived from the sizes.


def test_importing_the_data_modules_does_not_import_tensorflow():
  code = ("import sys\n"
          "from ciae_jax.data import canvas, categories, coco, dataset, pipeline\n"
          "from ciae_jax.data import schedule, sources, synthetic, tfds_source, transforms\n"
          "from ciae_jax import config_lib, hparams\n"
          "hparams.HParams.from_config(config_lib.base_config())\n"
          "assert 'tensorflow' not in sys.modules, 'TF imported'\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).parents[1],
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]


def test_example_functions_are_traced_without_autograph():
  # A Python `if` on a tensor inside a loader: AutoGraph would rewrite it into a tf.cond; the
  # pipeline traces without it (ciae_jax/data/transforms.py), so it fails at trace time.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def load(item):
    if item > 0:  # A tensor as a Python bool.
      raise AssertionError("not reached: the comparison above raises in graph mode")
    return {}

  make_example = pipeline._example_fn(  # pylint: disable=protected-access
      load, max_segments=4, train=True, size_fn=lambda token, raw: token["size"])
  tokens = tf.data.Dataset.from_tensors({"item": tf.constant(1, tf.int64), "valid": True,
                                         "size": tf.constant([8, 8]), "flip": False})
  with pytest.raises(TypeError, match="as a Python `bool`"):
    tokens.map(make_example)
