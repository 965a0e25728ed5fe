r"""CIAE overfitting the two real COCO val2017 images of the COCO sample (133 categories).

The sample is a COCO panoptic root holding `val2017/` (two images) and
`annotations/panoptic_val2017{.json,/}`. Its path is `--config.dataset.root`, by default the
environment variable CIAE_COCO_SAMPLE (the one the tests read); with neither, training and
evaluation stop with "dataset.root is required".

Launch (from the repository root):
  export CIAE_COCO_SAMPLE=/path/to/coco_panoptic_sample   # or --config.dataset.root=PATH
  python train.py --config configs/coco_sample_overfit.py --workdir runs/coco_overfit
  python evaluate.py --config configs/coco_sample_overfit.py --workdir runs/coco_overfit

The whole method on real COCO annotations: all 133 categories of the sample's JSON, the images
at about 0.8x (shorter side 384, canvas 384 x 640), a narrow ResNet with GroupNorm from scratch,
440 steps at batch 2 (both images every step), no flip; evaluation on the same two images.
"""
import os

import ml_collections

from ciae_jax import config_lib

SAMPLE_ENV = "CIAE_COCO_SAMPLE"  # The default of dataset.root (module docstring).


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The overfit config: train and evaluate on the same two COCO images."""
  config_lib.parse_variants(arg, ())
  config = config_lib.base_config()
  # Both images every step, 0.6 steps/s on the 2-core CPU: 440 steps take about 12 min.
  # Measured: at the rate of 0.01 throughout, PQ 78.9 at step 200, 81.1 at 300, 82.5 at 400;
  # decaying at 320 / 380 of 400 steps gave 80.7, so the decay comes late (README, Results).
  config.total_steps = 440
  config.batch_size = 2
  config.grad_accum_steps = 1  # Micro-batches per device and update.
  config.log_every_steps = 20
  config.checkpoint_every_steps = 220
  config.keep_checkpoints = 1
  config.eval_every_steps = config.total_steps

  dataset = config.dataset
  dataset.root = os.environ.get(SAMPLE_ENV, "")
  dataset.train_split = "val2017"
  # source "coco" and val_split "val2017": hparams.DatasetHParams' defaults.
  dataset.canvas_sizes = ((384, 640),)  # Both sample images are landscape.
  dataset.train_min_size_range = (384, 384)
  dataset.max_size = 640
  dataset.eval_min_size = 384
  dataset.eval_max_size = 640
  dataset.max_segments = 40
  dataset.flip = False

  model = config.model
  model.backbone = "resnet_tiny"
  model.norm = "gn"
  model.fpn_dim = 64
  model.head_convs = 2
  model.semantic_dim = 64

  optimizer = config.optimizer
  optimizer.lr = 0.01
  optimizer.warmup_steps = 100
  optimizer.warmup_factor = 0.1
  optimizer.decay_steps = (400, 430)
  optimizer.grad_clip_norm = 10.0

  inference = config.inference
  inference.pre_nms_top_n = 200
  inference.max_detections = 50
  inference.instance_min_area = 16.0
  return config
