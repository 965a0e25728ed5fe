"""Predictions in COCO formats: panoptic PNG + JSON, and detection results JSON.

COCO panoptic layout: one RGB PNG per image whose colour encodes a segment id,
`id = R + 256 * G + 256**2 * B` (0 = VOID), and a JSON entry per image listing
its segments (`id`, `category_id`, `iscrowd`, `area`, `bbox` as inclusive
pixel `[x, y, w, h]`, as panopticapi's converters write them).

Plain NumPy and PIL: no TensorFlow, no JAX. PNGs are read through kornia-rs
(Rust `png` crate; pinned in requirements.txt) when it is installed and the
file is one it decodes exactly as Pillow does, otherwise through Pillow: the
same pixels either way; kornia-rs is 2.5-4.5x faster on PIL-written PNGs
(adaptive filters, like COCO's), whose Paeth rows dominate the decoding
(figures in benchmarks/RESULTS.md, "PQ evaluation").
"""
from __future__ import annotations

import importlib
import json
import os
import struct
import zlib
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL import ImageFile

# Ids a COCO panoptic PNG can hold: three 8-bit channels.
MAX_SEGMENT_ID = 256**3 - 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Environment variable that selects the PNG reader: "auto" (kornia-rs when
# installed, else Pillow) or "pillow" (always Pillow, e.g. to compare).
PNG_DECODER_ENV = "CIAE_PNG_DECODER"
# kornia_rs.io once imported, False once found missing.
_kornia_io: Any = None


def id_map_to_rgb(id_map: np.ndarray) -> np.ndarray:
  """Encodes segment ids as COCO panoptic colours, `id = R + 256 G + 256^2 B`.

  Args:
    id_map: [H, W] non-negative integer segment ids, below 256**3.

  Returns:
    [H, W, 3] uint8 colours.
  """
  id_map = np.asarray(id_map)
  if id_map.ndim != 2 or not np.issubdtype(id_map.dtype, np.integer):
    raise ValueError(
        f"id_map must be a 2-D integer array, got {id_map.dtype} {id_map.shape}")
  if id_map.size and (id_map.min() < 0 or id_map.max() > MAX_SEGMENT_ID):
    raise ValueError(
        f"segment ids must lie in [0, {MAX_SEGMENT_ID}] to fit an RGB PNG, got "
        f"[{id_map.min()}, {id_map.max()}]")
  ids = id_map.astype(np.uint32)  # [H, W]
  return np.stack([ids & 255, (ids >> 8) & 255, ids >> 16], axis=-1).astype(
      np.uint8)  # [H, W, 3]


def encode_panoptic_png(id_map: np.ndarray, *, compress_level: int = 6
                        ) -> bytes:
  """A COCO panoptic PNG (8-bit RGB) of segment ids, as bytes.

  Every scanline uses PNG filter type 0 (None). Piecewise-constant id maps
  compress as well that way as with PIL's adaptive filters (the repeats are
  3 and 3W bytes back, inside deflate's window), and decoding skips the
  Paeth/Sub/Up reconstruction that dominates PIL's PNG reading: any reader
  (pq_compute too) decodes these files several times faster.

  Args:
    id_map: [H, W] segment ids in [0, 256**3).
    compress_level: zlib level.

  Returns:
    The PNG file content.
  """
  rgb = id_map_to_rgb(id_map)  # [H, W, 3]
  height, width = rgb.shape[:2]
  if not height or not width:
    raise ValueError(f"cannot encode an empty id map of shape {rgb.shape}")
  rows = np.zeros((height, 1 + 3 * width), np.uint8)  # [H, 1 + 3W]
  rows[:, 1:] = rgb.reshape(height, 3 * width)  # column 0: filter type 0
  header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return b"".join([
      b"\x89PNG\r\n\x1a\n",
      _png_chunk(b"IHDR", header),
      _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), compress_level)),
      _png_chunk(b"IEND", b""),
  ])


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  """One PNG chunk: length, type, data, CRC-32 of type + data."""
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data)))


def rgb_to_id_map(rgb: np.ndarray) -> np.ndarray:
  """Decodes COCO panoptic colours to segment ids (panopticapi's `rgb2id`).

  Args:
    rgb: [H, W, C>=3] colours (extra channels, e.g. alpha, are ignored).

  Returns:
    [H, W] uint32 segment ids.
  """
  rgb = np.asarray(rgb)
  if rgb.ndim != 3 or rgb.shape[-1] < 3:
    raise ValueError(f"rgb must be [H, W, 3], got shape {rgb.shape}")
  c = rgb[..., :3].astype(np.uint32)  # [H, W, 3]
  return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]  # [H, W]


def fast_png_decoder() -> Any | None:
  """`kornia_rs.io` if installed and not disabled through
  `$CIAE_PNG_DECODER=pillow`, else None (imported on first use)."""
  global _kornia_io
  if os.environ.get(PNG_DECODER_ENV, "auto").lower() == "pillow":
    return None
  if _kornia_io is None:
    try:
      _kornia_io = importlib.import_module("kornia_rs.io")
    except ImportError:
      _kornia_io = False
  return _kornia_io or None


def rgb8_png_size(data: bytes) -> tuple[int, int] | None:
  """(height, width) of a PNG that kornia-rs decodes exactly as Pillow does.

  That is a non-interlaced 8-bit RGB PNG (colour type 2; COCO's and ours)
  whose chunks before the image data have intact CRCs (Pillow rejects a bad
  one there). Anything else, and anything Pillow would warn about or reject
  for its size (`Image.MAX_IMAGE_PIXELS`) or read truncated
  (`ImageFile.LOAD_TRUNCATED_IMAGES`), gives None: read it with Pillow.

  Args:
    data: the file content.
  """
  if not data.startswith(PNG_SIGNATURE) or ImageFile.LOAD_TRUNCATED_IMAGES:
    return None
  header, pos, kind = None, len(PNG_SIGNATURE), b""
  while pos + 12 <= len(data):
    length, kind = struct.unpack_from(">I4s", data, pos)
    end = pos + 8 + length
    if kind == b"IDAT" or end + 4 > len(data):
      break
    (crc,) = struct.unpack_from(">I", data, end)
    if zlib.crc32(data[pos + 4:end]) != crc:
      return None
    if header is None:
      if kind != b"IHDR" or length != 13:
        return None
      header = struct.unpack_from(">IIBBBBB", data, pos + 8)
    pos = end + 4
  if kind != b"IDAT" or header is None:
    return None
  width, height, *layout = header  # depth, colour, compression, filter, lace
  if (layout != [8, 2, 0, 0, 0] or not width or not height
      or Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS):
    return None
  return height, width


def decode_rgb8_png(data: bytes) -> np.ndarray | None:
  """Pixels of an 8-bit RGB PNG decoded by kornia-rs, equal to Pillow's.

  Args:
    data: the file content.

  Returns:
    [H, W, 3] uint8, or None (read the file with Pillow) when kornia-rs is
    absent or disabled, the file is not what `rgb8_png_size` accepts, or
    kornia-rs fails on it (it checks every chunk CRC and the stream's end;
    Pillow then decodes the file or raises its usual error).
  """
  kornia_io = fast_png_decoder()
  size = rgb8_png_size(data) if kornia_io is not None else None
  if size is None:
    return None
  try:
    rgb = kornia_io.decode_image_png_u8(data, size, "rgb")  # [H, W, 3]
  except Exception:  # pylint: disable=broad-except  (it raises Exception)
    return None
  if (not isinstance(rgb, np.ndarray) or rgb.shape != size + (3,)
      or rgb.dtype != np.uint8 or not rgb.flags.c_contiguous):
    return None
  return rgb


def read_panoptic_png(path: str | os.PathLike[str]) -> np.ndarray:
  """Reads a COCO panoptic PNG as segment ids, like panopticapi does.

  RGB(A) images give `R + 256 G + 256^2 B` (alpha ignored); other modes
  (grayscale, palette), which pq_compute cannot read either, are an error.
  8-bit RGB files go through kornia-rs when installed (`decode_rgb8_png`).

  Args:
    path: the PNG file.

  Returns:
    [H, W] int64 segment ids.
  """
  if fast_png_decoder() is not None:
    with open(path, "rb") as f:
      rgb = decode_rgb8_png(f.read())  # [H, W, 3] or None
    if rgb is not None:
      height, width = rgb.shape[:2]
      ids = np.empty(height * width, np.int64)  # [H*W]
      return rgb_bytes_to_ids(rgb, ids).reshape(height, width)  # [H, W]
  return read_panoptic_png_pillow(path)


def read_panoptic_png_pillow(path: str | os.PathLike[str]) -> np.ndarray:
  """`read_panoptic_png` through Pillow only: [H, W] int64 segment ids."""
  with Image.open(path) as image:
    width, height = image.size
    if image.mode == "RGB" and width * height:
      ids = np.empty(height * width, np.int64)  # [H*W]
      return rgb_bytes_to_ids(image.tobytes(), ids).reshape(
          height, width)  # [H, W]
    pixels = np.asarray(image)
    if pixels.ndim != 3 or pixels.shape[-1] < 3:
      raise ValueError(f"{os.fspath(path)}: a panoptic PNG must be RGB, got "
                       f"mode {image.mode}")
  return rgb_to_id_map(pixels).astype(np.int64)  # [H, W]


def rgb_bytes_to_ids(packed: Any, ids: np.ndarray) -> np.ndarray:
  """Fills [N] integer `ids` (>= 32 bits) from N packed RGB pixels, one pass.

  Copies each pixel's 3 bytes plus the next pixel's first byte as one
  little-endian uint32 through an overlapping stride-3 view (NumPy's strided
  copy is ~1.7x faster than a strided ufunc), then masks the top byte in
  place (the last pixel, which has no next byte, is done apart).

  Args:
    packed: 3 N bytes, R G B per pixel: bytes (PIL's `tobytes()` of an RGB
      image) or a C-contiguous uint8 array such as [H, W, 3] (no copy made).
    ids: [N] output array of an integer dtype of at least 32 bits.

  Returns:
    `ids`.
  """
  num_pixels = ids.size
  buffer = memoryview(packed).cast("B")  # [3N] bytes, shares memory
  if buffer.nbytes != 3 * num_pixels or not num_pixels:
    raise ValueError(f"{buffer.nbytes} bytes cannot fill {num_pixels} RGB "
                     f"pixels")
  view = np.ndarray(shape=(num_pixels - 1,), dtype="<u4", buffer=buffer,
                    strides=(3,))  # [N-1]
  np.copyto(ids[:-1], view, casting="unsafe")
  np.bitwise_and(ids, MAX_SEGMENT_ID, out=ids, casting="unsafe")
  r, g, b = buffer[-3:]
  ids[-1] = r + 256 * g + 65536 * b
  return ids


def segment_areas_and_boxes(
    id_map: np.ndarray, segment_ids: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """Pixel area and inclusive COCO box of each listed segment, vectorised.

  Args:
    id_map: [H, W] integer segment ids.
    segment_ids: [S] ids to measure (ids absent from the map get area 0 and
      box [0, 0, 0, 0]).

  Returns:
    areas [S] int64 and boxes [S, 4] int64 `[x, y, w, h]` with
    `w = x_max - x_min + 1` (the panopticapi convention).
  """
  id_map = np.asarray(id_map)
  segment_ids = np.asarray(segment_ids, dtype=np.int64).reshape(-1)  # [S]
  height, width = id_map.shape
  num = segment_ids.size
  # Compact label per pixel: 0 for ids not listed, k + 1 for segment_ids[k].
  order = np.argsort(segment_ids, kind="stable")  # [S]
  sorted_ids = segment_ids[order]  # [S]
  flat = id_map.reshape(-1).astype(np.int64)  # [H*W]
  if num:
    pos = np.minimum(np.searchsorted(sorted_ids, flat), num - 1)  # [H*W]
    found = sorted_ids[pos] == flat  # [H*W]
    labels = np.where(found, order[pos] + 1, 0).reshape(height, width)  # [H, W]
  else:
    labels = np.zeros((height, width), np.int64)  # [H, W]
  areas = np.bincount(labels.reshape(-1), minlength=num + 1)[1:]  # [S]
  # Per-segment row / column occupancy, then first and last occupied index.
  rows = np.bincount(
      (labels * height + np.arange(height)[:, None]).reshape(-1),
      minlength=(num + 1) * height).reshape(num + 1, height)[1:] > 0  # [S, H]
  cols = np.bincount(
      (labels * width + np.arange(width)[None, :]).reshape(-1),
      minlength=(num + 1) * width).reshape(num + 1, width)[1:] > 0  # [S, W]
  y0 = np.argmax(rows, axis=1)  # [S]
  y1 = height - 1 - np.argmax(rows[:, ::-1], axis=1)  # [S]
  x0 = np.argmax(cols, axis=1)  # [S]
  x1 = width - 1 - np.argmax(cols[:, ::-1], axis=1)  # [S]
  boxes = np.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], axis=1)  # [S, 4]
  boxes[areas == 0] = 0
  return areas.astype(np.int64), boxes.astype(np.int64)


def segments_from_id_map(
    panoptic: np.ndarray,
    query_category_ids: Sequence[int] | np.ndarray,
    *,
    query_valid: Sequence[bool] | np.ndarray | None = None,
    query_scores: Sequence[float] | np.ndarray | None = None,
    image_id: int | None = None,
) -> list[dict[str, Any]]:
  """COCO `segments_info` for an inference map (0 void, else query index + 1).

  The segment id is the map value itself (query index + 1), so the map can be
  written as the PNG unchanged. Queries that own no pixel give no segment
  (COCO requires each listed segment to appear in the PNG).

  Args:
    panoptic: [H, W] int, 0 = void, `q + 1` = pixel assigned to query `q`.
    query_category_ids: [Q] COCO category id of each query (the caller maps
      contiguous classes through `CategoryInfo.coco_ids`).
    query_valid: optional [Q] bool; a pixel on an invalid query is an error.
    query_scores: optional [Q] float, copied to each segment as `score`.
    image_id: only used in error messages.

  Returns:
    One dict per non-empty segment, in query order: `id`, `category_id`,
    `iscrowd` (0), `area`, `bbox` ([x, y, w, h], inclusive), [`score`].
  """
  panoptic = np.asarray(panoptic)
  category_ids = np.asarray(query_category_ids).reshape(-1)  # [Q]
  num_queries = category_ids.size
  where = f" in image {image_id}" if image_id is not None else ""
  if panoptic.ndim != 2 or not np.issubdtype(panoptic.dtype, np.integer):
    raise ValueError(f"panoptic{where} must be a 2-D integer map, got "
                     f"{panoptic.dtype} {panoptic.shape}")
  if panoptic.size and (panoptic.min() < 0 or panoptic.max() > num_queries):
    raise ValueError(
        f"panoptic{where} holds values outside [0, {num_queries}] (0 = void, "
        f"q + 1 = query q): [{panoptic.min()}, {panoptic.max()}]")
  segment_ids = np.arange(1, num_queries + 1)  # [Q]
  areas, boxes = segment_areas_and_boxes(panoptic, segment_ids)
  if query_valid is not None:
    invalid_used = (~np.asarray(query_valid, bool).reshape(-1)) & (areas > 0)
    if invalid_used.any():
      raise ValueError(f"panoptic{where} assigns pixels to invalid queries "
                       f"{np.nonzero(invalid_used)[0].tolist()}")
  scores = None if query_scores is None else np.asarray(
      query_scores, np.float64).reshape(-1)  # [Q]
  segments = []
  for q in np.nonzero(areas > 0)[0]:
    segment = {
        "id": int(segment_ids[q]),
        "category_id": int(category_ids[q]),
        "iscrowd": 0,
        "area": int(areas[q]),
        "bbox": [int(v) for v in boxes[q]],
    }
    if scores is not None:
      segment["score"] = float(scores[q])
    segments.append(segment)
  return segments


def write_panoptic_prediction(
    out_folder: str | os.PathLike[str],
    image_id: int,
    file_name: str,
    panoptic: np.ndarray,
    segments_info: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
  """Writes one image's panoptic PNG and returns its COCO annotation entry.

  Areas and boxes are recomputed from the map. Listed segments that own no
  pixel are dropped (pq_compute rejects a JSON segment missing from the PNG);
  a non-zero map value that no segment lists is an error.

  Args:
    out_folder: folder of the PNGs (created if needed).
    image_id: COCO image id.
    file_name: the image's file name; the PNG takes its stem + ".png".
    panoptic: [H, W] int segment ids, 0 = void.
    segments_info: dicts with at least `id` and `category_id` (other keys,
      e.g. `iscrowd` or `score`, are kept).

  Returns:
    `{"image_id", "file_name", "segments_info"}` with `area` and `bbox` set.
  """
  panoptic = np.asarray(panoptic)
  ids = np.asarray([int(s["id"]) for s in segments_info], np.int64)  # [S]
  if len(set(ids.tolist())) != ids.size:
    raise ValueError(f"image {image_id}: duplicate segment ids in segments_info")
  if (ids <= 0).any():
    raise ValueError(f"image {image_id}: segment ids must be > 0 (0 is VOID), "
                     f"got {ids[ids <= 0].tolist()}")
  png = encode_panoptic_png(panoptic)
  present = np.unique(panoptic)  # [U]
  unlisted = np.setdiff1d(present[present != 0], ids)
  if unlisted.size:
    raise ValueError(f"image {image_id}: panoptic map holds segment ids "
                     f"{unlisted.tolist()} that segments_info does not list")
  areas, boxes = segment_areas_and_boxes(panoptic, ids)
  png_name = os.path.splitext(os.path.basename(file_name))[0] + ".png"
  os.makedirs(out_folder, exist_ok=True)
  with open(os.path.join(out_folder, png_name), "wb") as f:
    f.write(png)
  out_segments = []
  for segment, area, box in zip(segments_info, areas, boxes):
    if area == 0:
      continue
    entry = {k: _to_builtin(v) for k, v in segment.items()}
    entry["id"] = int(segment["id"])
    entry["category_id"] = int(segment["category_id"])
    entry.setdefault("iscrowd", 0)
    entry["area"] = int(area)
    entry["bbox"] = [int(v) for v in box]
    out_segments.append(entry)
  return {"image_id": int(image_id), "file_name": png_name,
          "segments_info": out_segments}


def write_panoptic_json(
    path: str | os.PathLike[str],
    annotations: Sequence[Mapping[str, Any]],
    categories_list: Sequence[Mapping[str, Any]],
    images_list: Sequence[Mapping[str, Any]],
) -> None:
  """Writes a COCO panoptic JSON (`annotations`, `categories`, `images`)."""
  payload = {
      "annotations": [_to_builtin(a) for a in annotations],
      "categories": [_to_builtin(c) for c in categories_list],
      "images": [_to_builtin(i) for i in images_list],
  }
  _write_json(path, payload)


def detections_from_boxes(
    image_id: int,
    boxes_xyxy: np.ndarray,
    scores: np.ndarray,
    category_ids: np.ndarray,
) -> list[dict[str, Any]]:
  """COCO detection results from `[x0, y0, x1, y1]` boxes (`x1 = x0 + w`).

  Args:
    image_id: COCO image id.
    boxes_xyxy: [N, 4] boxes in original-image pixels.
    scores: [N] confidences.
    category_ids: [N] COCO category ids.

  Returns:
    One dict per box: `image_id`, `category_id`, `bbox` [x, y, w, h], `score`.
  """
  boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)  # [N, 4]
  scores = np.asarray(scores, np.float64).reshape(-1)  # [N]
  category_ids = np.asarray(category_ids).reshape(-1)  # [N]
  if not boxes.shape[0] == scores.size == category_ids.size:
    raise ValueError(f"image {image_id}: boxes, scores and category_ids differ "
                     f"in length: {boxes.shape[0]}, {scores.size}, "
                     f"{category_ids.size}")
  xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], 1)  # [N, 4]
  return [{"image_id": int(image_id), "category_id": int(c),
           "bbox": [float(v) for v in b], "score": float(s)}
          for b, s, c in zip(xywh, scores, category_ids)]


def write_detections_json(path: str | os.PathLike[str],
                          detections: Iterable[Mapping[str, Any]]) -> None:
  """Writes COCO detection results: a JSON list of `image_id`,
  `category_id`, `bbox` [x, y, w, h], `score`."""
  out = []
  for det in detections:
    missing = {"image_id", "category_id", "bbox", "score"} - set(det)
    if missing:
      raise ValueError(f"detection {det!r} lacks fields {sorted(missing)}")
    out.append({"image_id": int(det["image_id"]),
                "category_id": int(det["category_id"]),
                "bbox": [float(v) for v in det["bbox"]],
                "score": float(det["score"])})
  _write_json(path, out)


def _to_builtin(value: Any) -> Any:
  """NumPy scalars / arrays (nested in dicts and lists) -> JSON-able builtins."""
  if isinstance(value, Mapping):
    return {k: _to_builtin(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_builtin(v) for v in value]
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, np.generic):
    return value.item()
  return value


def _write_json(path: str | os.PathLike[str], payload: Any) -> None:
  """Writes JSON, creating the parent folder."""
  parent = os.path.dirname(os.fspath(path))
  if parent:
    os.makedirs(parent, exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f)
