"""Ground-truth segments of an image: the struct every consumer takes, and sums over segments.

An image's panoptic ground truth is a segment-index map plus padded per-segment rows
(docs/interfaces.md, "One example"): `segment_map [H, W]` (0 = void, `k` = row `k - 1`) and, for
`S = dataset.max_segments` rows, the contiguous class, thing / crowd flags, the box and whether
the row holds a segment. `Segments` carries the six arrays together (a pytree: it vmaps, pmaps
and shards like a dict), and the batch keys derive from its fields.
"""
import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp

from ciae_jax import ops

Array = jax.Array


@flax.struct.dataclass
class Segments:
  """The per-image ground truth; leading batch axes allowed on every field.

  Attributes:
    segment_map: `[..., H, W]` int32, 0 = void, `k` = segment row `k - 1`.
    seg_class: `[..., S]` int32 contiguous class (stuff `0..C_st-1`, then things).
    seg_is_thing: `[..., S]` bool.
    seg_is_crowd: `[..., S]` bool (crowd regions: no positives, no loss, ignored by PQ).
    seg_box: `[..., S, 4]` float32 `x0, y0, x1, y1` in input pixels, over the visible pixels.
    seg_valid: `[..., S]` bool, False for padding rows (and segments cropped away).
  """
  segment_map: Array
  seg_class: Array
  seg_is_thing: Array
  seg_is_crowd: Array
  seg_box: Array
  seg_valid: Array

  @classmethod
  def from_batch(cls, batch: Mapping[str, Any]) -> "Segments":
    """The segment fields of a batch (or example) dict."""
    return cls(**{key: batch[key] for key in SEGMENT_KEYS})

  def as_dict(self) -> dict[str, Any]:
    return {key: getattr(self, key) for key in SEGMENT_KEYS}

  @property
  def num_segments(self) -> int:
    return self.seg_class.shape[-1]

  @property
  def is_instance(self) -> Array:
    """`[..., S]` rows that are instances: valid, thing and not crowd (queries of L_IAE)."""
    return self.seg_valid & self.seg_is_thing & ~self.seg_is_crowd


SEGMENT_KEYS = tuple(field.name for field in dataclasses.fields(Segments))
# What the train step reads of a batch.
BATCH_KEYS = ("image",) + SEGMENT_KEYS
# One example of the input pipeline (docs/interfaces.md); batches add `example_valid`.
EXAMPLE_KEYS = BATCH_KEYS + ("image_id", "orig_size", "image_size")


def segment_sums(values: Array, segment_map: Array, num_segments: int) -> Array:
  """`[S, D]` sums of `values [H, W, D]` over each segment row (void 0 dropped), float32."""
  height, width, dim = values.shape
  flat = jnp.reshape(values, (height * width, dim)).astype(jnp.float32)  # [HW, D]
  ids = jnp.reshape(segment_map, (-1,)).astype(jnp.int32)  # [HW] 0 = void, k = row k - 1
  sums = ops.segment_sum(flat, ids, num_segments + 1)  # [S + 1, D]
  return sums[1:]  # [S, D]


def instance_means(embedding_prenorm: Array, segment_map: Array, num_segments: int) -> Array:
  """Mean embedding `m_s^k` of each segment row (Eq. 4): L2norm of the sum of pre-norm embeddings.

  Rows of empty segments are 0. Returns `[S, D]` float32.
  """
  return ops.l2_normalize(segment_sums(embedding_prenorm, segment_map, num_segments))  # [S, D]
