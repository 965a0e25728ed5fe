"""The images to predict, with their COCO image ids: a folder, a glob, or an image-info JSON.

  list_images("photos/")                      # every image file of the folder (not its subfolders)
  list_images("photos/*.jpg")                 # a glob pattern (quote it in a shell)
  list_images("annotations/image_info_test-dev2017.json", image_dir="test2017/")

An image-info JSON is a COCO file with an `images` list (`id`, `file_name`, `height`, `width`),
e.g. `image_info_test-dev2017.json` or a split's `panoptic_*.json` (its annotations are not
read); its images are read from `image_dir/file_name` and keep the JSON's ids and entries. A
folder or a glob gets ids 1, 2, ... in sorted file-name order, and entries `{id, file_name,
height, width}` with the sizes read from the files. Two images whose prediction PNGs would have
the same name (`a.jpg` and `a.png`; `x/a.jpg` and `y/a.jpg`) are an error naming both.

Plain Python and PIL (no JAX): the entry point lists the inputs before any device starts.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import json
import os
from typing import Any, Sequence

from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
_GLOB_CHARACTERS = "*?["


@dataclasses.dataclass(frozen=True)
class InputImage:
  """One image to predict.

  Attributes:
    image_id: its COCO image id.
    path: the image file.
    info: its COCO `images` entry (`id`, `file_name`, and `height`, `width` where known).
  """
  image_id: int
  path: str
  info: dict[str, Any]

  @property
  def png_name(self) -> str:
    """The file name of its prediction PNG (`coco_format.write_panoptic_prediction`'s)."""
    return os.path.splitext(os.path.basename(self.info["file_name"]))[0] + ".png"


def list_images(source: str, image_dir: str | None = None) -> list[InputImage]:
  """The images of `source` (a folder, a glob pattern or an image-info JSON; see the module).

  Raises:
    FileNotFoundError: `source` (or `image_dir`) does not exist, or matches no image.
    ValueError: a malformed JSON (naming the file and the field), or two images with the same
      PNG name.
  """
  if os.path.isdir(source):
    paths = [os.path.join(source, n) for n in os.listdir(source)
             if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(source, n))]
    if not paths:
      raise FileNotFoundError(f"--input {source}: the folder holds no image "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
    images = _numbered(paths)
  elif source.lower().endswith(".json") and os.path.isfile(source):
    if not image_dir:
      raise ValueError(f"--input {source}: an image-info JSON needs --image_dir, the folder of "
                       "its images (e.g. test2017/)")
    images = _from_json(source, image_dir)
  elif any(c in source for c in _GLOB_CHARACTERS):
    paths = [p for p in glob.glob(source) if os.path.isfile(p)]
    if not paths:
      raise FileNotFoundError(f"--input {source}: the pattern matches no file")
    images = _numbered(paths)
  elif os.path.isfile(source):
    images = _numbered([source])
  else:
    raise FileNotFoundError(f"--input {source}: no such folder, file or image-info JSON")
  _check_png_names(images)
  return images


def _numbered(paths: Sequence[str]) -> list[InputImage]:
  """Ids 1..N in sorted file-name order (the path breaks ties; those fail the name check)."""
  ordered = sorted(paths, key=lambda p: (os.path.basename(p), p))
  return [InputImage(index + 1, path, {"id": index + 1, "file_name": os.path.basename(path)})
          for index, path in enumerate(ordered)]


def _from_json(path: str, image_dir: str) -> list[InputImage]:
  """The `images` of a COCO JSON, read from `image_dir`; errors name the file and the field."""
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f"--image_dir {image_dir}: no such folder")
  with open(path) as f:
    try:
      data = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f"{path}: not JSON ({error})") from None
  entries = data.get("images") if isinstance(data, dict) else None
  if not isinstance(entries, list) or not entries:
    raise ValueError(f"{path}: field 'images' missing or empty (an image-info JSON lists its "
                     "images there)")
  images, seen = [], set()
  for index, entry in enumerate(entries):
    if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) or not isinstance(
        entry.get("file_name"), str):
      raise ValueError(f"{path}: images[{index}] needs an integer 'id' and a string "
                       f"'file_name', got {entry!r}")
    if entry["id"] in seen:
      raise ValueError(f"{path}: images[{index}]: duplicate image id {entry['id']}")
    seen.add(entry["id"])
    images.append(InputImage(entry["id"], os.path.join(image_dir, entry["file_name"]),
                             dict(entry)))
  return images


def _check_png_names(images: Sequence[InputImage]) -> None:
  first: dict[str, InputImage] = {}
  for image in images:
    other = first.setdefault(image.png_name, image)
    if other is not image:
      raise ValueError(f"{other.path} and {image.path} would both be predicted into "
                       f"{image.png_name}: give images distinct file names (stems)")


def read_size(image: InputImage) -> tuple[int, int]:
  """`(height, width)` from the file's header (nothing decoded).

  Raises:
    ValueError: the file is missing or not an image PIL reads, naming it and its image id; or
      its size differs from the size its image-info entry gives.
  """
  try:
    with Image.open(image.path) as pil:
      width, height = pil.size
  except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ...).
    what = "missing" if not os.path.isfile(image.path) else "corrupt or unreadable image"
    raise ValueError(f"{image.path}: {what} (image id {image.image_id}): {error}") from None
  listed = image.info.get("height"), image.info.get("width")
  if listed != (None, None) and listed != (height, width):
    raise ValueError(f"{image.path}: {height} x {width} pixels, but its image-info entry "
                     f"(image id {image.image_id}) says {listed[0]} x {listed[1]}")
  return height, width


def read_sizes(images: Sequence[InputImage], workers: int = 16
               ) -> list[tuple[int, int] | ValueError]:
  """`read_size` of every image, in threads; the error in place of the size where it fails."""

  def size(image):
    try:
      return read_size(image)
    except ValueError as error:
      return error

  with concurrent.futures.ThreadPoolExecutor(min(workers, os.cpu_count() or 1)) as pool:
    return list(pool.map(size, images))
