"""Source 'tfds': `coco/2017_panoptic` through tensorflow-datasets.

Reads a prepared TFDS dataset (`dataset.tfds_data_dir`) with the images left
encoded (SkipDecoding), so that skipping and host filtering happen before any
decoding; the same decode and transforms as the COCO-file source follow.

Classes: TFDS stores `panoptic_objects/label` as the index of the category in
the annotation file's `categories` list (COCO panoptic: sorted by id). That
list comes from `dataset.categories_file` (a panoptic JSON or a bare list) or,
by default, from the bundled COCO panoptic categories; where the builder
carries real label names, they must match it.

Order: the base order (`shuffle_files=False`) is shuffled per epoch with a
buffer of `dataset.shuffle_buffer`, seeded from (seed, epoch), so the stream
is deterministic; a resume (`start_step > 0`) counts the non-empty examples
once and then skips records (I/O and parsing only, no image decoding) up to
one epoch. Segments beyond `max_segments` are dropped with a printed line
per image.

Canvases: the sizes are known only after decoding, so TFDS batches are not bucketed; every
batch is padded to the union of the dataset's canvases (`data/pipeline.py`).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import transforms

if TYPE_CHECKING:  # Annotations only: no TF import at run time.
  import tensorflow as tf  # pylint: disable=g-bad-import-order

COCO_CATEGORIES_FILE = os.path.join(os.path.dirname(__file__),
                                    "coco_panoptic_categories.json")

# COCO split names -> TFDS split names.
_SPLITS = {"train2017": "train", "val2017": "validation", "test2017": "test"}


def tfds_split_name(split: str) -> str:
  """TFDS split of a COCO-style split name ('val2017' -> 'validation')."""
  return _SPLITS.get(split, split)


def label_to_class_table(category_list: list[dict[str, Any]],
                         categories: categories_lib.CategoryInfo,
                         label_names: list[str] | None = None) -> np.ndarray:
  """Contiguous class of each TFDS label (the index into the category list).

  Args:
    category_list: category dicts in file order (TFDS label order).
    categories: the contiguous categories.
    label_names: the builder's label names, checked against the list when
      they are real names (not just '0', '1', ...).

  Returns:
    int32 [num_labels].
  """
  if label_names and any(n != str(i) for i, n in enumerate(label_names)):
    names = [c.get("name") for c in category_list]
    if list(label_names) != names:
      raise ValueError("TFDS label names differ from the categories file "
                       f"(first labels {list(label_names)[:3]} vs "
                       f"{names[:3]}); set dataset.categories_file to the "
                       "panoptic JSON the TFDS dataset was built from")
  return np.asarray([categories.contiguous_index(c["id"])
                     for c in category_list], np.int32)


class TfdsSource:
  """A TFDS panoptic split as (position, encoded example) tokens.

  Attributes:
    sizes: None: the images' sizes are known only after decoding, so the pipeline cannot plan
      canvas buckets ahead (`data/pipeline.py`: every batch on the union canvas).
  """
  sizes = None

  def __init__(self, cfg: hparams.DatasetHParams, split: str,
               categories: categories_lib.CategoryInfo, *, train: bool):
    transforms.import_tf()  # GPUs hidden before TFDS initialises TF.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    self._tfds = tfds
    self.name = cfg.tfds_name
    self.split = tfds_split_name(split)
    self.categories = categories
    self.max_segments = cfg.max_segments
    self.shuffle_buffer = int(cfg.shuffle_buffer)
    self.builder = tfds.builder(cfg.tfds_name, data_dir=cfg.tfds_data_dir)
    category_list = categories_lib.read_category_list(
        cfg.categories_file or COCO_CATEGORIES_FILE)
    names = self.builder.info.features["panoptic_objects"]["label"].names
    self.label_to_class = label_to_class_table(category_list, categories,
                                               names)
    self.train = train
    self._len = None

  def base(self) -> tf.data.Dataset:
    """The split in stored order, images still encoded."""
    skip = self._tfds.decode.SkipDecoding()
    return self.builder.as_dataset(
        split=self.split, shuffle_files=False,
        decoders={"image": skip, "panoptic_image": skip})

  def __len__(self) -> int:
    if self._len is None:
      n = int(self.base().cardinality())
      if n < 0:  # Unknown cardinality: count once.
        n = int(self.base().reduce(np.int64(0), lambda c, _: c + 1))
      self._len = n
    return self._len

  def _non_empty(self) -> tf.data.Dataset:
    tf = transforms.import_tf()
    return self.base().filter(
        lambda ex: tf.size(ex["panoptic_objects"]["id"]) > 0)

  def train_tokens(self, seed: int, start_position: int) -> tf.data.Dataset:
    """(position, example) from `start_position` on, infinite."""
    tf = transforms.import_tf()
    non_empty = self._non_empty()
    buffer = self.shuffle_buffer

    def epoch_dataset(epoch):
      # A fixed seed for this function's graph only: a global
      # tf.random.set_seed cannot change the order (nonzero: TF would read a
      # (0, tensor) seed pair as a request for nondeterminism).
      tf.compat.v1.get_default_graph().seed = 1
      return non_empty.shuffle(buffer, seed=seed * 1_000_003 + epoch,
                               reshuffle_each_iteration=False)

    first_epoch, offset = 0, start_position
    if start_position:
      n = int(non_empty.reduce(np.int64(0), lambda c, _: c + 1))
      if not n:
        raise ValueError(f"tfds {self.name}:{self.split}: no examples with "
                         "segments")
      first_epoch, offset = divmod(start_position, n)
    tokens = tf.data.Dataset.counter(first_epoch).flat_map(epoch_dataset)
    tokens = tokens.skip(offset)
    return tf.data.Dataset.zip(tf.data.Dataset.counter(start_position),
                               tokens)

  def eval_tokens(self) -> tf.data.Dataset:
    """(position, example) over every example once, in stored order."""
    return self.base().enumerate()

  def loader(self) -> Callable[[dict[str, tf.Tensor]], dict[str, tf.Tensor]]:
    """A TF function: encoded TFDS example -> raw example (transforms)."""
    tf = transforms.import_tf()
    label_to_class = tf.constant(self.label_to_class)  # [num_labels]
    is_thing = tf.constant(np.asarray(self.categories.isthing))  # [C]
    prefix = f"tfds {self.name}:{self.split}/"
    max_segments = self.max_segments

    def load(ex):
      objects = ex["panoptic_objects"]
      seg_class = tf.gather(label_to_class, objects["label"])  # [n]
      n = tf.size(seg_class)
      image_id = tf.cast(ex["image/id"], tf.int32)
      warn = tf.cond(
          n > max_segments,
          lambda: tf.print("ciae_jax input: image id", image_id, "has", n,
                           "segments > max_segments; the smallest dropped"),
          tf.no_op)
      with tf.control_dependencies([warn]):
        seg_ids = tf.cast(objects["id"], tf.int32)  # [n]
      return {
          "image": transforms.decode_rgb(ex["image"]),  # [h, w, 3]
          "pan": tf.io.decode_png(ex["panoptic_image"], channels=3),
          "seg_ids": seg_ids,
          "seg_class": seg_class,
          "seg_is_thing": tf.gather(is_thing, seg_class),  # [n]
          "seg_is_crowd": tf.cast(objects["is_crowd"], tf.bool),  # [n]
          "seg_area": tf.cast(objects["area"], tf.float32),  # [n]
          "image_id": image_id,
          "expect_size": tf.constant([-1, -1], tf.int32),
          "where": tf.strings.join([prefix, ex["image/filename"]]),
      }

    return load
