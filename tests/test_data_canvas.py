"""Canvases: the resize rule, per-orientation canvases, which canvas an image goes to."""
import pytest

from ciae_jax import hparams
from ciae_jax.data import canvas


def test_resize_rule_shorter_side_then_longer_side_cap():
  assert canvas.resized_shape(480, 640, min_size=800, max_size=1333) == (800, 1067)
  assert canvas.resized_shape(360, 640, min_size=800, max_size=1333) == (750, 1333)  # capped
  assert canvas.resized_shape(640, 427, min_size=800, max_size=1333) == (1199, 800)
  with pytest.raises(ValueError, match="positive"):
    canvas.resized_shape(0, 10, min_size=800, max_size=1333)


def test_derived_canvases_one_per_orientation_multiples_of_32():
  assert canvas.canvases(hparams.DatasetHParams()) == ((800, 1344), (1344, 800))
  square = hparams.DatasetHParams(train_min_size_range=(128, 128), max_size=128,
                                  eval_min_size=128, eval_max_size=128)
  assert canvas.canvases(square) == ((128, 128),)
  # The jitter range's upper end sizes the canvas.
  jitter = hparams.DatasetHParams(train_min_size_range=(640, 800), eval_min_size=700)
  assert canvas.canvases(jitter) == ((800, 1344), (1344, 800))
  given = hparams.DatasetHParams(canvas_sizes=((384, 640),))
  assert canvas.canvases(given) == ((384, 640),)


def test_canvas_for_takes_the_smallest_that_holds_else_the_least_shrinking():
  options = ((800, 1344), (1344, 800), (1344, 1344))
  assert canvas.canvas_for((800, 1067), options) == 0
  assert canvas.canvas_for((1199, 800), options) == 1
  assert canvas.canvas_for((1000, 1000), options) == 2
  assert canvas.canvas_for((2000, 500), ((800, 1344), (1344, 800))) == 1
  assert canvas.fit_to_canvas((2000, 500), (1344, 800)) == (1344, 336)
  assert canvas.fit_to_canvas((700, 500), (1344, 800)) == (700, 500)
  assert canvas.union_canvas(options[:2]) == (1344, 1344)


def test_coco_sample_sizes_pad_to_at_most_115_percent():
  # The two images of the COCO sample (427 x 640 and 360 x 640) at 800 / 1333: padding
  # is exact integer arithmetic, so the bound is checked exactly.
  options = canvas.canvases(hparams.DatasetHParams())
  for height, width in ((427, 640), (360, 640)):
    size = canvas.resized_shape(height, width, min_size=800, max_size=1333)
    h, w = options[canvas.canvas_for(size, options)]
    assert h * w <= 1.15 * size[0] * size[1]


def test_place_is_the_rule_then_the_canvas_then_the_fit():
  options = canvas.canvases(hparams.DatasetHParams())
  assert canvas.place(427, 640, min_size=800, max_size=1333, options=options) == (0, (800, 1199))
  assert canvas.place(640, 427, min_size=800, max_size=1333, options=options) == (1, (1199, 800))
  # Fits neither 384 x 640 nor 640 x 384 at 800: the least-shrinking canvas, then the fit.
  small = ((384, 640), (640, 384))
  assert canvas.place(427, 640, min_size=800, max_size=1333, options=small) == (0, (384, 576))
