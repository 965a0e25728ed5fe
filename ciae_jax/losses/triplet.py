"""Chunked kernel of the top-K triplet loss of pixels against queries (paper Eq. 5-9).

`triplet_loss_sum` computes `sum_i w_i * (sum of the top_k largest l_ik over the counted queries
k)` (see `ciae.embedding_triplet_loss` for the terms) without ever holding a `[P, Q]` array for the
whole image:

* Pixels are processed in fixed-size chunks of `chunk_size` (a `fori_loop` slicing the inputs in
  place; when P is not a multiple of the chunk, the last chunk is shifted back to end at P and
  its pixels already done get weight 0, which adds exactly 0 to the sums and gradients). The box
  filter is evaluated per chunk from the pixel centres and per-query box bounds (`BoxFilter`),
  so the `[P, S]` mask is never built either.
* A `jax.custom_vjp`: when differentiated, the forward pass computes, chunk by chunk, the loss and
  its gradients with respect to the pixel embeddings `[P, D]` (written in place into the loop
  carry), the queries `[Q, D]` (accumulated in the carry) and the pixel weights `[P]`; the
  backward pass only scales them by the cotangent. No `[P, Q]` residual is kept. Gradients of
  inputs that are not differentiated (e.g. the stop-gradient memory of L_CAE) are not computed
  (`symbolic_zeros`). Without differentiation only the loss is computed.
* Top-K without a scatter: `lax.top_k` runs on the chunk's `[C, Q]` values (XLA's TopK; ties go
  to the lower index, as in the dense formulation, which calls the same op on the same values).
  The loss sums its `[C, K]` values in the dense formulation's order. The gradient is built from
  the `K` selected entries only: the reverse-mode chain of the per-query terms is evaluated on
  `[C, K]` (with JAX's own derivative rules, so each factor equals autodiff's), and the cotangent
  of the `[C, Q]` similarities is assembled by comparing the selected indices with the query
  iota (one non-zero per column at most), then `@ queries` and `.T @ pixels`.

Values and gradients agree with the dense formulation to float32 rounding of sums taken in a
different order (chunks, the `K` factors of `d_pos`); see tests/test_ciae_loss_fast.py.
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

Array = jax.Array

# Pixels per chunk, by backend. CPU: timed with benchmarks/loss_speed.py --chunk_sizes on the
# 2-core AVX-512 CPU at 2 x 256 x 384 and 2 x 512 x 768 (benchmarks/RESULTS.md, "CIAE loss"):
# 256-4096 are within the noise of each other; smaller chunks pay the loop's per-iteration cost,
# larger ones leave the caches ([C, Q] float32 at C = 1024, Q = 153 is 0.6 MiB per live array).
# Accelerators: not measured (no GPU in that task); large chunks keep the number of sequential
# loop iterations (kernel launches) small, ~33 per image at 800 x 1344, while the per-chunk
# arrays stay ~20 MiB each.
CPU_CHUNK_SIZE = 1024
ACCELERATOR_CHUNK_SIZE = 32768
# Overrides both when set (tests and benchmarks patch it: ciae_loss has no chunk keyword, its
# keywords mirror the config's `loss` fields).
DEFAULT_CHUNK_SIZE: Optional[int] = None


def default_chunk_size() -> int:
  """`DEFAULT_CHUNK_SIZE` if set, else the size for the default backend."""
  if DEFAULT_CHUNK_SIZE is not None:
    return int(DEFAULT_CHUNK_SIZE)
  return CPU_CHUNK_SIZE if jax.default_backend() == "cpu" else ACCELERATOR_CHUNK_SIZE


class BoxFilter(NamedTuple):
  """The box filter of the queries, evaluated per chunk (instead of a dense `[P, Q]` mask).

  The similarity of pixel i to query k is kept iff the pixel centre lies in k's closed box
  `x_lo <= cx <= x_hi and y_lo <= cy <= y_hi`, or k is the pixel's own query (`target`) and
  `own_exempt[i]`; otherwise it is forced to 0. Unfiltered queries have bounds `(-inf, inf)`.
  """
  centre_x: Array  # [P] float32
  centre_y: Array  # [P] float32
  bounds: Array  # [Q, 4] float32: x_lo, x_hi, y_lo, y_hi
  own_exempt: Array  # [P] bool


class _Config(NamedTuple):
  margin: float
  top_k: int
  include_own: bool
  eps: float
  chunk_size: int


def _chunk_terms(cfg: _Config, pixels: Array, queries: Array, target: Array,
                 mask: Optional[Array], box, query_valid: Optional[Array]):
  """Per-query terms of one chunk, by the dense formulation's operations (Eq. 5-8).

  Returns `(values, x, keep, counted)`, each `[C, Q]`: `values` the per-query losses `l` (0 where
  not counted), `x = d_pos - d_neg + margin` (the hinge argument), `keep` the similarity mask
  (None: nothing masked) and `counted`.
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
  hinge = jnp.maximum(x, 0.0)  # [C, Q] Eq. 7
  ratio = jnp.minimum(hinge / (2.0 + cfg.margin), 1.0 - cfg.eps)  # [C, Q]
  per_query = -jnp.log1p(-ratio)  # [C, Q] Eq. 8, >= 0
  counted = jnp.ones_like(own) if cfg.include_own else ~own  # [C, Q]
  if query_valid is not None:
    counted &= query_valid[None, :]  # [C, Q]
  # Zeros never change a top-K sum of non-negative values, so uncounted entries become 0.
  values = jnp.where(counted, per_query, 0.0)  # [C, Q]
  return values, x, keep, counted


def _take(a: Array, index: Array) -> Array:
  """`a[c, index[c, j]]`: `[C, Q]`, `[C, J]` -> `[C, J]`."""
  return jnp.take_along_axis(a, index, axis=1, mode="promise_in_bounds")


def _similarity_cotangent(cfg: _Config, weight: Array, target: Array, x: Array,
                          keep: Optional[Array], counted: Array, index: Array) -> Array:
  """`[C, Q]` cotangent of the chunk's (unmasked) similarities, from the selected entries only.

  The reverse-mode chain of `_chunk_terms`, evaluated at the `K` selected entries with JAX's own
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


def _chunk_loop(cfg: _Config, pixel_emb, queries, target, weight, mask, box, query_valid, *,
                grad_pixels: bool, grad_queries: bool):
  """`(loss, per-pixel top-K sums [P], d loss / d pixel_emb or None, d loss / d queries or None)`.

  A loop over chunks that slices the per-pixel inputs in place (`dynamic_slice`) and writes the
  per-pixel outputs in place (`dynamic_update_slice` into the loop carry): no padded or
  transposed copy of the `[P, D]` inputs (under `vmap` a stacked `scan` input would be one). When
  P is not a multiple of the chunk, the last chunk is shifted back to end at P (as
  `dynamic_slice` clamps it); its pixels already done by the previous chunk get weight 0 (adding
  exactly 0 to the sums) and keep their outputs.
  """
  num_pixels, dim = pixel_emb.shape
  chunk = cfg.chunk_size
  num_chunks = -(-num_pixels // chunk)
  need_grad = grad_pixels or grad_queries

  def chunk_of(x, start):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0)

  def body(i, carry):
    loss_acc, per_pixel_all, dp_all, dq = carry
    start = jnp.minimum(i * chunk, num_pixels - chunk)  # [] the last chunk ends at P
    fresh = jnp.arange(chunk) + start >= i * chunk  # [C] not done by the previous chunk
    p = chunk_of(pixel_emb, start)  # [C, D]
    t = chunk_of(target, start)  # [C]
    w = jnp.where(fresh, chunk_of(weight, start), 0.0)  # [C]
    m = chunk_of(mask, start)  # [C, Q] or None
    chunk_box = None if box is None else (chunk_of(box.centre_x, start),
                                          chunk_of(box.centre_y, start), box.bounds,
                                          chunk_of(box.own_exempt, start))
    values, x, keep, counted = _chunk_terms(cfg, p, queries, t, m, chunk_box, query_valid)
    top, index = jax.lax.top_k(values, min(cfg.top_k, queries.shape[0]))  # [C, K] each
    # Keeps XLA from merging the column slices of `index` below into top_k's own slice, which
    # stops it from using its TopK call (a full sort instead, ~20x slower on CPU).
    index = jax.lax.optimization_barrier(index)  # [C, K]
    per_pixel = jnp.sum(top, axis=1)  # [C] summed as the dense formulation does
    loss_acc = loss_acc + jnp.sum(w * per_pixel)  # []
    keep_fresh = lambda new, old_all: jnp.where(
        fresh.reshape((chunk,) + (1,) * (new.ndim - 1)), new, chunk_of(old_all, start))
    per_pixel_all = jax.lax.dynamic_update_slice_in_dim(
        per_pixel_all, keep_fresh(per_pixel, per_pixel_all), start, axis=0)  # [P]
    if need_grad:
      ct_similarity = _similarity_cotangent(cfg, w, t, x, keep, counted, index)  # [C, Q]
      if grad_pixels:
        dp = ct_similarity @ queries  # [C, D]
        dp_all = jax.lax.dynamic_update_slice_in_dim(
            dp_all, keep_fresh(dp, dp_all), start, axis=0)  # [P, D]
      if grad_queries:
        dq = dq + (p.T @ ct_similarity).T  # [Q, D] (faster on CPU than ct_similarity.T @ p)
    return loss_acc, per_pixel_all, dp_all, dq

  # A zero that depends on every input: under shard_map (check_vma) the carry must be "varying"
  # over the mesh axes any input varies over, as the loop body's outputs are.
  zero = sum(jnp.sum(leaf.reshape(-1)[:0].astype(jnp.float32)) for leaf in jax.tree.leaves(
      (pixel_emb, queries, target, weight, mask, box, query_valid)))  # []
  zeros = lambda shape: jnp.zeros(shape, jnp.float32) + zero
  init = (zeros(()), zeros((num_pixels,)), zeros((num_pixels, dim)) if grad_pixels else None,
          zeros(queries.shape) if grad_queries else None)
  return jax.lax.fori_loop(0, num_chunks, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _loss_sum(cfg, pixel_emb, queries, target, weight, mask, box, query_valid):
  loss, _, _, _ = _chunk_loop(cfg, pixel_emb, queries, target, weight, mask, box, query_valid,
                              grad_pixels=False, grad_queries=False)
  return loss


def _loss_sum_fwd(cfg, pixel_emb, queries, target, weight, mask, box, query_valid):
  # symbolic_zeros=True: every array argument arrives as CustomVJPPrimal(value, perturbed).
  unwrap = lambda tree: jax.tree.map(lambda a: a.value, tree)
  loss, per_pixel, dp, dq = _chunk_loop(
      cfg, pixel_emb.value, queries.value, target.value, weight.value, unwrap(mask), unwrap(box),
      unwrap(query_valid), grad_pixels=pixel_emb.perturbed, grad_queries=queries.perturbed)
  return loss, (dp, dq, per_pixel if weight.perturbed else None)


def _loss_sum_bwd(cfg, residuals, cotangent):
  del cfg
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return (None,) * 7
  scale = lambda g: None if g is None else cotangent * g
  dp, dq, per_pixel = residuals
  return scale(dp), scale(dq), None, scale(per_pixel), None, None, None


_loss_sum.defvjp(_loss_sum_fwd, _loss_sum_bwd, symbolic_zeros=True)


def triplet_loss_sum(pixel_emb: Array,
                     queries: Array,
                     target: Array,
                     pixel_weight: Array,
                     *,
                     query_mask: Optional[Array] = None,
                     box_filter: Optional[BoxFilter] = None,
                     query_valid: Optional[Array] = None,
                     margin: float = 0.15,
                     top_k: int = 5,
                     include_own: bool = False,
                     eps: float = 1e-6,
                     chunk_size: Optional[int] = None) -> Array:
  """`sum_i w_i * (sum of the top_k largest l of pixel i)`, float32, chunked (module docstring).

  Args:
    pixel_emb: `[P, D]` unit pixel embeddings.
    queries: `[Q, D]` unit query embeddings.
    target: `[P]` int, index of each pixel's own query.
    pixel_weight: `[P]` float weight of each pixel; 0 leaves a pixel out.
    query_mask: optional dense `[P, Q]` bool (False forces the similarity to 0); chunked too.
    box_filter: optional `BoxFilter`, the same as a mask but computed per chunk (with both, a
      similarity is kept where both keep it).
    query_valid: `[Q]` bool, False for padding queries, which never count; None = all valid.
    margin, top_k, include_own, eps: as in `ciae.embedding_triplet_loss`.
    chunk_size: pixels per chunk (a static int >= 1, capped at P; None: `default_chunk_size()`);
      results depend on it only through float32 rounding.

  Differentiable with respect to `pixel_emb`, `queries` and `pixel_weight`.
  """
  chunk_size = default_chunk_size() if chunk_size is None else chunk_size
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  num_pixels, dim = pixel_emb.shape
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries shape {queries.shape} does not match pixel dim {dim}")
  if num_pixels == 0 or queries.shape[0] == 0:  # nothing to sum: a 0 that depends on the inputs
    return jnp.sum(jnp.asarray(pixel_emb, jnp.float32)) * 0.0 + jnp.sum(
        jnp.asarray(queries, jnp.float32)) * 0.0
  cfg = _Config(margin=float(margin), top_k=int(top_k), include_own=bool(include_own),
                eps=float(eps), chunk_size=int(min(chunk_size, num_pixels)))
  pixel_emb = jnp.asarray(pixel_emb, jnp.float32)  # [P, D]
  queries = jnp.asarray(queries, jnp.float32)  # [Q, D]
  target = jnp.asarray(target, jnp.int32)  # [P]
  pixel_weight = jnp.asarray(pixel_weight, jnp.float32)  # [P]
  if query_mask is not None:
    query_mask = jnp.asarray(query_mask, bool)  # [P, Q]
  if query_valid is not None:
    query_valid = jnp.asarray(query_valid, bool)  # [Q]
  if box_filter is not None:
    box_filter = BoxFilter(jnp.asarray(box_filter.centre_x, jnp.float32),
                           jnp.asarray(box_filter.centre_y, jnp.float32),
                           jnp.asarray(box_filter.bounds, jnp.float32),
                           jnp.asarray(box_filter.own_exempt, bool))
  return _loss_sum(cfg, pixel_emb, queries, target, pixel_weight, query_mask, box_filter,
                   query_valid)
