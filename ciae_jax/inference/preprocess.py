"""Host preprocessing for inference, without TensorFlow: the one path of the predictor, the demo
and evaluation.

An RGB uint8 image `[h0, w0, 3]` is normalised with the ImageNet statistics, resized bilinearly
by the resize rule (`data.canvas.resized_shape`: shorter side `eval_min_size`, longer side at
most `eval_max_size`), and padded at the bottom and right with zeros to its canvas (the smallest
of the dataset's canvases that holds it, `canvas.canvas_for`; an image no canvas holds is shrunk
to fit, `canvas.fit_to_canvas`). Compiled programs are specialised to canvases, not to image
sizes.

The arithmetic is the evaluation input pipeline's (`data/transforms.py`), so the two give the
same input: the normalisation is TF's `x * (1 / (255 std)) - mean / std` in float32 at the
source size, then `bilinear_resize` reproduces `tf.image.resize(method="bilinear")` (half-pixel
centres, no antialias) operation by operation in float32 (tests/test_preprocess.py compares
them). Oracle mode's ground truth (`segments_at_input`) takes the same nearest-neighbour resize
and the same truncation to `max_segments` rows as the TF transform.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image

from ciae_jax import hparams
from ciae_jax.data import canvas as canvas_lib
from ciae_jax.data import transforms  # Constants only; the module imports TF lazily.

# `normalize_image` of data/transforms.py: one float32 scale and offset per channel.
_SCALE = np.asarray([1.0 / (255.0 * s) for s in transforms.IMAGENET_STD], np.float32)  # [3]
_OFFSET = np.asarray([m / s for m, s in zip(transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)],
                     np.float32)  # [3]


def load_rgb(image: str | os.PathLike[str] | np.ndarray) -> np.ndarray:
  """An image file (any format PIL reads) or an array as uint8 RGB `[h, w, 3]`.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: the array is not `[h, w, 3]` uint8 (or `[h, w]` grey).
  """
  if isinstance(image, (str, os.PathLike)):
    if not os.path.isfile(image):
      raise FileNotFoundError(f"image not found: {image}")
    with Image.open(image) as pil:
      return np.asarray(pil.convert("RGB"))  # [h, w, 3]
  image = np.asarray(image)
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)  # [h, w, 3]
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or not image.size:
    raise ValueError(f"image must be RGB uint8 [H, W, 3]; got {image.dtype} {image.shape}")
  return image


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 RGB `[h, w, 3]` -> float32 `(x / 255 - mean) / std`, as `transforms.normalize_image`."""
  return image.astype(np.float32) * _SCALE - _OFFSET  # [h, w, 3]


def _bilinear_axis(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Source rows (lower, upper) and weight of each output row, as TF's half-pixel scaler."""
  scale = np.float32(in_size) / np.float32(out_size)
  source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(source)  # [out]
  lower = np.maximum(floor, 0).astype(np.int64)  # [out]
  upper = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)  # [out]
  return lower, upper, (source - floor).astype(np.float32)


def bilinear_resize(image: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """`tf.image.resize(image, size, method="bilinear")` in NumPy: half-pixel centres, no
  antialias, float32 with TF's order of operations (rows of a horizontal lerp, then vertical).

  Args:
    image: `[h, w, C]` float32.
    size: `(H, W)` of the output.

  Returns:
    `[H, W, C]` float32.
  """
  image = np.asarray(image, np.float32)
  row_lo, row_hi, row_w = _bilinear_axis(image.shape[0], int(size[0]))
  col_lo, col_hi, col_w = _bilinear_axis(image.shape[1], int(size[1]))
  col_w = col_w[None, :, None]  # [1, W, 1]
  top, bottom = image[row_lo], image[row_hi]  # [H, w, C]
  top = top[:, col_lo] + (top[:, col_hi] - top[:, col_lo]) * col_w  # [H, W, C]
  bottom = bottom[:, col_lo] + (bottom[:, col_hi] - bottom[:, col_lo]) * col_w  # [H, W, C]
  return top + (bottom - top) * row_w[:, None, None]  # [H, W, C]


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source index of each output pixel, nearest neighbour with half-pixel centres, in float64
  as `transforms.nearest_indices` (the segment maps of the input pipeline)."""
  scale = np.float64(in_size) / np.float64(out_size)
  source = np.floor((np.arange(out_size, dtype=np.float64) + 0.5) * scale)
  return np.minimum(source.astype(np.int64), in_size - 1)  # [out]


@dataclasses.dataclass(frozen=True)
class Prepared:
  """One image ready for the model.

  Attributes:
    image: `[H, W, 3]` float32, the normalised, resized image padded to `canvas` (zeros).
    image_size: `(h, w)` of the resized image inside the canvas.
    orig_size: `(h0, w0)` of the original image.
    canvas: `(H, W)`.
  """
  image: np.ndarray
  image_size: tuple[int, int]
  orig_size: tuple[int, int]
  canvas: tuple[int, int]


class Preprocessor:
  """The resize rule and canvases of a dataset config, applied to single images."""

  def __init__(self, dataset: hparams.DatasetHParams):
    self.min_size, self.max_size = dataset.eval_min_size, dataset.eval_max_size
    self.canvases = canvas_lib.canvases(dataset)

  @classmethod
  def from_rule(cls, min_size: float, max_size: float,
                canvases: Sequence[Sequence[int]]) -> Preprocessor:
    """The same preprocessing from its numbers alone (an export's `export.json`)."""
    self = cls.__new__(cls)
    self.min_size, self.max_size = min_size, max_size
    self.canvases = tuple((int(h), int(w)) for h, w in canvases)
    return self

  def plan(self, orig_size: Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """`(canvas, resized (h, w))` of an image of `orig_size`, without touching pixels."""
    size = canvas_lib.resized_shape(int(orig_size[0]), int(orig_size[1]),
                                    min_size=self.min_size, max_size=self.max_size)
    canvas = self.canvases[canvas_lib.canvas_for(size, self.canvases)]
    return canvas, canvas_lib.fit_to_canvas(size, canvas)

  def __call__(self, image: np.ndarray) -> Prepared:
    """Normalises, resizes and pads one uint8 RGB image `[h0, w0, 3]`."""
    image = load_rgb(image)
    canvas, (height, width) = self.plan(image.shape[:2])
    padded = np.zeros((*canvas, 3), np.float32)  # [H, W, 3]
    padded[:height, :width] = bilinear_resize(normalize(image), (height, width))
    return Prepared(padded, (height, width), tuple(image.shape[:2]), canvas)


def truncation_rows(seg_area: np.ndarray, max_segments: int) -> np.ndarray:
  """Row (1-based, 0 = dropped) of each JSON segment: with more than `max_segments`, the
  largest by JSON area stay, in JSON order (`transforms.truncation_rows`; ties to the first)."""
  seg_area = np.asarray(seg_area, np.float32)
  keep = np.zeros(seg_area.size, np.int64)  # [n]
  # A stable sort by decreasing area keeps the earlier of equal areas, as tf.math.top_k does.
  keep[np.argsort(-seg_area, kind="stable")[:max_segments]] = 1
  return np.cumsum(keep) * keep  # [n]


def segments_at_input(example: Mapping[str, Any], prepared: Prepared, *,
                      max_segments: int) -> dict[str, np.ndarray]:
  """The ground truth of `coco.decode_example` at the model input (oracle mode, Table V).

  The segment map is resized to `prepared.image_size` by nearest neighbour and padded to the
  canvas; rows are truncated to `max_segments`; boxes are the pixel extent of each row in the
  resized map (`x1` = last column + 1); rows whose pixels vanish are not valid.

  Returns:
    The `segments.Segments` fields as NumPy arrays (`segment_map [H, W]`, rows `[S]`).
  """
  rows = truncation_rows(example["seg_area"], max_segments)  # [n]
  row_of = np.concatenate([[0], rows]).astype(np.int32)  # [n + 1] old row + 1 -> new row + 1
  source = row_of[example["segment_map"]]  # [h0, w0]
  height, width = prepared.image_size
  resized = source[nearest_indices(source.shape[0], height)[:, None],
                   nearest_indices(source.shape[1], width)[None, :]]  # [h, w]
  segment_map = np.zeros(prepared.canvas, np.int32)  # [H, W]
  segment_map[:height, :width] = resized
  present_rows = np.bincount(
      (resized * height + np.arange(height)[:, None]).reshape(-1),
      minlength=(max_segments + 1) * height).reshape(max_segments + 1, height)[1:] > 0  # [S, h]
  present_cols = np.bincount(
      (resized * width + np.arange(width)[None, :]).reshape(-1),
      minlength=(max_segments + 1) * width).reshape(max_segments + 1, width)[1:] > 0  # [S, w]
  present = present_rows.any(axis=1)  # [S]
  y0, x0 = present_rows.argmax(axis=1), present_cols.argmax(axis=1)  # [S]
  y1 = height - present_rows[:, ::-1].argmax(axis=1)  # [S] last row + 1
  x1 = width - present_cols[:, ::-1].argmax(axis=1)  # [S]
  box = np.where(present[:, None], np.stack([x0, y0, x1, y1], -1), 0).astype(np.float32)

  def per_row(values, dtype):
    out = np.zeros(max_segments, dtype)  # [S]
    kept = rows > 0
    out[rows[kept] - 1] = np.asarray(values)[kept]
    return np.where(present, out, np.zeros((), dtype))

  return {"segment_map": segment_map, "seg_class": per_row(example["seg_class"], np.int32),
          "seg_is_thing": per_row(example["seg_is_thing"], bool),
          "seg_is_crowd": per_row(example["seg_is_crowd"], bool), "seg_box": box,
          "seg_valid": present}
