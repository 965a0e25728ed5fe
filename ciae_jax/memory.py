"""Category-aware memory embeddings and their momentum update (paper III-C, Eq. 13-14).

The memory is a `[num_memory, D]` array of unit rows carried in the train state (no gradient).
Row `c` is the query of stuff class `c` (`0..num_stuff-1`); the thing classes follow, either all
merged into the single row `num_stuff` (`merge_things=True`, the paper's default, Table IV) or one
row per thing class (`num_stuff + j`, i.e. the contiguous class index).

Each training step the caller
  1. computes the loss with the current memory `M_{t-1}`,
  2. sums `class_sums(...)` over the batch and `psum`s them over devices,
  3. calls `update_memory(memory, sums, counts, step, total_steps, hp.memory)` to get `M_t`.
"""
from typing import Tuple

import jax
import jax.numpy as jnp

from ciae_jax import hparams
from ciae_jax import ops
from ciae_jax.segments import Segments

Array = jax.Array

def num_memory(num_stuff: int, num_things: int, merge_things: bool) -> int:
  """Memory rows: `num_stuff + 1` when things are merged, else `num_stuff + num_things`."""
  if num_stuff < 0 or num_things < 0:
    raise ValueError(f"num_stuff ({num_stuff}) and num_things ({num_things}) must be >= 0")
  return num_stuff + 1 if merge_things else num_stuff + num_things


def memory_index(seg_class: Array, num_stuff: int, merge_things: bool) -> Array:
  """Maps contiguous classes to memory rows (same shape as `seg_class`, int32).

  Stuff class `c < num_stuff` -> row `c`. A thing class -> row `num_stuff` when
  `merge_things`, else its own contiguous index.
  """
  seg_class = jnp.asarray(seg_class, jnp.int32)
  if not merge_things:
    return seg_class
  return jnp.where(seg_class < num_stuff, seg_class, num_stuff).astype(jnp.int32)


def init_memory(rng: Array, num: int, dim: int) -> Array:
  """Random unit rows `[num, dim]` float32 (M_0 of the paper): normalised Gaussian draws."""
  rows = jax.random.normal(rng, (num, dim), jnp.float32)  # [M, D]
  return ops.l2_normalize(rows)  # [M, D]


def class_sums(embedding_prenorm: Array,
               segments: Segments,
               *,
               num_stuff: int,
               merge_things: bool,
               num_memory: int) -> Tuple[Array, Array]:  # pylint: disable=redefined-outer-name
  """Per-memory-row sums of pre-norm pixel embeddings and pixel counts, for one image.

  Void pixels (0), pixels of padding rows and pixels of crowd segments are left out. The caller
  sums both outputs over the batch and `psum`s them over devices before `update_memory`.

  Args:
    embedding_prenorm: `[H, W, D]` embeddings before the final L2 norm.
    segments: the image's ground truth (`segment_map [H, W]`; `seg_class`, `seg_valid`,
      `seg_is_crowd` are read).
    num_stuff: number of stuff classes.
    merge_things: whether all thing classes share one memory row.
    num_memory: number of memory rows M (see `num_memory()`).

  Returns:
    `(sums [M, D] float32, counts [M] int32)`.
  """
  height, width, dim = embedding_prenorm.shape
  segment_map = segments.segment_map
  if segment_map.shape != (height, width):
    raise ValueError(f"segment_map shape {segment_map.shape} does not match embedding_prenorm "
                     f"shape {embedding_prenorm.shape}")
  seg_class, seg_valid, seg_is_crowd = (
      jnp.asarray(a) for a in (segments.seg_class, segments.seg_valid, segments.seg_is_crowd))
  flat_emb = jnp.reshape(embedding_prenorm, (height * width, dim)).astype(jnp.float32)  # [HW, D]
  seg_id = jnp.reshape(segment_map, (-1,)).astype(jnp.int32)  # [HW]
  row = jnp.maximum(seg_id - 1, 0)  # [HW] segment row (garbage where void, masked below)
  keep = (seg_id > 0) & seg_valid[row] & ~seg_is_crowd[row]  # [HW]
  mem_row = memory_index(seg_class[row], num_stuff, merge_things)  # [HW]
  # Dropped pixels go to an extra bucket M that is cut off afterwards.
  bucket = jnp.where(keep, mem_row, num_memory)  # [HW]
  sums = ops.segment_sum(flat_emb, bucket, num_memory + 1)  # [M + 1, D]
  counts = jax.ops.segment_sum(keep.astype(jnp.int32), bucket,
                               num_segments=num_memory + 1)  # [M + 1]
  return sums[:num_memory], counts[:num_memory]


def momentum(step: Array, total_steps: int, hp: hparams.MemoryHParams) -> Array:
  """Memory momentum `lam_t = 1 - coeff * (1 - t / T)^power` (Eq. 13), t/T clipped to [0, 1]."""
  if total_steps <= 0:
    raise ValueError(f"total_steps must be > 0, got {total_steps}")
  # Clipping keeps lam_t in [1 - coeff, 1] if training runs past T (odd powers would exceed 1).
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / total_steps, 0.0, 1.0)  # []
  return 1.0 - hp.momentum_coeff * (1.0 - progress) ** hp.momentum_power  # []


def update_memory(memory: Array,
                  sums: Array,
                  counts: Array,
                  step: Array,
                  total_steps: int,
                  hp: hparams.MemoryHParams) -> Array:
  """One momentum update of the memory (Eq. 14), for the rows with `counts > 0`.

  `M_c = L2norm(sums)`, `M_t = L2norm(lam_t * M_{t-1} + (1 - lam_t) * M_c)`; rows of classes absent
  from the (global) batch are returned bit-identical. No gradient flows through the memory.

  Args:
    memory: `[M, D]` float32 memory `M_{t-1}`.
    sums: `[M, D]` class sums of pre-norm embeddings, summed over batch and devices.
    counts: `[M]` pixel counts matching `sums`.
    step: current step `t` (scalar).
    total_steps: total number of steps `T`.
    hp: `momentum_coeff` (1e-4 in Eq. 13) and `momentum_power` (3).

  Returns:
    `[M, D]` float32 memory `M_t`.
  """
  if memory.shape != sums.shape or counts.shape != memory.shape[:1]:
    raise ValueError(f"memory {memory.shape}, sums {sums.shape} and counts {counts.shape} "
                     "do not match")
  memory = jax.lax.stop_gradient(jnp.asarray(memory, jnp.float32))  # [M, D]
  sums = jax.lax.stop_gradient(jnp.asarray(sums, jnp.float32))  # [M, D]
  lam = momentum(step, total_steps, hp)  # []
  batch_means = ops.l2_normalize(sums)  # [M, D]
  updated = ops.l2_normalize(lam * memory + (1.0 - lam) * batch_means)  # [M, D]
  present = (counts > 0)[:, None]  # [M, 1]
  return jnp.where(present, updated, memory)  # [M, D]
