"""COCO-format export: PNG codec, segments_info (area, bbox), JSON files."""
import json
import os

import numpy as np
from panopticapi import evaluation as panopticapi_eval
from panopticapi.utils import rgb2id
from PIL import Image
import pytest

from ciae_jax import panoptic_png
from ciae_jax.evaluation import coco_format


def loop_area_bbox(id_map, segment_id):
  """Area and inclusive [x, y, w, h] by a plain loop over the pixels."""
  area, x0, y0, x1, y1 = 0, None, None, None, None
  height, width = id_map.shape
  for y in range(height):
    for x in range(width):
      if id_map[y, x] == segment_id:
        area += 1
        x0 = x if x0 is None else min(x0, x)
        x1 = x if x1 is None else max(x1, x)
        y0 = y if y0 is None else min(y0, y)
        y1 = y if y1 is None else max(y1, y)
  if area == 0:
    return 0, None
  return area, [x0, y0, x1 - x0 + 1, y1 - y0 + 1]


def random_id_map(rng, height, width, ids):
  """Blocky random map over `ids` (0 = void)."""
  cells = rng.choice(np.asarray(ids), (height // 3 + 1, width // 4 + 1))
  return np.kron(cells, np.ones((3, 4), np.int64))[:height, :width]


def test_png_codec_round_trip(tmp_path):
  rng = np.random.default_rng(0)
  id_map = rng.integers(0, 256**3, (13, 17))
  id_map[0, 0], id_map[-1, -1] = 256**3 - 1, 0
  rgb = panoptic_png.id_map_to_rgb(id_map)
  np.testing.assert_array_equal(
      rgb.astype(np.int64), np.stack(
          [id_map % 256, id_map // 256 % 256, id_map // 65536], -1))
  path = tmp_path / "a.png"
  Image.fromarray(rgb).save(path)
  reference = rgb2id(np.array(Image.open(path), dtype=np.uint32))
  np.testing.assert_array_equal(panoptic_png.read_panoptic_png(path), reference)
  np.testing.assert_array_equal(panoptic_png.rgb_to_id_map(rgb), reference)
  # RGBA reads as panopticapi reads it (alpha ignored); grayscale, which
  # panopticapi cannot read, is a clear error naming the file.
  rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 200, np.uint8)], -1)
  Image.fromarray(rgba).save(tmp_path / "b.png")
  ref = rgb2id(np.array(Image.open(tmp_path / "b.png"), dtype=np.uint32))
  np.testing.assert_array_equal(panoptic_png.read_panoptic_png(tmp_path / "b.png"),
                                ref)
  gray = rng.integers(0, 256, (5, 6)).astype(np.uint8)
  Image.fromarray(gray).save(tmp_path / "c.png")
  with pytest.raises(ValueError, match="c.png.*mode L"):
    panoptic_png.read_panoptic_png(tmp_path / "c.png")
  # Our own encoder (filter type 0): PIL and rgb2id read back the same ids.
  (tmp_path / "d.png").write_bytes(panoptic_png.encode_panoptic_png(id_map))
  with Image.open(tmp_path / "d.png") as image:
    assert image.mode == "RGB" and image.size == (17, 13)
    np.testing.assert_array_equal(
        rgb2id(np.array(image, dtype=np.uint32)), id_map)
  with pytest.raises(ValueError, match="16777216"):
    panoptic_png.id_map_to_rgb(np.array([[256**3]]))
  with pytest.raises(ValueError):
    panoptic_png.id_map_to_rgb(np.array([[-1]]))


def test_segment_areas_and_boxes_equal_loop():
  rng = np.random.default_rng(1)
  ids = [0, 5, 70000, 123456, 9]
  id_map = random_id_map(rng, 23, 31, ids)
  query = [5, 9, 70000, 123456, 777]  # 777 absent
  areas, boxes = coco_format.segment_areas_and_boxes(id_map, query)
  for k, segment_id in enumerate(query):
    area, bbox = loop_area_bbox(id_map, segment_id)
    assert areas[k] == area
    if area:
      assert boxes[k].tolist() == bbox


def test_write_panoptic_prediction(tmp_path):
  rng = np.random.default_rng(2)
  ids = [0, 3, 40, 5000, 16000000]
  id_map = random_id_map(rng, 20, 26, ids)
  segments = [{"id": 3, "category_id": 1, "score": np.float32(0.5)},
              {"id": 40, "category_id": np.int64(7)},
              {"id": 5000, "category_id": 92, "iscrowd": 0},
              {"id": 16000000, "category_id": 2},
              {"id": 99, "category_id": 3}]  # no pixel: dropped
  ann = coco_format.write_panoptic_prediction(str(tmp_path / "png"), 42,
                                         "000000000042.jpg", id_map, segments)
  assert ann["image_id"] == 42 and ann["file_name"] == "000000000042.png"
  assert [s["id"] for s in ann["segments_info"]] == [3, 40, 5000, 16000000]
  for s in ann["segments_info"]:
    area, bbox = loop_area_bbox(id_map, s["id"])
    assert s["area"] == area and s["bbox"] == bbox
    assert s["iscrowd"] == 0
  json.dumps(ann)  # plain builtins only
  written = np.array(Image.open(tmp_path / "png" / "000000000042.png"),
                     dtype=np.uint32)
  np.testing.assert_array_equal(rgb2id(written), id_map)
  with pytest.raises(ValueError, match="image 42.*5000"):
    coco_format.write_panoptic_prediction(str(tmp_path / "png"), 42, "x.png",
                                     id_map, segments[:2] + segments[3:])


def test_segments_from_id_map():
  rng = np.random.default_rng(3)
  num_queries = 6
  panoptic = random_id_map(rng, 17, 21, [0, 1, 2, 4, 6])  # queries 2, 4 empty
  cats = np.array([1, 1, 92, 3, 5, 8])
  scores = np.linspace(0.9, 0.4, num_queries)
  segments = coco_format.segments_from_id_map(panoptic, cats, query_scores=scores)
  expected_ids = [q + 1 for q in range(num_queries) if (panoptic == q + 1).any()]
  assert [s["id"] for s in segments] == expected_ids
  for s in segments:
    area, bbox = loop_area_bbox(panoptic, s["id"])
    assert (s["area"], s["bbox"]) == (area, bbox)
    assert s["category_id"] == cats[s["id"] - 1]
    # A float64 score carried through (at worst via float32: 6e-8 relative < approx's 1e-6).
    assert s["score"] == pytest.approx(scores[s["id"] - 1])
  valid = np.ones(num_queries, bool)
  valid[3] = False  # query 3 = value 4 owns pixels
  with pytest.raises(ValueError, match="invalid queries"):
    coco_format.segments_from_id_map(panoptic, cats, query_valid=valid)
  with pytest.raises(ValueError, match="image 7"):
    coco_format.segments_from_id_map(panoptic, cats[:3], image_id=7)


def test_exported_prediction_reads_back_in_pq_compute(coco_sample_root,
                                                      tmp_path, capsys):
  """gt -> query map -> our export -> panopticapi's pq_compute: PQ 100."""
  gt_json = str(coco_sample_root / "annotations" / "panoptic_val2017.json")
  gt_folder = str(coco_sample_root / "annotations" / "panoptic_val2017")
  with open(gt_json) as f:
    gt = json.load(f)
  annotations = []
  for ann in gt["annotations"]:
    rgb = np.array(Image.open(os.path.join(gt_folder, ann["file_name"])),
                   dtype=np.int64)
    gt_ids = rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]
    # As inference gives it: 0 void, else query index + 1.
    query_map = np.zeros(gt_ids.shape, np.int32)
    for q, s in enumerate(ann["segments_info"]):
      query_map[gt_ids == s["id"]] = q + 1
    cats = [s["category_id"] for s in ann["segments_info"]]
    segments = coco_format.segments_from_id_map(query_map, cats,
                                           image_id=ann["image_id"])
    for s, g in zip(segments, ann["segments_info"]):
      assert (s["area"], s["bbox"]) == (g["area"], g["bbox"])
    image = next(i for i in gt["images"] if i["id"] == ann["image_id"])
    annotations.append(coco_format.write_panoptic_prediction(
        str(tmp_path / "pred"), ann["image_id"], image["file_name"], query_map,
        segments))
  pred_json = str(tmp_path / "pred.json")
  coco_format.write_panoptic_json(pred_json, annotations, gt["categories"],
                             gt["images"])
  with open(pred_json) as f:
    written = json.load(f)
  assert set(written) == {"annotations", "categories", "images"}
  result = panopticapi_eval.pq_compute(gt_json, pred_json, gt_folder,
                                       str(tmp_path / "pred"))
  capsys.readouterr()
  for group in ("All", "Things", "Stuff"):
    assert result[group]["pq"] == pytest.approx(1.0)  # Perfect: 1 up to float64 rounding.


def test_detections_json(tmp_path):
  boxes = np.array([[10, 20, 50, 80], [0.5, 1.5, 2.5, 4.0]], np.float32)
  dets = coco_format.detections_from_boxes(np.int64(5), boxes,
                                      np.array([0.9, 0.1], np.float32),
                                      np.array([1, 18]))
  path = tmp_path / "d" / "dets.json"
  coco_format.write_detections_json(path, dets)
  loaded = json.loads(path.read_text())
  assert loaded[0] == {"image_id": 5, "category_id": 1,
                       "bbox": [10.0, 20.0, 40.0, 60.0],
                       "score": pytest.approx(0.9)}  # float32(0.9): 2.4e-8 off
  assert loaded[1]["bbox"] == [0.5, 1.5, 2.0, 2.5]
  with pytest.raises(ValueError, match="score"):
    coco_format.write_detections_json(path, [{"image_id": 1, "category_id": 1,
                                         "bbox": [0, 0, 1, 1]}])
