"""Where examples come from: a split's records, their checks, the images left out.

`CocoSource` reads a split in the COCO panoptic layout (also the 'synthetic' source): its
records (known sizes, so the host plans every batch: `data/schedule.py`) and a TF loader from
record index to raw example (`data/transforms.py`). `make_source` picks it or the TFDS source.

With `skip_bad_examples`, every record is decoded once up front with the NumPy decoder and the
bad ones are left out before the order is drawn; each left-out image is a `SkippedExample`.
TensorFlow is imported inside functions only.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any, Callable

from absl import logging
import numpy as np

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco
from ciae_jax.data import dataset as dataset_lib
from ciae_jax.data import transforms

if TYPE_CHECKING:  # Annotations only: no TF import at run time.
  import tensorflow as tf  # pylint: disable=g-bad-import-order


@dataclasses.dataclass(frozen=True)
class SkippedExample:
  """An image the input left out: its id, its files and why."""
  image_id: int
  files: str
  reason: str


def _files(image_path: str, png_path: str) -> str:
  return f"image {image_path}, PNG {png_path}"


def _skipped(record: coco.ImageRecord, reason: str) -> SkippedExample:
  return SkippedExample(record.image_id, _files(record.image_path, record.png_path), reason)


def _records_collecting_errors(
    root: str, split: str, categories: categories_lib.CategoryInfo
) -> tuple[list[coco.ImageRecord], list[SkippedExample]]:
  """`coco.load_records`, but per-image errors leave the image out instead.

  Errors of the whole file (not JSON, missing fields, duplicate image ids,
  annotations of unknown images) still raise ValueError.
  """
  skipped = []

  def leave_out(image_id: int, image_path: str, png_path: str, error: ValueError) -> None:
    skipped.append(SkippedExample(image_id, _files(image_path, png_path), str(error)))

  records = coco.load_records(root, split, categories=categories, on_image_error=leave_out)
  return records, skipped


def _decode_error(record: coco.ImageRecord,
                  categories: categories_lib.CategoryInfo) -> str | None:
  try:
    coco.decode_example(record, categories)
  except ValueError as e:
    return str(e)
  return None


def validate_records(
    records: list[coco.ImageRecord],
    categories: categories_lib.CategoryInfo, *,
    num_threads: int | None = None
) -> tuple[list[coco.ImageRecord], list[SkippedExample]]:
  """(records that decode cleanly, the others with their errors), in order.

  Each image and PNG is fully decoded with the NumPy decoder, which makes the
  checks the TF graph makes (sizes, PNG/JSON segment ids); PIL releases the
  GIL while decoding, so threads scale.
  """
  start = time.time()
  num_threads = num_threads or min(32, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
    errors = list(pool.map(lambda r: _decode_error(r, categories), records))
  good = [r for r, e in zip(records, errors) if e is None]
  bad = [_skipped(r, e) for r, e in zip(records, errors) if e is not None]
  logging.info("Checked %d images in %.1f s (%d threads): %d bad",
               len(records), time.time() - start, num_threads, len(bad))
  return good, bad


def log_skipped(where: str, skipped: list[SkippedExample], what: str,
                limit: int = 20) -> None:
  """Logs the images left out (the first `limit` of them)."""
  if not skipped:
    return
  logging.warning("%s: %d images %s:", where, len(skipped), what)
  for s in skipped[:limit]:
    logging.warning("  image id %d (%s): %s", s.image_id, s.files, s.reason)
  if len(skipped) > limit:
    logging.warning("  ... and %d more", len(skipped) - limit)


class CocoSource:
  """Records of one split in the COCO panoptic layout, loaded through TF tables.

  Attributes:
    records: the records the input uses, by image id.
    sizes: int64 [n, 2], their original `(height, width)` (from the JSON).
    skipped: `SkippedExample`s of the images left out, by image id.
  """

  def __init__(self, root: str, split: str,
               categories: categories_lib.CategoryInfo, *, train: bool,
               max_segments: int, skip_bad_examples: bool, num_tuning_images: int = 0):
    self.json_path = coco.split_paths(root, split)[1]
    skipped = []
    if skip_bad_examples:
      records, skipped = _records_collecting_errors(root, split, categories)
    else:
      records = coco.load_records(root, split, categories=categories)
    if train and num_tuning_images:
      records, held_out = dataset_lib.split_tuning_records(records, num_tuning_images,
                                                           where=self.json_path)
      logging.info("%s: the last %d images (ids %d..%d) are held out of training for "
                   "tune_inference (dataset.num_tuning_images)", self.json_path, len(held_out),
                   held_out[0].image_id, held_out[-1].image_id)
    if skip_bad_examples:
      records, bad = validate_records(records, categories)
      skipped = sorted(skipped + bad, key=lambda s: s.image_id)
      log_skipped(self.json_path, skipped, "are bad and left out")
    if train:
      records, left_out = self._training_records(records, max_segments, skip_bad_examples)
      skipped += left_out
    too_many = [r.image_id for r in records if len(r.segments) > max_segments]
    if too_many:
      logging.warning("%s: %d images have more than max_segments=%d segments; "
                      "the smallest are dropped (void), e.g. image ids %s",
                      self.json_path, len(too_many), max_segments, too_many[:10])
    self.records = records
    self.sizes = np.asarray([[r.height, r.width] for r in records], np.int64).reshape(-1, 2)
    self.categories = categories
    self.skipped = sorted(skipped, key=lambda s: s.image_id)

  def _training_records(
      self, records: list[coco.ImageRecord], max_segments: int, skip_bad_examples: bool
  ) -> tuple[list[coco.ImageRecord], list[SkippedExample]]:
    """Leaves out images without segments and (when skipping) those with too many."""
    empty = [_skipped(r, "no segments") for r in records if not r.segments]
    if empty:
      logging.info("%s: %d of %d images have no segments; skipped in "
                   "training", self.json_path, len(empty), len(records))
    records = [r for r in records if r.segments]
    over = []
    if skip_bad_examples:
      over = [_skipped(r, f"{len(r.segments)} segments, more than "
                       f"dataset.max_segments={max_segments}")
              for r in records if len(r.segments) > max_segments]
      log_skipped(self.json_path, over, "are left out of training")
      records = [r for r in records if len(r.segments) <= max_segments]
    if not records:
      raise ValueError(f"{self.json_path}: no images with segments")
    return records, empty + over

  def __len__(self) -> int:
    return len(self.records)

  def _tables(self) -> dict[str, Any]:
    tf = transforms.import_tf()
    recs, cats = self.records, self.categories
    segs = [s for r in recs for s in r.segments]
    classes = np.asarray([cats.contiguous_index(s.category_id) for s in segs],
                         np.int32).reshape(-1)  # [T]
    return {
        "image_path": tf.constant([r.image_path for r in recs], tf.string),
        "png_path": tf.constant([r.png_path for r in recs], tf.string),
        "image_id": tf.constant([r.image_id for r in recs], tf.int32),
        "size": tf.constant(self.sizes.astype(np.int32).reshape(-1, 2)),  # [n, 2]
        "offsets": tf.constant(np.cumsum([0] + [len(r.segments) for r in recs]), tf.int64),
        "seg_ids": tf.constant(np.asarray([s.id for s in segs], np.int32)),  # [T]
        "seg_class": tf.constant(classes),  # [T]
        "seg_is_thing": tf.constant(np.asarray([cats.isthing[c] for c in classes], bool)),
        "seg_is_crowd": tf.constant(np.asarray([s.iscrowd for s in segs], bool)),
        "seg_area": tf.constant(np.asarray([s.area for s in segs], np.float32)),
    }

  def loader(self) -> Callable[[tf.Tensor], dict[str, tf.Tensor]]:
    """A TF function: record index -> raw example (transforms module)."""
    tf = transforms.import_tf()
    t = self._tables()

    def load(index):
      start, end = t["offsets"][index], t["offsets"][index + 1]
      image = transforms.decode_rgb(tf.io.read_file(t["image_path"][index]))
      pan = tf.io.decode_png(tf.io.read_file(t["png_path"][index]), channels=3)
      return {
          "image": image,  # [h, w, 3]
          "pan": pan,  # [h, w, 3]
          "seg_ids": t["seg_ids"][start:end],  # [n]
          "seg_class": t["seg_class"][start:end],  # [n]
          "seg_is_thing": t["seg_is_thing"][start:end],  # [n]
          "seg_is_crowd": t["seg_is_crowd"][start:end],  # [n]
          "seg_area": t["seg_area"][start:end],  # [n]
          "image_id": t["image_id"][index],
          "expect_size": t["size"][index],  # [2]
          "where": tf.strings.join(["image ", t["image_path"][index],
                                    ", PNG ", t["png_path"][index]]),
      }

    return load

  def diagnose(self, indices: list[int]) -> None:
    """Decodes records with NumPy; raises their ValueError if one is bad."""
    for i in indices:
      coco.decode_example(self.records[i], self.categories)


def make_source(cfg: hparams.DatasetHParams, split: str, *, train: bool,
                categories: categories_lib.CategoryInfo) -> Any:
  """The configured source of `split`: a `CocoSource` or a `tfds_source.TfdsSource`."""
  if cfg.source == "tfds":
    from ciae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSource(cfg, split, categories, train=train)
  return CocoSource(dataset_lib.prepare_root(cfg), split, categories, train=train,
                    max_segments=cfg.max_segments, skip_bad_examples=cfg.skip_bad_examples,
                    num_tuning_images=cfg.num_tuning_images)
