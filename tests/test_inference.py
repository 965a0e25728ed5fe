"""FCOS decoding, panoptic assignment (Eq. 16), category from memory and oracle mode.

Hand-made model outputs carry only the keys inference reads: `cls_logits`, `centerness`,
`box_reg` (lists over levels) and `embedding` for prediction; `embedding` and
`embedding_prenorm` for the oracle. Images are 32 x 32 with two levels (strides 8, 16).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import lowered_loops
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax import platforms
from ciae_jax.fast_paths import assign
from ciae_jax.inference import detection
from ciae_jax.inference import panoptic as inference
from ciae_jax.segments import Segments

SIZE = 32
STRIDES = (8, 16)
NUM_STUFF = 2
NUM_THINGS = 3
EMBED_DIM = 8
BASIS = np.eye(EMBED_DIM, dtype=np.float32)


def unit(vector: np.ndarray) -> np.ndarray:
  return (vector / np.linalg.norm(vector)).astype(np.float32)


def logit(probability: float) -> float:
  return math.log(probability / (1 - probability))


def sigmoid(x: float) -> float:
  return 1 / (1 + math.exp(-x))


def empty_outputs(embed_dim: int = EMBED_DIM, num_things: int = NUM_THINGS) -> dict:
  """No candidate anywhere (sigmoid(-10) < 0.05); embedding filled by the caller."""
  return {
      "cls_logits": [np.full((SIZE // s, SIZE // s, num_things), -10, np.float32)
                     for s in STRIDES],
      "centerness": [np.zeros((SIZE // s, SIZE // s), np.float32) for s in STRIDES],
      "box_reg": [np.zeros((SIZE // s, SIZE // s, 4), np.float32) for s in STRIDES],
      "embedding": np.zeros((SIZE, SIZE, embed_dim), np.float32),
  }


def put_detection(outputs, level, cell_y, cell_x, thing_class, cls_logit, ctr_logit, ltrb):
  outputs["cls_logits"][level][cell_y, cell_x, thing_class] = cls_logit
  outputs["centerness"][level][cell_y, cell_x] = ctr_logit
  outputs["box_reg"][level][cell_y, cell_x] = ltrb


def run_jitted(fn, *args, **kwargs):
  return jax.tree.map(np.asarray, jax.jit(functools.partial(fn, **kwargs))(*args))


# ------------------------------------------------------------------------------------------------
# Decoding.


def test_decode_boxes_scores_and_threshold():
  outputs = empty_outputs()
  # Level 0 (stride 8), cell (y=1, x=2): location (20, 12).
  put_detection(outputs, 0, 1, 2, 1, 2.0, 0.0, (3, 4, 5, 6))
  # Level 1 (stride 16), cell (1, 1): location (24, 24); clipped to image (h=28, w=26).
  put_detection(outputs, 1, 1, 1, 0, 1.0, 1.0, (20, 30, 40, 2))
  # Just above / below the candidate threshold 0.05 on sigmoid(cls).
  put_detection(outputs, 0, 0, 0, 2, logit(0.06), -1.0, (1, 1, 1, 1))
  put_detection(outputs, 0, 3, 0, 2, logit(0.04), 5.0, (1, 1, 1, 1))
  # Level 0 cell (3, 3): location (28, 28) lies in the padding; its box clips to zero height.
  put_detection(outputs, 0, 3, 3, 0, 4.0, 4.0, (1, 0, 1, 2))
  image_size = np.array([28, 26], np.int32)
  decoded = run_jitted(
      lambda o, size: detection.decode_detections(
          o["cls_logits"], o["centerness"], o["box_reg"], size, strides=STRIDES,
          pre_nms_thresh=0.05, pre_nms_top_n=1000),
      outputs, image_size)
  assert decoded["box"].shape == (16 * 3 + 4 * 3, 4)  # min(1000, Hl*Wl*C) per level
  expected = {  # (level, flat index, class) -> (box, score, location)
      (0, 6, 1): ((17, 8, 25, 18), sigmoid(2) * sigmoid(0), (20, 12)),
      (1, 16 + 3, 0): ((4, 0, 26, 26), sigmoid(1) * sigmoid(1), (24, 24)),
      (0, 0, 2): ((3, 3, 5, 5), 0.06 * sigmoid(-1), (4, 4)),
  }
  valid = np.flatnonzero(decoded["valid"])
  got = {(int(decoded["level"][i]), int(decoded["flat_index"][i]),
          int(decoded["thing_class"][i])): i for i in valid}
  assert sorted(got) == sorted(expected)
  # Boxes: integer locations -/+ integer distances, clipped: exact in float32 (atol 1e-5, ~40
  # eps at 32, for any other rounding). Scores: sigmoid products (a few ulps of exp and a
  # division each) vs float64: < 1e-6; rtol 1e-5 (~80 eps). The same below.
  for key, (box, score, location) in expected.items():
    np.testing.assert_allclose(decoded["box"][got[key]], box, atol=1e-5)
    np.testing.assert_allclose(decoded["score"][got[key]], score, rtol=1e-5)
    np.testing.assert_array_equal(decoded["location"][got[key]], location)
  assert np.all(np.isneginf(decoded["score"][~decoded["valid"]]))


def test_decode_keeps_top_n_per_level():
  outputs = empty_outputs()
  for cell_x, probability in enumerate((0.3, 0.9, 0.5, 0.7)):
    put_detection(outputs, 0, 2, cell_x, 0, logit(probability), 0.0, (1, 1, 1, 1))
  put_detection(outputs, 1, 0, 0, 1, logit(0.2), 0.0, (1, 1, 1, 1))
  decoded = detection.decode_detections(
      outputs["cls_logits"], outputs["centerness"], outputs["box_reg"], (32, 32),
      strides=STRIDES, pre_nms_thresh=0.05, pre_nms_top_n=2)
  assert decoded["box"].shape == (4, 4)  # 2 per level
  np.testing.assert_array_equal(decoded["valid"], [True, True, True, False])
  np.testing.assert_array_equal(decoded["flat_index"][:3], [2 * 4 + 1, 2 * 4 + 3, 16])
  np.testing.assert_allclose(decoded["score"][:3], [0.45, 0.35, 0.1], rtol=1e-5)


# ------------------------------------------------------------------------------------------------
# Panoptic assignment on a hand-made scene.

# Instance A: embedding painted over rows 2..9, columns 2..13; its box covers columns 2..9 only.
A_EMBED = unit(BASIS[0] + 0.2 * BASIS[2] + 0.5 * BASIS[6])
# Instance B: painted over rows 18..25, columns 18..27, exactly its box.
B_EMBED = unit(BASIS[1] + 0.2 * BASIS[3] + 0.5 * BASIS[4])
IMAGE_SIZE = np.array([28, 30], np.int32)
A_SCORE = sigmoid(4) ** 2
B_SCORE = sigmoid(3) ** 2
LOW_SCORE = 0.06 * sigmoid(-4)


def scene_outputs() -> dict:
  """Stuff 0 (memory row e2) everywhere, a 12-pixel stuff-1 patch (e3), instances A and B."""
  outputs = empty_outputs()
  embedding = outputs["embedding"]
  embedding[...] = BASIS[2]
  embedding[24:27, 0:4] = BASIS[3]
  embedding[2:10, 2:14] = A_EMBED
  embedding[18:26, 18:28] = B_EMBED
  # A: level 0 cell (0, 0), location (4, 4), box (2, 2, 10, 10), thing class 1.
  put_detection(outputs, 0, 0, 0, 1, 4.0, 4.0, (2, 2, 6, 6))
  # A duplicate of A (box (2, 2, 10, 12), IoU 0.8) that NMS removes.
  put_detection(outputs, 0, 1, 0, 1, 2.0, 2.0, (2, 10, 6, 0))
  # B: level 1 cell (1, 1), location (24, 24), box (18, 18, 28, 26), thing class 2.
  put_detection(outputs, 1, 1, 1, 2, 3.0, 3.0, (6, 6, 4, 2))
  # A weak detection on stuff (query = e2): it ties with stuff 0, which comes first; no pixels.
  put_detection(outputs, 0, 2, 1, 0, logit(0.06), -4.0, (1, 1, 1, 1))
  # A detection in the padding: zero-height box after clipping, never valid.
  put_detection(outputs, 0, 3, 3, 0, 4.0, 4.0, (0, 0, 2, 2))
  return outputs


def scene_memory(merge_things: bool = True) -> np.ndarray:
  thing_rows = [BASIS[7]] if merge_things else [BASIS[4], BASIS[5], BASIS[6]]
  return np.stack([BASIS[2], BASIS[3]] + thing_rows)


def scene_expected(*, a_cols=(2, 10), stuff1_kept=False, a_kept=True, b_kept=True) -> np.ndarray:
  """The expected panoptic map written by hand: 0 void, else query index + 1."""
  expected = np.full((SIZE, SIZE), 1, np.int32)  # stuff 0 = query 0
  expected[24:27, 0:4] = 2 if stuff1_kept else 0
  expected[2:10, a_cols[0]:a_cols[1]] = 3 if a_kept else 0  # query num_stuff + 0
  expected[18:26, 18:28] = 4 if b_kept else 2  # B, or stuff 1 when B takes no part
  expected[28:, :] = 0
  expected[:, 30:] = 0
  return expected


def panoptic(outputs, memory, image_size, *, num_stuff, strides, merge_things=True,
             resize_scale=1.0, **fields):
  """`panoptic_inference` with the keyword fields of `InferenceHParams`."""
  return inference.panoptic_inference(outputs, memory, image_size,
                                      hparams.InferenceHParams(**fields), num_stuff=num_stuff,
                                      merge_things=merge_things, strides=strides,
                                      resize_scale=resize_scale)


def oracle(outputs, memory, *gt, image_size, num_stuff, include_crowd=True, resize_scale=1.0,
           **fields):
  """`oracle_inference` of the ground-truth arrays `gt` (in `Segments` field order)."""
  return inference.oracle_inference(outputs, memory, Segments(*gt),
                                    hparams.InferenceHParams(**fields), image_size=image_size,
                                    num_stuff=num_stuff, include_crowd=include_crowd,
                                    resize_scale=resize_scale)


# The scene's settings; detections of every score take part (instance_score_thresh 0).
PANOPTIC_DEFAULTS = dict(num_stuff=NUM_STUFF, strides=STRIDES, max_detections=5, stuff_area=64,
                         instance_min_area=0, resize_scale=0.5, instance_score_thresh=0.0)


def test_scene_regions_box_filter_and_stuff_area():
  result = run_jitted(panoptic, scene_outputs(), scene_memory(),
                      IMAGE_SIZE, **PANOPTIC_DEFAULTS)
  # A's columns 10..13 lie outside its box: similarity 0 there, so stuff 0 (0.2 > 0) wins.
  # The stuff-1 patch has 12 px < 64 * 0.5**2 = 16 px: void. Outside image_size: void.
  np.testing.assert_array_equal(result["panoptic"], scene_expected())
  np.testing.assert_array_equal(result["det_valid"], [True, True, True, False, False])
  # Scores: float32 sigmoid products (< 1e-6 relative); rtol 1e-5 as above. Boxes: integer
  # coordinates, exact (assert_allclose's default rtol 1e-7 on values <= 28 is < 1 ulp).
  np.testing.assert_allclose(result["det_score"][:3], [A_SCORE, B_SCORE, LOW_SCORE], rtol=1e-5)
  np.testing.assert_allclose(result["det_box"][:3],
                             [[2, 2, 10, 10], [18, 18, 28, 26], [11, 19, 13, 21]])
  np.testing.assert_array_equal(result["det_thing_class"][:3], [1, 2, 0])
  np.testing.assert_array_equal(result["det_class"][:3], [3, 4, 2])
  np.testing.assert_array_equal(result["query_class"][:5], [0, 1, 3, 4, 2])
  np.testing.assert_array_equal(result["query_is_thing"], [False, False] + [True] * 5)
  np.testing.assert_array_equal(result["query_valid"], [True, False, True, True] + [False] * 3)
  np.testing.assert_array_equal(result["query_area"],
                                [28 * 30 - 64 - 80 - 12, 0, 64, 80, 0, 0, 0])
  # Integer boxes: exact. Scores: 1 for stuff, float32 sigmoid products (rtol 1e-5, above).
  np.testing.assert_allclose(result["query_box"][2:4], [[2, 2, 10, 10], [18, 18, 28, 26]])
  np.testing.assert_allclose(result["query_score"][:4], [1, 1, A_SCORE, B_SCORE], rtol=1e-5)


@pytest.mark.parametrize("options, expected_kwargs", [
    # Area thresholds are in original pixels: at scale 0.25 the stuff-1 patch (12 >= 4) stays.
    (dict(resize_scale=0.25), dict(stuff1_kept=True)),
    # A has 64 px < 70: void; B has 80 px and stays.
    (dict(resize_scale=1.0, stuff_area=0, instance_min_area=70),
     dict(stuff1_kept=True, a_kept=False)),
    # B scores 0.907 < 0.93: it takes no part and its pixels go to stuff 1 (0.2 > 0).
    (dict(instance_score_thresh=0.93), dict(stuff1_kept=True, b_kept=False)),
    # A's box expanded 1.5x about its centre, (0, 0, 12, 12): columns 10, 11 become A.
    (dict(box_expand_infer=1.5), dict(a_cols=(2, 12))),
])
def test_scene_filters(options, expected_kwargs):
  kwargs = {**PANOPTIC_DEFAULTS, **options}
  result = run_jitted(panoptic, scene_outputs(), scene_memory(),
                      IMAGE_SIZE, **kwargs)
  np.testing.assert_array_equal(result["panoptic"], scene_expected(**expected_kwargs))
  assert result["det_valid"][:3].all()  # the filters act on segments, not on detections


def test_category_from_memory_picks_nearest_thing_row():
  kwargs = {**PANOPTIC_DEFAULTS, "merge_things": False}
  by_box = run_jitted(panoptic, scene_outputs(), scene_memory(False),
                      IMAGE_SIZE, **kwargs)
  by_memory = run_jitted(panoptic, scene_outputs(), scene_memory(False),
                         IMAGE_SIZE, category_from="memory", **kwargs)
  # Box classifier: A class 1, B class 2. Memory: A is nearest thing row 2 (e6), B row 0 (e4).
  np.testing.assert_array_equal(by_box["query_class"][2:4], [NUM_STUFF + 1, NUM_STUFF + 2])
  np.testing.assert_array_equal(by_memory["query_class"][2:4], [NUM_STUFF + 2, NUM_STUFF + 0])
  np.testing.assert_array_equal(by_memory["panoptic"], by_box["panoptic"])
  np.testing.assert_array_equal(by_memory["det_class"], by_box["det_class"])


@pytest.mark.parametrize("change, message", [
    (dict(category_from="memory"), "merge_things"),
    (dict(category_from="mask"), "category_from"),
    (dict(memory=np.zeros((5, EMBED_DIM), np.float32)), "memory has 5 rows"),
    (dict(embedding=np.zeros((1, SIZE, SIZE, EMBED_DIM), np.float32)), "batch axis"),
    (dict(drop="centerness"), "centerness"),
    (dict(strides=(8, 16, 32)), "levels"),
])
def test_bad_input_raises(change, message):
  change = dict(change)
  outputs = scene_outputs()
  memory = change.pop("memory", scene_memory())
  if "embedding" in change:
    outputs["embedding"] = change.pop("embedding")
  if "drop" in change:
    del outputs[change.pop("drop")]
  kwargs = {**PANOPTIC_DEFAULTS, **change}
  with pytest.raises(ValueError, match=message):
    panoptic(outputs, memory, IMAGE_SIZE, **kwargs)


def test_vmapped_batch_equals_single_images():
  first, second = scene_outputs(), scene_outputs()
  second["cls_logits"][1][1, 1, 2] = -10.0  # no B in the second image
  batch = jax.tree.map(lambda *xs: np.stack(xs), first, second)
  sizes = np.stack([IMAGE_SIZE, np.array([32, 32], np.int32)])
  fn = functools.partial(panoptic, **PANOPTIC_DEFAULTS)
  batched = jax.tree.map(np.asarray,
                         jax.jit(jax.vmap(fn, in_axes=(0, None, 0)))(batch, scene_memory(), sizes))
  np.testing.assert_array_equal(batched["panoptic"][0], scene_expected())
  for image, outputs in enumerate((first, second)):
    single = run_jitted(panoptic, outputs, scene_memory(), sizes[image],
                        **PANOPTIC_DEFAULTS)
    for key, value in single.items():
      np.testing.assert_array_equal(batched[key][image], value, err_msg=key)


# ------------------------------------------------------------------------------------------------
# Random scenes against a NumPy reference of the whole pipeline (loops from the paper).


def reference_iou(a, b) -> float:
  inter = (max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
           * max(0.0, min(a[3], b[3]) - max(a[1], b[1])))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / max(union, 1e-12)


def reference_panoptic(outputs, memory, image_size, *, num_stuff, strides, pre_nms_thresh,
                       pre_nms_top_n, nms_thresh, max_detections, stuff_area,
                       instance_min_area, instance_score_thresh, box_expand_infer,
                       outside_box_similarity, resize_scale):
  """Decoding, greedy NMS, Eq. 16 with the box filter, and the area filters, in loops."""
  height, width = int(image_size[0]), int(image_size[1])
  candidates = []
  for logits, ctr, reg, stride in zip(outputs["cls_logits"], outputs["centerness"],
                                      outputs["box_reg"], strides):
    level = []
    for y in range(logits.shape[0]):
      for x in range(logits.shape[1]):
        for k in range(logits.shape[2]):
          if sigmoid(logits[y, x, k]) > pre_nms_thresh:
            level.append((sigmoid(logits[y, x, k]) * sigmoid(ctr[y, x]), y, x, k, stride))
    level.sort(key=lambda c: -c[0])
    for score, y, x, k, s in level[:pre_nms_top_n]:
      loc_x, loc_y = x * s + s // 2, y * s + s // 2
      l, t, r, b = reg[y, x]
      box = (min(max(loc_x - l, 0), width), min(max(loc_y - t, 0), height),
             min(max(loc_x + r, 0), width), min(max(loc_y + b, 0), height))
      if box[2] > box[0] and box[3] > box[1]:
        candidates.append(dict(score=score, box=box, k=k, loc=(loc_x, loc_y)))
  order = sorted(range(len(candidates)), key=lambda i: -candidates[i]["score"])
  kept, dead = [], set()
  for position, i in enumerate(order):
    if i in dead:
      continue
    kept.append(candidates[i])
    for j in order[position + 1:]:
      if (candidates[j]["k"] == candidates[i]["k"]
          and reference_iou(candidates[i]["box"], candidates[j]["box"]) > nms_thresh):
        dead.add(j)
  kept = kept[:max_detections]

  embedding = outputs["embedding"].astype(np.float64)
  queries = [m / np.linalg.norm(m) for m in memory[:num_stuff].astype(np.float64)]
  boxes, usable = [], []
  for det in kept:
    x0, y0, x1, y1 = det["box"]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    hw, hh = (x1 - x0) / 2 * box_expand_infer, (y1 - y0) / 2 * box_expand_infer
    boxes.append((cx - hw, cy - hh, cx + hw, cy + hh))
    query = embedding[min(det["loc"][1], height - 1), min(det["loc"][0], width - 1)]
    queries.append(query / np.linalg.norm(query))
    usable.append(det["score"] >= instance_score_thresh)
  assignment = np.full((SIZE, SIZE), -1)
  for y in range(height):
    for x in range(width):
      best, best_similarity = -1, -np.inf
      for q, query in enumerate(queries):
        similarity = float(embedding[y, x] @ query)
        if q >= num_stuff:
          x0, y0, x1, y1 = boxes[q - num_stuff]
          if not usable[q - num_stuff]:
            similarity = -np.inf
          elif not (x0 <= x + 0.5 <= x1 and y0 <= y + 0.5 <= y1):
            similarity = outside_box_similarity
        if similarity > best_similarity:
          best, best_similarity = q, similarity
      assignment[y, x] = best
  panoptic = np.zeros((SIZE, SIZE), np.int32)
  for q in range(len(queries)):
    area = int((assignment == q).sum())
    threshold = (stuff_area if q < num_stuff else instance_min_area) * resize_scale**2
    if area > 0 and area >= threshold and (q < num_stuff or usable[q - num_stuff]):
      panoptic[assignment == q] = q + 1
  return panoptic, kept


@pytest.mark.parametrize("accelerator_paths", [False, True])
@pytest.mark.parametrize("seed, options", [
    (0, dict()),
    (1, dict(outside_box_similarity=-np.inf, box_expand_infer=1.5, instance_score_thresh=0.08,
             resize_scale=0.8)),
])
def test_random_scene_matches_numpy_reference(seed, options, accelerator_paths, monkeypatch):
  if accelerator_paths:  # What programs for accelerators choose, run here on CPU.
    for name, served in (("nms_fixed_point", ("cpu",)), ("assign_bands", ())):
      monkeypatch.setitem(platforms.FAST_PATHS, name,
                          dataclasses.replace(platforms.FAST_PATHS[name], platforms=served))
    assert platforms.choices("cpu")["nms_fixed_point"] == "fast"
  rng = np.random.default_rng(seed)
  num_stuff, num_things, embed_dim = 3, 3, 6
  outputs = empty_outputs(embed_dim, num_things)
  for level in range(len(STRIDES)):
    shape = outputs["centerness"][level].shape
    outputs["cls_logits"][level][...] = rng.normal(-3.5, 1.5, shape + (num_things,))
    outputs["centerness"][level][...] = rng.normal(0, 1, shape)
    outputs["box_reg"][level][...] = rng.uniform(0, 14, shape + (4,))
  # Blocks of 4 x 4 pixels with one embedding (plus noise), so that detection queries win pixels.
  blocks = rng.normal(size=(SIZE // 4, SIZE // 4, embed_dim))
  embedding = np.repeat(np.repeat(blocks, 4, axis=0), 4, axis=1)  # [H, W, D]
  embedding += rng.normal(0, 0.3, size=embedding.shape)
  outputs["embedding"][...] = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)
  memory = rng.normal(size=(num_stuff + 1, embed_dim)).astype(np.float32)
  memory /= np.linalg.norm(memory, axis=-1, keepdims=True)
  image_size = np.array([30, 27], np.int32)
  kwargs = dict(num_stuff=num_stuff, strides=STRIDES, pre_nms_thresh=0.05, pre_nms_top_n=6,
                nms_thresh=0.5, max_detections=5, stuff_area=40, instance_min_area=10,
                instance_score_thresh=0.0, box_expand_infer=1.0, outside_box_similarity=0.0,
                resize_scale=1.0)
  kwargs.update(options)
  result = run_jitted(panoptic, outputs, memory, image_size, **kwargs)
  expected_map, kept = reference_panoptic(outputs, memory, image_size, **kwargs)
  assert len(kept) == 5, "the scene should fill every detection slot"
  # Boxes: a location -/+ a float32 regression of up to 14 px, clipped to the 30 x 27 image:
  # a few roundings of 2^-24 * 32 ~ 2e-6 each vs float64, atol 1e-4. Scores as above.
  np.testing.assert_allclose(result["det_box"], [d["box"] for d in kept], atol=1e-4)
  np.testing.assert_allclose(result["det_score"], [d["score"] for d in kept], rtol=1e-5)
  np.testing.assert_array_equal(result["panoptic"], expected_map)
  assert (expected_map > num_stuff).sum() > 20, "instances should own pixels"
  assert len(np.unique(expected_map)) > 5, "the scene should have several segments"


# ------------------------------------------------------------------------------------------------
# Oracle mode.


def oracle_scene(rng: np.random.Generator):
  """Ground truth with 2 stuff segments, 3 thing segments (row 3 crowd), void and padding."""
  segment_map = np.zeros((SIZE, SIZE), np.int32)
  segment_map[:, :] = 1  # stuff class 0
  segment_map[16:, :] = 2  # stuff class 1
  segment_map[3:12, 4:15] = 3  # thing row 2
  segment_map[6:9, 10:20] = 4  # thing row 3 (crowd), overlapping row 2's box
  segment_map[18:27, 20:29] = 5  # thing row 4
  segment_map[14:16, 0:6] = 0  # void
  segment_map[28:, :] = 0  # padding rows (image_size 28 x 32)
  seg_class = np.array([0, 1, 2, 4, 3, 0], np.int32)
  seg_is_thing = np.array([False, False, True, True, True, False])
  seg_is_crowd = np.array([False, False, False, True, False, False])
  seg_valid = np.array([True, True, True, True, True, False])
  seg_box = np.zeros((6, 4), np.float32)
  for row in range(5):
    ys, xs = np.nonzero(segment_map == row + 1)
    seg_box[row] = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
  # Perfect embeddings: stuff pixels on their memory row, each instance on its own direction.
  memory = np.stack([BASIS[0], BASIS[1], BASIS[7]])
  directions = {1: BASIS[0], 2: BASIS[1], 3: BASIS[2], 4: BASIS[3], 5: BASIS[4]}
  embedding = np.tile(unit(np.ones(EMBED_DIM)), (SIZE, SIZE, 1))
  for segment_id, direction in directions.items():
    embedding[segment_map == segment_id] = direction
  # Void pixels inside row 4's box, nearer stuff 0 (0.8) than row 4 (0.6): they show that the
  # instance query is a unit vector (an unnormalised sum of ~80 pixels would win them).
  segment_map[20:22, 22:26] = 0
  embedding[20:22, 22:26] = unit(0.8 * BASIS[0] + 0.6 * BASIS[4])
  prenorm = embedding * rng.uniform(0.5, 3.0, size=(SIZE, SIZE, 1)).astype(np.float32)
  outputs = {"embedding": embedding, "embedding_prenorm": prenorm}
  gt = (segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_box, seg_valid)
  return outputs, memory, gt


@pytest.mark.parametrize("include_crowd", [True, False])
def test_oracle_reproduces_ground_truth_with_perfect_embeddings(include_crowd):
  outputs, memory, gt = oracle_scene(np.random.default_rng(0))
  segment_map, seg_class = gt[0], gt[1]
  result = run_jitted(oracle, outputs, memory, *gt,
                      image_size=np.array([28, 32], np.int32), num_stuff=NUM_STUFF,
                      stuff_area=0, instance_min_area=0, include_crowd=include_crowd)
  assert result["panoptic"].shape == (SIZE, SIZE)
  assert result["query_class"].shape == (NUM_STUFF + 6,)
  # Stuff segment with class c -> query c; thing segment row k -> query num_stuff + k.
  expected = np.zeros_like(segment_map)
  for row, cls in enumerate(seg_class[:5]):
    query = cls if row < 2 else NUM_STUFF + row
    expected[segment_map == row + 1] = query + 1
  if not include_crowd:
    # Without its query, the crowd row's pixels (direction e3) are equally far (0) from all
    # queries inside the boxes; they go to stuff 0, the first query.
    expected[segment_map == 4] = 1
  labelled = segment_map > 0
  np.testing.assert_array_equal(result["panoptic"][labelled], expected[labelled])
  assert (result["panoptic"][28:] == 0).all()
  assert (result["panoptic"][20:22, 22:26] == 1).all()
  # Instance queries of the stuff rows 0, 1 and the padding row 5 are invalid.
  np.testing.assert_array_equal(result["query_class"][NUM_STUFF + 2:NUM_STUFF + 5], [2, 4, 3])
  np.testing.assert_array_equal(result["query_valid"],
                                [True, True, False, False, True, include_crowd, True, False])
  np.testing.assert_array_equal(result["det_valid"],
                                [False, False, True, include_crowd, True, False])
  for row in (2, 3, 4) if include_crowd else (2, 4):
    # Oracle boxes are the ground-truth boxes copied: exact (default rtol 1e-7 < 1 ulp).
    np.testing.assert_allclose(result["det_box"][row], gt[4][row])


# ------------------------------------------------------------------------------------------------
# The banded assignment against the whole-image expression it replaced.


def whole_image_assignment(embedding, stuff_queries, thing_queries, thing_boxes, thing_usable,
                           *, box_expand, outside_box_similarity):
  """The [H, W, Q] expression of Eq. 16 in one piece, with jnp.argmax (the code before bands)."""
  num_rows, num_cols, _ = embedding.shape
  queries = jnp.concatenate([stuff_queries, thing_queries], axis=0)  # [Q, D]
  similarity = jnp.einsum("hwd,qd->hwq", embedding, queries,
                          precision=jax.lax.Precision.HIGHEST)  # [H, W, Q]
  boxes = ops.expand_boxes(thing_boxes, box_expand)  # [K, 4]
  pixel_y = jnp.arange(num_rows, dtype=jnp.float32)[:, None, None] + 0.5
  pixel_x = jnp.arange(num_cols, dtype=jnp.float32)[None, :, None] + 0.5
  in_box = ((pixel_y >= boxes[:, 1]) & (pixel_y <= boxes[:, 3]) & (pixel_x >= boxes[:, 0])
            & (pixel_x <= boxes[:, 2]))  # [H, W, K]
  num_stuff = stuff_queries.shape[0]
  in_box = jnp.concatenate([jnp.ones((num_rows, num_cols, num_stuff), bool), in_box], -1)
  usable = jnp.concatenate([jnp.ones((num_stuff,), bool), thing_usable])  # [Q]
  similarity = jnp.where(in_box, similarity, outside_box_similarity)
  similarity = jnp.where(usable, similarity, -jnp.inf)
  return jnp.argmax(similarity, axis=-1)  # [H, W]


def random_assignment_inputs(rng, height, width, num_stuff, num_things, dim=8):
  embedding = rng.normal(size=(height, width, dim)).astype(np.float32)
  embedding /= np.linalg.norm(embedding, axis=-1, keepdims=True)
  stuff = rng.normal(size=(num_stuff, dim)).astype(np.float32)
  things = rng.normal(size=(num_things, dim)).astype(np.float32)
  if num_stuff and num_things > 1:
    things[1] = stuff[0]  # A tie on every pixel: the first of the two (stuff 0) wins.
  wh = rng.uniform(2, max(3, min(height, width)), size=(num_things, 2))
  x0, y0 = rng.uniform(-2, width, num_things), rng.uniform(-2, height, num_things)
  boxes = np.stack([x0, y0, x0 + wh[:, 0], y0 + wh[:, 1]], -1).astype(np.float32)
  usable = rng.uniform(size=num_things) > 0.2
  return embedding, stuff, things, boxes, usable


@pytest.mark.parametrize("height, width, num_stuff, num_things, band_elements, outside", [
    (37, 23, 3, 9, 23 * 12 * 4, 0.0),  # bands of 4 rows, the last one padded
    (37, 23, 3, 9, 1, -np.inf),  # one row per band
    (16, 40, 2, 30, 10**9, 0.0),  # one band
    (9, 11, 0, 5, 11 * 5 * 2, 0.0),  # no stuff queries
])
def test_banded_assignment_equals_whole_image(height, width, num_stuff, num_things,
                                              band_elements, outside):
  rng = np.random.default_rng(height + num_things)
  embedding, stuff, things, boxes, usable = random_assignment_inputs(
      rng, height, width, num_stuff, num_things)
  embedding[3, 4] = np.nan  # A NaN pixel takes argmax's answer too.
  kwargs = dict(box_expand=1.2, outside_box_similarity=outside)
  expected = np.asarray(jax.jit(functools.partial(whole_image_assignment, **kwargs))(
      embedding, stuff, things, boxes, usable))
  assignment, inside = run_jitted(
      inference.assign_pixels, embedding, stuff, things, boxes, usable, height - 2, width,
      band_elements=band_elements, **kwargs)
  np.testing.assert_array_equal(assignment, expected)
  assert inside.sum() == (height - 2) * width
  assert len(np.unique(expected)) > 3, "the scene should have several winners"


def test_banded_assignment_vmapped_with_all_things_unusable():
  rng = np.random.default_rng(5)
  inputs = [random_assignment_inputs(rng, 13, 17, 0, 4) for _ in range(2)]
  embedding, stuff, things, boxes, usable = (np.stack(xs) for xs in zip(*inputs))
  usable[1] = False  # No usable query at all: every similarity is -inf, argmax says 0.
  kwargs = dict(box_expand=1.0, outside_box_similarity=0.0)
  fn = functools.partial(inference.assign_pixels, band_elements=17 * 4 * 3, **kwargs)
  batched = jax.jit(jax.vmap(lambda *a: fn(*a, 13, 17)[0]))(embedding, stuff, things, boxes,
                                                             usable)
  expected = jax.vmap(functools.partial(whole_image_assignment, **kwargs))(
      embedding, stuff, things, boxes, usable)
  np.testing.assert_array_equal(np.asarray(batched), np.asarray(expected))
  assert (np.asarray(batched)[1] == 0).all()


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_first_argmax_equals_argmax(axis):
  rng = np.random.default_rng(axis + 3)
  values = rng.integers(-3, 4, size=(6, 7, 5)).astype(np.float32)  # many ties
  values[0, 0, :] = -np.inf
  values[:, 1, 1] = -np.inf
  values[2, 2, 2] = np.nan
  values[3, :, 4] = np.inf
  values[4, 3, :] = np.nan
  np.testing.assert_array_equal(np.asarray(jax.jit(assign.first_argmax, static_argnums=1)(
      values, axis)), np.argmax(values, axis=axis))


def test_platform_paths_of_the_assignment_agree_exactly():
  """CPU takes bands of `BAND_ELEMENTS` (here 3 of 455 rows, the last one padded); the plain
  path (accelerators) is the whole-image expression. Same expression per pixel: equal."""
  rng = np.random.default_rng(11)
  embedding, stuff, things, boxes, usable = random_assignment_inputs(rng, 1200, 48, 3, 45)
  embedding[7, 5] = np.nan
  kwargs = dict(box_expand=1.1, outside_box_similarity=0.0)
  args = (embedding, stuff, things, boxes, usable, 1190, 47)
  banded, inside = run_jitted(inference.assign_pixels, *args, **kwargs)
  whole, _ = run_jitted(inference.assign_pixels, *args, band_elements=10**12, **kwargs)
  np.testing.assert_array_equal(banded, whole)
  np.testing.assert_array_equal(whole, np.asarray(jax.jit(functools.partial(
      whole_image_assignment, **kwargs))(*args[:5])))
  assert (whole == 0).any() and len(np.unique(whole)) > 10  # stuff 0 wins its ties
  assert inside.sum() == 1190 * 47
  band_rows = assign.BAND_ELEMENTS // (48 * 48)
  text = {elements: lowered_loops.lowered_text(functools.partial(
      inference.assign_pixels, band_elements=elements, **kwargs), *args, platform="cpu")
          for elements in (None, 10**12)}
  assert lowered_loops.static_trip_counts(text[None]) == [-(-1200 // band_rows)] == [3]
  assert lowered_loops.num_loops(text[10**12]) == 0


@pytest.mark.parametrize("stuff_from, category_from", [
    ("embedding", "box"), ("semantic", "box"), ("embedding", "memory")])
def test_cuda_program_at_800_by_1344_has_no_band_loop_and_no_nms_steps(stuff_from,
                                                                       category_from):
  """The whole inference program, lowered (not run) for cuda and cpu from array shapes; its
  similarity dots at full float32 precision (no TF32)."""
  height, width, num_stuff, num_things, dim = 800, 1344, 53, 80, 32
  hp = dataclasses.replace(hparams.InferenceHParams(), category_from=category_from)
  merge_things = category_from == "box"
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  levels = [(-(-height // s), -(-width // s)) for s in hparams.LEVEL_STRIDES]
  outputs = {"cls_logits": [f32(h, w, num_things) for h, w in levels],
             "centerness": [f32(h, w) for h, w in levels],
             "box_reg": [f32(h, w, 4) for h, w in levels],
             "embedding": f32(height, width, dim),
             "semantic_logits": f32(height // 4, width // 4, num_stuff + 1)}
  infer = functools.partial(inference.panoptic_inference, hp=hp, num_stuff=num_stuff,
                            merge_things=merge_things, stuff_from=stuff_from)
  memory = f32(num_stuff + (1 if merge_things else num_things), dim)
  text = {platform: lowered_loops.lowered_text(
      infer, outputs, memory, jax.ShapeDtypeStruct((2,), jnp.int32),
      platform=platform) for platform in ("cpu", "cuda")}
  queries = (0 if stuff_from == "semantic" else num_stuff) + hp.max_detections
  band_rows = assign.BAND_ELEMENTS // (width * queries)
  assert sorted(lowered_loops.static_trip_counts(text["cpu"])) == sorted(
      [hp.max_detections, -(-height // band_rows)])
  assert lowered_loops.static_trip_counts(text["cuda"]) == []
  assert lowered_loops.num_loops(text["cuda"]) == 1  # NMS's fixed point
  dots = text["cuda"].count("stablehlo.dot_general")
  assert dots == (2 if category_from == "memory" else 1)
  assert text["cuda"].count("precision = [HIGHEST, HIGHEST]") == dots
