"""ciae_jax.losses: pure loss functions of arrays (no TensorFlow, no side effects at import).

focal.py       sigmoid focal loss (FCOS classification)
iou.py         IoU / GIoU loss on l, t, r, b distances (FCOS regression)
centerness.py  centerness BCE with logits
fcos.py        the three FCOS losses normalised by global positive counts
ciae.py        the CIAE loss: L_CAE, L_IAE and their triplet building block
triplet.py     the chunked top-K triplet kernel behind ciae.py (custom VJP, no [P, Q] arrays)
semantic.py    cross-entropy of the semantic branch (Table III's first row: stuff from an FCN)
ciae_dense.py  the former dense CIAE loss, the reference of tests and benchmarks only
"""
