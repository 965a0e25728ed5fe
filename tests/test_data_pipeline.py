"""tf.data pipeline on real COCO images: transforms, shapes, determinism, eval.

Every output is compared with an independent NumPy reference built from the
PIL-decoded files: the resize rule, nearest-neighbour maps, half-pixel
bilinear images, boxes as pixel extents, truncation to the largest segments.
"""
import json
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
from PIL import Image
import pytest

from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco
from ciae_jax.data import pipeline
from ciae_jax.data import transforms

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])
NUM_IMAGES = 12


def make_dataset(sample_root, root, num_images, empty_ids=()):
  """`num_images` copies of the two sample images (ids 1..n) as 'val2017'."""
  data = json.loads((sample_root / "annotations" /
                     "panoptic_val2017.json").read_text())
  anns = {a["image_id"]: a for a in data["annotations"]}
  (root / "val2017").mkdir(parents=True)
  (root / "annotations" / "panoptic_val2017").mkdir(parents=True)
  images, annotations = [], []
  for i in range(1, num_images + 1):
    im = data["images"][(i - 1) % 2]
    ann = anns[im["id"]]
    stem = f"{i:012d}"
    shutil.copy(sample_root / "val2017" / im["file_name"],
                root / "val2017" / f"{stem}.jpg")
    png = root / "annotations" / "panoptic_val2017" / f"{stem}.png"
    shutil.copy(sample_root / "annotations" / "panoptic_val2017" /
                ann["file_name"], png)
    segments = ann["segments_info"]
    if i in empty_ids:
      Image.fromarray(np.zeros((im["height"], im["width"], 3), np.uint8)).save(
          png)
      segments = []
    images.append(dict(im, id=i, file_name=f"{stem}.jpg"))
    annotations.append({"image_id": i, "file_name": f"{stem}.png",
                        "segments_info": segments})
  (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(
      {"images": images, "annotations": annotations,
       "categories": data["categories"]}))
  return root


@pytest.fixture(scope="module")
def data_root(coco_sample_root, tmp_path_factory):
  return make_dataset(coco_sample_root, tmp_path_factory.mktemp("rep"),
                      NUM_IMAGES)


def tiny_config(root, **overrides):
  cfg = pipeline.default_dataset_config()
  cfg.root = str(root)
  cfg.train_split = cfg.val_split = "val2017"
  cfg.image_size = (256, 384)
  cfg.train_min_size_range = (160, 224)
  cfg.max_size = 384
  cfg.eval_min_size = 192
  cfg.eval_max_size = 320
  cfg.max_segments = 40
  for key, value in overrides.items():
    setattr(cfg, key, value)
  return cfg


def flat(batch):
  """[devices, per_device, ...] -> [rows, ...]."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def take(iterator, num):
  return [flat(next(iterator)) for _ in range(num)]


# ------------------------------------------------------- NumPy references.


def ref_shape(h, w, short, max_size, pad):
  scale = min(short / min(h, w), max_size / max(h, w), pad[0] / h, pad[1] / w)
  return (min(max(int(np.floor(h * scale + 0.5)), 1), pad[0]),
          min(max(int(np.floor(w * scale + 0.5)), 1), pad[1]))


def ref_nearest(values, out_h, out_w):
  h, w = values.shape[:2]
  rows = np.minimum(np.floor((np.arange(out_h) + 0.5) * h / out_h), h - 1)
  cols = np.minimum(np.floor((np.arange(out_w) + 0.5) * w / out_w), w - 1)
  return values[rows.astype(int)][:, cols.astype(int)]


def ref_bilinear(image, out_h, out_w):
  """Half-pixel-centre bilinear resize (TF2 tf.image.resize semantics)."""
  def axis(n_in, n_out):
    src = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    low = np.floor(src)
    frac = src - low
    return (np.clip(low, 0, n_in - 1).astype(int),
            np.clip(low + 1, 0, n_in - 1).astype(int), frac)
  y0, y1, fy = axis(image.shape[0], out_h)
  x0, x1, fx = axis(image.shape[1], out_w)
  top = image[y0][:, x0] * (1 - fx)[None, :, None] + image[y0][:, x1] * fx[
      None, :, None]
  bottom = image[y1][:, x0] * (1 - fx)[None, :, None] + image[y1][:, x1] * fx[
      None, :, None]
  return top * (1 - fy)[:, None, None] + bottom * fy[:, None, None]


def ref_rows(decoded, max_segments):
  """Row map and per-row arrays after keeping the largest segments."""
  n = len(decoded["seg_class"])
  order = np.argsort(-decoded["seg_area"], kind="stable")[:max_segments]
  kept = np.sort(order)
  new_row = np.zeros(n + 1, np.int32)
  new_row[kept + 1] = np.arange(1, len(kept) + 1)
  return (new_row[decoded["segment_map"]], decoded["seg_class"][kept],
          decoded["seg_is_thing"][kept], decoded["seg_is_crowd"][kept])


def check_example(out, decoded, *, size_range, max_size, pad, max_segments):
  """Asserts one output example against the NumPy reference; returns flip."""
  h, w = decoded["image"].shape[:2]
  nh, nw = out["image_size"]
  candidates = [s for s in range(size_range[0], size_range[1] + 1)
                if ref_shape(h, w, s, max_size, pad) == (nh, nw)]
  assert candidates, (out["image_size"], (h, w), size_range)
  assert tuple(out["orig_size"]) == (h, w)
  row_map, classes, things, crowds = ref_rows(decoded, max_segments)

  expected_map = ref_nearest(row_map, nh, nw)
  flipped = not np.array_equal(out["segment_map"][:nh, :nw], expected_map)
  if flipped:
    expected_map = expected_map[:, ::-1]
  np.testing.assert_array_equal(out["segment_map"][:nh, :nw], expected_map)
  assert not out["segment_map"][nh:].any() and not out["segment_map"][:, nw:].any()

  image = (decoded["image"][:, ::-1] if flipped else decoded["image"]) / 255.0
  expected_image = ref_bilinear((image - MEAN) / STD, nh, nw)
  # float32 (tf.image.resize) vs float64 arithmetic on the same decoded pixels: sample
  # positions rounded to ~2^-24 * 640 px, times the steepest step between two pixels (255
  # grey levels / 255 / std 0.224 = 4.5 per px), bound the error by ~2e-4 (measured 2e-4);
  # atol 2e-3 is ~10x that, and 1/8 of one grey level (0.017 here).
  np.testing.assert_allclose(out["image"][:nh, :nw], expected_image, atol=2e-3)
  assert not out["image"][nh:].any() and not out["image"][:, nw:].any()

  for row in range(max_segments):
    ys, xs = np.nonzero(out["segment_map"] == row + 1)
    present = ys.size > 0
    assert out["seg_valid"][row] == present
    if present:
      np.testing.assert_array_equal(
          out["seg_box"][row], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      assert out["seg_class"][row] == classes[row]
      assert out["seg_is_thing"][row] == things[row]
      assert out["seg_is_crowd"][row] == crowds[row]
    else:
      assert not out["seg_box"][row].any() and out["seg_class"][row] == 0
      assert not out["seg_is_thing"][row] and not out["seg_is_crowd"][row]
  return flipped


def decoded_by_id(root):
  cats = categories_lib.load_categories(
      root / "annotations" / "panoptic_val2017.json")
  return {r.image_id: coco.decode_example(r, cats)
          for r in coco.load_records(root, "val2017")}


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
          max_size=384, pad=(256, 384), max_segments=40))
  assert 0 < sum(flips) < len(flips)  # Both branches were checked.
  sizes = {tuple(s) for b in [batch] for s in b["image_size"]}
  assert len(sizes) > 1  # The jitter varies the size.


def test_eval_shrink_to_fit(data_root):
  # 300 on the shorter side would not fit 128 x 256: shrunk, aspect kept.
  cfg = tiny_config(data_root, image_size=(128, 256), eval_min_size=300,
                    eval_max_size=1000)
  decoded = decoded_by_id(data_root)
  batch = flat(next(pipeline.build_input(cfg, "val2017", train=False,
                                         global_batch_size=8, seed=0)))
  for i in range(8):
    out = {k: v[i] for k, v in batch.items()}
    assert not check_example(out, decoded[int(out["image_id"])],
                             size_range=(300, 300), max_size=1000,
                             pad=(128, 256), max_segments=40)
    assert out["image_size"][0] == 128  # Height limited by the padding.


def test_vanishing_segments_become_invalid(data_root):
  # At about 24 x 36 pixels small segments lose all their pixels.
  cfg = tiny_config(data_root, image_size=(128, 128), eval_min_size=24,
                    eval_max_size=40)
  decoded = decoded_by_id(data_root)
  batch = flat(next(pipeline.build_input(cfg, "val2017", train=False,
                                         global_batch_size=8, seed=0)))
  vanished = 0
  for i in range(2):
    out = {k: v[i] for k, v in batch.items()}
    ex = decoded[int(out["image_id"])]
    check_example(out, ex, size_range=(24, 24), max_size=40, pad=(128, 128),
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
                  max_size=320, pad=(256, 384), max_segments=10)
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
    # Flipped before the resize: equal up to float32 rounding of the mirrored sample positions
    # (~2^-24 * 640 px each) times the steepest step between two pixels (4.5 per px in
    # normalised units): <= 2 * 4e-5 * 4.5 ~ 3.4e-4 (measured 2.4e-4); atol 1e-3.
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
  cfg = tiny_config(data_root)
  batches = take(pipeline.build_input(cfg, "val2017", train=True,
                                      global_batch_size=8, seed=11), 3)
  ids = np.concatenate([b["image_id"] for b in batches])  # 24 positions
  sorted_ids = np.arange(1, NUM_IMAGES + 1)
  for epoch in range(2):
    perm = np.random.default_rng(
        np.random.SeedSequence([11, epoch])).permutation(NUM_IMAGES)
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
    # The host-side helper (demo, evaluation) agrees with the graph.
    assert tuple(size) == transforms.resized_shape(
        *orig, min_size=192, max_size=320, pad_size=(256, 384))


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
  with pytest.raises(ValueError, match="divisible by 128"):
    pipeline.build_input(tiny_config(data_root, image_size=(200, 384)),
                         "val2017", train=True, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="global_batch_size 12"):
    pipeline.build_input(tiny_config(data_root), "val2017", train=True,
                         global_batch_size=12, seed=0)
  with pytest.raises(ValueError, match="source"):
    pipeline.build_input(tiny_config(data_root, source="lmdb"), "val2017",
                         train=True, global_batch_size=8, seed=0)


def test_default_config_fields():
  cfg = pipeline.default_dataset_config()
  assert cfg.train_split == "train2017" and cfg.val_split == "val2017"
  assert cfg.tfds_name == "coco/2017_panoptic"
  assert cfg.tfds_data_dir is None and cfg.categories_file is None
  assert (cfg.max_size, cfg.eval_min_size, cfg.eval_max_size) == (1333, 800,
                                                                   1333)
  assert tuple(cfg.train_min_size_range) == (800, 800)
  assert cfg.max_segments == 100 and cfg.flip and not cfg.skip_bad_examples
  assert (cfg.num_parallel_calls, cfg.prefetch) == (-1, 2)
  assert {"num_train", "num_val", "image_size", "seed"} <= set(cfg.synthetic)
  assert all(v % 128 == 0 for v in cfg.image_size)


def test_importing_the_data_modules_does_not_import_tensorflow():
  code = ("import sys\n"
          "from ciae_jax.data import categories, coco, pipeline, synthetic\n"
          "from ciae_jax.data import tfds_source, transforms\n"
          "pipeline.default_dataset_config()\n"
          "assert 'tensorflow' not in sys.modules, 'TF imported'\n")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, cwd=pathlib.Path(__file__).parents[1],
                          check=False)
  assert result.returncode == 0, result.stderr[-2000:]
