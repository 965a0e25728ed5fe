"""Helpers of the data tests: datasets made of the real COCO sample, and NumPy references.

Every pipeline output is compared with an independent NumPy reference built from the
PIL-decoded files: the resize rule, nearest-neighbour maps, half-pixel bilinear images, boxes as
pixel extents, truncation to the largest segments.
"""
import json
import shutil

import numpy as np
from PIL import Image

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco

MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_dataset(sample_root, root, num_images, empty_ids=(), portrait_ids=()):
  """`num_images` copies of the two sample images (ids 1..n) as 'val2017'.

  Images in `empty_ids` have no segments; those in `portrait_ids` are transposed (image, PNG,
  sizes and boxes), so that a dataset can hold both orientations.
  """
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
    image_path = root / "val2017" / f"{stem}.jpg"
    png = root / "annotations" / "panoptic_val2017" / f"{stem}.png"
    shutil.copy(sample_root / "val2017" / im["file_name"], image_path)
    shutil.copy(sample_root / "annotations" / "panoptic_val2017" / ann["file_name"], png)
    segments = ann["segments_info"]
    entry = dict(im, id=i, file_name=f"{stem}.jpg")
    if i in portrait_ids:
      _transpose_files(image_path, png)
      segments = [dict(s, bbox=[s["bbox"][1], s["bbox"][0], s["bbox"][3], s["bbox"][2]])
                  for s in segments]
      entry.update(height=im["width"], width=im["height"])
    if i in empty_ids:
      Image.fromarray(np.zeros((entry["height"], entry["width"], 3), np.uint8)).save(png)
      segments = []
    images.append(entry)
    annotations.append({"image_id": i, "file_name": f"{stem}.png",
                        "segments_info": segments})
  (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(
      {"images": images, "annotations": annotations,
       "categories": data["categories"]}))
  return root


def _transpose_files(image_path, png_path):
  image = np.asarray(Image.open(image_path).convert("RGB"))  # [h, w, 3]
  Image.fromarray(np.ascontiguousarray(image.transpose(1, 0, 2))).save(image_path, quality=95)
  pan = np.asarray(Image.open(png_path).convert("RGB"))  # [h, w, 3]
  Image.fromarray(np.ascontiguousarray(pan.transpose(1, 0, 2))).save(png_path)


def tiny_config(root, **overrides):
  fields = dict(root=str(root), train_split="val2017", val_split="val2017",
                canvas_sizes=((256, 384),), train_min_size_range=(160, 224), max_size=384,
                eval_min_size=192, eval_max_size=320, max_segments=40)
  return hparams.DatasetHParams(**{**fields, **overrides})


def flat(batch):
  """[devices, per_device, ...] -> [rows, ...]."""
  return {k: v.reshape(-1, *v.shape[2:]) for k, v in batch.items()}


def take(iterator, num):
  return [flat(next(iterator)) for _ in range(num)]


def row(batch, i):
  return {k: v[i] for k, v in batch.items()}


# ------------------------------------------------------- NumPy references.


def ref_shape(h, w, short, max_size, canvas):
  """The resize rule (shorter side, longer-side cap), then shrunk to fit the canvas."""
  scale = min(short / min(h, w), max_size / max(h, w))
  h, w = max(int(np.floor(h * scale + 0.5)), 1), max(int(np.floor(w * scale + 0.5)), 1)
  fit = min(1.0, canvas[0] / h, canvas[1] / w)
  if fit == 1.0:
    return h, w
  return (min(max(int(np.floor(h * fit + 0.5)), 1), canvas[0]),
          min(max(int(np.floor(w * fit + 0.5)), 1), canvas[1]))


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


def check_example(out, decoded, *, size_range, max_size, canvas, max_segments):
  """Asserts one output example against the NumPy reference; returns whether it is flipped.

  The output's size must be the reference size of one shorter side in `size_range`; the
  example must be padded to `canvas` exactly (zeros outside the resized image).
  """
  h, w = decoded["image"].shape[:2]
  nh, nw = out["image_size"]
  assert out["image"].shape == (*canvas, 3) and out["segment_map"].shape == tuple(canvas)
  candidates = [s for s in range(size_range[0], size_range[1] + 1)
                if ref_shape(h, w, s, max_size, canvas) == (nh, nw)]
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
  # float32 vs float64 arithmetic; one grey level is 0.017 here.
  np.testing.assert_allclose(out["image"][:nh, :nw], expected_image, atol=2e-3)
  assert not out["image"][nh:].any() and not out["image"][:, nw:].any()

  for k in range(max_segments):
    ys, xs = np.nonzero(out["segment_map"] == k + 1)
    present = ys.size > 0
    assert out["seg_valid"][k] == present
    if present:
      np.testing.assert_array_equal(
          out["seg_box"][k], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
      assert out["seg_class"][k] == classes[k]
      assert out["seg_is_thing"][k] == things[k]
      assert out["seg_is_crowd"][k] == crowds[k]
    else:
      assert not out["seg_box"][k].any() and out["seg_class"][k] == 0
      assert not out["seg_is_thing"][k] and not out["seg_is_crowd"][k]
  return flipped


def decoded_by_id(root):
  cats = categories_lib.load_categories(
      root / "annotations" / "panoptic_val2017.json")
  return {r.image_id: coco.decode_example(r, cats)
          for r in coco.load_records(root, "val2017")}
