"""FCOS detection losses: focal classification, IoU regression, centerness BCE.

Normalisation (FCOS): all three losses are sums over this device's locations divided by global
quantities that the caller passes in after a `psum` over devices:
  * `num_positives_global`: the number of positive locations in the global batch (clamped to
    >= 1) normalises `loss_cls` and `loss_ctr` (and `loss_reg` when `centerness_weighted_reg` is
    False, the plain per-positive mean);
  * `centerness_target_sum_global`: the sum of the centerness targets of all positives in the
    global batch normalises `loss_reg` when `centerness_weighted_reg` (FCOS: the IoU loss of each
    positive is weighted by its centerness target).
Each returned value is therefore this device's share of the global loss: `psum` the returned
losses over devices (do not `pmean` them) to get the global-batch loss; with one device they are
the loss. FCOS divides by the per-GPU averages and lets DDP average the gradients, which is the
same thing. `fcos_normalizers(targets)` gives the local counts to `psum`.
"""
from typing import Dict, Mapping, Optional

import jax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax.losses.centerness import centerness_bce
from ciae_jax.losses.focal import sigmoid_focal_loss
from ciae_jax.losses.iou import iou_loss

Array = jax.Array

# Below this the centerness-target sum is treated as empty (its numerator is then 0 too).
_MIN_CENTERNESS_SUM = 1e-6


def fcos_normalizers(targets: Mapping[str, Array]) -> Dict[str, Array]:
  """Local `num_positives` and `centerness_target_sum` (float32 scalars) for the caller to `psum`.

  Works on targets of one image or with any leading batch axes.
  """
  positive = jnp.asarray(targets["positive"], jnp.float32)  # [..., N]
  return {
      "num_positives": jnp.sum(positive),
      "centerness_target_sum": jnp.sum(positive * targets["centerness_target"]),
  }


def fcos_losses(cls_logits: Array,
                box_reg: Array,
                centerness: Array,
                targets: Mapping[str, Array],
                num_positives_global: Array,
                centerness_target_sum_global: Optional[Array],
                hp: hparams.FcosHParams) -> Dict[str, Array]:
  """FCOS losses over flattened locations, normalised by global counts (see module docstring).

  Shapes are given for one image; any leading batch axes are allowed (everything is summed).

  Args:
    cls_logits: `[N, C_th]` thing-class logits.
    box_reg: `[N, 4]` predicted `l, t, r, b` (>= 0).
    centerness: `[N]` centerness logits.
    targets: dict from `ciae_jax.targets.fcos_targets` (`cls_target [N]`, `box_target [N, 4]`,
      `centerness_target [N]`, `positive [N]`).
    num_positives_global: number of positives summed over the global batch (clamped to >= 1).
    centerness_target_sum_global: sum of positives' centerness targets over the global batch;
      required when `hp.centerness_weighted_reg`.
    hp: `focal_alpha`, `focal_gamma`, `iou_kind` (`"iou"`: `-ln IoU`, paper/FCOS;
      `"linear_iou"`; `"giou"`) and `centerness_weighted_reg` (weight the IoU loss by the
      centerness targets, FCOS; else a plain mean over positives).

  Returns:
    dict `loss_cls`, `loss_reg`, `loss_ctr` (float32 scalars).
  """
  num_classes = cls_logits.shape[-1]
  if box_reg.shape != cls_logits.shape[:-1] + (4,):
    raise ValueError(f"box_reg shape {box_reg.shape} does not match cls_logits shape "
                     f"{cls_logits.shape}")
  if centerness.shape != cls_logits.shape[:-1]:
    raise ValueError(f"centerness shape {centerness.shape} does not match cls_logits shape "
                     f"{cls_logits.shape}")
  if hp.centerness_weighted_reg and centerness_target_sum_global is None:
    raise ValueError("centerness_target_sum_global is required when centerness_weighted_reg "
                     "is True (psum fcos_normalizers(targets)['centerness_target_sum'])")
  cls_target = targets["cls_target"]  # [N]
  positive = jnp.asarray(targets["positive"], jnp.float32)  # [N]
  centerness_target = jnp.asarray(targets["centerness_target"], jnp.float32)  # [N]
  num_pos = jnp.maximum(jnp.asarray(num_positives_global, jnp.float32), 1.0)  # []

  # Background (-1) gives an all-zero row.
  labels = (cls_target[..., None] == jnp.arange(num_classes)).astype(jnp.float32)  # [N, C]
  loss_cls = jnp.sum(sigmoid_focal_loss(cls_logits, labels, alpha=hp.focal_alpha,
                                        gamma=hp.focal_gamma)) / num_pos

  # Negatives' targets are zeros; their (finite) losses are masked out by the weight.
  reg_per_loc = iou_loss(box_reg, targets["box_target"], kind=hp.iou_kind)  # [N]
  if hp.centerness_weighted_reg:
    reg_norm = jnp.maximum(jnp.asarray(centerness_target_sum_global, jnp.float32),
                           _MIN_CENTERNESS_SUM)  # []
    loss_reg = jnp.sum(reg_per_loc * positive * centerness_target) / reg_norm
  else:
    loss_reg = jnp.sum(reg_per_loc * positive) / num_pos

  loss_ctr = jnp.sum(centerness_bce(centerness, centerness_target) * positive) / num_pos
  return {"loss_cls": loss_cls, "loss_reg": loss_reg, "loss_ctr": loss_ctr}
