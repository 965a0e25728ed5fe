"""FCOS targets (ciae_jax/targets.py) vs a plain NumPy loop over levels, locations, segments."""
import functools
import math

import jax
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax import targets as targets_lib
from ciae_jax.segments import Segments

NUM_STUFF = 3
NUM_THINGS = 4


def _random_layout(rng, height, width, num_rows, num_things, crowd_rows=(), region="mask"):
  """Paints 2 stuff segments then `num_things` rectangles/discs (later ones occlude earlier ones).

  Returns per-example arrays with `num_rows` segment rows (the last ones padding). Boxes are the
  visible extent of each mask (mask mode), or the painted shape's full extent, fractional and
  with two equal-size overlapping boxes (box mode, to make ties).
  """
  segment_map = np.zeros((height, width), np.int32)
  seg_class = np.zeros(num_rows, np.int32)
  seg_is_thing = np.zeros(num_rows, bool)
  seg_is_crowd = np.zeros(num_rows, bool)
  seg_box = np.zeros((num_rows, 4), np.float32)
  seg_valid = np.zeros(num_rows, bool)
  shape_box = np.zeros((num_rows, 4), np.float32)
  # Stuff: the top and bottom bands, leaving some void in between.
  split = height // 2
  segment_map[: split - 3] = 1
  segment_map[split + 3:] = 2
  seg_class[:2] = rng.choice(NUM_STUFF, 2, replace=False)
  seg_valid[:2] = True
  ys, xs = np.mgrid[:height, :width]
  for k in range(2, 2 + num_things):
    bw = int(np.exp(rng.uniform(np.log(4), np.log(width))))  # log-uniform: every level
    bh = int(np.exp(rng.uniform(np.log(4), np.log(height))))
    if region == "box" and k == 3:  # same size as row 2, shifted: an equal-area overlap.
      bw, bh = int(shape_box[2, 2] - shape_box[2, 0]), int(shape_box[2, 3] - shape_box[2, 1])
      x0 = int(min(shape_box[2, 0] + bw // 3, width - bw))
      y0 = int(min(shape_box[2, 1] + bh // 4, height - bh))
    else:
      x0 = int(rng.integers(-bw // 3, width - bw + bw // 3 + 1))
      y0 = int(rng.integers(-bh // 3, height - bh + bh // 3 + 1))
    if rng.random() < 0.5:
      inside = (xs >= x0) & (xs < x0 + bw) & (ys >= y0) & (ys < y0 + bh)
    else:  # a disc (ellipse) inscribed in the rectangle
      cx, cy = x0 + bw / 2, y0 + bh / 2
      inside = ((xs + 0.5 - cx) / (bw / 2)) ** 2 + ((ys + 0.5 - cy) / (bh / 2)) ** 2 <= 1
    segment_map[inside] = k + 1
    seg_class[k] = NUM_STUFF + int(rng.integers(NUM_THINGS))
    seg_is_thing[k] = True
    seg_is_crowd[k] = k in crowd_rows
    seg_valid[k] = True
    shape_box[k] = [max(x0, 0), max(y0, 0), min(x0 + bw, width), min(y0 + bh, height)]
  for k in range(num_rows):
    if not seg_valid[k]:
      continue
    rows, cols = np.nonzero(segment_map == k + 1)
    if rows.size == 0:  # fully occluded: drop, as the input pipeline would
      seg_valid[k] = False
      continue
    seg_box[k] = [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
  if region == "box":
    seg_box = np.where(seg_is_thing[:, None] & seg_valid[:, None], shape_box, seg_box)
    seg_box[4:] *= np.float32(0.75)  # fractional coordinates too
  # A padding row whose box would catch many locations: must be ignored.
  seg_box[-1] = [0, 0, width, height]
  seg_class[-1] = NUM_STUFF
  seg_is_thing[-1] = True
  return dict(segment_map=segment_map, seg_class=seg_class, seg_is_thing=seg_is_thing,
              seg_is_crowd=seg_is_crowd, seg_box=seg_box.astype(np.float32), seg_valid=seg_valid)


def _reference(ex, strides, sizes, region):
  """Plain loops: one location at a time, one segment at a time."""
  segment_map = ex["segment_map"]
  height, width = segment_map.shape
  box = ex["seg_box"].astype(np.float64)
  bounds = [0.0] + list(sizes) + [math.inf]
  out = {k: [] for k in ("cls_target", "box_target", "centerness_target", "positive",
                         "matched_segment")}
  num_ties = 0
  for level, stride in enumerate(strides):
    for y in range(-(-height // stride)):
      for x in range(-(-width // stride)):
        px, py = x * stride + stride // 2, y * stride + stride // 2
        best, best_area, best_ltrb, num_candidates = -1, math.inf, None, 0
        for k in range(len(ex["seg_class"])):
          if not ex["seg_valid"][k] or not ex["seg_is_thing"][k] or ex["seg_is_crowd"][k]:
            continue
          ltrb = (px - box[k, 0], py - box[k, 1], box[k, 2] - px, box[k, 3] - py)
          if region == "mask":
            if segment_map[min(py, height - 1), min(px, width - 1)] != k + 1 or min(ltrb) < 0:
              continue
          elif min(ltrb) <= 0:
            continue
          if not bounds[level] <= max(ltrb) <= bounds[level + 1]:
            continue
          num_candidates += 1
          area = (box[k, 2] - box[k, 0]) * (box[k, 3] - box[k, 1])
          if area < best_area:
            best, best_area, best_ltrb = k, area, ltrb
        num_ties += num_candidates > 1
        if best < 0:
          out["cls_target"].append(-1)
          out["box_target"].append((0.0, 0.0, 0.0, 0.0))
          out["centerness_target"].append(0.0)
        else:
          l, t, r, b = best_ltrb
          ratio_x = min(l, r) / max(l, r) if max(l, r) > 0 else 0.0
          ratio_y = min(t, b) / max(t, b) if max(t, b) > 0 else 0.0
          out["cls_target"].append(ex["seg_class"][best] - NUM_STUFF)
          out["box_target"].append(best_ltrb)
          out["centerness_target"].append(math.sqrt(ratio_x * ratio_y))
        out["positive"].append(best >= 0)
        out["matched_segment"].append(best)
  return {k: np.array(v) for k, v in out.items()}, num_ties


def _targets(*, strides=hparams.LEVEL_STRIDES, sizes=hparams.FcosHParams().sizes,  # noqa: B008
             positive_region="mask", **ex):
  """`fcos_targets` of an example dict of segment arrays."""
  hp = hparams.FcosHParams(sizes=sizes, positive_region=positive_region)
  return targets_lib.fcos_targets(Segments(**ex), num_stuff=NUM_STUFF, hp=hp, strides=strides)


@functools.cache
def _jitted(strides, sizes, region):
  return jax.jit(functools.partial(_targets, strides=strides, sizes=sizes,
                                   positive_region=region))


def _run(ex, strides, sizes, region):
  return jax.tree.map(np.asarray, _jitted(strides, sizes, region)(**ex))


def _assert_equal(got, want):
  for key in ("cls_target", "positive", "matched_segment"):
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # ltrb distances from integer boxes to pixel locations, < 1024 px: a float32 rounding is at
  # most 2^-24 * 1024 = 6e-5 (measured: exact), atol 1e-4. Centerness sqrt(ratio * ratio)
  # of values <= 1: a few roundings of 6e-8, atol 1e-5.
  np.testing.assert_allclose(got["box_target"], want["box_target"], atol=1e-4)
  np.testing.assert_allclose(got["centerness_target"], want["centerness_target"], atol=1e-5)


# (height, width, strides, sizes): small strides and sizes so that instances of small images span
# all levels;
# an image not divisible by the strides (ceil division, clipped mask lookups); the defaults.
CASES = [
    (128, 128, (4, 8, 16, 32, 64), (16, 32, 48, 64)),
    (100, 76, (8, 16, 32, 64, 128), (16, 24, 32, 48)),
    (256, 192, (8, 16, 32, 64, 128), (64, 128, 256, 512)),
]


@pytest.mark.parametrize("region", ["mask", "box"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fcos_targets_match_loop_reference(case, region):
  height, width, strides, sizes = CASES[case]
  total_pos = total_ties = 0
  levels_hit = set()
  for seed in range(4):
    rng = np.random.default_rng(100 * case + seed)
    ex = _random_layout(rng, height, width, num_rows=10, num_things=7, crowd_rows=(4,),
                        region=region)
    want, ties = _reference(ex, strides, sizes, region)
    got = _run(ex, strides, sizes, region)
    _assert_equal(got, want)
    total_pos += want["positive"].sum()
    total_ties += ties
    _, level = targets_lib.fcos_locations(
        targets_lib.level_shapes_for((height, width), strides), strides)
    levels_hit |= set(level[want["positive"]].tolist())
    # Crowd (row 4) and the padding row never match.
    assert not np.isin(got["matched_segment"], [4, 9]).any()
  assert total_pos > 15  # the layouts do exercise positives ...
  assert len(levels_hit) >= (2 if case == 2 else 3)  # ... on several levels
  if region == "box":
    assert total_ties > 0  # overlapping boxes: the smallest-area rule is exercised
  else:
    assert total_ties == 0  # one segment per pixel: masks never tie


def test_equal_area_tie_goes_to_lowest_row():
  height = width = 64
  segment_map = np.zeros((height, width), np.int32)
  ex = dict(segment_map=segment_map,
            seg_class=np.array([NUM_STUFF + 1, NUM_STUFF + 2, NUM_STUFF], np.int32),
            seg_is_thing=np.array([True, True, True]),
            seg_is_crowd=np.zeros(3, bool),
            # rows 0 and 1 have the same area, row 2 is larger
            seg_box=np.array([[4, 4, 36, 36], [8, 8, 40, 40], [0, 0, 48, 48]], np.float32),
            seg_valid=np.ones(3, bool))
  strides, sizes = (8, 16, 32, 64, 128), (64, 128, 256, 512)
  got = _run(ex, strides, sizes, "box")
  want, ties = _reference(ex, strides, sizes, "box")
  _assert_equal(got, want)
  assert ties > 0
  # A location inside both equal boxes (20, 20 at stride 8: cell (2, 2)) goes to row 0.
  assert got["matched_segment"][2 * 8 + 2] == 0


def test_empty_image_has_no_positives_and_batch_vmap():
  rng = np.random.default_rng(7)
  ex = _random_layout(rng, 128, 128, num_rows=9, num_things=6, crowd_rows=(4,))
  empty = dict(ex, seg_valid=np.zeros_like(ex["seg_valid"]))
  batch = jax.tree.map(lambda a, b: np.stack([a, b]), ex, empty)
  fn = functools.partial(_targets, sizes=(8, 16, 32, 48))
  got = jax.tree.map(np.asarray, jax.jit(jax.vmap(fn))(**batch))
  single = jax.tree.map(np.asarray, fn(**ex))
  for key in single:
    np.testing.assert_array_equal(got[key][0], single[key], err_msg=key)
  assert single["positive"].any()
  assert not got["positive"][1].any()
  assert (got["cls_target"][1] == -1).all() and (got["matched_segment"][1] == -1).all()
  assert (got["box_target"][1] == 0).all() and (got["centerness_target"][1] == 0).all()


def test_level_shapes_and_locations():
  assert targets_lib.level_shapes_for((100, 76), (8, 16, 32, 64, 128)) == (
      (13, 10), (7, 5), (4, 3), (2, 2), (1, 1))
  points, level = targets_lib.fcos_locations(((2, 3), (1, 2)), (8, 16))
  np.testing.assert_array_equal(points, [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12],
                                         [8, 8], [24, 8]])
  np.testing.assert_array_equal(level, [0, 0, 0, 0, 0, 0, 1, 1])


def test_bad_arguments_raise():
  rng = np.random.default_rng(0)
  ex = _random_layout(rng, 64, 64, num_rows=9, num_things=3)
  with pytest.raises(ValueError, match="positive_region"):
    _targets(**ex, positive_region="centre")
  with pytest.raises(ValueError, match="seg_box"):
    _targets(**dict(ex, seg_box=ex["seg_box"][:, :3]))
  with pytest.raises(ValueError, match="sizes"):
    _targets(**ex, sizes=(64, 128))
