"""Per-chunk math of the triplet kernel (`ciae_jax.losses.triplet`): the per-query terms of a
chunk of pixels (Eq. 5-8), and the cotangent of its similarities from the top-K selected entries.
"""
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array


class Config(NamedTuple):
  """The kernel's static settings."""
  margin: float
  top_k: int
  include_own: bool
  eps: float
  chunk_size: int
  normalize_pixels: bool


def chunk_terms(cfg: Config, pixels: Array, queries: Array, target: Array,
                mask: Optional[Array], box, query_valid: Optional[Array]):
  """Per-query terms of one chunk, by the dense formulation's operations (Eq. 5-8).

  Returns `(key, x, keep, counted)`, each `[C, Q]`: `key` the ratio of Eq. 8 (0 where not
  counted), which orders the queries as the per-query losses `l = -log(1 - ratio)` do (Eq. 8 is
  increasing in the ratio), so the top-K is selected on it and `selected_values` takes the
  logarithm on the `K` selected entries only; `x = d_pos - d_neg + margin` (the hinge argument),
  `keep` the similarity mask (None: nothing masked) and `counted`.
  """
  num_queries = queries.shape[0]
  similarity = pixels @ queries.T  # [C, Q]
  iota = jnp.arange(num_queries, dtype=jnp.int32)[None, :]  # [1, Q]
  own = target[:, None] == iota  # [C, Q]
  keep = mask
  if box is not None:
    centre_x, centre_y, bounds, own_exempt = box
    inside = ((bounds[None, :, 0] <= centre_x[:, None]) & (centre_x[:, None] <= bounds[None, :, 1])
              & (bounds[None, :, 2] <= centre_y[:, None])
              & (centre_y[:, None] <= bounds[None, :, 3]))  # [C, Q]
    near = inside | (own & own_exempt[:, None])  # [C, Q]
    keep = near if keep is None else (keep & near)  # [C, Q]
  if keep is not None:
    similarity = jnp.where(keep, similarity, 0.0)  # [C, Q]
  distance = 1.0 - similarity  # [C, Q]
  d_pos = jnp.sum(jnp.where(own, distance, 0.0), axis=1)  # [C]
  d_neg = jnp.where(own, 0.0, distance)  # [C, Q] Eq. 6: 0 for the own query
  x = d_pos[:, None] - d_neg + cfg.margin  # [C, Q]
  counted = jnp.ones_like(own) if cfg.include_own else ~own  # [C, Q]
  if query_valid is not None:
    counted &= query_valid[None, :]  # [C, Q]
  # Zeros never change a top-K sum of non-negative values, so uncounted entries become 0.
  key = jnp.where(counted, _ratio(cfg, x), 0.0)  # [C, Q]
  return key, x, keep, counted


def _ratio(cfg: Config, x: Array) -> Array:
  """The argument of Eq. 8's logarithm: the hinge (Eq. 7) over its bound, capped below 1."""
  hinge = jnp.maximum(x, 0.0)  # Eq. 7
  return jnp.minimum(hinge / (2.0 + cfg.margin), 1.0 - cfg.eps)


def selected_values(cfg: Config, x: Array, counted: Array, index: Array) -> Array:
  """The per-query losses `l` (Eq. 8; 0 where not counted) of the `[C, K]` selected entries, in
  the order of `index`: the same operations as on the whole `[C, Q]`, on `K` columns only.

  `index` is the top-K of `chunk_terms`' key; the losses are in descending order too, and a tie
  of two losses whose ratios differ (Eq. 8 rounding two ratios to one float) leaves the sum
  unchanged.
  """
  per_query = -jnp.log1p(-_ratio(cfg, _take(x, index)))  # [C, K] Eq. 8, >= 0
  return jnp.where(_take(counted, index), per_query, 0.0)  # [C, K]


def _take(a: Array, index: Array) -> Array:
  """`a[c, index[c, j]]`: `[C, Q]`, `[C, J]` -> `[C, J]`."""
  return jnp.take_along_axis(a, index, axis=1, mode="promise_in_bounds")


def similarity_cotangent(cfg: Config, weight: Array, target: Array, x: Array,
                         keep: Optional[Array], counted: Array, index: Array) -> Array:
  """`[C, Q]` cotangent of the chunk's (unmasked) similarities, from the selected entries only.

  The reverse-mode chain of `chunk_terms`, evaluated at the `K` selected entries with JAX's own
  derivative rules (log1p: `g / (x + 1)`; min, max: `_balanced_eq`, i.e. 1/2 at equality; the
  division by the constant `2 + margin`), so each entry's factor is the one autodiff of the dense
  formulation gives. The own query receives minus the sum of the factors (through `d_pos`).
  """
  num_queries = x.shape[1]
  x_sel = _take(x, index)  # [C, K]
  hinge = jnp.maximum(x_sel, 0.0)  # [C, K]
  scaled = hinge / (2.0 + cfg.margin)  # [C, K]
  ratio = jnp.minimum(scaled, 1.0 - cfg.eps)  # [C, K]
  ct_values = jnp.where(_take(counted, index), weight[:, None], 0.0)  # [C, K]
  ct_ratio = -((-ct_values) / ((-ratio) + 1.0))  # [C, K] through -log1p(-ratio)
  ct_scaled = ct_ratio * (jnp.where(scaled == ratio, 1.0, 0.0)
                          / jnp.where((1.0 - cfg.eps) == ratio, 2.0, 1.0))  # [C, K]
  ct_hinge = ct_scaled / (2.0 + cfg.margin)  # [C, K]
  ct_x = ct_hinge * (jnp.where(x_sel == hinge, 1.0, 0.0)
                     / jnp.where(0.0 == hinge, 2.0, 1.0))  # [C, K]
  ct_d_pos = jnp.sum(ct_x, axis=1)  # [C]
  # d_neg of the own query is the constant 0: its similarity only gets the d_pos term.
  ct_neg = jnp.where(index == target[:, None], 0.0, ct_x)  # [C, K] d x / d s_k = +1
  ct_pos = -ct_d_pos  # [C] d d_pos / d s_own = -1
  if keep is not None:
    ct_neg = jnp.where(_take(keep, index), ct_neg, 0.0)  # [C, K]
    # (A target outside [0, Q) has no own query, as in the dense formulation: clip the read,
    # the term lands on no column below.)
    keep_own = jnp.take_along_axis(keep, target[:, None], axis=1, mode="clip")[:, 0]  # [C]
    ct_pos = jnp.where(keep_own, ct_pos, 0.0)  # [C]
  iota = jnp.arange(num_queries, dtype=jnp.int32)[None, :]  # [1, Q]
  # Each column gets one non-zero term at most (the own query is zeroed among the selected),
  # so the order of these additions does not matter. One elementwise pass over [C, Q] (a
  # broadcast [C, K + 1, Q] compare summed over K + 1 is materialised by XLA, much slower).
  ct_similarity = jnp.where(target[:, None] == iota, ct_pos[:, None], 0.0)  # [C, Q]
  for j in range(index.shape[1]):
    ct_similarity += jnp.where(index[:, j:j + 1] == iota, ct_neg[:, j:j + 1], 0.0)  # [C, Q]
  return ct_similarity
