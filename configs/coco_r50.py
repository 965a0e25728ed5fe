r"""CIAE on COCO panoptic, ResNet-50 FPN, the paper's recipe (V-C): 90k steps at batch 16.

Launch (8 GPUs or a TPU host; the global batch is split over all devices):
  python -m ciae_jax.models.convert resnet50.pth --output resnet50.npz
  python train.py --config configs/coco_r50.py --workdir runs/coco_r50 \
    --config.dataset.root=/path/to/coco --config.init_backbone=resnet50.npz
Variants (`--config configs/coco_r50.py:VARIANTS`, comma-separated):
  r101   ResNet-101 backbone (convert resnet101.pth instead);
  long   the headline schedule: 180k steps, x0.1 at 120k / 160k, shorter side in [640, 800];
  e.g. `--config configs/coco_r50.py:r101,long`.

Image size: each batch is padded to one canvas bucket (`data/canvas.py`): 800 x 1344 for
landscape and 1344 x 800 for portrait images, derived from the sizes (multiples of 32), so the
train step compiles twice and an 800 x 1199 image pads 1.12x (the union 1344 x 1344 would pad
1.88x); `--config.dataset.canvas_sizes` sets other canvases.
"""
import ml_collections

from ciae_jax import config_lib

VARIANTS = ("r101", "long")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper's COCO config, with the variants named in `arg` applied."""
  variants = config_lib.parse_variants(arg, VARIANTS)
  # The defaults of ciae_jax/hparams.py are the paper's recipe (source coco, sizes 800 / 1333).
  # Among them `loss.params.include_own=True` (the paper's per-pixel loss, `loss.kind="ciae"`):
  # Eq. 6 as written (the own query counts with d_neg = 0), kept because dropping it did not win
  # on the main job or the COCO overfit (docs/results.md "Eq. 6", docs/method.md);
  # `--config.loss.params.include_own=False` trains the other reading.
  config = config_lib.base_config()
  # The paper's global batch of 16 per update. On fewer devices than it was trained on
  # (e.g. one GPU), `--config.grad_accum_steps=8` runs it as 8 micro-batches of 2 per update:
  # the same updates at about the memory of a batch of 2 (docs/architecture.md).
  config.batch_size = 16
  config.grad_accum_steps = 1
  if "r101" in variants:
    config.model.backbone = "resnet101"
  if "long" in variants:
    config.total_steps = 180_000
    config.optimizer.decay_steps = (120_000, 160_000)
    config.dataset.train_min_size_range = (640, 800)
  return config
