"""COCO panoptic reader on real COCO files; every bad input gives a clear error.

Bad datasets are copies of the real sample in tmp_path with one defect each;
both the NumPy decoder and the tf.data pipeline must name the file and the
image id.
"""
import json
import shutil

import numpy as np
from PIL import Image
import pytest

from ciae_jax import hparams
from ciae_jax import panoptic_png
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco
from ciae_jax.data import pipeline

BAD_IMAGE_ID = 439180  # The sample image the defects are put into.


def _records_and_categories(root):
  cats = categories_lib.load_categories(
      root / "annotations" / "panoptic_val2017.json")
  return coco.load_records(root, "val2017"), cats


def test_records(coco_sample_root):
  records, _ = _records_and_categories(coco_sample_root)
  with open(coco_sample_root / "annotations" / "panoptic_val2017.json") as f:
    data = json.load(f)
  assert [r.image_id for r in records] == sorted(i["id"] for i in data["images"])
  sizes = {i["id"]: (i["height"], i["width"]) for i in data["images"]}
  anns = {a["image_id"]: a for a in data["annotations"]}
  for r in records:
    assert (r.height, r.width) == sizes[r.image_id]
    assert r.image_path.endswith(f"val2017/{r.image_id:012d}.jpg")
    assert r.png_path.endswith(f"panoptic_val2017/{r.image_id:012d}.png")
    assert [s.id for s in r.segments] == [
        s["id"] for s in anns[r.image_id]["segments_info"]]


def test_decoded_pixels_match_json_area_and_bbox(coco_sample_root):
  records, cats = _records_and_categories(coco_sample_root)
  for record in records:
    ex = coco.decode_example(record, cats)
    png = np.asarray(Image.open(record.png_path).convert("RGB"), np.int64)
    ids = png[..., 0] + 256 * png[..., 1] + 65536 * png[..., 2]
    assert ex["image"].shape == (record.height, record.width, 3)
    assert ex["image"].dtype == np.uint8
    assert ex["segment_map"].shape == (record.height, record.width)
    np.testing.assert_array_equal(ex["segment_map"] == 0, ids == 0)
    for row, seg in enumerate(record.segments):
      mask = ex["segment_map"] == row + 1
      np.testing.assert_array_equal(mask, ids == seg.id)
      assert mask.sum() == seg.area
      ys, xs = np.nonzero(mask)
      x, y, w, h = seg.bbox
      assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (
          x, y, x + w, y + h)
      np.testing.assert_array_equal(ex["seg_box"][row], [x, y, x + w, y + h])
      c = ex["seg_class"][row]
      assert cats.coco_id(c) == seg.category_id
      assert ex["seg_is_thing"][row] == (c >= cats.num_stuff)
      assert ex["seg_is_crowd"][row] == seg.iscrowd
    assert tuple(ex["orig_size"]) == (record.height, record.width)


def test_ground_truth_paths(coco_sample_root):
  gt = coco.ground_truth(coco_sample_root, "val2017")
  assert gt.gt_json.endswith("annotations/panoptic_val2017.json")
  assert gt.gt_folder.endswith("annotations/panoptic_val2017")
  assert gt.categories.num_classes == 133


def test_rgb_id_round_trip():
  ids = np.array([[0, 1, 255], [256, 65535, 256**3 - 1]])
  np.testing.assert_array_equal(panoptic_png.rgb_to_id_map(panoptic_png.id_map_to_rgb(ids)), ids)


# ---------------------------------------------------------------- bad inputs.


@pytest.fixture
def broken_root(coco_sample_root, tmp_path):
  """A writable copy of the sample."""
  root = tmp_path / "coco"
  shutil.copytree(coco_sample_root, root)
  for path in root.rglob("*"):
    path.chmod(0o755 if path.is_dir() else 0o644)
  return root


def _edit_json(root, edit):
  path = root / "annotations" / "panoptic_val2017.json"
  data = json.loads(path.read_text())
  edit(data)
  path.write_text(json.dumps(data))


def _segments(data):
  ann = next(a for a in data["annotations"] if a["image_id"] == BAD_IMAGE_ID)
  return ann["segments_info"]


def _image(root):
  return root / "val2017" / f"{BAD_IMAGE_ID:012d}.jpg"


def _png(root):
  return root / "annotations" / "panoptic_val2017" / f"{BAD_IMAGE_ID:012d}.png"


def _truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def _corrupt_jpeg(root):
  _image(root).write_bytes(b"this is not a JPEG" * 50)
  return _image(root).name


def _truncated_jpeg(root):
  _truncate(_image(root))
  return _image(root).name


def _truncated_png(root):
  _truncate(_png(root))
  return _png(root).name


def _segment_only_in_png(root):
  _edit_json(root, lambda d: _segments(d).pop(3))
  return _png(root).name


def _segment_only_in_json(root):
  _edit_json(root, lambda d: _segments(d).append(
      {"id": 7777777, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1],
       "area": 1}))
  return _png(root).name


def _missing_png(root):
  _png(root).unlink()
  return _png(root).name


DECODE_DEFECTS = {
    "corrupt_jpeg": _corrupt_jpeg,
    "truncated_jpeg": _truncated_jpeg,
    "truncated_png": _truncated_png,
    "segment_only_in_png": _segment_only_in_png,
    "segment_only_in_json": _segment_only_in_json,
}


@pytest.mark.parametrize("defect", sorted(DECODE_DEFECTS))
def test_numpy_decoder_names_file_and_image_id(broken_root, defect):
  file_name = DECODE_DEFECTS[defect](broken_root)
  records, cats = _records_and_categories(broken_root)
  record = next(r for r in records if r.image_id == BAD_IMAGE_ID)
  with pytest.raises(ValueError) as info:
    coco.decode_example(record, cats)
  assert file_name in str(info.value) and str(BAD_IMAGE_ID) in str(info.value)


def _tiny_config(root):
  return hparams.DatasetHParams(root=str(root), train_split="val2017", val_split="val2017",
                                canvas_sizes=((256, 256),), train_min_size_range=(128, 160),
                                max_size=256, eval_min_size=128, eval_max_size=256)


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("defect", sorted(DECODE_DEFECTS))
def test_pipeline_names_file_and_image_id(broken_root, defect, train):
  file_name = DECODE_DEFECTS[defect](broken_root)
  batches = pipeline.build_input(_tiny_config(broken_root), "val2017",
                                 train=train, global_batch_size=8, seed=0)
  with pytest.raises(ValueError) as info:
    next(batches)
  assert file_name in str(info.value) and str(BAD_IMAGE_ID) in str(info.value)


def test_in_graph_check_message(broken_root):
  """The PNG/JSON mismatch is caught by the graph's own assert."""
  _segment_only_in_png(broken_root)
  batches = pipeline.build_input(_tiny_config(broken_root), "val2017",
                                 train=False, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match=f"ciae_jax input error: image id "
                     f"{BAD_IMAGE_ID} \\(image .*{BAD_IMAGE_ID:012d}.jpg, PNG "
                     f".*{BAD_IMAGE_ID:012d}.png\\): segment id [0-9]+ is in "
                     "the PNG but not in the JSON$"):
    next(batches)


def test_missing_file(broken_root):
  name = _missing_png(broken_root)
  with pytest.raises(ValueError, match=f"{name}.*image id {BAD_IMAGE_ID}"):
    coco.load_records(broken_root, "val2017")
  with pytest.raises(ValueError, match=f"{name}.*image id {BAD_IMAGE_ID}"):
    pipeline.build_input(_tiny_config(broken_root), "val2017", train=True,
                         global_batch_size=8, seed=0)


def test_unknown_category(broken_root):
  def edit(data):
    _segments(data)[0]["category_id"] = 4242
  _edit_json(broken_root, edit)
  pattern = f"panoptic_val2017.json.*image id {BAD_IMAGE_ID}.*4242"
  with pytest.raises(ValueError, match=pattern):
    coco.load_records(broken_root, "val2017")
  with pytest.raises(ValueError, match=pattern):
    pipeline.build_input(_tiny_config(broken_root), "val2017", train=False,
                         global_batch_size=8, seed=0)


def test_missing_categories(broken_root):
  _edit_json(broken_root, lambda d: d.pop("categories"))
  with pytest.raises(ValueError, match="panoptic_val2017.json.*categories"):
    coco.load_records(broken_root, "val2017")
  with pytest.raises(ValueError, match="panoptic_val2017.json.*categories"):
    pipeline.build_input(_tiny_config(broken_root), "val2017", train=True,
                         global_batch_size=8, seed=0)


def test_image_size_differs_from_json(broken_root):
  def edit(data):
    next(i for i in data["images"] if i["id"] == BAD_IMAGE_ID)["height"] += 1
  _edit_json(broken_root, edit)
  records, cats = _records_and_categories(broken_root)
  record = next(r for r in records if r.image_id == BAD_IMAGE_ID)
  with pytest.raises(ValueError, match=f"image id {BAD_IMAGE_ID}"):
    coco.decode_example(record, cats)
  batches = pipeline.build_input(_tiny_config(broken_root), "val2017",
                                 train=False, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match=f"image id {BAD_IMAGE_ID} .*"
                     f"{BAD_IMAGE_ID:012d}.jpg.*image size"):
    next(batches)
