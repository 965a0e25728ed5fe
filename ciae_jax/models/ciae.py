"""The CIAE network: ResNet + FPN P2..P7 + FCOS proposal head + embedding branch.

Outputs follow docs/interfaces.md ("Model outputs"). Variables: "params" (trainable)
and, with norm="frozen_bn", "frozen" (frozen-BN statistics and affine, and the
kernels of the frozen backbone stages); apply the model with both collections and
differentiate / decay "params" only.
"""
from typing import Any, Sequence

from absl import logging
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax import platforms as platforms_lib
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

  `__call__(images [B, H, W, 3])` -> dict with cls_logits, centerness, box_reg,
  box_embed (lists over P3..P7), embedding_prenorm and embedding ([B, H, W, D],
  float32); see docs/interfaces.md. With `hp.use_box_embedding=False` there is no box
  embedding and the dict has no "box_embed" key. With `hp.stuff_from="semantic"` (Table III,
  first row) it also has `semantic_logits [B, H/4, W/4, N_st + 1]` (float32; channels: the
  stuff classes 0..N_st-1, then one merged "thing" class). H and W must be multiples of 32.
  Training and inference run the same function (frozen BN or GroupNorm, no dropout).

  Attributes:
    hp: the architecture (`hparams.ModelHParams`, defaults: the paper's R50 model).
    num_thing_classes: C_th, the detector's classes.
    num_stuff_classes: N_st, the dataset's stuff classes; read (and required >= 1) only with
      `hp.stuff_from="semantic"`.
  """
  hp: hparams.ModelHParams
  num_thing_classes: int
  num_stuff_classes: int = 0

  @property
  def strides(self) -> tuple[int, ...]:
    """Strides of the proposal head's levels P3..P7."""
    return hparams.LEVEL_STRIDES

  @property
  def semantic_stride(self) -> int:
    """Stride of `semantic_logits` (the embedding branch's 1/4-scale aggregate)."""
    return embedding_lib.AGGREGATE_STRIDE

  def _check(self, images: jax.Array) -> None:
    if self.num_thing_classes < 1:
      raise ValueError(f"num_thing_classes must be >= 1, got {self.num_thing_classes}")
    if self.hp.stuff_from == "semantic" and self.num_stuff_classes < 1:
      raise ValueError("model.stuff_from='semantic' needs the dataset's stuff classes: pass "
                       f"num_stuff_classes >= 1 (got {self.num_stuff_classes})")
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [B, H, W, 3], got shape {images.shape}")
    height, width = images.shape[1:3]
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR:
      raise ValueError(f"image height and width must be multiples of {SIZE_DIVISOR} "
                       f"(pad the batch), got {height} x {width}")

  @nn.compact
  def __call__(self, images: jax.Array) -> dict[str, Any]:
    """images [B, H, W, 3] (normalised RGB) -> the output dict of docs/interfaces.md."""
    self._check(images)
    hp = self.hp
    if hp.dtype == "auto":
      raise ValueError("model.dtype='auto' is resolved for the platforms a model is built for: "
                       "build it with build_model(..., platforms=...)")
    dtype = layers.canonical_dtype(hp.dtype)
    kernel_grad = hp.conv_kernel_grad  # "auto": resolved per convolution (models/conv.py).
    features = resnet.ResNet(hp.backbone, hp.norm, hp.resolved_freeze_at, dtype, kernel_grad,
                             name="backbone")(images.astype(dtype))  # c2..c5
    pyramid = fpn_lib.FPN(hp.fpn_dim, dtype, kernel_grad, name="fpn")(features)  # p2..p7
    box_embed_dim = hp.box_embed_dim or hp.embed_dim
    head_outputs = head_lib.ProposalHead(
        num_classes=self.num_thing_classes, head_dim=hp.fpn_dim, head_convs=hp.head_convs,
        box_embed_dim=box_embed_dim if hp.use_box_embedding else 0,
        prior_prob=hp.prior_prob, strides=self.strides, dtype=dtype, kernel_grad=kernel_grad,
        name="head",
    )([pyramid[name] for name in head_lib.LEVEL_NAMES])
    # Stuff classes plus one merged thing class (Table III, first row); 0: no semantic branch.
    num_semantic = self.num_stuff_classes + 1 if hp.stuff_from == "semantic" else 0
    branch_outputs = embedding_lib.EmbeddingBranch(
        semantic_dim=hp.semantic_dim, embed_dim=hp.embed_dim,
        use_box_embedding=hp.use_box_embedding, use_coordconv=hp.use_coordconv,
        dtype=dtype, kernel_grad=kernel_grad, num_semantic_classes=num_semantic,
        name="embedding",
    )(pyramid, head_outputs.get("box_embed"), images.shape[1:3])
    outputs = dict(head_outputs, embedding_prenorm=branch_outputs[0],
                   embedding=branch_outputs[1])
    if num_semantic:
      outputs["semantic_logits"] = branch_outputs[2]  # [B, H/4, W/4, N_st + 1]
    return outputs


def build_model(hp: hparams.ModelHParams, num_thing_classes: int,
                num_stuff_classes: int = 0, *,
                platforms: Sequence[str] | str | None = None) -> CIAE:
  """The CIAE of `hp` (a `ModelHParams`, or a mapping of its fields for tests and scripts).

  `num_stuff_classes` (the dataset's N_st) is needed only by `hp.stuff_from="semantic"`.
  `platforms`: those the model's programs are built for ("cpu", "cuda", ...; default: those of
  `jax.devices()`), which resolve `model.dtype="auto"` (`ciae_jax.platforms.resolve_dtype`).
  """
  if not isinstance(hp, hparams.ModelHParams):
    hp = hparams.ModelHParams.from_mapping(hp, "model")
  if hp.dtype == "auto":
    resolved = platforms_lib.resolve_dtype(hp.dtype, platforms)
    logging.info("model.dtype='auto' for platforms %s: computing in %s",
                 platforms or platforms_lib.platforms_of(), resolved)
    hp = hp.replace(dtype=resolved)
  if hp.stuff_from == "semantic" and num_stuff_classes < 1:
    raise ValueError("model.stuff_from='semantic' needs the dataset's stuff classes: pass "
                     f"num_stuff_classes >= 1 (got {num_stuff_classes})")
  return CIAE(hp=hp, num_thing_classes=num_thing_classes, num_stuff_classes=num_stuff_classes)


def count_params(variables: Any) -> dict[str, int]:
  """Element counts: {"trainable": params, "total": every collection}; arrays or shape structs."""
  def size(tree: Any) -> int:
    return sum(int(leaf.size) for leaf in jax.tree_util.tree_leaves(tree))
  return {"trainable": size(variables.get("params", {})), "total": size(variables)}


def split_variables(variables: Any) -> tuple[Any, Any]:
  """Splits flax variables into ('params', every other collection as a dict)."""
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  return params, variables


# Parameters of a fully convolutional net do not depend on the input size: initialise on the
# smallest image the model accepts with all five levels (P7 has stride 128).
INIT_IMAGE_HW = (128, 128)


def init_variables(model: Any, rng: jax.Array) -> Any:
  """The model's variables at step 0 (jitted `model.init` on a zero image)."""
  images = jnp.zeros((1, *INIT_IMAGE_HW, 3), jnp.float32)  # [1, 128, 128, 3]
  init = platforms_lib.built_for(lambda r: model.init(r, images), platforms_lib.platforms_of())
  return jax.jit(init)(rng)
