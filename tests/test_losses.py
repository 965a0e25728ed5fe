"""FCOS losses (ciae_jax/losses/{focal,iou,centerness,fcos}.py) against optax and NumPy."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ciae_jax import hparams
from ciae_jax.losses import centerness as centerness_lib
from ciae_jax.losses import fcos as fcos_lib
from ciae_jax.losses import focal as focal_lib
from ciae_jax.losses import iou as iou_lib

# FCOS's focal alpha 0.25 and gamma 2, -ln IoU, centerness-weighted regression.
PAPER = hparams.FcosHParams()


def _np_iou_loss(pred, target, kind, smooth=1.0):
  """One box at a time, from the UnitBox / GIoU definitions (FCOS's +1 smoothing)."""
  out = []
  for (pl, pt, pr, pb), (tl, tt, tr, tb) in zip(pred.astype(np.float64),
                                                 target.astype(np.float64)):
    # Boxes around the common point (0, 0): [x0, y0, x1, y1].
    p_box = (-pl, -pt, pr, pb)
    t_box = (-tl, -tt, tr, tb)
    iw = max(min(p_box[2], t_box[2]) - max(p_box[0], t_box[0]), 0.0)
    ih = max(min(p_box[3], t_box[3]) - max(p_box[1], t_box[1]), 0.0)
    inter = iw * ih
    union = (pl + pr) * (pt + pb) + (tl + tr) * (tt + tb) - inter
    iou = (inter + smooth) / (union + smooth)
    if kind == "iou":
      out.append(-math.log(iou))
    elif kind == "linear_iou":
      out.append(1.0 - iou)
    else:
      cw = max(p_box[2], t_box[2]) - min(p_box[0], t_box[0])
      ch = max(p_box[3], t_box[3]) - min(p_box[1], t_box[1])
      enclosing = cw * ch
      out.append(1.0 - (iou - (enclosing - union) / enclosing))
  return np.array(out)


def _np_bce(logits, targets):
  logits = logits.astype(np.float64)
  prob = 1.0 / (1.0 + np.exp(-logits))
  return -(targets * np.log(prob) + (1 - targets) * np.log(1 - prob))


def test_focal_matches_optax():
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(64, 5)) * 6).astype(np.float32)
  labels = (rng.random((64, 5)) < 0.2).astype(np.float32)
  got = focal_lib.sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0)
  want = optax.sigmoid_focal_loss(logits, labels, alpha=0.25, gamma=2.0)
  # Two float32 formulas of the same elementwise loss: a few ulps each from exp / log (XLA's
  # approximations are within ~4 ulps); 1e-5 is ~80 eps. atol 1e-7 for terms near 0 (|logit|
  # up to ~18: 1 - sigmoid loses its digits in one formula, and the loss is < 1e-7 there).
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(focal_lib.sigmoid_focal_loss_sum(logits, labels, alpha=0.5,
                                                              gamma=1.0),
                             np.sum(optax.sigmoid_focal_loss(logits, labels, alpha=0.5,
                                                             gamma=1.0)), rtol=1e-5)
  # (Sums of 320 non-negative terms of those: + log2(320) eps in any order.)
  grad = jax.grad(lambda x: focal_lib.sigmoid_focal_loss_sum(x, labels, alpha=0.25,
                                                            gamma=2.0))(logits * 10)
  assert np.isfinite(grad).all()


@pytest.mark.parametrize("kind", ["iou", "linear_iou", "giou"])
def test_iou_losses_match_numpy(kind):
  rng = np.random.default_rng(1)
  target = rng.uniform(0, 50, size=(40, 4)).astype(np.float32)
  pred = np.where(rng.random((40, 4)) < 0.5, target * rng.uniform(0.5, 1.5, (40, 4)),
                  rng.uniform(0, 50, (40, 4))).astype(np.float32)
  pred[0] = target[0]  # a perfect prediction: IoU 1, loss 0
  pred[1] = 0.0  # an empty prediction
  got = iou_lib.iou_loss(pred, target, kind=kind)
  want = _np_iou_loss(pred, target, kind)
  # float32 areas of boxes up to 100 px (products of sums: ~3 eps), a ratio and a log: the
  # loss of a near-perfect box, -log(IoU) ~ 1 - IoU, loses the digits IoU has in common with
  # 1, so its relative error is ~eps / (1 - IoU): rtol 1e-4 for IoU < 0.99, atol 1e-5 (~100
  # eps of the IoU itself) below. The perfect box: inter == union exactly, loss 0 up to 1e-5.
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert abs(float(got[0])) < 1e-5
  weight = rng.random(40).astype(np.float32)
  # The weighted sum of 40 of those non-negative losses: the same relative tolerance.
  np.testing.assert_allclose(iou_lib.weighted_iou_loss_sum(pred, target, weight, kind=kind),
                             np.sum(want * weight), rtol=1e-4)
  with pytest.raises(ValueError, match="kind"):
    iou_lib.iou_loss(pred, target, kind="diou")


def test_centerness_bce_matches_numpy():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=50).astype(np.float32) * 4
  targets = rng.random(50).astype(np.float32)
  # float32 BCE with logits (|x| < ~12: a softplus, a product) vs float64: a few ulps of each
  # term (1e-5 ~ 80 eps), atol 1e-6 for terms near 0 whose two parts nearly cancel; the sum
  # of 25 non-negative terms adds log2(25) eps.
  np.testing.assert_allclose(centerness_lib.centerness_bce(logits, targets),
                             _np_bce(logits, targets), rtol=1e-5, atol=1e-6)
  weight = (rng.random(50) < 0.5).astype(np.float32)
  np.testing.assert_allclose(centerness_lib.centerness_loss_sum(logits, targets, weight),
                             np.sum(_np_bce(logits, targets) * weight), rtol=1e-5)


def _random_fcos_case(rng, n=60, c=4):
  positive = rng.random(n) < 0.3
  cls_target = np.where(positive, rng.integers(0, c, n), -1).astype(np.int32)
  box_target = np.where(positive[:, None], rng.uniform(1, 40, (n, 4)), 0).astype(np.float32)
  ltrb = box_target.astype(np.float64)
  left, top, right, bottom = ltrb.T
  ctr = np.sqrt(np.minimum(left, right) / np.maximum(left, right).clip(1e-9)
                * np.minimum(top, bottom) / np.maximum(top, bottom).clip(1e-9))
  targets = dict(cls_target=cls_target, box_target=box_target,
                 centerness_target=ctr.astype(np.float32), positive=positive)
  cls_logits = rng.normal(size=(n, c)).astype(np.float32) * 3
  box_reg = rng.uniform(0, 40, (n, 4)).astype(np.float32)
  centerness = rng.normal(size=n).astype(np.float32)
  return cls_logits, box_reg, centerness, targets


@pytest.mark.parametrize("weighted", [True, False])
def test_fcos_losses_match_numpy(weighted):
  rng = np.random.default_rng(3)
  cls_logits, box_reg, centerness, targets = _random_fcos_case(rng)
  pos = targets["positive"]
  # Global normalisers as if other devices had more positives.
  num_pos_global = pos.sum() + 7.0
  ctr_sum_global = targets["centerness_target"][pos].sum() + 3.0
  got = fcos_lib.fcos_losses(cls_logits, box_reg, centerness, targets, num_pos_global,
                             ctr_sum_global, PAPER.replace(centerness_weighted_reg=weighted))

  # NumPy: focal loss written from its definition over every (location, class).
  prob = 1.0 / (1.0 + np.exp(-cls_logits.astype(np.float64)))
  focal = 0.0
  for i in range(cls_logits.shape[0]):
    for c in range(cls_logits.shape[1]):
      if targets["cls_target"][i] == c:
        focal += -0.25 * (1 - prob[i, c]) ** 2 * np.log(prob[i, c])
      else:
        focal += -0.75 * prob[i, c] ** 2 * np.log(1 - prob[i, c])
  iou = _np_iou_loss(box_reg[pos], targets["box_target"][pos], "iou")
  if weighted:
    reg = np.sum(iou * targets["centerness_target"][pos]) / ctr_sum_global
  else:
    reg = np.sum(iou) / num_pos_global
  ctr = np.sum(_np_bce(centerness[pos], targets["centerness_target"][pos])) / num_pos_global
  # float32 sums of <= 240 non-negative terms (a few ulps each) over exact normalisers vs
  # float64: ~log2(240) eps + a few ulps ~ 1e-6; rtol 1e-5 (~80 eps).
  np.testing.assert_allclose(got["loss_cls"], focal / num_pos_global, rtol=1e-5)
  np.testing.assert_allclose(got["loss_reg"], reg, rtol=1e-5)
  np.testing.assert_allclose(got["loss_ctr"], ctr, rtol=1e-5)

  norms = fcos_lib.fcos_normalizers(targets)
  # A count: an integer, exact in float32.
  np.testing.assert_array_equal(norms["num_positives"], pos.sum())
  # Two float32 sums (XLA's, NumPy's) of the same N positive terms in different orders: each
  # within (N - 1) * 2^-24 of the exact sum (the bound of any order), so they differ by at
  # most N * eps (~2e-6 here, measured 2e-7). The former rtol 1e-6 was below that bound.
  num_pos = int(pos.sum())
  np.testing.assert_allclose(norms["centerness_target_sum"],
                             targets["centerness_target"][pos].sum(),
                             rtol=num_pos * float(np.finfo(np.float32).eps))


def test_fcos_losses_no_positives_and_batch_axes():
  rng = np.random.default_rng(4)
  cls_logits, box_reg, centerness, targets = _random_fcos_case(rng)
  empty = dict(cls_target=np.full_like(targets["cls_target"], -1),
               box_target=np.zeros_like(targets["box_target"]),
               centerness_target=np.zeros_like(targets["centerness_target"]),
               positive=np.zeros_like(targets["positive"]))
  got = fcos_lib.fcos_losses(cls_logits, box_reg, centerness, empty, 0.0, 0.0, PAPER)
  assert float(got["loss_reg"]) == 0.0 and float(got["loss_ctr"]) == 0.0
  # Clamped to one positive: the plain focal sum (240 non-negative float32 terms, as above).
  np.testing.assert_allclose(got["loss_cls"],
                             np.sum(optax.sigmoid_focal_loss(cls_logits, 0 * cls_logits,
                                                             alpha=0.25)), rtol=1e-5)
  # A batch axis: the sums over both images.
  batch = lambda a, b: np.stack([a, b])  # noqa: E731
  both = fcos_lib.fcos_losses(batch(cls_logits, cls_logits), batch(box_reg, box_reg),
                              batch(centerness, centerness),
                              jax.tree.map(batch, targets, empty), 5.0, 2.0, PAPER)
  one = fcos_lib.fcos_losses(cls_logits, box_reg, centerness, targets, 5.0, 2.0, PAPER)
  one_empty = fcos_lib.fcos_losses(cls_logits, box_reg, centerness, empty, 5.0, 2.0, PAPER)
  # Sums over 2 x 60 locations vs two sums of 60 added: the same non-negative float32 terms
  # in another order, <= log2(120) eps apart (rtol 1e-5 ~ 80 eps).
  for key in one:
    np.testing.assert_allclose(both[key], one[key] + one_empty[key], rtol=1e-5, err_msg=key)
  grads = jax.grad(lambda r: fcos_lib.fcos_losses(cls_logits, r, centerness, targets, 5.0,
                                                  2.0, PAPER)["loss_reg"])(jnp.asarray(box_reg))
  assert np.isfinite(grads).all()
  with pytest.raises(ValueError, match="centerness_target_sum_global"):
    fcos_lib.fcos_losses(cls_logits, box_reg, centerness, targets, 5.0, None, PAPER)
