"""A small, learnable synthetic panoptic dataset in the COCO panoptic layout.

NumPy and PIL only (no TF). `generate_synthetic_dataset(root, ...)` writes
`root/{train2017,val2017}/*.jpg`, `root/annotations/panoptic_{split}.json` and
`root/annotations/panoptic_{split}/*.png`, then reads back exactly like COCO.

Content, drawn per image from one distribution for both splits:
- stuff: 2-3 regions (bands with wavy borders) of 4 stuff classes, each with
  its own colour and texture (stripes, dots, checks, gradient);
- things: 1-6 instances of 5 shapes (disc, square, triangle, ring, cross),
  each shape a class with its own colour and texture, sizes log-uniform from
  12 px to 70% of the shorter side (so several FCOS levels get positives),
  drawn largest first so smaller ones occlude them;
- a crowd segment (a cluster of small discs) in about 10% of the images;
- void pixels: an unlabeled noise blob in about half of the images, and
  thing fragments left with under `MIN_VISIBLE` pixels.
Category ids are non-contiguous (things 3, 7, 12, 25, 31; stuff 101, 140,
153, 187). Output is deterministic in the seed; a manifest makes generation
idempotent (same parameters: nothing is rewritten).

Command: `python -m ciae_jax.data.synthetic --root DIR [--num_train N ...]`.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ciae_jax import hparams
from ciae_jax import panoptic_png
from ciae_jax.data import coco

MANIFEST = "synthetic_manifest.json"
# Present while splits are moved into a root: a half-written synthetic root is not real data.
GENERATING_MARKER = ".synthetic_generating"
VERSION = 1
MIN_VISIBLE = 24  # Thing fragments smaller than this become void (pixels).

# name, id, colour (also the base colour of the drawn texture), texture.
THINGS = (
    ("disc", 3, (220, 40, 40), "solid"),
    ("square", 7, (240, 200, 30), "hstripes"),
    ("triangle", 12, (200, 40, 220), "solid"),
    ("ring", 25, (30, 220, 230), "dots"),
    ("cross", 31, (250, 130, 20), "vstripes"),
)
STUFF = (
    ("sky", 101, (70, 110, 210), "gradient"),
    ("grass", 140, (40, 140, 50), "dstripes"),
    ("sand", 153, (200, 170, 120), "dots"),
    ("wall", 187, (120, 120, 120), "checks"),
)
SPLITS = ("train2017", "val2017")


def categories_json() -> list[dict[str, Any]]:
  """The COCO-style category list of the synthetic dataset."""
  cats = [{"id": cid, "name": name, "supercategory": "shape", "isthing": 1,
           "color": list(color)} for name, cid, color, _ in THINGS]
  cats += [{"id": cid, "name": name, "supercategory": "region", "isthing": 0,
            "color": list(color)} for name, cid, color, _ in STUFF]
  return cats


def _texture(kind: str, color: Sequence[int], h: int, w: int,
             rng: np.random.Generator) -> np.ndarray:
  """A float image [h, w, 3] of a class's colour and texture, with noise."""
  yy, xx = np.mgrid[0:h, 0:w]  # [h, w]
  phase = rng.integers(0, 8)
  if kind == "hstripes":
    pattern = ((yy + phase) // 3 % 2) * 2.0 - 1  # [h, w]
  elif kind == "vstripes":
    pattern = ((xx + phase) // 3 % 2) * 2.0 - 1
  elif kind == "dstripes":
    pattern = ((xx + yy + phase) // 4 % 2) * 2.0 - 1
  elif kind == "dots":
    pattern = (((xx + phase) % 5 < 2) & ((yy + phase) % 5 < 2)) * 2.0 - 1
  elif kind == "checks":
    pattern = (((xx + phase) // 6 + yy // 6) % 2) * 2.0 - 1
  elif kind == "gradient":
    pattern = yy / max(h - 1, 1) * 2.0 - 1
  else:  # solid
    pattern = np.zeros((h, w))
  base = np.asarray(color, np.float64)[None, None, :]  # [1, 1, 3]
  noise = rng.normal(0.0, 10.0, size=(h, w, 3))  # [h, w, 3]
  return base + 30.0 * pattern[..., None] + noise  # [h, w, 3]


def _shape_mask(kind: str, h: int, w: int, cy: float, cx: float,
                size: float, rng: np.random.Generator) -> np.ndarray:
  """Boolean mask [h, w] of a thing shape of diameter `size` at (cy, cx)."""
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64) + 0.5  # [h, w]
  dy, dx = yy - cy, xx - cx
  r = size / 2
  if kind == "disc":
    return dy**2 + dx**2 <= r**2
  if kind == "square":
    return (np.abs(dy) <= r) & (np.abs(dx) <= r)
  if kind == "triangle":
    apex_down = rng.random() < 0.5  # Both orientations: more variety.
    s = ((-dy if apex_down else dy) + r) / (2 * r)  # 0 at the apex, 1 base.
    return (s >= 0) & (s <= 1) & (np.abs(dx) <= r * s)
  if kind == "ring":
    d2 = dy**2 + dx**2
    return (d2 <= r**2) & (d2 >= (0.55 * r)**2)
  if kind == "cross":
    arm = max(r / 3, 2.0)
    return (((np.abs(dy) <= arm) & (np.abs(dx) <= r)) |
            ((np.abs(dx) <= arm) & (np.abs(dy) <= r)))
  raise ValueError(f"unknown shape {kind!r}")


def _stuff_layout(h: int, w: int, rng: np.random.Generator
                  ) -> tuple[np.ndarray, list[int]]:
  """Stuff region map [h, w] (region index) and the stuff class per region."""
  num_regions = int(rng.integers(2, 4))
  classes = [int(c) for c in rng.choice(len(STUFF), num_regions,
                                        replace=False)]
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)  # [h, w]
  angle = rng.uniform(0, np.pi)
  coord = yy * np.cos(angle) + xx * np.sin(angle)  # [h, w]
  amp, freq, phase = rng.uniform(2, 8), rng.uniform(0.03, 0.1), rng.uniform(
      0, 2 * np.pi)
  coord += amp * np.sin(freq * (xx * np.cos(angle) - yy * np.sin(angle)) +
                        phase)
  lo, hi = coord.min(), coord.max()
  # Cut j near (j + 1) / num_regions of the range: no band is very thin.
  centres = np.arange(1, num_regions) / num_regions
  cuts = lo + (hi - lo) * (centres + rng.uniform(-0.1, 0.1, num_regions - 1))
  region = np.searchsorted(cuts, coord.reshape(-1)).reshape(h, w)  # [h, w]
  return region, classes


def _draw_image(h: int, w: int, rng: np.random.Generator
                ) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
  """One image: RGB uint8 [h, w, 3], segment ids [h, w], segment entries."""
  canvas = np.zeros((h, w, 3))  # [h, w, 3]
  label = np.zeros((h, w), np.int64)  # [h, w] index into `entries` + 1
  entries = []
  region, stuff_classes = _stuff_layout(h, w, rng)
  for r, c in enumerate(stuff_classes):
    mask = region == r  # [h, w]
    name, cid, color, tex = STUFF[c]
    canvas[mask] = _texture(tex, color, h, w, rng)[mask]
    entries.append({"category_id": cid, "iscrowd": 0})
    label[mask] = len(entries)

  num_things = int(rng.integers(1, 7))
  sizes = np.exp(rng.uniform(np.log(12), np.log(0.7 * min(h, w)), num_things))
  for size in sorted(sizes, reverse=True):  # Small ones drawn last, on top.
    k = int(rng.integers(len(THINGS)))
    name, cid, color, tex = THINGS[k]
    cy, cx = rng.uniform(size / 4, h - size / 4), rng.uniform(size / 4,
                                                               w - size / 4)
    mask = _shape_mask(name, h, w, cy, cx, size, rng)
    if not mask.any():
      continue
    canvas[mask] = _texture(tex, color, h, w, rng)[mask]
    entries.append({"category_id": cid, "iscrowd": 0})
    label[mask] = len(entries)

  if rng.random() < 0.1:  # A crowd: a cluster of small discs, one segment.
    k = int(rng.integers(len(THINGS)))
    name, cid, color, tex = THINGS[k]
    cy, cx = rng.uniform(0.2 * h, 0.8 * h), rng.uniform(0.2 * w, 0.8 * w)
    mask = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(4, 8))):
      mask |= _shape_mask("disc", h, w, cy + rng.normal(0, 8),
                          cx + rng.normal(0, 8), rng.uniform(6, 10), rng)
    canvas[mask] = _texture(tex, color, h, w, rng)[mask]
    entries.append({"category_id": cid, "iscrowd": 1})
    label[mask] = len(entries)

  if rng.random() < 0.5:  # Unlabeled clutter: void pixels.
    cy, cx, size = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(5, 14)
    mask = _shape_mask("disc", h, w, cy, cx, size, rng)
    canvas[mask] = rng.uniform(0, 255, size=(int(mask.sum()), 3))
    label[mask] = 0

  image = np.clip(canvas, 0, 255).astype(np.uint8)  # [h, w, 3]
  return image, *_finish_segments(label, entries, rng)


def _finish_segments(label: np.ndarray, entries: list[dict[str, Any]],
                     rng: np.random.Generator
                     ) -> tuple[np.ndarray, list[dict[str, Any]]]:
  """Drops tiny/vanished segments, assigns unique ids, computes bbox/area."""
  ids = np.zeros(label.shape, np.int64)  # [h, w]
  segments = []
  used = set()
  for k, entry in enumerate(entries, start=1):
    mask = label == k  # [h, w]
    area = int(mask.sum())
    is_thing = entry["category_id"] in {t[1] for t in THINGS}
    if area == 0 or (is_thing and area < MIN_VISIBLE):
      continue  # Fully occluded, or a fragment: void.
    seg_id = int(rng.integers(1, 256**3))
    while seg_id in used:
      seg_id = int(rng.integers(1, 256**3))
    used.add(seg_id)
    ys, xs = np.nonzero(mask)
    ids[mask] = seg_id
    segments.append({
        "id": seg_id, "category_id": entry["category_id"],
        "iscrowd": entry["iscrowd"], "area": area,
        "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1),
                 int(ys.max() - ys.min() + 1)],
    })
  return ids, segments


def _write_split(root: str, split: str, num_images: int,
                 image_size: tuple[int, int], seed: int) -> None:
  image_dir, json_path, png_dir = coco.split_paths(root, split)
  os.makedirs(image_dir, exist_ok=True)
  os.makedirs(png_dir, exist_ok=True)
  h, w = image_size
  images, annotations = [], []
  split_index = SPLITS.index(split) if split in SPLITS else len(SPLITS)
  for i in range(num_images):
    # One generator per image: an image depends on (seed, split, i) only.
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_index, i]))
    image, ids, segments = _draw_image(h, w, rng)
    image_id = (split_index + 1) * 1_000_000 + i
    stem = f"{image_id:012d}"
    Image.fromarray(image).save(os.path.join(image_dir, stem + ".jpg"),
                                quality=95)
    Image.fromarray(panoptic_png.id_map_to_rgb(ids)).save(os.path.join(png_dir,
                                                           stem + ".png"))
    images.append({"id": image_id, "file_name": stem + ".jpg", "height": h,
                   "width": w})
    annotations.append({"image_id": image_id, "file_name": stem + ".png",
                        "segments_info": segments})
  with open(json_path, "w") as f:
    json.dump({"info": {"description": "ciae_jax synthetic panoptic"},
               "licenses": [], "images": images, "annotations": annotations,
               "categories": categories_json()}, f)


def generate_synthetic_dataset(root: str | os.PathLike, *, num_train: int, num_val: int,
                               image_size: tuple[int, int], seed: int) -> str:
  """Writes the synthetic dataset under `root` unless already there.

  Args:
    root: output folder (COCO panoptic layout, splits train2017 and val2017).
    num_train: images in train2017.
    num_val: images in val2017.
    image_size: (height, width) of every image.
    seed: the dataset is a pure function of the parameters.

  Returns:
    The root, as a string.

  Raises:
    ValueError: `root` holds a synthetic dataset with other parameters.
  """
  root = os.fspath(root)
  params = {"version": VERSION, "num_train": int(num_train),
            "num_val": int(num_val),
            "image_size": [int(v) for v in image_size], "seed": int(seed)}
  if min(image_size) < 32:
    raise ValueError(f"synthetic image_size {tuple(image_size)} too small "
                     "(at least 32 x 32)")
  os.makedirs(os.path.dirname(os.path.abspath(root)), exist_ok=True)
  # One generator at a time per root (e.g. parallel test workers or hosts).
  with open(os.path.abspath(root) + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if not _matches_manifest(root, params):
        _generate(root, params)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  return root


def holds_other_dataset(root: str | os.PathLike) -> bool:
  """True if `root` has an `annotations/` folder but no synthetic manifest (real data)."""
  root = os.fspath(root)
  return (os.path.isdir(os.path.join(root, "annotations"))
          and not os.path.isfile(os.path.join(root, MANIFEST))
          and not os.path.isfile(os.path.join(root, GENERATING_MARKER)))


def _matches_manifest(root: str, params: dict[str, Any]) -> bool:
  """True if `root` holds this dataset; ValueError if it holds another."""
  manifest_path = os.path.join(root, MANIFEST)
  if not os.path.isfile(manifest_path):
    return False
  with open(manifest_path) as f:
    existing = json.load(f)
  if existing != params:
    raise ValueError(f"{manifest_path}: a synthetic dataset with other "
                     f"parameters ({existing}) is there; asked for {params}. "
                     "Use another root or delete it.")
  return True


def _generate(root: str, params: dict[str, Any]) -> None:
  """Writes the splits next to `root`, moves them in, then the manifest."""
  if holds_other_dataset(root):  # Never replace real data.
    raise ValueError(f"{root} holds a COCO-layout dataset that is not synthetic; not "
                     "generating into it")
  staging = f"{root}.partial-{os.getpid()}"
  shutil.rmtree(staging, ignore_errors=True)
  image_size = tuple(params["image_size"])
  for split, num in zip(SPLITS, (params["num_train"], params["num_val"])):
    _write_split(staging, split, num, image_size, params["seed"])
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, GENERATING_MARKER), "w"):
    pass
  for name in ("annotations", *SPLITS):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    os.replace(os.path.join(staging, name), os.path.join(root, name))
  shutil.rmtree(staging, ignore_errors=True)
  manifest_path = os.path.join(root, MANIFEST)
  with open(manifest_path + ".tmp", "w") as f:
    json.dump(params, f)
  os.replace(manifest_path + ".tmp", manifest_path)  # Written last: complete.
  os.remove(os.path.join(root, GENERATING_MARKER))


def main(argv: Sequence[str] | None = None) -> None:
  """Command line: generate the synthetic dataset."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", required=True, help="output folder")
  defaults = hparams.SyntheticHParams()
  parser.add_argument("--num_train", type=int, default=defaults.num_train)
  parser.add_argument("--num_val", type=int, default=defaults.num_val)
  parser.add_argument("--height", type=int, default=defaults.image_size[0])
  parser.add_argument("--width", type=int, default=defaults.image_size[1])
  parser.add_argument("--seed", type=int, default=defaults.seed)
  args = parser.parse_args(argv)
  root = generate_synthetic_dataset(args.root, num_train=args.num_train,
                                    num_val=args.num_val,
                                    image_size=(args.height, args.width),
                                    seed=args.seed)
  print(f"synthetic panoptic dataset at {root}")


if __name__ == "__main__":
  main()
