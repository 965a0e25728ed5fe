"""Pictures of a panoptic result: the segments over the image, and the embedding map by PCA.

Plain NumPy and PIL, so it runs wherever inference runs (no TensorFlow). `panel` draws the row
of the paper's Fig. 5 that the demo writes and that training logs to TensorBoard: input |
panoptic segments with boxes and labels | pixel embeddings by PCA (Fig. 4c), side by side,
scaled up to at least `MIN_SIDE` pixels on the longer side so that the labels stay readable.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

MIN_SIDE = 512  # Longer side of each picture of a panel, at least (small images are scaled up).
_GAP = 8  # Pixels between the pictures of a panel.


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
                      thing_category_ids: frozenset[int] = frozenset(),
                      seed: int = 0) -> np.ndarray:
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


@functools.lru_cache(maxsize=8)
def font(size: int) -> Any:
  """PIL's scalable default font at `size` px (the small bitmap font without FreeType)."""
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError, ImportError):
    return ImageFont.load_default()


def _height(text_font: Any) -> int:
  """Line height of a font (the bitmap fallback has no `size`)."""
  return int(getattr(text_font, "size", 11))


Box = tuple[float, float, float, float]


def _label(draw: ImageDraw.ImageDraw, size: tuple[int, int], xy: tuple[float, float], text: str,
           colour: Sequence[int], text_font: Any, taken: list[Box] | None = None) -> Box | None:
  """Text on a dark box (readable over any colour), kept inside a picture of `size` (w, h).

  With `taken` (the boxes of the labels drawn so far), a label that would cover one of them is
  left out (None), and a drawn one is added. Returns the box of the label.
  """
  left, top, right, bottom = draw.textbbox((0, 0), text, font=text_font)
  width, height = right - left + 4, bottom - top + 4
  x = min(max(0, xy[0]), max(0, size[0] - width))
  y = min(max(0, xy[1]), max(0, size[1] - height))
  box = (x, y, x + width, y + height)
  if taken is not None:
    if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in taken):
      return None
    taken.append(box)
  draw.rectangle(box, fill=(0, 0, 0))
  draw.text((x + 2 - left, y + 2 - top), text, fill=tuple(int(c) for c in colour), font=text_font)
  return box


def draw_panoptic(image: np.ndarray, id_map: np.ndarray, segments_info: Sequence[dict],
                  category_colors: dict[int, Sequence[int]], category_names: dict[int, str],
                  thing_category_ids: frozenset[int] = frozenset(), boxes: Sequence[dict] = (),
                  alpha: float = 0.55, font_size: int | None = None) -> np.ndarray:
  """Blends the coloured panoptic map over `image`, draws boxes with labels and scores, and
  names the larger stuff segments where no other label is.

  Args:
    image: `[H, W, 3]` uint8, the image.
    id_map: `[H, W]` panoptic ids at the same size.
    boxes: detection dicts with `bbox` (COCO x, y, w, h, in `image` pixels), `category_id` and
      `score`.
    font_size: label height in pixels (default: ~1/28 of the longer side, at least 12).
  """
  if image.shape[:2] != id_map.shape:
    raise ValueError(f"image {image.shape[:2]} and id map {id_map.shape} differ in size")
  # [H, W, 3]
  colours = colorize_panoptic(id_map, segments_info, category_colors, thing_category_ids)
  blend = image.astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
  blend = np.where((id_map == 0)[..., None], image.astype(np.float32), blend)  # void unpainted
  canvas = Image.fromarray(blend.astype(np.uint8))
  draw = ImageDraw.Draw(canvas)
  text_font = font(font_size or max(12, max(id_map.shape) // 28))
  line = max(2, max(id_map.shape) // 256)
  taken: list[Box] = []
  for box in boxes:
    x, y, w, h = box["bbox"]
    colour = tuple(int(c) for c in category_colors.get(box["category_id"], (255, 255, 255)))
    draw.rectangle([x, y, x + w, y + h], outline=colour, width=line)
    label = f"{category_names.get(box['category_id'], box['category_id'])} {box['score']:.2f}"
    taken.append(_label(draw, canvas.size, (x, y - _height(text_font) - 4), label, colour,
                        text_font))
  for segment in segments_info:
    if segment["category_id"] in thing_category_ids:
      continue
    # Stuff name (of segments over 2% of the picture) at the segment pixel nearest to the
    # segment's mean position.
    ys, xs = np.nonzero(id_map == segment["id"])
    if ys.size < 0.02 * id_map.size:
      continue
    nearest = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    name = category_names.get(segment["category_id"], "?")
    _label(draw, canvas.size, (xs[nearest], ys[nearest]), name, (255, 255, 255), text_font,
           taken)
  return np.asarray(canvas)


def display_scale(height: int, width: int, min_side: int = MIN_SIDE) -> int:
  """Integer factor that brings the longer side to at least `min_side` (1 for large images)."""
  return max(1, math.ceil(min_side / max(height, width)))


def _scaled_overlay(image: np.ndarray, prediction: Any, categories: Any, min_score: float,
                    min_side: int) -> tuple[np.ndarray, np.ndarray]:
  """(the image, the segments and boxes over it), both scaled by `display_scale`."""
  scale = display_scale(*image.shape[:2], min_side)
  height, width = image.shape[0] * scale, image.shape[1] * scale
  big = np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))
  id_map = np.repeat(np.repeat(prediction.panoptic, scale, 0), scale, 1)  # [H, W]
  colours = dict(zip(categories.coco_ids, categories.colors))
  names = dict(zip(categories.coco_ids, categories.names))
  things = frozenset(c for c, t in zip(categories.coco_ids, categories.isthing) if t)
  boxes = [dict(d, bbox=[v * scale for v in d["bbox"]]) for d in prediction.detections
           if d["score"] >= min_score]
  return big, draw_panoptic(big, id_map, prediction.segments_info, colours, names, things, boxes)


def overlay(image: np.ndarray, prediction: Any, categories: Any, *, min_score: float = 0.0,
            min_side: int = MIN_SIDE) -> np.ndarray:
  """The panoptic segments over the image, with the boxes scored `min_score` or more (the
  middle picture of `panel`), scaled up by an integer factor to at least `min_side`.

  Args:
    image, prediction, categories, min_score, min_side: as `panel`'s (the embedding is unused).

  Returns:
    `[H, W, 3]` uint8.
  """
  return _scaled_overlay(image, prediction, categories, min_score, min_side)[1]


def panel(image: np.ndarray, prediction: Any, categories: Any, *, min_score: float = 0.0,
          min_side: int = MIN_SIDE) -> np.ndarray:
  """input | panoptic | embedding PCA, side by side with titles (one row of paper Fig. 5).

  Args:
    image: `[h0, w0, 3]` uint8, the original image.
    prediction: a `predictor.Prediction` of it (`panoptic`, `segments_info`, `detections`,
      `embedding`: the embedding picture is left out when it is None).
    categories: the dataset's `CategoryInfo` (names, colours, things).
    min_score: detections scored lower get no box (the instances' own threshold).
    min_side: each picture is scaled up by an integer factor to at least this longer side.

  Returns:
    `[H, W, 3]` uint8.
  """
  big, drawn = _scaled_overlay(image, prediction, categories, min_score, min_side)
  height, width = big.shape[:2]
  pictures = [("input", big), (f"panoptic ({len(prediction.segments_info)} segments)", drawn)]
  if prediction.embedding is not None:
    pca = embedding_pca_rgb(prediction.embedding)  # [h, w, 3] input resolution
    pictures.append(("embedding PCA", np.asarray(
        Image.fromarray(pca).resize((width, height), Image.BILINEAR))))
  title_font = font(max(14, min(height, width) // 24))
  title_height = _height(title_font) + 10
  out = Image.new("RGB", (len(pictures) * (width + _GAP) - _GAP, height + title_height),
                  (255, 255, 255))
  draw = ImageDraw.Draw(out)
  for index, (title, picture) in enumerate(pictures):
    left = index * (width + _GAP)
    out.paste(Image.fromarray(picture), (left, title_height))
    draw.text((left + 4, 4), title, fill=(0, 0, 0), font=title_font)
  return np.asarray(out)
