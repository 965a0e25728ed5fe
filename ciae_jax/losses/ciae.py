"""The CIAE loss (paper III-B, Eq. 2-12; readings in docs/method.md "Losses").

Per valid pixel i with unit embedding p_i and a set of query embeddings, distances are
`D = 1 - cosine`. With `d_pos` the distance to the pixel's own query, every other valid query k
gives `l' = max(d_pos - d_neg_k + margin, 0)` and `l = -log(1 - l' / (2 + margin))`; the `top_k`
largest `l` of the pixel are summed (design.md: tau_K read as top-K negatives per pixel).

* `L_CAE`: the queries are the memory rows (`ciae_jax.memory`); the own query is the memory row
  of the pixel's class.
* `L_IAE`: the queries are the stuff memories (rows `0..num_stuff-1`) followed by the instance
  means `m_s^k` of the image's segment rows (valid, non-crowd thing segments only); the own query
  is the pixel's stuff memory or its instance. The similarity of a pixel to instance k is forced
  to 0 (distance 1) outside k's box expanded `box_expand` x about its centre (never for the
  pixel's own instance); thing pixels weigh `thing_weight`.
* Void, padding-row and crowd pixels take no part. Both sums are divided by the number of valid
  pixels (`ciae_total`, after the caller's `psum`), `L_CIAE = L_CAE + alpha * L_IAE`.

Both triplet sums are computed by the chunked kernel `ciae_jax.losses.triplet`, in one loop
over the pixels (pixels in chunks, the box filter per chunk, a custom VJP without `[P, Q]`
residuals whose forward pass computes the gradient of `L_CAE + alpha * L_IAE`);
`ciae_dense.py` keeps the former dense formulation as the reference it is tested and
benchmarked against.
"""
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax import segments as segments_lib
from ciae_jax.losses import triplet
from ciae_jax.memory import memory_index
from ciae_jax.segments import SEGMENT_KEYS
from ciae_jax.segments import Segments

Array = jax.Array


def embedding_triplet_loss(pixel_emb: Array,
                           queries: Array,
                           target: Array,
                           query_mask: Optional[Array],
                           pixel_weight: Array,
                           *,
                           margin: float,
                           top_k: int,
                           include_own: bool,
                           query_valid: Optional[Array] = None,
                           eps: float = 1e-6,
                           box_filter: Optional[triplet.BoxFilter] = None,
                           chunk_size: Optional[int] = None) -> Tuple[Array, Array]:
  """Top-K triplet loss of pixels against query embeddings (Eq. 5-9), unnormalised.

  Per pixel i and query k: `s = p_i . q_k` (0 where masked), `d = 1 - s`, `d_pos` the distance
  to the own query, `d_neg_k = d_k` (0 for the own query, Eq. 6),
  `l_k = -log(1 - min(max(d_pos - d_neg_k + margin, 0) / (2 + margin), 1 - eps))`; uncounted
  queries give 0, and the `top_k` largest `l_k` of the pixel are summed. Computed by the chunked
  kernel `ciae_jax.losses.triplet` (no `[P, Q]` array for all pixels at once unless `query_mask`
  is one).

  Args:
    pixel_emb: `[P, D]` unit pixel embeddings.
    queries: `[Q, D]` unit query embeddings.
    target: `[P]` int, index of each pixel's own query.
    query_mask: `[P, Q]` bool; False forces the similarity to 0 (distance 1): the box filter.
      None = all True.
    pixel_weight: `[P]` float weight of each pixel; 0 leaves a pixel out.
    margin: triplet margin.
    top_k: number of largest per-query losses kept per pixel (all if fewer queries).
    include_own: add Eq. 6's `k = c_i` term (`d_neg = 0`).
    query_valid: `[Q]` bool, False for padding queries, which never count; None = all valid.
    eps: keeps `l' / (2 + margin) <= 1 - eps`, so `l <= -log(eps)` stays finite.
    box_filter: a `triplet.BoxFilter`: the box filter evaluated chunk by chunk instead of a dense
      `query_mask` (combined with it by "and" if both are given).
    chunk_size: pixels per chunk of the kernel (None: `triplet.default_chunk_size()`).

  Returns:
    `(sum_i w_i * sum of the top_k l of pixel i, number of pixels with w_i > 0)`, float32.
  """
  pixel_weight = jnp.asarray(pixel_weight, jnp.float32)  # [P]
  loss_sum = triplet.triplet_loss_sum(
      pixel_emb, queries, target, pixel_weight, query_mask=query_mask, box_filter=box_filter,
      query_valid=query_valid, margin=margin, top_k=top_k, include_own=include_own, eps=eps,
      chunk_size=chunk_size)  # []
  count = jnp.sum((pixel_weight > 0).astype(jnp.float32))  # []
  return loss_sum, count


def class_means(embedding_prenorm: Array, segment_map: Array, seg_class: Array,
                num_classes: int) -> Array:
  """Mean embedding `m_c^k` of each class present (Eq. 3), `[num_classes, D]`, 0 if absent."""
  seg_sums = segments_lib.segment_sums(embedding_prenorm, segment_map, seg_class.shape[0])  # [S, D]
  sums = jax.ops.segment_sum(seg_sums, seg_class.astype(jnp.int32),
                             num_segments=num_classes)  # [C, D]
  return ops.l2_normalize(sums)  # [C, D]


def pixel_centres(height: int, width: int, stride: int = 1) -> Tuple[np.ndarray, np.ndarray]:
  """Centres `(x + 0.5, y + 0.5)` of the pixels `[::stride, ::stride]`, flattened row-major."""
  ys, xs = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij")
  return (xs.reshape(-1) + 0.5).astype(np.float32), (ys.reshape(-1) + 0.5).astype(np.float32)


def expanded_box_bounds(seg_box: Array, box_expand: float) -> Tuple[Array, ...]:
  """`(x_lo, x_hi, y_lo, y_hi)`, each `[S]` float32: the boxes scaled `box_expand` x about their
  centres."""
  boxes = ops.expand_boxes(jnp.asarray(seg_box, jnp.float32), box_expand)  # [S, 4]
  return boxes[:, 0], boxes[:, 2], boxes[:, 1], boxes[:, 3]


def expanded_box_mask(centre_x: Array, centre_y: Array, seg_box: Array,
                      box_expand: float) -> Array:
  """`[P, S]` bool: point inside each box scaled `box_expand` x about its centre (closed)."""
  x_lo, x_hi, y_lo, y_hi = expanded_box_bounds(seg_box, box_expand)  # each [S]
  cx = jnp.asarray(centre_x)[:, None]  # [P, 1]
  cy = jnp.asarray(centre_y)[:, None]  # [P, 1]
  return (x_lo <= cx) & (cx <= x_hi) & (y_lo <= cy) & (cy <= y_hi)  # [P, S]


def ciae_loss(embedding: Optional[Array],
              embedding_prenorm: Array,
              segments: Segments,
              memory: Array,
              hp: hparams.LossHParams,
              *,
              num_stuff: int,
              stuff_pixels: bool = True) -> Dict[str, Array]:
  """Unnormalised CIAE loss sums of one image (vmap over the batch, then `ciae_total`).

  Args:
    embedding: `[H, W, D]` unit pixel embeddings P = L2norm(embedding_prenorm); or None: the
      loss kernel normalises `embedding_prenorm` chunk by chunk (the same values; what
      training does, so that no normalised full-resolution copy is held: 0.26 GiB of the R50
      step at 2 x 800 x 1344).
    embedding_prenorm: `[H, W, D]` embeddings before the L2 norm (instance means use these).
    segments: the image's ground truth (`segment_map [H, W]`, rows `[S]`).
    memory: `[M, D]` memory `M_{t-1}` (no gradient), rows per `ciae_jax.memory.memory_index`.
    hp: the loss hyper-parameters: `margin` (both sub-losses), `top_k` (negatives kept per
      pixel), `alpha` (weight of L_IAE in `loss_ciae_sum`), `thing_weight` (thing pixels in
      L_IAE), `box_expand` / `use_box_filter` (the instance box filter), `merge_things` (all
      thing classes share one memory row; must match `memory`), `loss_stride` (pixels
      `[::s, ::s]` only; instance means still use every pixel), `include_own` (Eq. 6's
      own-query term, see `embedding_triplet_loss`), `stop_query_gradient` (no gradient
      through the instance means; the paper does not say).
    num_stuff: number of stuff classes.
    stuff_pixels: False: stuff pixels take no part in L_CAE nor L_IAE (Table III, first row:
      a semantic branch segments stuff, CIAE things only; `num_pixels` counts thing pixels).

  Returns:
    dict `loss_cae_sum`, `loss_iae_sum`, `loss_ciae_sum` (= cae + alpha * iae), `num_pixels`
    (valid pixels used), float32 scalars; `psum` them and call `ciae_total`.
  """
  height, width, dim = embedding_prenorm.shape
  segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_box, seg_valid = (
      jnp.asarray(getattr(segments, key)) for key in SEGMENT_KEYS)
  margin, top_k, include_own = hp.margin, hp.top_k, hp.include_own
  loss_stride, merge_things = hp.loss_stride, hp.merge_things
  if embedding is not None and embedding_prenorm.shape != embedding.shape:
    raise ValueError(f"embedding_prenorm shape {embedding_prenorm.shape} != embedding shape "
                     f"{embedding.shape}")
  if segment_map.shape != (height, width):
    raise ValueError(f"segment_map shape {segment_map.shape} does not match embedding shape "
                     f"{embedding_prenorm.shape}")
  if memory.ndim != 2 or memory.shape[1] != dim:
    raise ValueError(f"memory shape {memory.shape} does not match embedding dim {dim}")
  rows_fit = (memory.shape[0] == num_stuff + 1) if merge_things else (memory.shape[0] > num_stuff)
  if not rows_fit:
    raise ValueError(f"memory has {memory.shape[0]} rows, which does not fit num_stuff="
                     f"{num_stuff} with merge_things={merge_things} (see memory.num_memory)")
  if loss_stride < 1:
    raise ValueError(f"loss_stride must be >= 1, got {loss_stride}")
  num_segments = seg_class.shape[0]
  memory = jax.lax.stop_gradient(jnp.asarray(memory, jnp.float32))  # [M, D]

  # Instance means over all pixels of the segment (full resolution, cheap segment sums).
  means = segments_lib.instance_means(embedding_prenorm, segment_map, num_segments)  # [S, D]
  if hp.stop_query_gradient:
    means = jax.lax.stop_gradient(means)  # [S, D]

  source = embedding_prenorm if embedding is None else embedding  # [H, W, D]
  pixels = source[::loss_stride, ::loss_stride].reshape(-1, dim)  # [P, D]
  pixel_seg = segment_map[::loss_stride, ::loss_stride].reshape(-1).astype(jnp.int32)  # [P]
  row = jnp.maximum(pixel_seg - 1, 0)  # [P] segment row (garbage on void, masked below)
  valid = (pixel_seg > 0) & seg_valid[row] & ~seg_is_crowd[row]  # [P]
  pixel_class = seg_class.astype(jnp.int32)[row]  # [P]
  pixel_is_thing = seg_is_thing[row]  # [P]
  if not stuff_pixels:
    valid = valid & pixel_is_thing  # [P]

  # L_CAE (Eq. 10): memory rows as queries, no filter.
  cae_target = memory_index(pixel_class, num_stuff, merge_things)  # [P]
  cae_weight = valid.astype(jnp.float32)  # [P]
  cae = triplet.Term(memory, cae_target, cae_weight)

  # L_IAE (Eq. 11): stuff memories, then one query per segment row (instances only valid).
  queries = jnp.concatenate([memory[:num_stuff], means], axis=0)  # [C_st + S, D]
  is_instance = seg_valid & seg_is_thing & ~seg_is_crowd  # [S]
  query_valid = jnp.concatenate([jnp.ones((num_stuff,), bool), is_instance])  # [C_st + S]
  iae_target = jnp.where(pixel_is_thing, num_stuff + row, pixel_class)  # [P]
  if hp.use_box_filter:
    # The filter of Eq. 11 as per-query bounds, evaluated chunk by chunk by the kernel: stuff
    # queries are never filtered, instance k keeps pixels inside its expanded box, and a thing
    # pixel's own instance is never filtered (own query = `iae_target`).
    centre_x, centre_y = pixel_centres(height, width, loss_stride)  # [P], [P]
    unbounded = jnp.full((num_stuff,), jnp.inf, jnp.float32)  # [C_st]
    x_lo, x_hi, y_lo, y_hi = expanded_box_bounds(seg_box, hp.box_expand)  # each [S]
    bounds = jnp.stack([jnp.concatenate([-unbounded, x_lo]), jnp.concatenate([unbounded, x_hi]),
                        jnp.concatenate([-unbounded, y_lo]), jnp.concatenate([unbounded, y_hi])],
                       axis=1)  # [C_st + S, 4]
    box_filter = triplet.BoxFilter(centre_x, centre_y, bounds, own_exempt=pixel_is_thing)
  else:
    box_filter = None
  iae_weight = jnp.where(valid, jnp.where(pixel_is_thing, hp.thing_weight, 1.0), 0.0)  # [P]
  iae = triplet.Term(queries, iae_target, iae_weight, box=box_filter, query_valid=query_valid)
  # One loop over the pixels for both: their pixel gradients share one [P, D] buffer.
  cae_sum, iae_sum, ciae_sum = triplet.triplet_loss_sums(
      pixels, (cae, iae), (1.0, hp.alpha), margin=margin, top_k=top_k, include_own=include_own,
      normalize_pixels=embedding is None)
  num_pixels = jnp.sum((cae_weight > 0).astype(jnp.float32))  # []

  return {
      "loss_cae_sum": cae_sum,
      "loss_iae_sum": iae_sum,
      "loss_ciae_sum": ciae_sum,
      "num_pixels": num_pixels,
  }


def ciae_total(sums: Mapping[str, Array], hp: hparams.LossHParams) -> Dict[str, Array]:
  """Normalised losses from `ciae_loss` sums (summed over batch and devices).

  Returns dict `loss_cae = cae_sum / n`, `loss_iae = iae_sum / n`,
  `loss_ciae = ciae_sum / n = loss_cae + alpha * loss_iae` (Eq. 12), with
  `n = max(num_pixels, 1)`. `loss_ciae` is the combined sum's own output of the kernel, whose
  gradient its forward pass computed (`triplet.triplet_loss_sums`).
  """
  del hp  # alpha is in `loss_ciae_sum` already; kept so that callers need not change
  num_pixels = jnp.maximum(jnp.asarray(sums["num_pixels"], jnp.float32), 1.0)  # []
  loss_cae = jnp.asarray(sums["loss_cae_sum"], jnp.float32) / num_pixels  # []
  loss_iae = jnp.asarray(sums["loss_iae_sum"], jnp.float32) / num_pixels  # []
  loss_ciae = jnp.asarray(sums["loss_ciae_sum"], jnp.float32) / num_pixels  # []
  return {"loss_cae": loss_cae, "loss_iae": loss_iae, "loss_ciae": loss_ciae}
