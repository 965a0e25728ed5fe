"""Host-side COCO export of ciae_jax.inference: panoptic id maps, segments_info, detections."""
import json

import numpy as np
from PIL import Image
import pytest

from ciae_jax.evaluation import coco_format


def reference_segments(id_map: np.ndarray) -> dict[int, tuple[int, list[int]]]:
  """Area and [x, y, w, h] of every segment id, from explicit pixel loops."""
  stats = {}
  for y in range(id_map.shape[0]):
    for x in range(id_map.shape[1]):
      segment = int(id_map[y, x])
      if segment == 0:
        continue
      area, x0, y0, x1, y1 = stats.get(segment, (0, x, y, x, y))
      stats[segment] = (area + 1, min(x0, x), min(y0, y), max(x1, x), max(y1, y))
  return {s: (a, [x0, y0, x1 - x0 + 1, y1 - y0 + 1]) for s, (a, x0, y0, x1, y1) in stats.items()}


def blocky_result(rng: np.random.Generator, num_queries: int, image_size, padded_size):
  """A panoptic map of rectangles (query index + 1) with void holes and padding."""
  panoptic = np.zeros(padded_size, np.int32)
  height, width = image_size
  panoptic[:height, :width] = rng.integers(1, 4, dtype=np.int32)
  for _ in range(12):
    y0, x0 = rng.integers(0, height - 2), rng.integers(0, width - 2)
    panoptic[y0:y0 + rng.integers(1, 9), x0:x0 + rng.integers(1, 9)] = rng.integers(
        0, num_queries + 1)
  panoptic[:height, :width][panoptic[:height, :width] == 5] = 0  # query 4 never appears
  panoptic[height:, :] = 77  # garbage in the padding must be cropped away
  panoptic[:, width:] = 77
  query_class = rng.permutation(num_queries).astype(np.int32)
  return {"panoptic": panoptic, "query_class": query_class}


@pytest.mark.parametrize("seed, image_size, orig_size", [
    (0, (21, 27), (47, 61)),  # upsampling, non-integer factors
    (1, (33, 45), (20, 25)),  # downsampling: small segments may vanish
    (2, (15, 19), (15, 19)),  # identity
])
def test_to_coco_panoptic_matches_pil_resize_and_pixel_loops(seed, image_size, orig_size):
  rng = np.random.default_rng(seed)
  num_queries = 80
  result = blocky_result(rng, num_queries, image_size, (48, 48))
  coco_ids = [1000 + 3 * c for c in range(num_queries)]
  id_map, segments_info = coco_format.to_coco_panoptic(result, image_size, orig_size, coco_ids)

  # Independent resize: PIL's NEAREST (odd input sizes leave no rounding ties).
  crop = result["panoptic"][:image_size[0], :image_size[1]]
  resized = np.asarray(Image.fromarray(crop, mode="I").resize(orig_size[::-1], Image.NEAREST))
  queries = sorted(set(resized.ravel().tolist()) - {0})
  assert id_map.shape == tuple(orig_size) and id_map.dtype == np.int32
  # Segments are renumbered 1..n in query order; vanished queries are dropped.
  expected_ids = np.zeros_like(resized)
  for new_id, query in enumerate(queries, start=1):
    expected_ids[resized == query] = new_id
  np.testing.assert_array_equal(id_map, expected_ids)
  assert [s["id"] for s in segments_info] == list(range(1, len(queries) + 1))
  stats = reference_segments(id_map)
  for info, query in zip(segments_info, queries):
    assert info["category_id"] == coco_ids[result["query_class"][query - 1]]
    assert (info["area"], info["bbox"]) == stats[info["id"]]
    assert info["iscrowd"] == 0
  json.dumps(segments_info)  # plain Python types only


def test_to_coco_panoptic_round_trips_coco_annotation(coco_sample_root):
  """A prediction equal to the ground truth gives back the annotation's areas and boxes."""
  annotations = json.loads((coco_sample_root / "annotations" / "panoptic_val2017.json").read_text())
  for annotation in annotations["annotations"]:
    png = coco_sample_root / "annotations" / "panoptic_val2017" / annotation["file_name"]
    rgb = np.asarray(Image.open(png), np.int64)
    coco_id_map = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
    segments = annotation["segments_info"]
    # Query k = segment k; its "contiguous class" k maps to the segment's category.
    panoptic = np.zeros((512, 768), np.int32)
    height, width = coco_id_map.shape
    for k, segment in enumerate(segments):
      panoptic[:height, :width][coco_id_map == segment["id"]] = k + 1
    result = {"panoptic": panoptic, "query_class": np.arange(len(segments), dtype=np.int32)}
    id_map, segments_info = coco_format.to_coco_panoptic(
        result, (height, width), (height, width), [s["category_id"] for s in segments])
    assert len(segments_info) == len(segments)
    for info, segment in zip(segments_info, segments):
      assert info["category_id"] == segment["category_id"]
      assert info["area"] == segment["area"], annotation["file_name"]
      assert info["bbox"] == segment["bbox"], annotation["file_name"]
      np.testing.assert_array_equal(id_map == info["id"], coco_id_map == segment["id"])


def test_to_coco_panoptic_rejects_bad_input():
  result = {"panoptic": np.zeros((8, 8), np.int32), "query_class": np.zeros(3, np.int32)}
  with pytest.raises(ValueError, match="image_size"):
    coco_format.to_coco_panoptic(result, (9, 8), (10, 10), [1, 2, 3])
  with pytest.raises(ValueError, match="one image"):
    coco_format.to_coco_panoptic({**result, "panoptic": np.zeros((1, 8, 8), np.int32)}, (8, 8),
                               (10, 10), [1, 2, 3])
  result["panoptic"][0, 0] = 3
  with pytest.raises(ValueError, match="outside category_coco_ids"):
    coco_format.to_coco_panoptic({**result, "query_class": np.array([0, 1, 7])}, (8, 8), (8, 8),
                               [1, 2, 3])


def test_detections_to_coco_original_coordinates():
  result = {
      "det_box": np.array([[10, 20, 50, 80], [0, 0, 4, 4], [3, 6, 9, 12]], np.float32),
      "det_score": np.array([0.9, 0.5, 0.1], np.float32),
      "det_class": np.array([55, 60, 54], np.int32),
      "det_valid": np.array([True, False, True]),
  }
  coco_ids = list(range(100, 100 + 133))
  detections = coco_format.detections_to_coco(result, 42, 2.0, coco_ids)
  # Scores are float32(0.9), float32(0.1): within 3e-8 relative of the decimals (approx: 1e-6).
  assert detections == [
      {"image_id": 42, "category_id": 155, "bbox": [5.0, 10.0, 20.0, 30.0],
       "score": pytest.approx(0.9)},
      {"image_id": 42, "category_id": 154, "bbox": [1.5, 3.0, 3.0, 3.0],
       "score": pytest.approx(0.1)},
  ]
  # Separate (scale_y, scale_x).
  detections = coco_format.detections_to_coco(result, 42, (2.0, 0.5), coco_ids)
  assert detections[0]["bbox"] == [20.0, 10.0, 80.0, 30.0]
  json.dumps(detections)
