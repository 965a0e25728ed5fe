"""Frozen copy of the dense CIAE loss (ciae_jax/losses/ciae.py as of commit 81f1765).

The reference for tests/test_ciae_loss_fast.py and benchmarks/loss_speed.py: it materialises
`[P, Q]` similarities (and the `[P, S]` box mask) for the whole image and differentiates through
`jax.lax.top_k`. Training uses `ciae_jax.losses.ciae` (chunked kernel, `triplet.py`). Keep this
file unchanged: it pins today's values and gradients. The docstring of the original follows.

The CIAE loss (paper III-B, Eq. 2-12; readings in docs/method.md "Losses").

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
"""
from typing import Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax.memory import memory_index
from ciae_jax.ops import l2_normalize

Array = jax.Array


def embedding_triplet_loss(pixel_emb: Array,
                           queries: Array,
                           target: Array,
                           query_mask: Optional[Array],
                           pixel_weight: Array,
                           *,
                           margin: float = 0.15,
                           top_k: int = 5,
                           include_own: bool = False,
                           query_valid: Optional[Array] = None,
                           eps: float = 1e-6) -> Tuple[Array, Array]:
  """Top-K triplet loss of pixels against query embeddings (Eq. 5-9), unnormalised.

  Args:
    pixel_emb: `[P, D]` unit pixel embeddings.
    queries: `[Q, D]` unit query embeddings.
    target: `[P]` int, index of each pixel's own query.
    query_mask: `[P, Q]` bool; False forces the similarity to 0 (distance 1): the box filter.
      None = all True.
    pixel_weight: `[P]` float weight of each pixel; 0 leaves a pixel out.
    margin: triplet margin.
    top_k: number of largest per-query losses kept per pixel (all if fewer queries).
    include_own: add Eq. 6's `k = c_i` term (`d_neg = 0`); the default is the one of the
      time this copy was frozen (the library's is now True): callers pass it.
    query_valid: `[Q]` bool, False for padding queries, which never count; None = all valid.
    eps: keeps `l' / (2 + margin) <= 1 - eps`, so `l <= -log(eps)` stays finite.

  Returns:
    `(sum_i w_i * sum of the top_k l of pixel i, number of pixels with w_i > 0)`, float32.
  """
  num_queries = queries.shape[0]
  pixel_emb = jnp.asarray(pixel_emb, jnp.float32)  # [P, D]
  queries = jnp.asarray(queries, jnp.float32)  # [Q, D]
  similarity = pixel_emb @ queries.T  # [P, Q]
  if query_mask is not None:
    similarity = jnp.where(query_mask, similarity, 0.0)  # [P, Q]
  distance = 1.0 - similarity  # [P, Q]
  own = target[:, None] == jnp.arange(num_queries)[None, :]  # [P, Q]
  d_pos = jnp.sum(jnp.where(own, distance, 0.0), axis=1)  # [P]
  d_neg = jnp.where(own, 0.0, distance)  # [P, Q] Eq. 6: 0 for the own query
  hinge = jnp.maximum(d_pos[:, None] - d_neg + margin, 0.0)  # [P, Q] Eq. 7
  ratio = jnp.minimum(hinge / (2.0 + margin), 1.0 - eps)  # [P, Q]
  per_query = -jnp.log1p(-ratio)  # [P, Q] Eq. 8, >= 0
  counted = jnp.ones_like(own) if include_own else ~own  # [P, Q]
  if query_valid is not None:
    counted &= query_valid[None, :]  # [P, Q]
  # Zeros never change a top-K sum of non-negative values, so uncounted entries become 0.
  per_query = jnp.where(counted, per_query, 0.0)  # [P, Q]
  top, _ = jax.lax.top_k(per_query, min(top_k, num_queries))  # [P, K]
  pixel_weight = jnp.asarray(pixel_weight, jnp.float32)  # [P]
  loss_sum = jnp.sum(pixel_weight * jnp.sum(top, axis=1))  # []
  count = jnp.sum((pixel_weight > 0).astype(jnp.float32))  # []
  return loss_sum, count


def segment_sums(values: Array, segment_map: Array, num_segments: int) -> Array:
  """`[S, D]` sums of `values [H, W, D]` over each segment row (void 0 dropped), float32."""
  height, width, dim = values.shape
  flat = jnp.reshape(values, (height * width, dim)).astype(jnp.float32)  # [HW, D]
  ids = jnp.reshape(segment_map, (-1,)).astype(jnp.int32)  # [HW] 0 = void, k = row k - 1
  sums = jax.ops.segment_sum(flat, ids, num_segments=num_segments + 1)  # [S + 1, D]
  return sums[1:]  # [S, D]


def instance_means(embedding_prenorm: Array, segment_map: Array, num_segments: int) -> Array:
  """Mean embedding `m_s^k` of each segment row (Eq. 4): L2norm of the sum of pre-norm embeddings.

  Rows of empty segments are 0. Returns `[S, D]` float32.
  """
  return l2_normalize(segment_sums(embedding_prenorm, segment_map, num_segments))  # [S, D]


def class_means(embedding_prenorm: Array, segment_map: Array, seg_class: Array,
                num_classes: int) -> Array:
  """Mean embedding `m_c^k` of each class present (Eq. 3), `[num_classes, D]`, 0 if absent."""
  seg_sums = segment_sums(embedding_prenorm, segment_map, seg_class.shape[0])  # [S, D]
  sums = jax.ops.segment_sum(seg_sums, seg_class.astype(jnp.int32),
                             num_segments=num_classes)  # [C, D]
  return l2_normalize(sums)  # [C, D]


def pixel_centres(height: int, width: int, stride: int = 1) -> Tuple[np.ndarray, np.ndarray]:
  """Centres `(x + 0.5, y + 0.5)` of the pixels `[::stride, ::stride]`, flattened row-major."""
  ys, xs = np.meshgrid(np.arange(0, height, stride), np.arange(0, width, stride), indexing="ij")
  return (xs.reshape(-1) + 0.5).astype(np.float32), (ys.reshape(-1) + 0.5).astype(np.float32)


def expanded_box_mask(centre_x: Array, centre_y: Array, seg_box: Array,
                      box_expand: float = 1.5) -> Array:
  """`[P, S]` bool: point inside each box scaled `box_expand` x about its centre (closed)."""
  seg_box = jnp.asarray(seg_box, jnp.float32)  # [S, 4]
  mid_x = 0.5 * (seg_box[:, 0] + seg_box[:, 2])  # [S]
  mid_y = 0.5 * (seg_box[:, 1] + seg_box[:, 3])  # [S]
  half_w = 0.5 * box_expand * (seg_box[:, 2] - seg_box[:, 0])  # [S]
  half_h = 0.5 * box_expand * (seg_box[:, 3] - seg_box[:, 1])  # [S]
  cx = jnp.asarray(centre_x)[:, None]  # [P, 1]
  cy = jnp.asarray(centre_y)[:, None]  # [P, 1]
  return ((mid_x - half_w <= cx) & (cx <= mid_x + half_w)
          & (mid_y - half_h <= cy) & (cy <= mid_y + half_h))  # [P, S]


def ciae_loss(embedding: Array,
              embedding_prenorm: Array,
              segment_map: Array,
              seg_class: Array,
              seg_is_thing: Array,
              seg_is_crowd: Array,
              seg_box: Array,
              seg_valid: Array,
              memory: Array,
              *,
              num_stuff: int,
              margin: float = 0.15,
              top_k: int = 5,
              alpha: float = 2.0,
              thing_weight: float = 5.0,
              box_expand: float = 1.5,
              use_box_filter: bool = True,
              merge_things: bool = True,
              loss_stride: int = 1,
              include_own: bool = False,
              stop_query_gradient: bool = False) -> Dict[str, Array]:
  """Unnormalised CIAE loss sums of one image (vmap over the batch, then `ciae_total`).

  Args:
    embedding: `[H, W, D]` unit pixel embeddings P.
    embedding_prenorm: `[H, W, D]` embeddings before the L2 norm (instance means use these).
    segment_map: `[H, W]` int, 0 = void, `k` = segment row `k - 1`.
    seg_class: `[S]` contiguous class.
    seg_is_thing: `[S]` bool.
    seg_is_crowd: `[S]` bool.
    seg_box: `[S, 4]` `x0, y0, x1, y1` in input pixels.
    seg_valid: `[S]` bool.
    memory: `[M, D]` memory `M_{t-1}` (no gradient), rows per `ciae_jax.memory.memory_index`.
    num_stuff: number of stuff classes.
    margin: triplet margin (both sub-losses).
    top_k: negatives kept per pixel.
    alpha: weight of L_IAE in `loss_ciae_sum`.
    thing_weight: weight of thing pixels in L_IAE.
    box_expand: scale of the boxes of the instance filter about their centres.
    use_box_filter: apply the instance box filter.
    merge_things: all thing classes share one memory row (must match `memory`).
    loss_stride: use pixels `[::s, ::s]` only (instance means still use every pixel).
    include_own: add Eq. 6's own-query term (see `embedding_triplet_loss`).
    stop_query_gradient: no gradient through the instance means (the paper does not say; off).

  Returns:
    dict `loss_cae_sum`, `loss_iae_sum`, `loss_ciae_sum` (= cae + alpha * iae), `num_pixels`
    (valid pixels used), float32 scalars; `psum` them and call `ciae_total`.
  """
  height, width, dim = embedding.shape
  if embedding_prenorm.shape != embedding.shape:
    raise ValueError(f"embedding_prenorm shape {embedding_prenorm.shape} != embedding shape "
                     f"{embedding.shape}")
  if segment_map.shape != (height, width):
    raise ValueError(f"segment_map shape {segment_map.shape} does not match embedding shape "
                     f"{embedding.shape}")
  if memory.ndim != 2 or memory.shape[1] != dim:
    raise ValueError(f"memory shape {memory.shape} does not match embedding dim {dim}")
  rows_fit = (memory.shape[0] == num_stuff + 1) if merge_things else (memory.shape[0] > num_stuff)
  if not rows_fit:
    raise ValueError(f"memory has {memory.shape[0]} rows, which does not fit num_stuff="
                     f"{num_stuff} with merge_things={merge_things} (see memory.num_memory)")
  if loss_stride < 1:
    raise ValueError(f"loss_stride must be >= 1, got {loss_stride}")
  num_segments = seg_class.shape[0]
  segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_valid = (
      jnp.asarray(a) for a in (segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_valid))
  memory = jax.lax.stop_gradient(jnp.asarray(memory, jnp.float32))  # [M, D]

  # Instance means over all pixels of the segment (full resolution, cheap segment sums).
  means = instance_means(embedding_prenorm, segment_map, num_segments)  # [S, D]
  if stop_query_gradient:
    means = jax.lax.stop_gradient(means)  # [S, D]

  pixels = embedding[::loss_stride, ::loss_stride].reshape(-1, dim)  # [P, D]
  pixel_seg = segment_map[::loss_stride, ::loss_stride].reshape(-1).astype(jnp.int32)  # [P]
  row = jnp.maximum(pixel_seg - 1, 0)  # [P] segment row (garbage on void, masked below)
  valid = (pixel_seg > 0) & seg_valid[row] & ~seg_is_crowd[row]  # [P]
  pixel_class = seg_class.astype(jnp.int32)[row]  # [P]
  pixel_is_thing = seg_is_thing[row]  # [P]

  # L_CAE (Eq. 10): memory rows as queries, no filter.
  cae_target = memory_index(pixel_class, num_stuff, merge_things)  # [P]
  cae_sum, num_pixels = embedding_triplet_loss(
      pixels, memory, cae_target, None, valid.astype(jnp.float32),
      margin=margin, top_k=top_k, include_own=include_own)

  # L_IAE (Eq. 11): stuff memories, then one query per segment row (instances only valid).
  queries = jnp.concatenate([memory[:num_stuff], means], axis=0)  # [C_st + S, D]
  is_instance = seg_valid & seg_is_thing & ~seg_is_crowd  # [S]
  query_valid = jnp.concatenate([jnp.ones((num_stuff,), bool), is_instance])  # [C_st + S]
  iae_target = jnp.where(pixel_is_thing, num_stuff + row, pixel_class)  # [P]
  own_instance = row[:, None] == jnp.arange(num_segments)[None, :]  # [P, S]
  own_instance &= pixel_is_thing[:, None]  # [P, S]
  if use_box_filter:
    centre_x, centre_y = pixel_centres(height, width, loss_stride)  # [P], [P]
    near = expanded_box_mask(centre_x, centre_y, seg_box, box_expand) | own_instance  # [P, S]
  else:
    near = jnp.ones_like(own_instance)  # [P, S]
  query_mask = jnp.concatenate([jnp.ones((near.shape[0], num_stuff), bool), near],
                               axis=1)  # [P, C_st + S]
  iae_weight = jnp.where(valid, jnp.where(pixel_is_thing, thing_weight, 1.0), 0.0)  # [P]
  iae_sum, _ = embedding_triplet_loss(
      pixels, queries, iae_target, query_mask, iae_weight,
      margin=margin, top_k=top_k, include_own=include_own, query_valid=query_valid)

  return {
      "loss_cae_sum": cae_sum,
      "loss_iae_sum": iae_sum,
      "loss_ciae_sum": cae_sum + alpha * iae_sum,
      "num_pixels": num_pixels,
  }


def ciae_total(sums: Mapping[str, Array], alpha: float = 2.0) -> Dict[str, Array]:
  """Normalised losses from `ciae_loss` sums (summed over batch and devices).

  Returns dict `loss_cae = cae_sum / n`, `loss_iae = iae_sum / n`,
  `loss_ciae = loss_cae + alpha * loss_iae` (Eq. 12), with `n = max(num_pixels, 1)`.
  """
  num_pixels = jnp.maximum(jnp.asarray(sums["num_pixels"], jnp.float32), 1.0)  # []
  loss_cae = jnp.asarray(sums["loss_cae_sum"], jnp.float32) / num_pixels  # []
  loss_iae = jnp.asarray(sums["loss_iae_sum"], jnp.float32) / num_pixels  # []
  return {"loss_cae": loss_cae, "loss_iae": loss_iae, "loss_ciae": loss_cae + alpha * loss_iae}
