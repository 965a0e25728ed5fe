"""IoU losses on `l, t, r, b` distances from a common location (UnitBox / FCOS)."""
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

_KINDS = ("iou", "linear_iou", "giou")


def iou_loss(pred_ltrb: Array,
             target_ltrb: Array,
             *,
             kind: str,
             smooth: float = 1.0) -> Array:
  """Elementwise IoU loss between boxes given as `l, t, r, b` from the same point.

  Follows FCOS's `IOULoss`: `IoU = (I + smooth) / (U + smooth)` (the `smooth` term keeps `-ln`
  finite for empty overlaps); `kind="iou"`: `-ln IoU`; `"linear_iou"`: `1 - IoU`; `"giou"`:
  `1 - GIoU` with `GIoU = IoU - (C - U) / C`, C the area of the smallest enclosing box.

  Args:
    pred_ltrb: `[..., 4]` predicted distances (>= 0).
    target_ltrb: `[..., 4]` target distances.
    kind: `"iou"`, `"linear_iou"` or `"giou"`.
    smooth: additive smoothing of intersection and union.

  Returns:
    `[...]` float32 loss per box.
  """
  if kind not in _KINDS:
    raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
  pred = jnp.asarray(pred_ltrb, jnp.float32)  # [..., 4]
  target = jnp.asarray(target_ltrb, jnp.float32)  # [..., 4]
  pred_area = (pred[..., 0] + pred[..., 2]) * (pred[..., 1] + pred[..., 3])  # [...]
  target_area = (target[..., 0] + target[..., 2]) * (target[..., 1] + target[..., 3])  # [...]
  inner = jnp.minimum(pred, target)  # [..., 4]
  outer = jnp.maximum(pred, target)  # [..., 4]
  intersection = (inner[..., 0] + inner[..., 2]) * (inner[..., 1] + inner[..., 3])  # [...]
  union = pred_area + target_area - intersection  # [...]
  iou = (intersection + smooth) / (union + smooth)  # [...]
  if kind == "iou":
    return -jnp.log(iou)
  if kind == "linear_iou":
    return 1.0 - iou
  enclosing = (outer[..., 0] + outer[..., 2]) * (outer[..., 1] + outer[..., 3]) + 1e-7  # [...]
  giou = iou - (enclosing - union) / enclosing  # [...]
  return 1.0 - giou


def weighted_iou_loss_sum(pred_ltrb: Array,
                          target_ltrb: Array,
                          weight: Optional[Array] = None,
                          *,
                          kind: str,
                          smooth: float = 1.0) -> Array:
  """`sum_i weight_i * iou_loss_i` (a scalar; weight 1 when None); the caller normalises."""
  losses = iou_loss(pred_ltrb, target_ltrb, kind=kind, smooth=smooth)  # [...]
  if weight is not None:
    losses = losses * jnp.asarray(weight, jnp.float32)  # [...]
  return jnp.sum(losses)
