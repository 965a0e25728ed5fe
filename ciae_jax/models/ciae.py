"""The CIAE network: ResNet + FPN P2..P7 + FCOS proposal head + embedding branch.

Outputs follow docs/interfaces.md ("Model outputs"). Variables: "params" (trainable)
and, with norm="frozen_bn", "frozen" (frozen-BN statistics and affine, and the
kernels of the frozen backbone stages); apply the model with both collections and
differentiate / decay "params" only.
"""
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ciae_jax.models import embedding as embedding_lib
from ciae_jax.models import fpn as fpn_lib
from ciae_jax.models import head as head_lib
from ciae_jax.models import layers
from ciae_jax.models import resnet

# Input sides must be multiples of the coarsest backbone stride (C5).
SIZE_DIVISOR = 32


def flatten_levels(levels: Sequence[jax.Array]) -> jax.Array:
  """L maps [B, Hl, Wl, ...] -> [B, N, ...], N = sum Hl * Wl, level order then row-major."""
  if not levels:
    raise ValueError("flatten_levels needs at least one level")
  flat = [x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:]) for x in levels]
  return jnp.concatenate(flat, axis=1)  # [B, N, ...]


class CIAE(nn.Module):
  """CIAE panoptic network (Gao et al., Fig. 3).

  `__call__(images [B, H, W, 3], train)` -> dict with cls_logits, centerness, box_reg,
  box_embed (lists over P3..P7), embedding_prenorm and embedding ([B, H, W, D],
  float32); see docs/interfaces.md. With use_box_embedding=False there is no box
  embedding and the dict has no "box_embed" key. H and W must be multiples of 32.
  `train` changes nothing today (frozen BN, no dropout); it is kept for the contract.

  Attributes:
    num_thing_classes: C_th, the detector's classes.
    backbone: "resnet18" | "resnet34" | "resnet50" | "resnet101" | "resnet_tiny".
    norm: backbone norm, "frozen_bn" (ImageNet init) or "gn" (from scratch).
    fpn_dim: FPN channels, also the head tower width.
    head_convs: conv layers per head tower.
    semantic_dim: embedding-branch aggregation width.
    embed_dim: D.
    box_embed_dim: E, channels of the box embedding (None: = embed_dim).
    use_box_embedding: fuse P'' into the embedding (paper Table VI).
    use_coordconv: CoordConv on the P5 path of the embedding branch.
    prior_prob: class prior of the logits' bias init.
    dtype: compute dtype ("float32" or "bfloat16"); params float32, outputs float32.
    freeze_at: frozen backbone stages (None: 2 with frozen_bn as in FCOS, 0 with gn).
  """
  num_thing_classes: int
  backbone: str = "resnet50"
  norm: str = "frozen_bn"
  fpn_dim: int = 256
  head_convs: int = 4
  semantic_dim: int = 128
  embed_dim: int = 32
  box_embed_dim: int | None = None
  use_box_embedding: bool = True
  use_coordconv: bool = True
  prior_prob: float = 0.01
  dtype: str | Any = "float32"
  freeze_at: int | None = None

  def _check(self, images: jax.Array) -> None:
    if self.num_thing_classes < 1:
      raise ValueError(f"num_thing_classes must be >= 1, got {self.num_thing_classes}")
    for field in ("fpn_dim", "semantic_dim", "embed_dim"):
      if getattr(self, field) < 1:
        raise ValueError(f"model.{field} must be >= 1, got {getattr(self, field)}")
    if self.head_convs < 0:
      raise ValueError(f"model.head_convs must be >= 0, got {self.head_convs}")
    if self.box_embed_dim is not None and self.box_embed_dim < 1:
      raise ValueError(f"model.box_embed_dim must be None or >= 1, got {self.box_embed_dim}")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
      raise ValueError(f"image height and width must be multiples of {SIZE_DIVISOR} "
                       f"(pad the batch), got {height} x {width}")

  @property
  def resolved_freeze_at(self) -> int:
    """freeze_at with its default filled in."""
    if self.freeze_at is not None:
      return self.freeze_at
    return 2 if self.norm == "frozen_bn" else 0

  @nn.compact
  def __call__(self, images: jax.Array, train: bool = False) -> dict[str, Any]:
    """images [B, H, W, 3] (normalised RGB) -> the output dict of docs/interfaces.md."""
    del train  # Nothing behaves differently in training (frozen BN, no dropout).
    self._check(images)
    dtype = layers.canonical_dtype(self.dtype)
    features = resnet.ResNet(self.backbone, self.norm, self.resolved_freeze_at, dtype,
                             name="backbone")(images.astype(dtype))  # c2..c5
    pyramid = fpn_lib.FPN(self.fpn_dim, dtype, name="fpn")(features)  # p2..p7
    box_embed_dim = self.box_embed_dim or self.embed_dim
    head_outputs = head_lib.ProposalHead(
        num_classes=self.num_thing_classes, head_dim=self.fpn_dim, head_convs=self.head_convs,
        box_embed_dim=box_embed_dim if self.use_box_embedding else 0,
        prior_prob=self.prior_prob, dtype=dtype, name="head",
    )([pyramid[name] for name in head_lib.LEVEL_NAMES])
    prenorm, embedding = embedding_lib.EmbeddingBranch(
        semantic_dim=self.semantic_dim, embed_dim=self.embed_dim,
        use_box_embedding=self.use_box_embedding, use_coordconv=self.use_coordconv,
        dtype=dtype, name="embedding",
    )(pyramid, head_outputs.get("box_embed"), images.shape[1:3])
    return dict(head_outputs, embedding_prenorm=prenorm, embedding=embedding)


# Fields of config.model that build_model reads (all CIAE fields but num_thing_classes).
MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(CIAE)
                     if f.name not in ("num_thing_classes", "parent", "name"))


def build_model(model_cfg: Any, num_thing_classes: int, *,
                ignore_fields: Sequence[str] = ()) -> CIAE:
  """CIAE from `config.model` (an ml_collections ConfigDict or a mapping).

  Fields missing from the config keep CIAE's defaults (the paper's). A field that
  CIAE does not know raises ValueError (typos must not pass silently) unless it is
  named in `ignore_fields` (e.g. a checkpoint path the train loop reads).
  """
  values = dict(model_cfg.items()) if hasattr(model_cfg, "items") else dict(model_cfg)
  unknown = sorted(set(values) - set(MODEL_FIELDS) - set(ignore_fields))
  if unknown:
    raise ValueError(f"config.model has unknown fields {unknown}; known: {list(MODEL_FIELDS)}")
  kwargs = {name: values[name] for name in MODEL_FIELDS if name in values}
  if "backbone" in kwargs:
    resnet.resnet_spec(kwargs["backbone"])
  if "norm" in kwargs and kwargs["norm"] not in resnet.NORMS:
    raise ValueError(f"config.model.norm {kwargs['norm']!r} not in {resnet.NORMS}")
  if "dtype" in kwargs:
    layers.canonical_dtype(kwargs["dtype"])
  return CIAE(num_thing_classes=num_thing_classes, **kwargs)


def count_params(variables: Any) -> dict[str, int]:
  """Element counts: {"trainable": params, "total": every collection}; arrays or ShapeDtypeStructs."""
  def size(tree: Any) -> int:
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))
  return {"trainable": size(variables.get("params", {})), "total": size(variables)}
