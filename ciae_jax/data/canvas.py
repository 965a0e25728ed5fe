"""Image sizes: the resize rule and the canvases images are padded to (plain Python, no TF).

An image is resized so that its shorter side is `min_size` unless its longer side would then
exceed `max_size` (paper V-C: 800 / 1333), then padded at the bottom and right to a *canvas*,
a static `(H, W)` with both sides multiples of 32 (the coarsest backbone stride) that every
compiled program is specialised to. A dataset has a few canvases (`canvases(hp)`): by default
one per orientation, derived from the sizes (800 x 1333 images go into 800 x 1344 or
1344 x 800), so that an image is padded to at most ~1.15x its pixels instead of to a square.
Each image goes to the smallest canvas that holds it (`canvas_for`); an image that fits none
(a user's `canvas_sizes` too small) is shrunk until it fits the largest (`fit_to_canvas`).
"""
from __future__ import annotations

import math
from typing import Sequence

from ciae_jax import hparams

# Canvas sides are multiples of the coarsest backbone stride (C5); the FCOS levels P6, P7 of
# such a canvas are `ceil(H / s)` maps.
CANVAS_MULTIPLE = 32

Size = tuple[int, int]


def round_up(value: float, multiple: int = CANVAS_MULTIPLE) -> int:
  """The smallest multiple of `multiple` that is >= `value`."""
  return int(math.ceil(value / multiple) * multiple)


def resized_shape(height: int, width: int, *, min_size: float, max_size: float) -> Size:
  """`(h, w)` of an image after the resize rule: shorter side to `min_size`, longer side capped
  at `max_size` (aspect ratio kept, rounded to the nearest pixel, at least 1)."""
  if height <= 0 or width <= 0:
    raise ValueError(f"image size must be positive, got {height} x {width}")
  scale = min(min_size / min(height, width), max_size / max(height, width))
  return (max(int(math.floor(height * scale + 0.5)), 1),
          max(int(math.floor(width * scale + 0.5)), 1))


def fit_to_canvas(size: Sequence[int], canvas: Sequence[int]) -> Size:
  """`size` shrunk (aspect ratio kept) until it fits `canvas`; unchanged if it fits."""
  height, width = (int(v) for v in size)
  scale = min(1.0, canvas[0] / height, canvas[1] / width)
  if scale == 1.0:
    return height, width
  return (min(max(int(math.floor(height * scale + 0.5)), 1), int(canvas[0])),
          min(max(int(math.floor(width * scale + 0.5)), 1), int(canvas[1])))


def derived_canvases(min_size: int, max_size: int) -> tuple[Size, ...]:
  """One canvas per orientation for images resized to (`min_size`, `max_size`).

  Landscape `(round_up(min_size), round_up(max_size))` and its transpose (one canvas when the
  two coincide, e.g. square images with `max_size == min_size`).
  """
  landscape = (round_up(min_size), round_up(max(max_size, min_size)))
  portrait = landscape[::-1]
  return (landscape,) if portrait == landscape else (landscape, portrait)


def canvases(hp: hparams.DatasetHParams) -> tuple[Size, ...]:
  """The dataset's canvases: `hp.canvas_sizes`, or one per orientation derived from the
  largest training and evaluation sizes (the upper end of the jitter range)."""
  if hp.canvas_sizes:
    return tuple((int(h), int(w)) for h, w in hp.canvas_sizes)
  min_size = max(hp.train_min_size_range[1], hp.eval_min_size)
  max_size = max(hp.max_size, hp.eval_max_size)
  return derived_canvases(min_size, max_size)


def canvas_for(size: Sequence[int], options: Sequence[Size]) -> int:
  """Index of the canvas for an image of (resized) `size`: the smallest-area canvas that holds
  it; if none does, the one that needs the least shrinking (ties: the first)."""
  height, width = (int(v) for v in size)
  holding = [i for i, (h, w) in enumerate(options) if height <= h and width <= w]
  if holding:
    return min(holding, key=lambda i: (options[i][0] * options[i][1], i))
  return max(range(len(options)),
             key=lambda i: (min(options[i][0] / height, options[i][1] / width), -i))


def union_canvas(options: Sequence[Size]) -> Size:
  """The smallest canvas that holds every one of `options` (the per-side maximum)."""
  return max(h for h, _ in options), max(w for _, w in options)


def place(height: int, width: int, *, min_size: float, max_size: float,
          options: Sequence[Size]) -> tuple[int, Size]:
  """(canvas index, resized `(h, w)` on it) of an image: the resize rule, the canvas that holds
  the result (`canvas_for`), then shrunk to fit it if none does. Evaluation and the demo."""
  size = resized_shape(height, width, min_size=min_size, max_size=max_size)
  index = canvas_for(size, options)
  return index, fit_to_canvas(size, options[index])
