"""Cross-entropy of the semantic branch (paper V-F.1, Table III, first row).

The ablation segments stuff with "an additional semantic segmentation branch, where an
H/4 x W/4 x (N_st + 1) tensor (thing classes are merged as a single class) is predicted in
parallel with P' and supervised with the standard cross-entropy loss". Labels: a stuff pixel's
contiguous class `0..N_st-1`, a thing pixel's (crowd included: a crowd region is still
"some thing") the merged class `N_st`; void pixels (padding included) and pixels of invalid
segment rows take no part. The sum is divided by the global number of labelled pixels by the
train step (`semantic_total`, after its `psum`), as the CIAE sums are.
"""
from typing import Dict, Mapping

import jax
import jax.numpy as jnp
import optax

from ciae_jax.segments import Segments

Array = jax.Array


def semantic_labels(segments: Segments, *, num_stuff: int, stride: int) -> tuple[Array, Array]:
  """`(label [h, w] int32, labelled [h, w] bool)` of the stride-`stride` cells.

  A cell takes the label of the full-resolution pixel `(s * i + s // 2, s * j + s // 2)`: the
  location FCOS gives a stride-s cell (`targets.fcos_locations`), and a pixel of the s x s
  block `[s * i, s * i + s)` that nearest upsampling at inference hands the cell's prediction
  (`inference.panoptic`), so training and inference read the same pixel. The top-left
  pixel `[::s, ::s]` would bias labels towards the segments above and left of every boundary.
  """
  segment_map = jnp.asarray(segments.segment_map)
  cell_seg = segment_map[stride // 2::stride, stride // 2::stride].astype(jnp.int32)  # [h, w]
  row = jnp.maximum(cell_seg - 1, 0)  # [h, w] segment row (garbage on void, masked below)
  labelled = (cell_seg > 0) & jnp.asarray(segments.seg_valid, bool)[row]  # [h, w]
  is_thing = jnp.asarray(segments.seg_is_thing, bool)[row]  # [h, w]
  seg_class = jnp.asarray(segments.seg_class, jnp.int32)[row]  # [h, w]
  label = jnp.where(is_thing, num_stuff, seg_class)  # [h, w] in 0..N_st
  return jnp.where(labelled, label, 0).astype(jnp.int32), labelled


def semantic_loss_sums(logits: Array, segments: Segments, *, num_stuff: int
                       ) -> Dict[str, Array]:
  """Unnormalised cross-entropy of one image's semantic logits (vmap over the batch).

  Args:
    logits: `[h, w, N_st + 1]` logits at stride `H / h` (4 for the model's branch): channels
      the stuff classes, then the merged thing class.
    segments: the image's ground truth (`segment_map [H, W]`, rows `[S]`); `H` must be `h`
      times the stride (the same for `W`).
    num_stuff: N_st.

  Returns:
    dict `loss_semantic_sum` (sum of `-log softmax(logits)[label]` over the labelled cells)
    and `semantic_pixels` (their number), float32 scalars; `psum` them and call
    `semantic_total`.
  """
  height, width = jnp.shape(segments.segment_map)
  cells_h, cells_w, channels = logits.shape
  if channels != num_stuff + 1:
    raise ValueError(f"semantic logits have {channels} channels; num_stuff={num_stuff} stuff "
                     "classes plus the merged thing class need num_stuff + 1")
  stride = height // cells_h
  if stride < 1 or (cells_h * stride, cells_w * stride) != (height, width):
    raise ValueError(f"semantic logits {cells_h} x {cells_w} are not the segment map "
                     f"{height} x {width} at one whole stride")
  label, labelled = semantic_labels(segments, num_stuff=num_stuff, stride=stride)  # [h, w] x 2
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), label)  # [h, w]
  return {
      # `where`, not a product: a non-finite logit on an unlabelled cell stays out of the sum.
      "loss_semantic_sum": jnp.sum(jnp.where(labelled, cross_entropy, 0.0)),
      "semantic_pixels": jnp.sum(labelled.astype(jnp.float32)),
  }


def num_labelled_cells(segments: Segments, *, num_stuff: int, stride: int) -> Array:
  """The `semantic_pixels` of `semantic_loss_sums` (float32 scalar) from the ground truth alone,
  for logits at `stride` (known before the forward pass: `training.accumulate`)."""
  _, labelled = semantic_labels(segments, num_stuff=num_stuff, stride=stride)  # [h, w]
  return jnp.sum(labelled.astype(jnp.float32))  # []


def semantic_total(sums: Mapping[str, Array], weight: float) -> Dict[str, Array]:
  """`loss_semantic = weight * loss_semantic_sum / max(semantic_pixels, 1)` from summed sums."""
  pixels = jnp.maximum(jnp.asarray(sums["semantic_pixels"], jnp.float32), 1.0)  # []
  return {"loss_semantic": weight * jnp.asarray(sums["loss_semantic_sum"], jnp.float32) / pixels}
