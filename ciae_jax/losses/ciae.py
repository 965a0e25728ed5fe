"""The CIAE loss (paper III-B, Eq. 2-12; readings in docs/method.md "Losses").

Per valid pixel i with unit embedding p_i and a set of query embeddings, a per-pixel loss of its
cosine similarities to the queries (`loss.kind`, `ciae_jax.losses.pixel_losses`; the paper's by
default: the top-K of `-log(1 - max(d_pos - d_neg + margin, 0) / (2 + margin))` with
`d = 1 - cosine`, Eq. 5-9) is weighted and summed:

* `L_CAE`: the queries are the memory rows (`ciae_jax.memory`); the own query is the memory row
  of the pixel's class.
* `L_IAE`: the queries are the stuff memories (rows `0..num_stuff-1`) followed by the instance
  means `m_s^k` of the image's segment rows (valid, non-crowd thing segments only; the others are
  padding query slots); the own query is the pixel's stuff memory or its instance. The
  similarity of a pixel to instance k is forced to 0 outside k's box expanded `box_expand` x
  about its centre (never for the pixel's own instance); thing pixels weigh `thing_weight`.
* Void, padding-row and crowd pixels take no part. Both sums are divided by the number of valid
  pixels (`ciae_total`, after the caller's `psum`),
  `L_CIAE = cae_weight * L_CAE + alpha * L_IAE` (Eq. 12; the paper's `cae_weight` is 1).

Both sums come from `ciae_jax.losses.engine.loss_sums` in one loop over pixel chunks (no
`[P, Q]` array; gradients by autodiff of the per-pixel loss).
"""
from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax import platforms
from ciae_jax import segments as segments_lib
from ciae_jax.losses import engine
from ciae_jax.losses import registry
from ciae_jax.memory import memory_index
from ciae_jax.segments import SEGMENT_KEYS
from ciae_jax.segments import Segments

Array = jax.Array

# Pixels per chunk of the loss engine when `loss.chunk_size` is None, by the platform the
# program is lowered for (`platforms`, "loss_small_chunks"). CPU: timed with
# benchmarks/loss_speed.py --chunk_sizes on a 2-core AVX-512 CPU at 2 x 256 x 384 and
# 2 x 512 x 768 (benchmarks/RESULTS.md, "CIAE loss"): 256-4096 are within the noise of each
# other; smaller chunks pay the loop's per-iteration cost, larger ones leave the caches.
# Accelerators: large chunks keep the sequential loop short (17 iterations per image at
# 800 x 1344) while each per-chunk [C, Q] array stays ~40 MiB (Q ~ 150).
CPU_CHUNK_SIZE = 1024
ACCELERATOR_CHUNK_SIZE = 65536


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


def _loss_pixels(segment_map: Array, seg_class: Array, seg_is_thing: Array, seg_is_crowd: Array,
                 seg_valid: Array, loss_stride: int, stuff_pixels: bool) -> Tuple[Array, ...]:
  """(segment row, valid, class, is_thing), each `[P]`, of the loss pixels `[::s, ::s]`."""
  pixel_seg = segment_map[::loss_stride, ::loss_stride].reshape(-1).astype(jnp.int32)  # [P]
  row = jnp.maximum(pixel_seg - 1, 0)  # [P] segment row (garbage on void, masked below)
  valid = (pixel_seg > 0) & seg_valid[row] & ~seg_is_crowd[row]  # [P]
  pixel_class = seg_class.astype(jnp.int32)[row]  # [P]
  pixel_is_thing = seg_is_thing[row]  # [P]
  if not stuff_pixels:
    valid = valid & pixel_is_thing  # [P]
  return row, valid, pixel_class, pixel_is_thing


def num_loss_pixels(segments: Segments, hp: hparams.LossHParams, *,
                    stuff_pixels: bool = True) -> Array:
  """The `num_pixels` of `ciae_loss` (float32 scalar) from the ground truth alone.

  Lets a caller that splits a batch into micro-batches know the loss's global normaliser
  before any forward pass (`training.accumulate`).
  """
  segment_map, seg_class, seg_is_thing, seg_is_crowd, _, seg_valid = (
      jnp.asarray(getattr(segments, key)) for key in SEGMENT_KEYS)
  _, valid, _, _ = _loss_pixels(segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_valid,
                                hp.loss_stride, stuff_pixels)  # [P]
  return jnp.sum(valid.astype(jnp.float32))  # []


def ciae_loss(embedding: Optional[Array],
              embedding_prenorm: Array,
              segments: Segments,
              memory: Array,
              hp: hparams.LossHParams,
              *,
              num_stuff: int,
              stuff_pixels: bool = True,
              sums_fn: Callable[..., tuple] = engine.loss_sums) -> Dict[str, Array]:
  """Unnormalised CIAE loss sums of one image (vmap over the batch, then `ciae_total`).

  Args:
    embedding: `[H, W, D]` unit pixel embeddings P = L2norm(embedding_prenorm); or None: the
      engine normalises `embedding_prenorm` chunk by chunk (the same values; what training
      does, so that no normalised full-resolution copy is held: 0.26 GiB of the R50 step at
      2 x 800 x 1344).
    embedding_prenorm: `[H, W, D]` embeddings before the L2 norm (instance means use these).
    segments: the image's ground truth (`segment_map [H, W]`, rows `[S]`).
    memory: `[M, D]` memory `M_{t-1}` (no gradient), rows per `ciae_jax.memory.memory_index`.
    hp: the loss hyper-parameters: `kind` / `params` (the per-pixel loss), `alpha` and
      `cae_weight` (weights of L_IAE and L_CAE in `loss_ciae_sum`), `thing_weight` (thing
      pixels in L_IAE), `box_expand` / `use_box_filter` (the instance box filter),
      `merge_things` (all thing classes share one memory row; must match `memory`),
      `loss_stride` (pixels `[::s, ::s]` only; instance means still use every pixel),
      `stop_query_gradient` (no gradient through the instance means; the paper does not say),
      `chunk_size` (None: `CPU_CHUNK_SIZE` in programs for CPU, else `ACCELERATOR_CHUNK_SIZE`).
    num_stuff: number of stuff classes.
    stuff_pixels: False: stuff pixels take no part in L_CAE nor L_IAE (Table III, first row:
      a semantic branch segments stuff, CIAE things only; `num_pixels` counts thing pixels).
    sums_fn: `engine.loss_sums`, or `engine.dense_loss_sums` (the reference, for tests).

  Returns:
    dict `loss_cae_sum`, `loss_iae_sum`, `loss_ciae_sum` (= cae_weight * cae + alpha * iae),
    `num_pixels` (valid pixels used), float32 scalars; `psum` them and call `ciae_total`.
  """
  height, width, dim = embedding_prenorm.shape
  segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_box, seg_valid = (
      jnp.asarray(getattr(segments, key)) for key in SEGMENT_KEYS)
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
  num_segments = seg_class.shape[0]
  memory = jax.lax.stop_gradient(jnp.asarray(memory, jnp.float32))  # [M, D]

  # Instance means over all pixels of the segment (full resolution, cheap segment sums).
  means = segments_lib.instance_means(embedding_prenorm, segment_map, num_segments)  # [S, D]
  if hp.stop_query_gradient:
    means = jax.lax.stop_gradient(means)  # [S, D]

  source = embedding_prenorm if embedding is None else embedding  # [H, W, D]
  pixels = source[::loss_stride, ::loss_stride].reshape(-1, dim)  # [P, D]
  row, valid, pixel_class, pixel_is_thing = _loss_pixels(
      segment_map, seg_class, seg_is_thing, seg_is_crowd, seg_valid, loss_stride,
      stuff_pixels)  # each [P]

  # L_CAE (Eq. 10): memory rows as queries, no filter.
  cae_own = memory_index(pixel_class, num_stuff, merge_things)  # [P]
  cae_weight = valid.astype(jnp.float32)  # [P]
  cae = engine.Term(memory, cae_own, cae_weight)

  # L_IAE (Eq. 11): stuff memories, then one query per segment row (instances only valid).
  queries = jnp.concatenate([memory[:num_stuff], means], axis=0)  # [C_st + S, D]
  is_instance = seg_valid & seg_is_thing & ~seg_is_crowd  # [S]
  query_valid = jnp.concatenate([jnp.ones((num_stuff,), bool), is_instance])  # [C_st + S]
  iae_own = jnp.where(pixel_is_thing, num_stuff + row, pixel_class)  # [P]
  box_filter = None
  if hp.use_box_filter:
    # The filter of Eq. 11 as per-query bounds, evaluated chunk by chunk: stuff queries are
    # never filtered, instance k keeps pixels inside its expanded box, and a thing pixel's own
    # instance is never filtered.
    centre_x, centre_y = pixel_centres(height, width, loss_stride)  # [P], [P]
    unbounded = jnp.full((num_stuff,), jnp.inf, jnp.float32)  # [C_st]
    x_lo, x_hi, y_lo, y_hi = expanded_box_bounds(seg_box, hp.box_expand)  # each [S]
    bounds = jnp.stack([jnp.concatenate([-unbounded, x_lo]), jnp.concatenate([unbounded, x_hi]),
                        jnp.concatenate([-unbounded, y_lo]), jnp.concatenate([unbounded, y_hi])],
                       axis=1)  # [C_st + S, 4]
    box_filter = engine.BoxFilter(centre_x, centre_y, bounds, own_exempt=pixel_is_thing)
  iae_weight = jnp.where(valid, jnp.where(pixel_is_thing, hp.thing_weight, 1.0), 0.0)  # [P]
  iae = engine.Term(queries, iae_own, iae_weight, box=box_filter, query_valid=query_valid)
  # One loop over the pixels for both: their pixel gradients share one [P, D] buffer.
  loss = registry.bind(hp.kind, hp.params)
  run = lambda chunk_size: lambda pixels, terms: sums_fn(
      pixels, terms, (hp.cae_weight, hp.alpha), loss, chunk_size=chunk_size,
      normalize_pixels=embedding is None)
  if hp.chunk_size:
    cae_sum, iae_sum, ciae_sum = run(hp.chunk_size)(pixels, (cae, iae))
  else:
    cae_sum, iae_sum, ciae_sum = platforms.switch(
        "loss_small_chunks", pixels, (cae, iae), fast=run(CPU_CHUNK_SIZE),
        plain=run(ACCELERATOR_CHUNK_SIZE))
  num_pixels = jnp.sum((cae_weight > 0).astype(jnp.float32))  # []

  return {
      "loss_cae_sum": cae_sum,
      "loss_iae_sum": iae_sum,
      "loss_ciae_sum": ciae_sum,
      "num_pixels": num_pixels,
  }


def ciae_total(sums: Mapping[str, Array]) -> Dict[str, Array]:
  """Normalised losses from `ciae_loss` sums (summed over batch and devices).

  Returns dict `loss_cae = cae_sum / n`, `loss_iae = iae_sum / n`,
  `loss_ciae = ciae_sum / n = cae_weight * loss_cae + alpha * loss_iae` (Eq. 12), with
  `n = max(num_pixels, 1)`. `loss_ciae` is the engine's total, whose gradient its forward pass
  computed (`engine.loss_sums`).
  """
  num_pixels = jnp.maximum(jnp.asarray(sums["num_pixels"], jnp.float32), 1.0)  # []
  loss_cae = jnp.asarray(sums["loss_cae_sum"], jnp.float32) / num_pixels  # []
  loss_iae = jnp.asarray(sums["loss_iae_sum"], jnp.float32) / num_pixels  # []
  loss_ciae = jnp.asarray(sums["loss_ciae_sum"], jnp.float32) / num_pixels  # []
  return {"loss_cae": loss_cae, "loss_iae": loss_iae, "loss_ciae": loss_ciae}
