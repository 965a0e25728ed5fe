"""Input pipeline: COCO panoptic layout, TFDS and synthetic data (the only TF user).

Modules (none imports TensorFlow at import time):
  categories   CategoryInfo, load_categories: contiguous class indices (no TF).
  coco         COCO panoptic layout: image records, NumPy decoder, ground truth (no TF).
  synthetic    generate_synthetic_dataset: a learnable dataset in that layout (no TF).
  transforms   TF ops shared by the sources: id -> row, resize, flip, boxes.
  pipeline     build_input, default_dataset_config, eval_ground_truth (tf.data).
  tfds_source  the 'tfds' source (coco/2017_panoptic).
"""
