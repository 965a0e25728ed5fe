"""Weighted sums of a per-pixel loss over all pixels, memory-bounded, gradients by autodiff.

`loss_sums(pixels, terms, scales, loss)` returns `(sum_1, ..., sum_T, total)` with
`sum_t = sum_i w_ti * loss(similarity_t[i], own_t[i], counted_t[i])` for each `Term` t (its
queries, own queries, pixel weights, box filter, padding queries) and
`total = sum_t scales[t] * sum_t`; `loss` is any per-pixel function of
`ciae_jax.losses.pixel_losses` (bound by `registry.bind`). `dense_loss_sums` is the same with the
whole `[P, Q]` at once and plain autodiff: the reference every variant is tested against.

How `loss_sums` stays memory-bounded with any function:
* Pixels go in chunks of `chunk_size` through one `fori_loop` (inputs sliced in place; when P is
  not a multiple of the chunk, the last chunk is shifted back to end at P and its pixels that the
  previous chunk did get weight 0). No `[P, Q]` array exists, only `[C, Q]` ones per chunk.
* One `jax.custom_vjp` around the loop: its forward pass takes, chunk by chunk,
  `jax.value_and_grad` of the chunk's weighted total (JAX differentiates the variant; nothing is
  derived by hand), writes the pixel gradient into a `[P, D]` buffer and adds the query
  gradients; the backward pass scales them by the cotangent. Autodiff through the loop itself
  would keep every chunk's `[C, Q]` residuals (`[P, Q]` in all); `jax.checkpoint` would run the
  loop twice. Gradients of inputs that are not differentiated (the stop-gradient memory of L_CAE)
  are not computed (`symbolic_zeros`). A cotangent on a term's own sum (not what training
  differentiates) runs the loop once more for the pixel gradient.
* `normalize_pixels`: the pixels are pre-norm embeddings, L2-normalised chunk by chunk inside the
  differentiated function (no normalised `[P, D]` copy).
"""
import functools
from typing import Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from ciae_jax import loops
from ciae_jax import ops

Array = jax.Array
PixelLossFn = Callable[[Array, Array, Array], Array]


class BoxFilter(NamedTuple):
  """The box filter of Eq. 11, evaluated per chunk (never as a `[P, Q]` mask).

  The similarity of pixel i to query k is kept iff the pixel centre lies in k's closed box
  `x_lo <= cx <= x_hi and y_lo <= cy <= y_hi`, or k is the pixel's own query and
  `own_exempt[i]`; otherwise it is 0. Unfiltered queries have bounds `(-inf, inf)`.
  """
  centre_x: Array  # [P] float32
  centre_y: Array  # [P] float32
  bounds: Array  # [Q, 4] float32: x_lo, x_hi, y_lo, y_hi
  own_exempt: Array  # [P] bool


class Term(NamedTuple):
  """One loss over the pixels: its queries and per-pixel inputs (L_CAE's or L_IAE's)."""
  queries: Array  # [Q, D] unit query embeddings
  own: Array  # [P] int32 in [0, Q), each pixel's own query (any value where the weight is 0)
  weight: Array  # [P] float32 weight of each pixel; 0 leaves it out
  box: Optional[BoxFilter] = None
  query_valid: Optional[Array] = None  # [Q] bool, False for padding query slots


def pixel_losses(loss: PixelLossFn, pixels: Array, queries: Array, own: Array,
                 box: Optional[tuple] = None, query_valid: Optional[Array] = None) -> Array:
  """`[C]` losses of unit `pixels` `[C, D]` against `queries` `[Q, D]` (the interface's inputs).

  `box`: `(centre_x [C], centre_y [C], bounds [Q, 4], own_exempt [C])` or None.
  """
  num_queries = queries.shape[0]
  own = jnp.clip(own, 0, num_queries - 1)  # [C] (weight-0 pixels may carry anything)
  # Full float32 precision: GPUs would otherwise take TF32 (10-bit mantissas) for these cheap
  # D-dimensional dots, and cosine similarities near the margin need more; on CPU a no-op.
  similarity = jnp.dot(pixels, queries.T, precision=jax.lax.Precision.HIGHEST)  # [C, Q]
  is_own = own[:, None] == jnp.arange(num_queries, dtype=jnp.int32)[None, :]  # [C, Q]
  if box is not None:
    centre_x, centre_y, bounds, own_exempt = box
    inside = ((bounds[None, :, 0] <= centre_x[:, None]) & (centre_x[:, None] <= bounds[None, :, 1])
              & (bounds[None, :, 2] <= centre_y[:, None])
              & (centre_y[:, None] <= bounds[None, :, 3]))  # [C, Q]
    similarity = jnp.where(inside | (is_own & own_exempt[:, None]), similarity, 0.0)  # [C, Q]
  counted = (jnp.ones_like(is_own) if query_valid is None
             else query_valid[None, :] | is_own)  # [C, Q]
  return loss(similarity, own, counted)  # [C]


def _weighted_sum(weight: Array, per_pixel: Array) -> Array:
  """`sum_i w_i l_i`; pixels of weight 0 add exactly 0 whatever their loss."""
  return jnp.sum(jnp.where(weight != 0, weight * per_pixel, 0.0))  # []


def _combine(scales, sums):
  """`sum_t scales[t] * sums[t]`, in the order of the terms."""
  total = scales[0] * sums[0]
  for scale, value in zip(scales[1:], sums[1:]):
    total = total + scale * value
  return total


class _Config(NamedTuple):
  loss: PixelLossFn
  chunk_size: int
  normalize_pixels: bool


def _chunk_loop(cfg: _Config, pixels, terms, scales, *, grad_pixels: bool, grad_queries,
                per_pixel_sums):
  """Every term's sum and what the gradients need, in one loop over pixel chunks.

  Returns `(sums, per_pixel, dp, dq)`: `sums` one `[]` per term; `per_pixel` per term the `[P]`
  losses (where `per_pixel_sums[t]`, else None); `dp` the gradient of
  `sum_t scales[t] * sum_t` with respect to `pixels` (`[P, D]` if `grad_pixels`, else None); `dq`
  per term the gradient of `sum_t` with respect to its queries (where `grad_queries[t]`).
  """
  num_pixels, dim = pixels.shape
  chunk = cfg.chunk_size
  # The scales of terms whose queries are differentiated (Python floats then: the backward
  # pass's second loop, whose scales are traced, differentiates no queries).
  diff_scales = tuple(float(s) if g else None for s, g in zip(scales, grad_queries))
  chunk_of = lambda x, start: None if x is None else jax.lax.dynamic_slice_in_dim(x, start, chunk)

  def body(i, carry):
    sums, per_pixel_all, dp_all, dq_all = carry
    start, fresh = loops.chunk_window(i, chunk, num_pixels)  # [], [C]
    keep_fresh = lambda new, old_all: jnp.where(
        fresh.reshape((chunk,) + (1,) * (new.ndim - 1)), new, chunk_of(old_all, start))
    inputs = []
    for term in terms:
      box = None if term.box is None else (
          chunk_of(term.box.centre_x, start), chunk_of(term.box.centre_y, start),
          term.box.bounds, chunk_of(term.box.own_exempt, start))
      weight = jnp.where(fresh, chunk_of(term.weight, start), 0.0)  # [C]
      inputs.append((chunk_of(term.own, start), weight, box))

    def chunk_total(p, diff_queries):
      """The chunk's weighted total and, as aux, each term's sum and `[C]` losses."""
      if cfg.normalize_pixels:
        p = ops.l2_normalize(p)  # [C, D] unit
      diff_queries = iter(diff_queries)
      chunk_sums, chunk_losses, total = [], [], 0.0
      for t, (term, (own, weight, box)) in enumerate(zip(terms, inputs)):
        queries = next(diff_queries) if grad_queries[t] else term.queries  # [Q, D]
        # A term of scale 0 whose queries are differentiated enters the total with scale 1 and
        # no pixel gradient, so that its query gradient is not lost.
        lost = grad_queries[t] and not diff_scales[t]
        losses = pixel_losses(cfg.loss, jax.lax.stop_gradient(p) if lost else p, queries, own,
                              box, term.query_valid)  # [C]
        chunk_sums.append(_weighted_sum(weight, losses))
        chunk_losses.append(losses)
        total = total + (1.0 if lost else scales[t]) * chunk_sums[-1]
      return total, (chunk_sums, chunk_losses)

    p = chunk_of(pixels, start)  # [C, D]
    diff_queries = tuple(term.queries for term, g in zip(terms, grad_queries) if g)
    if grad_pixels or diff_queries:
      argnums = (0, 1) if grad_pixels else 1
      (_, (chunk_sums, chunk_losses)), grads = jax.value_and_grad(
          chunk_total, argnums=argnums, has_aux=True)(p, diff_queries)
      dp, dq_chunk = grads if grad_pixels else (None, grads)
    else:
      _, (chunk_sums, chunk_losses) = chunk_total(p, diff_queries)
      dp, dq_chunk = None, ()
    sums = tuple(s + c for s, c in zip(sums, chunk_sums))
    per_pixel_all, dq_all, dq_chunk = list(per_pixel_all), list(dq_all), iter(dq_chunk)
    for t in range(len(terms)):
      if per_pixel_sums[t]:
        per_pixel_all[t] = jax.lax.dynamic_update_slice_in_dim(
            per_pixel_all[t], keep_fresh(chunk_losses[t], per_pixel_all[t]), start, axis=0)
      if grad_queries[t]:
        dq_all[t] = dq_all[t] + next(dq_chunk)  # [Q, D] (scales applied by the caller below)
    if grad_pixels:
      dp_all = jax.lax.dynamic_update_slice_in_dim(dp_all, keep_fresh(dp, dp_all), start, axis=0)
    return sums, tuple(per_pixel_all), dp_all, tuple(dq_all)

  zero = loops.varying_zero((pixels, terms))  # []
  zeros = lambda shape: jnp.zeros(shape, jnp.float32) + zero
  # The per-pixel outputs are written in full before they are read, so their initial values do
  # not matter: derived from `pixels` (0 unless it is not finite), XLA allocates them when the
  # embedding exists, not with the constants at the start of the step (a [P, D] buffer held
  # through the network's backward pass: 0.26 GiB of the plan at 2 x 800 x 1344).
  late = pixels[0, 0] * 0.0  # []
  overwritten = lambda shape: jnp.broadcast_to(late, shape) + zero
  init = (tuple(zeros(()) for _ in terms),
          tuple(overwritten((num_pixels,)) if keep else None for keep in per_pixel_sums),
          overwritten((num_pixels, dim)) if grad_pixels else None,
          tuple(zeros(term.queries.shape) if grad else None
                for term, grad in zip(terms, grad_queries)))
  sums, per_pixel, dp, dq = jax.lax.fori_loop(0, -(-num_pixels // chunk), body, init)
  # value_and_grad differentiated the total: undo each term's scale on its queries' gradient.
  dq = tuple(None if g is None else g / (s or 1.0) for g, s in zip(dq, diff_scales))
  return sums, per_pixel, dp, dq


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _loss_sums(cfg, scales, pixels, terms):
  num = len(terms)
  sums, _, _, _ = _chunk_loop(cfg, pixels, terms, scales, grad_pixels=False,
                              grad_queries=(False,) * num, per_pixel_sums=(False,) * num)
  return (*sums, _combine(scales, sums))


def _loss_sums_fwd(cfg, scales, pixels, terms):
  # symbolic_zeros=True: every array argument arrives as CustomVJPPrimal(value, perturbed).
  grad_queries = tuple(term.queries.perturbed for term in terms)
  per_pixel_sums = tuple(term.weight.perturbed for term in terms)
  pixel_value = pixels.value
  term_values = jax.tree.map(lambda a: a.value, terms)
  # The forward pass computes the gradient of the combined total (what a training step
  # differentiates), so that no [P, Q] residual is kept.
  sums, per_pixel, dp, dq = _chunk_loop(
      cfg, pixel_value, term_values, scales, grad_pixels=pixels.perturbed,
      grad_queries=grad_queries, per_pixel_sums=per_pixel_sums)
  return (*sums, _combine(scales, sums)), (dp, dq, per_pixel, pixel_value, term_values)


def _loss_sums_bwd(cfg, scales, residuals, cotangents):
  dp, dq, per_pixel, pixels, terms = residuals
  is_zero = lambda ct: isinstance(ct, jax.custom_derivatives.SymbolicZero)
  *ct_terms, ct_total = cotangents
  if all(is_zero(ct) for ct in cotangents):
    return None, tuple(Term(*(None,) * len(Term._fields)) for _ in terms)
  # Each term's sum reaches the outputs through its own output and through the total.
  ct_total = 0.0 if is_zero(ct_total) else ct_total
  effective = tuple((0.0 if is_zero(ct) else ct) + ct_total * scale
                    for ct, scale in zip(ct_terms, scales))  # each []
  if dp is None:
    d_pixels = None
  elif all(is_zero(ct) for ct in ct_terms):
    d_pixels = ct_total * dp  # [P, D] what the forward pass computed
  else:
    num = len(terms)
    _, _, d_pixels, _ = _chunk_loop(cfg, pixels, terms, effective, grad_pixels=True,
                                    grad_queries=(False,) * num, per_pixel_sums=(False,) * num)
  scale = lambda ct, g: None if g is None else ct * g
  return d_pixels, tuple(Term(queries=scale(ct, g_q), own=None, weight=scale(ct, g_w))
                         for ct, g_q, g_w in zip(effective, dq, per_pixel))


_loss_sums.defvjp(_loss_sums_fwd, _loss_sums_bwd, symbolic_zeros=True)


def _prepared(pixels: Array, terms: Sequence[Term], scales) -> tuple:
  """The inputs in the engine's dtypes, their shapes checked."""
  terms, scales = tuple(terms), tuple(float(s) for s in scales)
  if len(terms) != len(scales) or not terms:
    raise ValueError(f"{len(terms)} terms and {len(scales)} scales: need one scale per term, "
                     "and at least one term")
  pixels = jnp.asarray(pixels, jnp.float32)  # [P, D]
  if pixels.ndim != 2:
    raise ValueError(f"pixels must be [P, D], got shape {pixels.shape}")
  num_pixels, dim = pixels.shape
  prepared = []
  for term in terms:
    queries = jnp.asarray(term.queries, jnp.float32)  # [Q, D]
    if queries.ndim != 2 or queries.shape[1] != dim:
      raise ValueError(f"queries shape {queries.shape} does not match pixel dim {dim}")
    own, weight = jnp.asarray(term.own, jnp.int32), jnp.asarray(term.weight, jnp.float32)
    for name, array in (("own", own), ("weight", weight)):
      if array.shape != (num_pixels,):
        raise ValueError(f"{name} shape {array.shape} does not match {num_pixels} pixels")
    box = term.box
    if box is not None:
      box = BoxFilter(jnp.asarray(box.centre_x, jnp.float32),
                      jnp.asarray(box.centre_y, jnp.float32),
                      jnp.asarray(box.bounds, jnp.float32), jnp.asarray(box.own_exempt, bool))
    valid = None if term.query_valid is None else jnp.asarray(term.query_valid, bool)  # [Q]
    prepared.append(Term(queries, own, weight, box, valid))
  return pixels, tuple(prepared), scales


def _empty_sum(pixels: Array, term: Term) -> Array:
  """0 for a term with no pixel or no query, depending on its inputs (gradients of 0)."""
  return jnp.sum(pixels) * 0.0 + jnp.sum(term.queries) * 0.0 + jnp.sum(term.weight) * 0.0


def loss_sums(pixels: Array, terms: Sequence[Term], scales: Sequence[float],
              loss: PixelLossFn, *, chunk_size: int, normalize_pixels: bool = False) -> tuple:
  """`(sum_1, ..., sum_T, sum_t scales[t] * sum_t)`, chunked (module docstring), float32.

  Args:
    pixels: `[P, D]` unit pixel embeddings (with `normalize_pixels`: before the L2 norm).
    terms: `Term`s over the same pixels (L_CAE's and L_IAE's), run in one loop.
    scales: one Python float per term, the weights of the total.
    loss: a per-pixel loss `(similarity [C, Q], own [C], counted [C, Q]) -> [C]` with its
      parameters bound (`registry.bind`); hashable (it is a static argument).
    chunk_size: pixels per chunk (a static int >= 1, capped at P); results depend on it only
      through float32 rounding.
    normalize_pixels: `pixels` are before the L2 norm: each chunk is normalised in the loop and
      the gradient is the one with respect to them.

  Differentiable with respect to `pixels` and each term's `queries` and `weight`.
  """
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  pixels, terms, scales = _prepared(pixels, terms, scales)
  num_pixels = pixels.shape[0]
  active = [t for t, term in enumerate(terms) if num_pixels and term.queries.shape[0]]
  sums = [None if t in active else _empty_sum(pixels, term) for t, term in enumerate(terms)]
  if not active:
    return (*sums, _combine(scales, sums))
  cfg = _Config(loss, int(min(chunk_size, num_pixels)), bool(normalize_pixels))
  # The total is the custom VJP's own output: its gradient is the one the forward pass took.
  *active_sums, total = _loss_sums(cfg, tuple(scales[t] for t in active), pixels,
                                   tuple(terms[t] for t in active))
  for t, value in zip(active, active_sums):
    sums[t] = value
  for t in sorted(set(range(len(terms))) - set(active)):
    total = total + scales[t] * sums[t]
  return (*sums, total)


def dense_loss_sums(pixels: Array, terms: Sequence[Term], scales: Sequence[float],
                    loss: PixelLossFn, *, chunk_size: Optional[int] = None,
                    normalize_pixels: bool = False) -> tuple:
  """The reference of `loss_sums`: the same sums with the whole `[P, Q]` at once, plain autodiff.

  Same arguments (`chunk_size` is ignored). Holds `[P, Q]` arrays: for tests and small inputs.
  """
  del chunk_size
  pixels, terms, scales = _prepared(pixels, terms, scales)
  if normalize_pixels:
    pixels = ops.l2_normalize(pixels)  # [P, D]
  sums = []
  for term in terms:
    if not (pixels.shape[0] and term.queries.shape[0]):
      sums.append(_empty_sum(pixels, term))
      continue
    losses = pixel_losses(loss, pixels, term.queries, term.own,
                          None if term.box is None else tuple(term.box), term.query_valid)
    sums.append(_weighted_sum(term.weight, losses))  # []
  return (*sums, _combine(scales, sums))
