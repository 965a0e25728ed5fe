"""ciae_jax.losses: pure loss functions of arrays (no TensorFlow, no side effects at import).

focal.py       sigmoid focal loss (FCOS classification)
iou.py         IoU / GIoU loss on l, t, r, b distances (FCOS regression)
centerness.py  centerness BCE with logits
fcos.py        the three FCOS losses normalised by global positive counts
ciae.py        the CIAE loss: L_CAE and L_IAE (Eq. 10-12) of a per-pixel loss
pixel_losses.py  the per-pixel losses (the paper's and its variants), pure functions
registry.py    `loss.kind` / `loss.params` -> a bound per-pixel loss
engine.py      chunked sums of a per-pixel loss, gradients by autodiff, no [P, Q] arrays;
               dense_loss_sums, its reference
semantic.py    cross-entropy of the semantic branch (Table III's first row: stuff from an FCN)
"""
