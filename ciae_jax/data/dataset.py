"""Dataset-level helpers (no TF): the config's checks, the root, categories, ground truth.

The training loop and evaluation call these apart from the input pipeline: the categories
size the model, the ground-truth files feed PQ.
"""
from __future__ import annotations

import os
from typing import Sequence

from absl import logging

from ciae_jax import hparams
from ciae_jax.data import categories as categories_lib
from ciae_jax.data import coco


def check_config(cfg: hparams.DatasetHParams) -> None:
  """ValueError for dataset fields that cannot go together (before any file is read)."""
  if cfg.skip_bad_examples and cfg.source == "tfds":
    raise ValueError("dataset.skip_bad_examples=True needs source 'coco' or "
                     "'synthetic' (TFDS examples were checked when the "
                     "dataset was prepared)")
  if cfg.num_tuning_images and cfg.source == "tfds":
    raise ValueError("dataset.num_tuning_images > 0 needs source 'coco' or 'synthetic' (the "
                     "held-out images are chosen by image id from the split's JSON)")
  if cfg.source in ("coco", "synthetic") and not cfg.root:
    raise ValueError(f"dataset.root is required for source {cfg.source!r}: "
                     "pass --config.dataset.root=PATH")


def split_tuning_records(records: Sequence[coco.ImageRecord], num_tuning_images: int, *,
                         where: str = "") -> tuple[list[coco.ImageRecord],
                                                   list[coco.ImageRecord]]:
  """(training records, held-out tuning records) of the train split's records.

  The held-out images are the last `num_tuning_images` by image id: a pure function of the
  split's JSON, so the training input (`sources.CocoSource`), every host and a resumed run
  leave out the same images, and `tune_inference` reads exactly those. Called on the records
  as `coco.load_records` returns them (before any decoding check), so the held-out set does not
  depend on which images decode.

  Raises:
    ValueError: naming `dataset.num_tuning_images` when it leaves no training image.
  """
  records = sorted(records, key=lambda r: r.image_id)
  if num_tuning_images <= 0:
    return records, []
  if num_tuning_images >= len(records):
    raise ValueError(f"dataset.num_tuning_images={num_tuning_images} must be smaller than the "
                     f"{len(records)} images of the train split{f' ({where})' if where else ''}"
                     ": at least one image must be left for training")
  cut = len(records) - num_tuning_images
  return records[:cut], records[cut:]


def prepare_root(cfg: hparams.DatasetHParams) -> str:
  """The dataset root; for 'synthetic', generated there first if missing.

  A 'synthetic' root that already holds another COCO-layout dataset (an `annotations/` folder
  and no synthetic manifest) is read as it is: `--config.dataset.root=PATH` alone trains the
  synthetic config on any COCO-layout data, and nothing is ever generated into it.
  """
  if not cfg.root:  # Evaluation comes here without the pipeline's check_config.
    raise ValueError(f"dataset.root is required for source {cfg.source!r}: "
                     "pass --config.dataset.root=PATH")
  if cfg.source == "synthetic":
    from ciae_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if synthetic.holds_other_dataset(cfg.root):
      logging.info("dataset.root %s holds a COCO-layout dataset: reading it as it is "
                   "(nothing generated)", cfg.root)
      return os.fspath(cfg.root)
    s = cfg.synthetic
    synthetic.generate_synthetic_dataset(
        cfg.root, num_train=s.num_train, num_val=s.num_val,
        image_size=tuple(s.image_size), seed=s.seed)
  return os.fspath(cfg.root)


def load_dataset_categories(
    cfg: hparams.DatasetHParams) -> categories_lib.CategoryInfo:
  """The categories of the configured dataset (one set for all splits).

  Raises:
    ValueError: the file declares no thing category (CIAE's detector needs at least one).
  """
  path = _categories_path(cfg)
  categories = categories_lib.load_categories(path)
  if categories.num_things == 0:
    raise ValueError(f"{path}: no thing category (isthing=1) among its "
                     f"{categories.num_stuff} categories; CIAE detects instances and needs "
                     "at least one thing class")
  return categories


def _categories_path(cfg: hparams.DatasetHParams) -> str:
  """The file the dataset's categories are read from."""
  if cfg.categories_file:
    return cfg.categories_file
  if cfg.source == "tfds":
    from ciae_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.COCO_CATEGORIES_FILE
  root = prepare_root(cfg)
  for split in (cfg.train_split, cfg.val_split):
    json_path = coco.split_paths(root, split)[1]
    if os.path.isfile(json_path):
      return json_path
  raise FileNotFoundError(f"no annotation file for {cfg.train_split!r} or "
                          f"{cfg.val_split!r} under {root}")


def eval_ground_truth(cfg: hparams.DatasetHParams,
                      split: str | None = None) -> coco.PanopticGroundTruth:
  """Ground-truth files (JSON, PNG folder) and categories for evaluation."""
  split = split or cfg.val_split
  if cfg.source == "tfds" and not cfg.root:
    raise ValueError("evaluation of the tfds source needs dataset.root: the "
                     "COCO panoptic annotations (annotations/panoptic_"
                     f"{split}.json and its PNG folder)")
  root = prepare_root(cfg)
  gt = coco.ground_truth(root, split, cfg.categories_file)
  return coco.PanopticGroundTruth(gt.gt_json, gt.gt_folder, gt.image_folder,
                                  load_dataset_categories(cfg))
