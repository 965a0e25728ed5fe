"""PNG reading for PQ: kornia-rs gives Pillow's pixels, or leaves the file to
Pillow (which then reads it or raises as it would for pq_compute).

The reference is Pillow itself (`np.asarray(Image.open(...))`, what
panopticapi reads); PNG chunks are assembled here with struct and zlib.
"""
import io
import struct
import zlib

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import PngImagePlugin
import pytest

from ciae_jax import panoptic_png
from ciae_jax.evaluation import coco_format
from ciae_jax.evaluation import pq

SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(name="fast")
def fixture_fast():
  """Skips unless the kornia-rs reader is installed and enabled."""
  pytest.importorskip("kornia_rs.io")
  if panoptic_png.fast_png_decoder() is None:
    pytest.skip(f"kornia-rs disabled by ${panoptic_png.PNG_DECODER_ENV}")


def chunk(kind, data):
  """One PNG chunk with its CRC."""
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data)))


def split_chunks(png):
  """[(kind, data)] of a PNG file."""
  assert png[:8] == SIGNATURE
  out, pos = [], 8
  while pos < len(png):
    (length,) = struct.unpack(">I", png[pos:pos + 4])
    out.append((png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]))
    pos += 12 + length
  return out


def join_chunks(chunks):
  return SIGNATURE + b"".join(chunk(k, d) for k, d in chunks)


def insert_before_idat(png, extra):
  """The PNG with chunks `extra` [(kind, data)] before its first IDAT."""
  chunks = split_chunks(png)
  first = next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
  return join_chunks(chunks[:first] + extra + chunks[first:])


def pil_png(rgb, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, format="PNG", **kwargs)
  return buffer.getvalue()


def pillow_pixels(png):
  with Image.open(io.BytesIO(png)) as image:
    return np.asarray(image)


def pillow_outcome(path):
  """('ok', [H, W] ids) as panopticapi reads the file, or ('error', type)."""
  try:
    with Image.open(path) as image:
      rgb = np.array(image, dtype=np.int64)
  except Exception as e:  # pylint: disable=broad-except
    return "error", type(e)
  return "ok", rgb[..., 0] + 256 * rgb[..., 1] + 65536 * rgb[..., 2]


def outcome(read, path):
  try:
    return "ok", np.asarray(read(path))
  except Exception as e:  # pylint: disable=broad-except
    return "error", type(e)


def assert_reads_like_pillow(path):
  """read_panoptic_png and PQ's reader agree with Pillow on `path`."""
  expected = pillow_outcome(path)
  for read in (panoptic_png.read_panoptic_png,
               lambda p: pq._png_ids(str(p), "test")[0]):  # pylint: disable=protected-access
    got = outcome(read, path)
    assert got[0] == expected[0], (path, got, expected)
    if expected[0] == "ok":
      np.testing.assert_array_equal(got[1].reshape(expected[1].shape),
                                    expected[1])
    else:
      assert issubclass(got[1], expected[1]) or issubclass(expected[1],
                                                           got[1])


def id_maps():
  """Panoptic-like maps (blocks of 24-bit ids), noise, and thin shapes."""
  rng = np.random.default_rng(0)
  blocks = rng.integers(0, 256**3, (9, 12))
  yield "blocks", np.kron(blocks, np.ones((7, 9), np.int64))  # [63, 108]
  noise = rng.integers(0, 256**3, (33, 47))
  yield "noise", noise
  yield "1x1", noise[:1, :1]
  yield "1xN", noise[:1]
  yield "Nx1", noise[:, :1]


def written_pngs(id_map):
  """The same map written by our exporter and by Pillow in several ways."""
  rgb = panoptic_png.id_map_to_rgb(id_map)
  yield "ours", panoptic_png.encode_panoptic_png(id_map)
  yield "ours_level0", panoptic_png.encode_panoptic_png(id_map, compress_level=0)
  yield "ours_level9", panoptic_png.encode_panoptic_png(id_map, compress_level=9)
  yield "pil", pil_png(rgb)
  yield "pil_optimize", pil_png(rgb, optimize=True)
  yield "pil_level0", pil_png(rgb, compress_level=0)
  info = PngImagePlugin.PngInfo()
  info.add_text("Comment", "tEXt")
  info.add_text("Long", "zTXt " * 50, zip=True)
  info.add_itxt("Intl", "iTXt")
  yield "pil_metadata", pil_png(rgb, pnginfo=info, dpi=(72, 72),
                                icc_profile=b"\0" * 128,
                                transparency=tuple(int(v) for v in rgb[0, 0]))
  # Chunks Pillow does not write: gamma, significant bits, sRGB, a
  # suggested palette; none of them changes the pixels of an RGB PNG.
  yield "gamma_sbit_srgb_plte", insert_before_idat(pil_png(rgb), [
      (b"gAMA", struct.pack(">I", 100000)), (b"sBIT", b"\x05\x06\x07"),
      (b"sRGB", b"\x00"), (b"PLTE", bytes(range(12)))])
  # The image data split over many small IDAT chunks, and data after IEND.
  chunks = split_chunks(pil_png(rgb))
  stream = b"".join(d for k, d in chunks if k == b"IDAT")
  idats = [(b"IDAT", stream[i:i + 50]) for i in range(0, len(stream), 50)]
  yield "many_idat_and_trailer", join_chunks(
      [c for c in chunks if c[0] == b"IHDR"] + idats + [(b"IEND", b"")]
  ) + b"trailing bytes"


@pytest.mark.usefixtures("fast")
def test_equals_pillow_on_coco_sample(coco_sample_root):
  paths = sorted(
      (coco_sample_root / "annotations" / "panoptic_val2017").glob("*.png"))
  assert paths
  for path in paths:
    data = path.read_bytes()
    rgb = panoptic_png.decode_rgb8_png(data)  # [H, W, 3]
    assert rgb is not None, path  # COCO's PNGs take the fast path
    np.testing.assert_array_equal(rgb, pillow_pixels(data))
    assert_reads_like_pillow(path)


@pytest.mark.usefixtures("fast")
@pytest.mark.parametrize("name,id_map", list(id_maps()))
def test_equals_pillow_on_written_pngs(name, id_map, tmp_path):
  del name
  for writer, data in written_pngs(id_map):
    rgb = panoptic_png.decode_rgb8_png(data)  # [H, W, 3]
    assert rgb is not None, writer
    np.testing.assert_array_equal(rgb, pillow_pixels(data), err_msg=writer)
    ids = np.empty(id_map.size, np.uint32)
    np.testing.assert_array_equal(panoptic_png.rgb_bytes_to_ids(rgb, ids),
                                  id_map.reshape(-1), err_msg=writer)
    path = tmp_path / f"{writer}.png"
    path.write_bytes(data)
    assert_reads_like_pillow(path)
  # What write_panoptic_prediction writes.
  ann = coco_format.write_panoptic_prediction(
      tmp_path / "pred", 1, "a.jpg", id_map,
      [{"id": int(i), "category_id": 1} for i in np.unique(id_map) if i])
  data = (tmp_path / "pred" / ann["file_name"]).read_bytes()
  np.testing.assert_array_equal(panoptic_png.decode_rgb8_png(data),
                                pillow_pixels(data))


def test_leaves_other_files_to_pillow(tmp_path, monkeypatch):
  """Files kornia-rs would read differently from Pillow, or not at all."""
  rng = np.random.default_rng(1)
  rgb = rng.integers(0, 256, (6, 7, 3)).astype(np.uint8)
  good = pil_png(rgb)
  assert panoptic_png.rgb8_png_size(good) == (6, 7)
  ihdr = split_chunks(good)[0][1]

  def with_header(depth, colour, interlace):
    chunks = split_chunks(good)
    chunks[0] = (b"IHDR", ihdr[:8] + bytes([depth, colour, 0, 0, interlace]))
    return join_chunks(chunks)

  palette = io.BytesIO()
  Image.fromarray(rgb).convert("P").save(palette, format="PNG")
  declined = {
      "rgba": pil_png(np.concatenate([rgb, rgb[..., :1]], -1)),
      "rgb16": with_header(16, 2, 0),
      "interlaced": with_header(8, 2, 1),
      "not_png": b"BM" + good[2:],
      "bad_crc_before_idat": insert_before_idat(
          good, [(b"tEXt", b"k\0v")]).replace(b"k\0v", b"k\0w"),
      "no_idat": join_chunks(
          [c for c in split_chunks(good) if c[0] != b"IDAT"]),
      "gray": pil_png(rgb[..., 0]),
      "palette": palette.getvalue(),
  }
  for name, data in declined.items():
    assert panoptic_png.rgb8_png_size(data) is None, name
    assert panoptic_png.decode_rgb8_png(data) is None, name
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    if name in ("gray", "palette"):  # pq_compute cannot read these either
      with pytest.raises(ValueError, match=f"{name}.png.*must be RGB"):
        panoptic_png.read_panoptic_png(path)
    else:
      assert_reads_like_pillow(path)
  # Pillow's size guard (it warns above, raises above twice the limit) and
  # its switch for reading truncated files: then Pillow it is.
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6 * 7 - 1)
  assert panoptic_png.rgb8_png_size(good) is None
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6 * 7)
  assert panoptic_png.rgb8_png_size(good) == (6, 7)
  monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
  assert panoptic_png.rgb8_png_size(good) is None


@pytest.mark.usefixtures("fast")
def test_broken_files_behave_as_in_pillow(tmp_path):
  """When kornia-rs rejects a file, Pillow reads it or raises its error."""
  rng = np.random.default_rng(2)
  rgb = np.kron(rng.integers(0, 256, (4, 5, 3)), np.ones((5, 6, 1))).astype(
      np.uint8)
  good = pil_png(rgb)
  chunks = split_chunks(good)
  idat = next(i for i, (k, _) in enumerate(chunks) if k == b"IDAT")
  stream = chunks[idat][1]
  rows = bytearray(zlib.decompress(stream))
  rows[0] = 9  # no such filter type
  bad_crc = bytearray(good)
  bad_crc[len(join_chunks(chunks[:idat + 1])) - 1] ^= 1  # IDAT's CRC
  cases = {
      "truncated": good[:len(good) // 2],
      "no_iend": good[:-12],
      "idat_crc": bytes(bad_crc),
      "bad_filter": join_chunks(chunks[:idat] + [
          (b"IDAT", zlib.compress(bytes(rows)))] + chunks[idat + 1:]),
      "unknown_critical_chunk": insert_before_idat(good, [(b"ABCD", b"x")]),
  }
  for name, data in cases.items():
    path = tmp_path / f"{name}.png"
    path.write_bytes(data)
    assert_reads_like_pillow(path)


def test_decoder_switch(monkeypatch):
  rgb = np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
  data = pil_png(rgb)
  monkeypatch.setenv(panoptic_png.PNG_DECODER_ENV, "pillow")
  assert panoptic_png.fast_png_decoder() is None
  assert panoptic_png.decode_rgb8_png(data) is None
  monkeypatch.delenv(panoptic_png.PNG_DECODER_ENV)
  monkeypatch.setattr(panoptic_png, "_kornia_io", lambda: None)  # as if not installed
  assert panoptic_png.fast_png_decoder() is None
  assert panoptic_png.decode_rgb8_png(data) is None
