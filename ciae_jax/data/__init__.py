"""Input pipeline: COCO panoptic layout, TFDS and synthetic data (the only TF user)."""
