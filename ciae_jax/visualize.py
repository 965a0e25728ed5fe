"""Pictures of a panoptic result: the segments over the image, and the embedding map by PCA.

Plain NumPy and PIL, so it runs wherever inference runs (no TensorFlow). Used by `ciae_jax.demo`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw


def embedding_pca_rgb(embedding: np.ndarray, valid_hw: tuple[int, int] | None = None) -> np.ndarray:
  """Projects a `[H, W, D]` embedding map on its first three principal components (paper Fig. 4c).

  Each component is stretched to [0, 255] with its 1st and 99th percentiles, so a few outliers do
  not wash the picture out. Only the valid region `valid_hw` (default: all) is fitted and returned.
  """
  if embedding.ndim != 3:
    raise ValueError(f"embedding must be [H, W, D], got shape {embedding.shape}")
  h, w = valid_hw if valid_hw is not None else embedding.shape[:2]
  pixels = np.asarray(embedding[:h, :w], np.float64).reshape(h * w, -1)  # [h*w, D]
  centred = pixels - pixels.mean(axis=0, keepdims=True)  # [h*w, D]
  # The right singular vectors of the centred data are the principal axes.
  _, _, vt = np.linalg.svd(centred[:: max(1, centred.shape[0] // 20000)], full_matrices=False)
  components = vt[:3]  # [<=3, D]
  projected = centred @ components.T  # [h*w, <=3]
  if projected.shape[1] < 3:  # D < 3: pad with zeros so the result is still RGB.
    projected = np.pad(projected, ((0, 0), (0, 3 - projected.shape[1])))
  low = np.percentile(projected, 1, axis=0)  # [3]
  high = np.percentile(projected, 99, axis=0)  # [3]
  scaled = (projected - low) / np.maximum(high - low, 1e-12)  # [h*w, 3]
  return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8).reshape(h, w, 3)


def colorize_panoptic(id_map: np.ndarray, segments_info: Sequence[dict],
                      category_colors: dict[int, Sequence[int]],
                      thing_category_ids: frozenset[int] = frozenset(), seed: int = 0) -> np.ndarray:
  """Colours a panoptic id map: stuff in its category colour, each instance a jittered variant.

  Args:
    id_map: `[H, W]` segment ids, 0 = void (drawn black).
    segments_info: COCO `segments_info` dicts with `id` and `category_id`.
    category_colors: COCO category id -> (r, g, b), from the dataset's categories.
    thing_category_ids: categories whose segments are instances (their colours get jittered).
  """
  rng = np.random.default_rng(seed)
  max_id = max([int(id_map.max(initial=0))] + [int(s["id"]) for s in segments_info])
  lookup = np.zeros((max_id + 1, 3), np.uint8)  # segment id -> colour; id 0 (void) stays black
  for segment in segments_info:
    colour = np.asarray(category_colors.get(segment["category_id"], (128, 128, 128)), np.int64)
    if segment["category_id"] in thing_category_ids:
      # Instances of one category share a hue; the jitter tells neighbours apart.
      colour = colour + rng.integers(-40, 41, size=3)
    lookup[segment["id"]] = np.clip(colour, 0, 255)
  return lookup[id_map]  # [H, W, 3]


def draw_panoptic(image: np.ndarray, id_map: np.ndarray, segments_info: Sequence[dict],
                  category_colors: dict[int, Sequence[int]], category_names: dict[int, str],
                  thing_category_ids: frozenset[int] = frozenset(), boxes: Sequence[dict] = (),
                  alpha: float = 0.55) -> np.ndarray:
  """Blends the coloured panoptic map over `image` and draws boxes with labels and scores.

  Args:
    image: `[H, W, 3]` uint8, the original image.
    id_map: `[H, W]` panoptic ids at the same size.
    boxes: detection dicts with `bbox` (COCO x, y, w, h), `category_id` and `score`.
  """
  if image.shape[:2] != id_map.shape:
    raise ValueError(f"image {image.shape[:2]} and id map {id_map.shape} differ in size")
  colours = colorize_panoptic(id_map, segments_info, category_colors, thing_category_ids)  # [H, W, 3]
  blend = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
  blend = np.where((id_map == 0)[..., None], image.astype(np.float32), blend)  # void unpainted
  canvas = Image.fromarray(blend.astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  for box in boxes:
    x, y, w, h = box["bbox"]
    colour = tuple(int(c) for c in category_colors.get(box["category_id"], (255, 255, 255)))
    draw.rectangle([x, y, x + w, y + h], outline=colour, width=2)
    label = f"{category_names.get(box['category_id'], box['category_id'])} {box['score']:.2f}"
    draw.text((x + 2, max(0, y - 11)), label, fill=colour)
  return np.asarray(canvas)
