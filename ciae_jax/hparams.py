"""Typed hyper-parameters: one frozen dataclass per group, the paper's defaults written once.

`HParams.from_config(config)` turns an ml_collections config (`configs/*.py`, overridable with
`--config.a.b=value`) into these objects once, at the entry point; every function below takes
the group it needs (`ciae_loss(..., hp.loss)`, `panoptic_inference(..., hp.inference)`).
`config_lib.base_config()` is built from the defaults here (through `hparams_mapping`), so a
default exists in one place.

Groups and where they go:
  model      -> `models.ciae.CIAE` (ResNet-FPN, proposal head, embedding branch);
  fcos       -> FCOS targets (`targets`) and losses (`losses.fcos`);
  loss       -> the CIAE loss (`losses.ciae`); `merge_things` also sets the memory layout;
  memory     -> the memory momentum (`memory.update_memory`, Eq. 13);
  optimizer  -> `training.optim` (SGD, schedule, decay, clipping, frozen parameters);
  inference  -> `inference` (decoding, NMS, panoptic assignment) and evaluation;
  dataset    -> `data` (sources, sizes, augmentation); imports no TensorFlow.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from ciae_jax.hparams_mapping import FrozenParams
from ciae_jax.hparams_mapping import HParamsError
from ciae_jax.hparams_mapping import as_tuple
from ciae_jax.hparams_mapping import from_mapping

# FPN levels P3..P7 of the proposal head: fixed by the architecture (not a config field).
LEVEL_STRIDES = (8, 16, 32, 64, 128)

_BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet_tiny")
_NORMS = ("frozen_bn", "gn")
_DTYPES = ("float32", "bfloat16", "float16", "auto")
# model.conv_kernel_grad (ciae_jax.fast_paths.conv).
KERNEL_GRADS = ("auto", "matmul", "xla")
_POSITIVE_REGIONS = ("mask", "box")
_IOU_KINDS = ("iou", "linear_iou", "giou")
_CATEGORY_SOURCES = ("box", "memory")
_STUFF_SOURCES = ("embedding", "semantic")
_SOURCES = ("coco", "tfds", "synthetic")
PARALLEL_MODES = ("pmap", "shard_map")


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise HParamsError(f"config.{field}: {message}")


class _Group:
  """Methods shared by the groups (frozen dataclasses)."""

  def replace(self, **changes: Any) -> Any:
    """A copy with some fields changed (validated again)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_mapping(cls, mapping: Mapping[str, Any], where: str = "") -> Any:
    """An instance from a (nested) mapping, e.g. a ConfigDict group; HParamsError names an
    unknown field or a bad value. `where` is the group's dotted name in messages."""
    return from_mapping(cls, mapping, f"{where}." if where else "")


@dataclasses.dataclass(frozen=True)
class ModelHParams(_Group):
  """The CIAE network, paper IV-A: ResNet-50 (frozen BN, ImageNet init), FPN 256, D = 32."""
  backbone: str = "resnet50"  # resnet18 | resnet34 | resnet50 | resnet101 | resnet_tiny (tests).
  norm: str = "frozen_bn"  # "gn": GroupNorm backbone trained from scratch.
  freeze_at: int | None = None  # Frozen stages; None: 2 with frozen_bn (FCOS), 0 with gn.
  fpn_dim: int = 256  # FPN channels, also the head tower width.
  head_convs: int = 4  # conv3x3 + GN + ReLU layers per head tower.
  semantic_dim: int = 128  # Embedding-branch aggregation width.
  embed_dim: int = 32  # D, Table X.
  box_embed_dim: int | None = None  # E, channels of the box embedding; None: = embed_dim.
  use_box_embedding: bool = True  # Fuse P'' into the embedding, Table VI.
  use_coordconv: bool = True  # CoordConv on the P5 path of the embedding branch, Table VI.
  prior_prob: float = 0.01  # Class prior of the logits' bias init (RetinaNet / FCOS).
  # Compute dtype; params and outputs stay float32. "auto" (only when asked for): bfloat16 on
  # GPU / TPU, float32 on CPU, for the platforms the model is built for (`build_model`).
  dtype: str = "float32"
  # Convolution kernel gradients: "matmul" (one matmul per kernel tap, 1.6-2x faster R50 steps
  # on XLA:CPU), "xla" (XLA's own), "auto": matmul on CPU for 1x1 and wide (I*O >= 2^15)
  # kernels, XLA's elsewhere (fast_paths/conv.py). With "auto" / "matmul" on CPU, input maps smaller
  # than the kernel are convolved as one matmul over their patches.
  conv_kernel_grad: str = "auto"
  # Who segments the stuff classes: "embedding" (paper: CIAE models stuff and things alike) or
  # "semantic" (Table III, first row: an FCN branch predicts H/4 x W/4 x (N_st + 1) logits, all
  # things one class, with cross-entropy; CIAE then covers thing pixels only).
  stuff_from: str = "embedding"

  def __post_init__(self):
    _require(self.backbone in _BACKBONES, "model.backbone",
             f"{self.backbone!r} not in {_BACKBONES}")
    _require(self.norm in _NORMS, "model.norm", f"{self.norm!r} not in {_NORMS}")
    _require(self.dtype in _DTYPES, "model.dtype", f"{self.dtype!r} not in {_DTYPES}")
    _require(self.conv_kernel_grad in KERNEL_GRADS, "model.conv_kernel_grad",
             f"{self.conv_kernel_grad!r} not in {KERNEL_GRADS}")
    _require(self.stuff_from in _STUFF_SOURCES, "model.stuff_from",
             f"{self.stuff_from!r} not in {_STUFF_SOURCES}")
    for name in ("fpn_dim", "semantic_dim", "embed_dim"):
      _require(getattr(self, name) >= 1, f"model.{name}",
               f"must be >= 1, got {getattr(self, name)}")
    _require(self.head_convs >= 0, "model.head_convs", f"must be >= 0, got {self.head_convs}")
    _require(self.box_embed_dim is None or self.box_embed_dim >= 1, "model.box_embed_dim",
             f"must be None or >= 1, got {self.box_embed_dim}")
    _require(0.0 < self.prior_prob < 1.0, "model.prior_prob",
             f"must be in (0, 1), got {self.prior_prob}")
    _require(self.freeze_at is None or 0 <= self.freeze_at <= 5, "model.freeze_at",
             f"must be None or in 0..5, got {self.freeze_at}")
    _require(not (self.norm == "gn" and (self.freeze_at or 0) > 0), "model.freeze_at",
             "> 0 needs norm='frozen_bn' (a GN backbone trains from scratch)")

  @property
  def resolved_freeze_at(self) -> int:
    """`freeze_at` with its default filled in."""
    if self.freeze_at is not None:
      return self.freeze_at
    return 2 if self.norm == "frozen_bn" else 0


@dataclasses.dataclass(frozen=True)
class FcosHParams(_Group):
  """FCOS targets and losses (paper IV-A.3: positives inside the instance mask)."""
  sizes: tuple[float, ...] = (64, 128, 256, 512)  # Level ranges of max(l, t, r, b).
  positive_region: str = "mask"  # "box": original FCOS.
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0
  iou_kind: str = "iou"  # -ln IoU; "linear_iou" 1 - IoU; "giou".
  centerness_weighted_reg: bool = True  # IoU loss weighted by the centerness target (FCOS).

  def __post_init__(self):
    _require(all(a < b for a, b in zip(self.sizes[:-1], self.sizes[1:])), "fcos.sizes",
             f"must increase, got {tuple(self.sizes)}")
    _require(self.positive_region in _POSITIVE_REGIONS, "fcos.positive_region",
             f"{self.positive_region!r} not in {_POSITIVE_REGIONS}")
    _require(self.iou_kind in _IOU_KINDS, "fcos.iou_kind", f"{self.iou_kind!r} not in {_IOU_KINDS}")


@dataclasses.dataclass(frozen=True)
class LossHParams(_Group):
  """The CIAE loss (paper III-B, Eq. 2-12); each field is one of the paper's ablations.

  The per-pixel loss is `kind` with `params` (`ciae_jax.losses.pixel_losses`): the paper's
  `ciae` has `margin` (Table IX, 0.15), `top_k` (Eq. 9, 5), `include_own` (Eq. 6's own-query
  term, True: measured as good or better than leaving it out, docs/results.md "Eq. 6") and `eps`.
  """
  # A name of `losses.pixel_losses.REGISTRY`, or "module:function" on the Python path.
  kind: str = "ciae"
  # The variant's keyword parameters; those not given keep the function's defaults.
  params: Mapping[str, Any] = FrozenParams()
  alpha: float = 2.0  # Eq. 12: weight of L_IAE.
  cae_weight: float = 1.0  # Weight of L_CAE in L_CIAE (Table IV's last rows: 0).
  thing_weight: float = 5.0  # Weight of thing pixels in L_IAE.
  box_expand: float = 1.5  # Table VIII: instance box filter, boxes scaled about their centres.
  use_box_filter: bool = True  # Table VIII, first row: False.
  merge_things: bool = True  # Table IV: all thing classes share one memory row.
  loss_stride: int = 1  # 1: full-resolution P as in the paper; s: pixels [::s, ::s] only.
  stop_query_gradient: bool = False  # No gradient through the instance means (paper silent).
  # Pixels per chunk of the loss engine (`losses.engine`); None: the platform's (`losses.ciae`
  # CPU_CHUNK_SIZE on CPU, else ACCELERATOR_CHUNK_SIZE). Results depend on it only through
  # float32 rounding.
  chunk_size: int | None = None
  # Table III: weight of the semantic branch's cross-entropy (model.stuff_from='semantic').
  semantic_weight: float = 1.0

  def __post_init__(self):
    params = {str(k): as_tuple(v) for k, v in dict(self.params or {}).items() if v is not None}
    object.__setattr__(self, "params", FrozenParams(params))
    _require(self.loss_stride >= 1, "loss.loss_stride", f"must be >= 1, got {self.loss_stride}")
    _require(self.box_expand > 0, "loss.box_expand", f"must be > 0, got {self.box_expand}")
    _require(min(self.alpha, self.cae_weight, self.semantic_weight) >= 0, "loss.alpha",
             "loss.alpha, loss.cae_weight and loss.semantic_weight must be >= 0, got "
             f"{self.alpha}, {self.cae_weight}, {self.semantic_weight}")
    _require(self.chunk_size is None or self.chunk_size >= 1, "loss.chunk_size",
             f"must be None or >= 1, got {self.chunk_size}")
    from ciae_jax.losses import registry  # pylint: disable=g-import-not-at-top
    try:
      registry.bind(self.kind, self.params)
    except registry.LossSelectionError as e:
      raise HParamsError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class MemoryHParams(_Group):
  """Memory momentum, Eq. 13: `lam_t = 1 - momentum_coeff * (1 - t/T)^momentum_power`."""
  momentum_coeff: float = 1e-4  # Table VII.
  momentum_power: float = 3.0

  def __post_init__(self):
    _require(0.0 <= self.momentum_coeff <= 1.0, "memory.momentum_coeff",
             f"must be in [0, 1], got {self.momentum_coeff}")


@dataclasses.dataclass(frozen=True)
class OptimizerHParams(_Group):
  """SGD of paper V-C (the RetinaNet recipe); `lr` None means `base_lr * batch_size / 16`.

  Parameter groups as FCOS's reference code (`fcos_core/solver/build.py` with
  maskrcnn-benchmark's defaults): biases at 2x the rate without decay, everything else decayed.
  """
  base_lr: float = 0.01  # For a global batch of 16, scaled linearly.
  lr: float | None = None  # A direct learning rate overrides base_lr.
  momentum: float = 0.9
  weight_decay: float = 1e-4  # Kernels and the per-level FCOS scales.
  weight_decay_norm: float = 1e-4  # GroupNorm scales (FCOS decays them; detectron2: 0).
  weight_decay_bias: float = 0.0  # Conv and GroupNorm biases (FCOS: SOLVER.WEIGHT_DECAY_BIAS).
  bias_lr_factor: float = 2.0  # Biases train at this x the rate (FCOS: SOLVER.BIAS_LR_FACTOR).
  warmup_steps: int = 1000  # Linear warm-up from lr * warmup_factor (Detectron).
  warmup_factor: float = 0.001
  decay_steps: tuple[int, ...] = (60_000, 80_000)  # x decay_factor at each.
  decay_factor: float = 0.1
  grad_clip_norm: float | None = None  # None: no clipping.
  # Regexes over '/'-joined param paths that get no update; the frozen backbone stages already
  # live outside 'params' (model.freeze_at).
  frozen_patterns: tuple[str, ...] = ()

  def __post_init__(self):
    _require(self.warmup_steps >= 0, "optimizer.warmup_steps",
             f"must be >= 0, got {self.warmup_steps}")


@dataclasses.dataclass(frozen=True)
class InferenceHParams(_Group):
  """Panoptic inference (paper IV-C), used by evaluation and prediction."""
  pre_nms_thresh: float = 0.05  # Threshold on sigmoid(cls) for a candidate.
  pre_nms_top_n: int = 1000  # Candidates kept per level.
  nms_thresh: float = 0.6  # Class-wise NMS IoU.
  max_detections: int = 100  # Detections after NMS (instance query slots).
  stuff_area: float = 4096.0  # Stuff segments smaller than this (original pixels) become void.
  instance_min_area: float = 64.0  # Instances with fewer pixels become void.
  # Detections scored below this take no pixels. The paper is silent; with every NMS survivor
  # competing in the argmax (0.0), low-score duplicates split instances (docs/tuning.md).
  instance_score_thresh: float = 0.3
  category_from: str = "box"  # "memory": Table IV 'E' (needs loss.merge_things=False).
  box_expand_infer: float = 1.0  # Scale of the predicted boxes for the box filter.
  outside_box_similarity: float = 0.0  # Paper: 0 outside the box; -inf makes it a hard limit.
  oracle: bool = False  # Table V: ground-truth boxes and mean embeddings as queries.
  # Images per device and call in evaluation and prediction (the global batch is this times
  # the devices of all processes; the last one of each canvas is padded).
  per_device_batch: int = 2

  def __post_init__(self):
    _require(self.category_from in _CATEGORY_SOURCES, "inference.category_from",
             f"{self.category_from!r} not in {_CATEGORY_SOURCES}")
    _require(self.max_detections >= 1, "inference.max_detections",
             f"must be >= 1, got {self.max_detections}")
    _require(self.pre_nms_top_n >= 1, "inference.pre_nms_top_n",
             f"must be >= 1, got {self.pre_nms_top_n}")
    _require(self.per_device_batch >= 1, "inference.per_device_batch",
             f"must be >= 1, got {self.per_device_batch}")


@dataclasses.dataclass(frozen=True)
class SyntheticHParams(_Group):
  """The generated dataset of `dataset.source = "synthetic"`."""
  num_train: int = 512
  num_val: int = 64
  image_size: tuple[int, int] = (128, 128)  # (h, w)
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class DatasetHParams(_Group):
  """The input: source, sizes, augmentation (paper V-C: shorter side 800, longer side <= 1333).

  The fields are documented in `ciae_jax.data.pipeline`.
  """
  source: str = "coco"  # coco | tfds | synthetic.
  root: str = ""  # COCO-layout root (coco, synthetic; for tfds the evaluation ground truth).
  train_split: str = "train2017"
  val_split: str = "val2017"
  tfds_name: str = "coco/2017_panoptic"
  tfds_data_dir: str | None = None
  categories_file: str | None = None  # None: the split's JSON (bundled COCO list for tfds).
  # Canvases (H, W), multiples of 32, that images are padded to (`data.canvas`); empty: one
  # per orientation derived from the sizes below (800 x 1344 and 1344 x 800 for COCO).
  canvas_sizes: tuple[tuple[int, int], ...] = ()
  train_min_size_range: tuple[int, int] = (800, 800)  # Training shorter side, uniform integer.
  max_size: int = 1333  # Training cap of the longer side.
  eval_min_size: int = 800
  eval_max_size: int = 1333
  max_segments: int = 100  # S, segment rows per image.
  flip: bool = True
  skip_bad_examples: bool = False
  # The last N images of the train split (by image id) are held out of training for
  # `python -m ciae_jax.tune_inference` (inference thresholds chosen on images the model never
  # trained on, and not on val); 0: train on the whole split. Sources coco and synthetic only.
  num_tuning_images: int = 0
  shuffle_buffer: int = 1000  # TFDS source only.
  num_parallel_calls: int = -1  # -1: AUTOTUNE.
  prefetch: int = 2
  synthetic: SyntheticHParams = SyntheticHParams()

  def __post_init__(self):
    _require(self.source in _SOURCES, "dataset.source", f"must be one of {_SOURCES}, got "
             f"{self.source!r}")
    lo, hi = self.train_min_size_range
    _require(0 < lo <= hi, "dataset.train_min_size_range",
             f"must be (lo, hi) with 0 < lo <= hi, got {tuple(self.train_min_size_range)}")
    _require(self.max_segments >= 1, "dataset.max_segments",
             f"must be >= 1, got {self.max_segments}")
    _require(self.num_tuning_images >= 0, "dataset.num_tuning_images",
             f"must be >= 0, got {self.num_tuning_images}")
    _require(all(len(c) == 2 and c[0] > 0 and c[1] > 0 and not c[0] % 32 and not c[1] % 32
                 for c in self.canvas_sizes), "dataset.canvas_sizes",
             f"each canvas must be (H, W) with positive multiples of 32, got {self.canvas_sizes}")


@dataclasses.dataclass(frozen=True)
class HParams(_Group):
  """Everything a run reads: the run-level fields and one object per group."""
  seed: int = 0
  parallel: str = "pmap"  # or "shard_map": the same step under jax.shard_map + jax.jit.
  total_steps: int = 90_000
  batch_size: int = 16  # Global, over all devices and hosts: the images of one update.
  # Micro-batches per device and update, their gradients summed (`training.accumulate`).
  grad_accum_steps: int = 1
  log_every_steps: int = 50
  checkpoint_every_steps: int = 5_000
  keep_checkpoints: int = 3
  eval_every_steps: int = 10_000  # <= 0: no evaluation at all (not even at the end).
  init_backbone: str = ""  # Converted ImageNet backbone (python -m ciae_jax.models.convert).
  # A step with a non-finite loss or gradient is skipped (state unchanged, counted); this many
  # in a row stop the run with an error.
  max_consecutive_nonfinite: int = 10
  # Resuming a workdir whose config.json differs in fields that change the model, the
  # optimisation or the data is an error unless this is set.
  allow_resume_with_other_config: bool = False
  # A profiler trace of steps profile_first_step .. + profile_num_steps - 1 into
  # WORKDIR/profile (TensorBoard's profile plugin and Perfetto); 0: no trace.
  profile_first_step: int = 0
  profile_num_steps: int = 5
  dataset: DatasetHParams = DatasetHParams()
  model: ModelHParams = ModelHParams()
  fcos: FcosHParams = FcosHParams()
  loss: LossHParams = LossHParams()
  memory: MemoryHParams = MemoryHParams()
  optimizer: OptimizerHParams = OptimizerHParams()
  inference: InferenceHParams = InferenceHParams()

  def __post_init__(self):
    _require(self.parallel in PARALLEL_MODES, "parallel",
             f"must be one of {PARALLEL_MODES}, got {self.parallel!r}")
    _require(self.total_steps > 0, "total_steps", f"must be > 0, got {self.total_steps}")
    _require(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
    _require(self.grad_accum_steps >= 1 and not self.batch_size % self.grad_accum_steps,
             "grad_accum_steps", f"must be >= 1 and divide batch_size {self.batch_size}, got "
             f"{self.grad_accum_steps}")
    _require(self.log_every_steps > 0, "log_every_steps",
             f"must be > 0, got {self.log_every_steps}")
    _require(self.checkpoint_every_steps > 0, "checkpoint_every_steps",
             f"must be > 0, got {self.checkpoint_every_steps}")
    _require(self.keep_checkpoints > 0, "keep_checkpoints",
             f"must be > 0, got {self.keep_checkpoints}")
    _require(self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite",
             f"must be >= 1, got {self.max_consecutive_nonfinite}")
    _require(self.profile_first_step >= 0 and self.profile_num_steps >= 1, "profile_first_step",
             "profile_first_step must be >= 0 (0: off) and profile_num_steps >= 1, got "
             f"{self.profile_first_step}, {self.profile_num_steps}")
    _require(self.inference.category_from != "memory" or not self.loss.merge_things,
             "inference.category_from", "'memory' needs one memory row per thing class "
             "(loss.merge_things=False)")

  @classmethod
  def from_config(cls, config: Mapping[str, Any]) -> HParams:
    """The typed hyper-parameters of an ml_collections config (or a nested mapping).

    Raises:
      HParamsError: a field that no group knows (a typo must not pass silently), or a value
        out of range; the message names the field.
    """
    return cls.from_mapping(config)
