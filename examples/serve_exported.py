r"""Serves an exported CIAE with JAX, NumPy and Pillow only (no ciae_jax, no TensorFlow).

  python examples/serve_exported.py EXPORT_DIR IMAGE OUT.png

EXPORT_DIR is what `python -m ciae_jax.export ... --output EXPORT_DIR` wrote. Reads its
export.json, prepares IMAGE as the package's `preprocess` does (reimplemented below from the
manifest's numbers: normalisation, resize rule, half-pixel bilinear resize, padding to the
smallest canvas that holds it), runs the canvas's program (`jax.export.deserialize(...).call`)
and writes the COCO panoptic PNG (`id = R + 256 G + 256^2 B`) at the image's own size to
OUT.png and its `segments_info` (id, category_id, isthing, area, bbox, score, iscrowd) to
OUT.json. Everything is checked before anything is loaded.
"""
from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
from PIL import Image


def fail(message: str) -> None:
  print(f"serve_exported: {message}", file=sys.stderr)
  sys.exit(2)


def resized_shape(height: int, width: int, min_size: float, max_size: float) -> tuple[int, int]:
  """The resize rule: shorter side to min_size, longer side at most max_size."""
  scale = min(min_size / min(height, width), max_size / max(height, width))
  return (max(int(math.floor(height * scale + 0.5)), 1),
          max(int(math.floor(width * scale + 0.5)), 1))


def choose_canvas(size: tuple[int, int], canvases: list[tuple[int, int]]
                  ) -> tuple[tuple[int, int], tuple[int, int]]:
  """(canvas, size inside it): the smallest canvas that holds `size`, else the one that needs
  the least shrinking, the size shrunk to fit it."""
  height, width = size
  holding = [i for i, (h, w) in enumerate(canvases) if height <= h and width <= w]
  if holding:
    index = min(holding, key=lambda i: (canvases[i][0] * canvases[i][1], i))
  else:
    index = max(range(len(canvases)),
                key=lambda i: (min(canvases[i][0] / height, canvases[i][1] / width), -i))
  canvas = canvases[index]
  scale = min(1.0, canvas[0] / height, canvas[1] / width)
  if scale < 1.0:
    size = (min(max(int(math.floor(height * scale + 0.5)), 1), canvas[0]),
            min(max(int(math.floor(width * scale + 0.5)), 1), canvas[1]))
  return canvas, size


def _axis(in_size: int, out_size: int):
  """Source rows (lower, upper) and weights of TF's half-pixel bilinear scaler, in float32."""
  scale = np.float32(in_size) / np.float32(out_size)
  source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
  floor = np.floor(source)  # [out]
  lower = np.maximum(floor, 0).astype(np.int64)  # [out]
  upper = np.minimum(np.ceil(source), in_size - 1).astype(np.int64)  # [out]
  return lower, upper, (source - floor).astype(np.float32)


def bilinear_resize(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """`tf.image.resize(bilinear)`: horizontal lerp of two source rows, then vertical, float32."""
  row_lo, row_hi, row_w = _axis(image.shape[0], size[0])
  col_lo, col_hi, col_w = _axis(image.shape[1], size[1])
  col_w = col_w[None, :, None]  # [1, W, 1]
  top, bottom = image[row_lo], image[row_hi]  # [H, w, 3]
  top = top[:, col_lo] + (top[:, col_hi] - top[:, col_lo]) * col_w  # [H, W, 3]
  bottom = bottom[:, col_lo] + (bottom[:, col_hi] - bottom[:, col_lo]) * col_w  # [H, W, 3]
  return top + (bottom - top) * row_w[:, None, None]  # [H, W, 3]


def prepare(rgb: np.ndarray, manifest: dict):
  """(padded image [H, W, 3] float32, resized (h, w), canvas)."""
  resize, norm = manifest["resize"], manifest["normalize"]
  canvases = [tuple(int(v) for v in c) for c in manifest["canvases"]]
  size = resized_shape(rgb.shape[0], rgb.shape[1], resize["eval_min_size"],
                       resize["eval_max_size"])
  canvas, size = choose_canvas(size, canvases)
  scale = np.asarray(norm["scale"], np.float32)  # [3]
  offset = np.asarray(norm["offset"], np.float32)  # [3]
  normalized = rgb.astype(np.float32) * scale - offset  # [h0, w0, 3]
  padded = np.zeros((*canvas, 3), np.float32)  # [H, W, 3]
  padded[:size[0], :size[1]] = bilinear_resize(normalized, size)
  return padded, size, canvas


def nearest_index(size_out: int, size_in: int) -> np.ndarray:
  """floor((i + 0.5) * in / out) in integers: nearest resize with aligned pixel centres."""
  index = (2 * np.arange(size_out, dtype=np.int64) + 1) * size_in // (2 * size_out)
  return np.minimum(index, size_in - 1)  # [out]


def to_panoptic(result: dict, size: tuple[int, int], orig: tuple[int, int], manifest: dict):
  """(id map [h0, w0] int32, segments_info): queries present numbered 1..n in query order."""
  panoptic = np.asarray(result["panoptic"])[:size[0], :size[1]]  # [h, w]
  resized = panoptic[nearest_index(orig[0], size[0])[:, None],
                     nearest_index(orig[1], size[1])[None, :]]  # [h0, w0]
  num_queries = np.asarray(result["query_class"]).shape[0]
  present = np.flatnonzero(np.bincount(resized.ravel(), minlength=num_queries + 1))
  present = present[present > 0]  # [n] query index + 1
  renumber = np.zeros(num_queries + 1, np.int32)
  renumber[present] = np.arange(1, present.size + 1, dtype=np.int32)
  id_map = renumber[resized]  # [h0, w0]
  categories = manifest["categories"]
  segments = []
  for segment_id, query in enumerate(present - 1, start=1):
    ys, xs = np.nonzero(id_map == segment_id)
    category = categories[int(result["query_class"][query])]
    segments.append({
        "id": segment_id, "category_id": int(category["id"]), "area": int(ys.size),
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1)],
        "iscrowd": 0, "isthing": bool(result["query_is_thing"][query]),
        "score": float(np.float64(result["query_score"][query]))})
  return id_map, segments


def main(argv: list[str]) -> None:
  if len(argv) != 4:
    fail("usage: serve_exported.py EXPORT_DIR IMAGE OUT.png")
  directory, image_path, out_png = argv[1:]
  manifest_path = os.path.join(directory, "export.json")
  if not os.path.isfile(manifest_path):
    fail(f"{manifest_path}: no such file (python -m ciae_jax.export ... --output {directory})")
  if not os.path.isfile(image_path):
    fail(f"{image_path}: no such image")
  if not out_png.lower().endswith(".png"):
    fail(f"{out_png}: the output must be a .png")
  with open(manifest_path) as f:
    manifest = json.load(f)
  if manifest.get("format") != "ciae-jax-export" or manifest.get("format_version") != 1:
    fail(f"{manifest_path}: fields 'format' / 'format_version' are "
         f"{manifest.get('format')!r} / {manifest.get('format_version')!r}, expected "
         "'ciae-jax-export' / 1")
  with Image.open(image_path) as pil:
    rgb = np.asarray(pil.convert("RGB"))  # [h0, w0, 3]
  image, size, canvas = prepare(rgb, manifest)
  programs = {tuple(p["canvas"]): p for p in manifest["programs"]}
  if canvas not in programs:
    fail(f"{manifest_path}: no program for canvas {canvas} (field 'programs')")
  program = programs[canvas]
  weights_path = os.path.join(directory, manifest["weights"]["file"])
  for path in (weights_path, os.path.join(directory, program["file"])):
    if not os.path.isfile(path):
      fail(f"{path}: no such file (named in {manifest_path})")

  import jax  # pylint: disable=g-import-not-at-top  (after the checks: JAX starts slowly)
  with open(os.path.join(directory, program["file"]), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(weights_path) as stored:
    weights = [stored[k] for k in sorted(stored.files)]
  rows = int(program["batch_size"])
  canvas_size = np.asarray(canvas, np.int32)
  batch = {"image": np.zeros((rows, *canvas, 3), np.float32),  # [B, H, W, 3]
           # Blank rows claim the whole canvas (finite scales), as the package's Predictor.
           "image_size": np.tile(canvas_size, (rows, 1)),  # [B, 2]
           "orig_size": np.tile(canvas_size, (rows, 1))}  # [B, 2]
  batch["image"][0] = image
  batch["image_size"][0] = size
  batch["orig_size"][0] = rgb.shape[:2]
  outputs = jax.device_get(exported.call(weights, batch))
  result = {k: np.asarray(v[0]) for k, v in outputs.items()}
  id_map, segments = to_panoptic(result, size, rgb.shape[:2], manifest)
  ids = id_map.astype(np.uint32)  # [h0, w0]
  colours = np.stack([ids & 255, (ids >> 8) & 255, ids >> 16], axis=-1).astype(np.uint8)
  Image.fromarray(colours).save(out_png)
  with open(os.path.splitext(out_png)[0] + ".json", "w") as f:
    json.dump({"segments_info": segments}, f, indent=1)
  print(f"wrote {out_png} ({len(segments)} segments)")


if __name__ == "__main__":
  main(sys.argv)
