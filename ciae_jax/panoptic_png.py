"""The COCO panoptic PNG: segment ids as colours, `id = R + 256 G + 256^2 B` (0 = void).

One implementation for the data (reading ground truth) and the evaluation (reading ground truth,
writing predictions). Plain NumPy and PIL: no TensorFlow, no JAX.

PNGs are read through kornia-rs (Rust `png` crate; pinned in requirements.txt) when it is
installed and the file is one it decodes exactly as Pillow does, otherwise through Pillow: the
same pixels either way; kornia-rs is 2.5-4.5x faster on PIL-written PNGs (adaptive filters, like
COCO's), whose Paeth rows dominate the decoding (benchmarks/RESULTS.md, "PQ evaluation").
`CIAE_PNG_DECODER=pillow` in the environment forces Pillow (e.g. to compare).
"""
from __future__ import annotations

import functools
import importlib
import os
import struct
from typing import Any
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile

# Ids a COCO panoptic PNG can hold: three 8-bit channels.
MAX_SEGMENT_ID = 256**3 - 1
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Environment variable that selects the PNG reader: "auto" (kornia-rs when installed, else
# Pillow) or "pillow" (always Pillow).
PNG_DECODER_ENV = "CIAE_PNG_DECODER"


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
      PNG_SIGNATURE,
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


@functools.cache
def _kornia_io() -> Any | None:
  """`kornia_rs.io`, imported once; None when it is not installed."""
  try:
    return importlib.import_module("kornia_rs.io")
  except ImportError:
    return None


def fast_png_decoder() -> Any | None:
  """`kornia_rs.io` if installed and not disabled through `$CIAE_PNG_DECODER=pillow`."""
  if os.environ.get(PNG_DECODER_ENV, "auto").lower() == "pillow":
    return None
  return _kornia_io()


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
