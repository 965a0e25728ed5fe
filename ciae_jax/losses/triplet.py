"""Chunked kernel of the top-K triplet loss of pixels against queries (paper Eq. 5-9).

`triplet_loss_sum` computes `sum_i w_i * (sum of the top_k largest l_ik over the counted queries
k)` (see `ciae.embedding_triplet_loss` for the terms) without ever holding a `[P, Q]` array for the
whole image; `triplet_loss_sums` computes several such sums (`Term`s: L_CAE's and L_IAE's
queries, targets and weights) over the same pixels in one loop, and their weighted total:

* Pixels are processed in fixed-size chunks of `chunk_size` (a `fori_loop` slicing the inputs in
  place; when P is not a multiple of the chunk, the last chunk is shifted back to end at P and
  its pixels already done get weight 0, which adds exactly 0 to the sums and gradients). The box
  filter is evaluated per chunk from the pixel centres and per-query box bounds (`BoxFilter`),
  so the `[P, S]` mask is never built either.
* A `jax.custom_vjp`: when differentiated, the forward pass computes, chunk by chunk, the losses
  and the gradient of the weighted total with respect to the pixel embeddings `[P, D]` (one
  buffer for all terms, written in place into the loop carry), each term's gradients with
  respect to its queries `[Q, D]` (accumulated in the carry) and its pixel weights `[P]`; the
  backward pass only scales them by the cotangents. No `[P, Q]` residual is kept. A cotangent
  on a term's own sum (not what training differentiates) runs the loop once more for the pixel
  gradient. Gradients of inputs that are not differentiated (e.g. the stop-gradient memory of
  L_CAE) are not computed (`symbolic_zeros`). Without differentiation only the losses are
  computed.
* `normalize_pixels`: the pixels are pre-norm embeddings, L2-normalised chunk by chunk
  (`ops.l2_normalize_and_vjp`), the pixel gradient chained through the norm in the loop.
* Top-K without a scatter: `lax.top_k` runs on the chunk's `[C, Q]` ratios of Eq. 8 (XLA's
  TopK; ties go to the lower index, as in the dense formulation). Eq. 8 is increasing in the
  ratio, so these are the entries of the K largest losses, and its logarithm is taken on the
  `[C, K]` selected entries only. The loss sums its `[C, K]` values in the dense formulation's
  order. The gradient is built from the `K` selected entries only: the reverse-mode chain of the
  per-query terms is evaluated on `[C, K]` (with JAX's own derivative rules, so each factor
  equals autodiff's), and the cotangent of the `[C, Q]` similarities is assembled by comparing
  the selected indices with the query iota (one non-zero per column at most), then `@ queries`
  and `.T @ pixels`.

Values and gradients agree with the dense formulation to float32 rounding of sums taken in a
different order (chunks, the `K` factors of `d_pos`); see tests/test_ciae_loss_fast.py.
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from ciae_jax import ops
from ciae_jax.losses import triplet_chunk

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


class Term(NamedTuple):
  """One triplet loss over the kernel's pixels: its queries and per-pixel inputs.

  L_CAE and L_IAE are two terms over the same pixels; the kernel runs them in one loop, so that
  their gradients with respect to the pixels share one `[P, D]` buffer.
  """
  queries: Array  # [Q, D] unit query embeddings
  target: Array  # [P] int32, index of each pixel's own query
  weight: Array  # [P] float32 weight of each pixel; 0 leaves it out
  mask: Optional[Array] = None  # [P, Q] bool, False forces the similarity to 0
  box: Optional[BoxFilter] = None  # the same as a mask, evaluated per chunk
  query_valid: Optional[Array] = None  # [Q] bool, False for padding queries


def _chunk_loop(cfg: triplet_chunk.Config, pixel_emb, terms, scales, *, grad_pixels: bool,
                grad_queries, per_pixel_sums):
  """Loss sums of every term, and what their gradients need, in one loop over pixel chunks.

  Returns `(losses, per_pixel, dp, dq)`: `losses` a tuple of `[]` sums, one per term;
  `per_pixel` per term the `[P]` top-K sums (where `per_pixel_sums[t]`, else None); `dp` the
  gradient of `sum_t scales[t] * loss_t` with respect to `pixel_emb` (`[P, D]`, if
  `grad_pixels`, else None); `dq` per term the gradient of `loss_t` with respect to its queries
  (where `grad_queries[t]`, else None).

  The loop slices the per-pixel inputs in place (`dynamic_slice`) and writes the per-pixel
  outputs in place (`dynamic_update_slice` into the loop carry): no padded or transposed copy
  of the `[P, D]` inputs (under `vmap` a stacked `scan` input would be one). When P is not a
  multiple of the chunk, the last chunk is shifted back to end at P (as `dynamic_slice` clamps
  it); its pixels already done by the previous chunk get weight 0 (adding exactly 0 to the sums)
  and keep their outputs.
  """
  num_pixels, dim = pixel_emb.shape
  chunk = cfg.chunk_size
  num_chunks = -(-num_pixels // chunk)

  def chunk_of(x, start):
    return None if x is None else jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0)

  def term_of_chunk(term, start, fresh):
    box = None if term.box is None else (
        chunk_of(term.box.centre_x, start), chunk_of(term.box.centre_y, start), term.box.bounds,
        chunk_of(term.box.own_exempt, start))
    return (chunk_of(term.target, start), jnp.where(fresh, chunk_of(term.weight, start), 0.0),
            chunk_of(term.mask, start), box)  # [C], [C], [C, Q] or None, per-chunk box

  def body(i, carry):
    losses, per_pixel_all, dp_all, dq_all = carry
    start, fresh = ops.chunk_window(i, chunk, num_pixels)  # [], [C]
    keep_fresh = lambda new, old_all: jnp.where(
        fresh.reshape((chunk,) + (1,) * (new.ndim - 1)), new, chunk_of(old_all, start))
    p = chunk_of(pixel_emb, start)  # [C, D]
    if cfg.normalize_pixels:
      p, normalize_vjp = ops.l2_normalize_and_vjp(p)  # [C, D] unit
    losses, per_pixel_all, dq_all = list(losses), list(per_pixel_all), list(dq_all)
    dp = None
    for t, term in enumerate(terms):
      target, w, mask, box = term_of_chunk(term, start, fresh)
      key, x, keep, counted = triplet_chunk.chunk_terms(
          cfg, p, term.queries, target, mask, box, term.query_valid)
      _, index = jax.lax.top_k(key, min(cfg.top_k, term.queries.shape[0]))  # [C, K]
      # Keeps XLA from merging the column slices of `index` below into top_k's own slice, which
      # stops it from using its TopK call (a full sort instead, ~20x slower on CPU).
      index = jax.lax.optimization_barrier(index)  # [C, K]
      top = triplet_chunk.selected_values(cfg, x, counted, index)  # [C, K] descending
      per_pixel = jnp.sum(top, axis=1)  # [C] summed as the dense formulation does
      losses[t] = losses[t] + jnp.sum(w * per_pixel)  # []
      if per_pixel_sums[t]:
        per_pixel_all[t] = jax.lax.dynamic_update_slice_in_dim(
            per_pixel_all[t], keep_fresh(per_pixel, per_pixel_all[t]), start, axis=0)  # [P]
      if grad_pixels or grad_queries[t]:
        ct_similarity = triplet_chunk.similarity_cotangent(
            cfg, w, target, x, keep, counted, index)  # [C, Q]
        if grad_pixels:
          dp_term = scales[t] * (ct_similarity @ term.queries)  # [C, D]
          dp = dp_term if dp is None else dp + dp_term  # [C, D]
        if grad_queries[t]:
          # [Q, D] (faster on CPU than ct_similarity.T @ p)
          dq_all[t] = dq_all[t] + (p.T @ ct_similarity).T
    if grad_pixels:
      if cfg.normalize_pixels:
        dp = normalize_vjp(dp)  # [C, D] with respect to the chunk before its normalisation
      dp_all = jax.lax.dynamic_update_slice_in_dim(
          dp_all, keep_fresh(dp, dp_all), start, axis=0)  # [P, D]
    return tuple(losses), tuple(per_pixel_all), dp_all, tuple(dq_all)

  zero = ops.varying_zero((pixel_emb, terms, scales))  # []
  zeros = lambda shape: jnp.zeros(shape, jnp.float32) + zero
  # The per-pixel outputs are written in full before they are read, so their initial values do
  # not matter: derived from `pixel_emb` (0 unless it is not finite), XLA allocates them when
  # the embedding exists, not with the constants at the start of the step (a [P, D] buffer held
  # through the network's backward pass: 0.26 GiB of the plan at 2 x 800 x 1344).
  late = pixel_emb[0, 0] * 0.0  # []
  overwritten = lambda shape: jnp.broadcast_to(late, shape) + zero
  init = (tuple(zeros(()) for _ in terms),
          tuple(overwritten((num_pixels,)) if keep else None for keep in per_pixel_sums),
          overwritten((num_pixels, dim)) if grad_pixels else None,
          tuple(zeros(term.queries.shape) if grad else None
                for term, grad in zip(terms, grad_queries)))
  return jax.lax.fori_loop(0, num_chunks, body, init)


def _combine(scales, losses):
  """`sum_t scales[t] * losses[t]`, in the order of the terms."""
  total = scales[0] * losses[0]
  for scale, loss in zip(scales[1:], losses[1:]):
    total = total + scale * loss
  return total


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _loss_sums(cfg, scales, pixel_emb, terms):
  num = len(terms)
  losses, _, _, _ = _chunk_loop(cfg, pixel_emb, terms, scales, grad_pixels=False,
                                grad_queries=(False,) * num, per_pixel_sums=(False,) * num)
  return (*losses, _combine(scales, losses))


def _loss_sums_fwd(cfg, scales, pixel_emb, terms):
  # symbolic_zeros=True: every array argument arrives as CustomVJPPrimal(value, perturbed).
  value = lambda tree: jax.tree.map(lambda a: a.value, tree)
  grad_queries = tuple(term.queries.perturbed for term in terms)
  per_pixel_sums = tuple(term.weight.perturbed for term in terms)
  pixel_value, term_values = pixel_emb.value, value(terms)
  # The forward pass already computes the gradient of the combined sum (the one a training step
  # differentiates), so that no [P, Q] residual is kept.
  losses, per_pixel, dp, dq = _chunk_loop(
      cfg, pixel_value, term_values, scales, grad_pixels=pixel_emb.perturbed,
      grad_queries=grad_queries, per_pixel_sums=per_pixel_sums)
  residuals = (dp, dq, per_pixel, pixel_value, term_values)
  return (*losses, _combine(scales, losses)), residuals


def _loss_sums_bwd(cfg, scales, residuals, cotangents):
  dp, dq, per_pixel, pixel_emb, terms = residuals
  is_zero = lambda ct: isinstance(ct, jax.custom_derivatives.SymbolicZero)
  *ct_terms, ct_total = cotangents
  no_grad = (None, tuple(Term(*(None,) * len(Term._fields)) for _ in terms))
  if all(is_zero(ct) for ct in cotangents):
    return no_grad
  # Each term's loss reaches the outputs through its own sum and through the combined one.
  ct_total = 0.0 if is_zero(ct_total) else ct_total
  effective = tuple((0.0 if is_zero(ct) else ct) + ct_total * scale
                    for ct, scale in zip(ct_terms, scales))  # each []
  if dp is None:
    d_pixels = None
  elif all(is_zero(ct) for ct in ct_terms):
    d_pixels = ct_total * dp  # [P, D] what the forward pass computed
  else:
    # A term's own sum is differentiated (not what a training step does): its pixel gradient
    # was not kept apart in the forward pass, so the loop runs again with these weights.
    num = len(terms)
    _, _, d_pixels, _ = _chunk_loop(cfg, pixel_emb, terms, effective, grad_pixels=True,
                                    grad_queries=(False,) * num, per_pixel_sums=(False,) * num)
  scale = lambda ct, g: None if g is None else ct * g
  d_terms = tuple(Term(queries=scale(ct, g_q), target=None, weight=scale(ct, g_w))
                  for ct, g_q, g_w in zip(effective, dq, per_pixel))
  return d_pixels, d_terms


_loss_sums.defvjp(_loss_sums_fwd, _loss_sums_bwd, symbolic_zeros=True)


def _prepared_term(term: Term, num_pixels: int, dim: int) -> Term:
  """The term's arrays in the kernel's dtypes, their shapes checked."""
  queries = jnp.asarray(term.queries, jnp.float32)  # [Q, D]
  if queries.ndim != 2 or queries.shape[1] != dim:
    raise ValueError(f"queries shape {queries.shape} does not match pixel dim {dim}")
  box = term.box
  if box is not None:
    box = BoxFilter(jnp.asarray(box.centre_x, jnp.float32), jnp.asarray(box.centre_y, jnp.float32),
                    jnp.asarray(box.bounds, jnp.float32), jnp.asarray(box.own_exempt, bool))
  target = jnp.asarray(term.target, jnp.int32)  # [P]
  weight = jnp.asarray(term.weight, jnp.float32)  # [P]
  for name, array in (("target", target), ("weight", weight)):
    if array.shape != (num_pixels,):
      raise ValueError(f"{name} shape {array.shape} does not match {num_pixels} pixels")
  return Term(queries, target, weight,
              None if term.mask is None else jnp.asarray(term.mask, bool),  # [P, Q]
              box, None if term.query_valid is None else jnp.asarray(term.query_valid, bool))


def triplet_loss_sums(pixel_emb: Array,
                      terms,
                      scales,
                      *,
                      margin: float = 0.15,
                      top_k: int = 5,
                      include_own: bool = False,
                      eps: float = 1e-6,
                      chunk_size: Optional[int] = None,
                      normalize_pixels: bool = False):
  """`(loss_1, ..., loss_T, sum_t scales[t] * loss_t)` of the `Term`s over the same pixels.

  Each `loss_t = sum_i w_ti * (sum of the top_k largest l of pixel i against term t's queries)`,
  float32, chunked (module docstring); all terms in one loop over the pixels. Differentiable
  with respect to `pixel_emb` and each term's `queries` and `weight`. Differentiating the last
  output (the combined sum, as training does) uses the gradients the forward pass computed;
  differentiating a term's own sum runs the loop once more for the pixel gradient.

  Args:
    pixel_emb: `[P, D]` unit pixel embeddings (with `normalize_pixels`: before the norm).
    terms: a sequence of `Term`s.
    scales: one Python float per term, the weights of the combined sum.
    margin, top_k, include_own, eps: as in `ciae.embedding_triplet_loss`.
    chunk_size: pixels per chunk (a static int >= 1, capped at P; None: `default_chunk_size()`);
      results depend on it only through float32 rounding.
    normalize_pixels: `pixel_emb` are embeddings before the L2 norm: each chunk is normalised
      by `ops.l2_normalize` in the loop, and the gradient is the one with respect to them. The
      values are those of normalising first; no normalised `[P, D]` copy exists.
  """
  terms, scales = tuple(terms), tuple(float(s) for s in scales)
  if len(terms) != len(scales) or not terms:
    raise ValueError(f"{len(terms)} terms and {len(scales)} scales: need one scale per term, "
                     "and at least one term")
  chunk_size = default_chunk_size() if chunk_size is None else chunk_size
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  pixel_emb = jnp.asarray(pixel_emb, jnp.float32)  # [P, D]
  num_pixels, dim = pixel_emb.shape
  terms = tuple(_prepared_term(term, num_pixels, dim) for term in terms)
  # Terms with nothing to sum get a 0 that depends on their inputs; the rest run in the kernel.
  active = [t for t, term in enumerate(terms) if num_pixels and term.queries.shape[0]]
  losses = [None if t in active else jnp.sum(pixel_emb) * 0.0 + jnp.sum(term.queries) * 0.0
            for t, term in enumerate(terms)]
  if not active:
    return (*losses, _combine(scales, losses))
  cfg = triplet_chunk.Config(
      margin=float(margin), top_k=int(top_k), include_own=bool(include_own), eps=float(eps),
      chunk_size=int(min(chunk_size, num_pixels)), normalize_pixels=bool(normalize_pixels))
  *kernel_losses, total = _loss_sums(
      cfg, tuple(scales[t] for t in active), pixel_emb, tuple(terms[t] for t in active))
  for t, loss in zip(active, kernel_losses):
    losses[t] = loss
  for t in sorted(set(range(len(terms))) - set(active)):
    total = total + scales[t] * losses[t]
  return (*losses, total)


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

  One `Term` of `triplet_loss_sums`. Args:
    pixel_emb: `[P, D]` unit pixel embeddings.
    queries: `[Q, D]` unit query embeddings.
    target: `[P]` int, index of each pixel's own query.
    pixel_weight: `[P]` float weight of each pixel; 0 leaves a pixel out.
    query_mask: optional dense `[P, Q]` bool (False forces the similarity to 0); chunked too.
    box_filter: optional `BoxFilter`, the same as a mask but computed per chunk (with both, a
      similarity is kept where both keep it).
    query_valid: `[Q]` bool, False for padding queries, which never count; None = all valid.
    margin, top_k, include_own, eps, chunk_size: as in `triplet_loss_sums`.

  Differentiable with respect to `pixel_emb`, `queries` and `pixel_weight`.
  """
  term = Term(queries, target, pixel_weight, query_mask, box_filter, query_valid)
  # The combined sum of one term with scale 1 is the term's sum (1.0 * x == x), and takes the
  # gradients the forward pass computed.
  return triplet_loss_sums(pixel_emb, (term,), (1.0,), margin=margin, top_k=top_k,
                           include_own=include_own, eps=eps, chunk_size=chunk_size)[-1]
