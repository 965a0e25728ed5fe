"""Input pipeline: COCO panoptic layout, TFDS and synthetic data (the only TF user).

Modules (none imports TensorFlow at import time):
  categories   CategoryInfo, load_categories: contiguous class indices (no TF).
  coco         COCO panoptic layout: image records, NumPy decoder, ground truth (no TF).
  synthetic    generate_synthetic_dataset: a learnable dataset in that layout (no TF).
  canvas       the resize rule and the canvases images are padded to (no TF).
  schedule     the plan of every batch: canvas bucket, records, sizes, flips (NumPy, no TF).
  dataset      check_config, prepare_root, load_dataset_categories, eval_ground_truth (no TF).
  sources      CocoSource (records, checks, skipped images), make_source.
  transforms   TF ops shared by the sources: id -> row, resize, flip, boxes.
  pipeline     build_input: the tf.data assembly, the iterator, errors naming the file.
  tfds_source  the 'tfds' source (coco/2017_panoptic).
"""
