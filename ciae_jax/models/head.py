"""FCOS proposal head shared over P3..P7, with CIAE's box-embedding output."""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax.fast_paths import conv as conv_lib
from ciae_jax.models import layers

LEVEL_NAMES = ("p3", "p4", "p5", "p6", "p7")


def prior_bias(prior_prob: float) -> float:
  """Class-logit bias so that sigmoid(bias) = prior_prob (RetinaNet / FCOS)."""
  if not 0.0 < prior_prob < 1.0:
    raise ValueError(f"prior_prob must be in (0, 1), got {prior_prob}")
  return -math.log((1.0 - prior_prob) / prior_prob)


class ProposalHead(nn.Module):
  """Classification and regression towers, then the per-location predictions.

  Per level (same weights on every level): class logits from the classification
  tower; centerness ("centerness on reg"), box regression and box embedding from
  the regression tower. Box regression is relu(scale_l * x) * stride_l, in input
  pixels, with a learned scalar `scale_<level>` per level initialised to 1 (FCOS
  norm_reg_targets). Convs init normal(0.01), bias 0; class bias from prior_prob.

  Attributes:
    num_classes: number of thing classes C_th.
    head_dim: tower width (= fpn_dim in the paper).
    head_convs: conv3x3 + GN + ReLU layers per tower (4).
    box_embed_dim: channels of the box embedding, or 0 for no box-embedding output.
    prior_prob: initial foreground probability of the class logits (0.01).
    strides: stride of each input level (8 .. 128).
    dtype: compute dtype; the outputs are float32.
    kernel_grad: the convolutions' kernel gradients (`ciae_jax.fast_paths.conv`).
  """
  num_classes: int
  head_dim: int = 256
  head_convs: int = 4
  box_embed_dim: int = 32
  prior_prob: float = 0.01
  strides: Sequence[int] = hparams.LEVEL_STRIDES
  dtype: Any = jnp.float32
  kernel_grad: str = "auto"

  def _conv(self, features: int, name: str, bias: float = 0.0) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                   kernel_init=layers.normal_001,
                   bias_init=nn.initializers.constant(bias),
                   conv_general_dilated=conv_lib.for_flax(self.kernel_grad), name=name)

  def _tower(self, prefix: str) -> list[nn.Module]:
    modules = []
    for index in range(self.head_convs):
      modules.append(self._conv(self.head_dim, f"{prefix}_conv{index}"))
      modules.append(layers.group_norm(self.head_dim, self.dtype, name=f"{prefix}_gn{index}"))
    return modules

  @nn.compact
  def __call__(self, levels: Sequence[jax.Array]) -> dict[str, list[jax.Array]]:
    """levels: L maps [B, Hl, Wl, F] -> dict of L-lists (see docs/interfaces.md)."""
    if len(levels) != len(self.strides):
      raise ValueError(f"proposal head got {len(levels)} levels for {len(self.strides)} strides")
    cls_tower, reg_tower = self._tower("cls_tower"), self._tower("reg_tower")
    cls_pred = self._conv(self.num_classes, "cls_logits", bias=prior_bias(self.prior_prob))
    ctr_pred = self._conv(1, "centerness")
    box_pred = self._conv(4, "box_reg")
    embed_pred = self._conv(self.box_embed_dim, "box_embed") if self.box_embed_dim else None
    outputs = {"cls_logits": [], "centerness": [], "box_reg": [], "box_embed": []}
    for level_index, (x, stride) in enumerate(zip(levels, self.strides)):
      cls_feat, reg_feat = x, x  # [B, Hl, Wl, F]
      for conv, norm in zip(cls_tower[0::2], cls_tower[1::2]):
        cls_feat = nn.relu(norm(conv(cls_feat)))  # [B, Hl, Wl, head_dim]
      for conv, norm in zip(reg_tower[0::2], reg_tower[1::2]):
        reg_feat = nn.relu(norm(conv(reg_feat)))  # [B, Hl, Wl, head_dim]
      scale = self.param(f"scale_{LEVEL_NAMES[level_index]}", nn.initializers.ones, (), jnp.float32)
      outputs["cls_logits"].append(cls_pred(cls_feat).astype(jnp.float32))  # [B, Hl, Wl, C_th]
      outputs["centerness"].append(ctr_pred(reg_feat)[..., 0].astype(jnp.float32))  # [B, Hl, Wl]
      box = box_pred(reg_feat).astype(jnp.float32)  # [B, Hl, Wl, 4]
      outputs["box_reg"].append(nn.relu(scale * box) * float(stride))  # [B, Hl, Wl, 4]
      if embed_pred is not None:
        outputs["box_embed"].append(embed_pred(reg_feat).astype(jnp.float32))  # [B, Hl, Wl, E]
    if embed_pred is None:
      del outputs["box_embed"]
    return outputs
