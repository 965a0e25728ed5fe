"""The training config: every field the loop reads, with the paper's defaults.

`configs/*.py` start from `base_config()` and change what their setting needs; `--config.x=...`
overrides any field from the command line. Fields left `None` are typed placeholders, so that
an override like `--config.optimizer.lr=0.02` is accepted.

Groups and where they go:
  model.*      -> `ciae_jax.models.ciae.build_model` (every field is a CIAE attribute);
  fcos.*       -> FCOS targets and losses (`strides`, `sizes`, `positive_region`, focal / IoU);
  loss.*       -> `ciae_jax.losses.ciae.ciae_loss` (margin, top_k, alpha, thing_weight, ...);
                  `loss.merge_things` also sets the memory layout;
  memory.*     -> `ciae_jax.memory.update_memory` (Eq. 13: coeff 1e-4, power 3);
  optimizer.*  -> `ciae_jax.training.optim` (SGD, schedule, decay, clipping, frozen params);
  inference.*  -> `ciae_jax.inference.panoptic_inference` (used by evaluation);
  dataset      -> `ciae_jax.data.pipeline.default_dataset_config()` (source, root, sizes, ...).
"""
import ml_collections
from ml_collections import config_dict

from ciae_jax.data import pipeline


def model_config() -> ml_collections.ConfigDict:
  """CIAE network, paper IV-A: ResNet-50 (frozen BN, ImageNet init), FPN 256, D = 32."""
  model = ml_collections.ConfigDict()
  model.backbone = "resnet50"
  model.norm = "frozen_bn"
  model.freeze_at = config_dict.placeholder(int)  # None: 2 with frozen_bn (FCOS), 0 with gn.
  model.fpn_dim = 256
  model.head_convs = 4
  model.semantic_dim = 128
  model.embed_dim = 32  # Table X.
  model.box_embed_dim = config_dict.placeholder(int)  # None: = embed_dim.
  model.use_box_embedding = True  # Table VI.
  model.use_coordconv = True  # Table VI.
  model.prior_prob = 0.01
  model.dtype = "float32"
  return model


def fcos_config() -> ml_collections.ConfigDict:
  """FCOS targets and losses (paper IV-A.3: positives inside the instance mask)."""
  fcos = ml_collections.ConfigDict()
  fcos.strides = (8, 16, 32, 64, 128)
  fcos.sizes = (64, 128, 256, 512)
  fcos.positive_region = "mask"  # "box": original FCOS.
  fcos.focal_alpha = 0.25
  fcos.focal_gamma = 2.0
  fcos.iou_kind = "iou"  # -ln IoU.
  fcos.centerness_weighted_reg = True
  return fcos


def loss_config() -> ml_collections.ConfigDict:
  """CIAE loss (paper III-B, design.md "Losses"); each field is one of the paper's ablations."""
  loss = ml_collections.ConfigDict()
  loss.margin = 0.15  # Table IX.
  loss.top_k = 5
  loss.alpha = 2.0
  loss.thing_weight = 5.0
  loss.box_expand = 1.5  # Table VIII.
  loss.use_box_filter = True  # Table VIII, first row: False.
  loss.merge_things = True  # Table IV.
  loss.loss_stride = 1  # 1: full-resolution P as in the paper.
  loss.include_own = False
  loss.stop_query_gradient = False
  return loss


def memory_config() -> ml_collections.ConfigDict:
  """Memory momentum, Eq. 13: `lam_t = 1 - momentum_coeff * (1 - t/T)^momentum_power`."""
  memory = ml_collections.ConfigDict()
  memory.momentum_coeff = 1e-4  # Table VII.
  memory.momentum_power = 3.0
  return memory


def optimizer_config() -> ml_collections.ConfigDict:
  """SGD of paper V-C; `lr` None means `base_lr * batch_size / 16`."""
  optimizer = ml_collections.ConfigDict()
  optimizer.base_lr = 0.01  # For a global batch of 16.
  optimizer.lr = config_dict.placeholder(float)  # A direct learning rate overrides base_lr.
  optimizer.momentum = 0.9
  optimizer.weight_decay = 1e-4  # Kernels only.
  optimizer.warmup_steps = 1000
  optimizer.warmup_factor = 0.001
  optimizer.decay_steps = (60_000, 80_000)
  optimizer.decay_factor = 0.1
  optimizer.grad_clip_norm = config_dict.placeholder(float)  # None: no clipping.
  optimizer.frozen_patterns = ()  # Regexes over '/'-joined param paths; frozen stages of the
  # backbone already live outside 'params' (model.freeze_at).
  return optimizer


def inference_config() -> ml_collections.ConfigDict:
  """Panoptic inference (paper IV-C); read by evaluation."""
  inference = ml_collections.ConfigDict()
  inference.pre_nms_thresh = 0.05
  inference.pre_nms_top_n = 1000
  inference.nms_thresh = 0.6
  inference.max_detections = 100
  inference.stuff_area = 4096.0
  inference.instance_min_area = 64.0
  # Detections scored below this take no pixels. The paper is silent; with every NMS survivor
  # competing in the argmax (0.0), low-score duplicates split instances and Things PQ collapses
  # (synthetic val: Things PQ 7.5 at 0.0, 46.9 at 0.3; see README "Results").
  inference.instance_score_thresh = 0.3
  inference.category_from = "box"  # "memory": Table IV 'E'.
  inference.box_expand_infer = 1.0
  inference.outside_box_similarity = 0.0
  inference.oracle = False  # Table V: ground-truth boxes and mean embeddings as queries.
  inference.batch_size = 0  # Evaluation batch (global); 0: the training batch size.
  return inference


def base_config() -> ml_collections.ConfigDict:
  """Paper defaults for COCO with ResNet-50 (configs/coco_r50.py uses it as is)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.parallel = "pmap"  # or "shard_map": same step under jax.shard_map + jax.jit.
  config.total_steps = 90_000
  config.batch_size = 16  # Global, over all devices and hosts.
  config.log_every_steps = 50
  config.checkpoint_every_steps = 5_000
  config.keep_checkpoints = 3
  config.eval_every_steps = 10_000  # <= 0: no evaluation at all (not even at the end).
  config.init_backbone = ""  # Converted ImageNet backbone (python -m ciae_jax.models.convert).
  # A step with a non-finite loss or gradient is skipped (state unchanged, counted in
  # train/nonfinite_steps); this many in a row stop the run with an error.
  config.max_consecutive_nonfinite = 10
  # Resuming a workdir whose config.json differs in fields that change the model, the
  # optimisation or the data is an error unless this is set.
  config.allow_resume_with_other_config = False
  config.dataset = pipeline.default_dataset_config()
  config.model = model_config()
  config.fcos = fcos_config()
  config.loss = loss_config()
  config.memory = memory_config()
  config.optimizer = optimizer_config()
  config.inference = inference_config()
  return config


def parse_variants(arg: str | None, known: tuple[str, ...]) -> set[str]:
  """`"r101,long"` -> {"r101", "long"}; ValueError naming an unknown variant."""
  variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
  unknown = sorted(variants - set(known))
  if unknown:
    raise ValueError(f"unknown config variant(s) {unknown}; known: {list(known)}")
  return variants
