"""Per-pixel embedding losses: what one pixel's loss is against the queries of L_CAE or L_IAE.

A variant is a pure function of one chunk of C pixels against the Q queries:

    fn(similarity, own, counted, **params) -> [C] float32 per-pixel losses

* `similarity` `[C, Q]` float32: cosine `p_i . q_k` of unit embeddings, with the box filter of
  Eq. 11 already applied (0 outside an instance's expanded box, never for the pixel's own
  instance);
* `own` `[C]` int32 in `[0, Q)`: each pixel's own query (its class's memory row in L_CAE, its
  stuff memory or its instance in L_IAE);
* `counted` `[C, Q]` bool: the queries that exist for that pixel (False for padding query slots;
  the own query is always True);
* `params`: the variant's own hyper-parameters, keyword-only with defaults (set from the config
  as `--config.loss.params.NAME=VALUE`).

The library does the rest once (`ciae_jax.losses.ciae`, `ciae_jax.losses.engine`): pixel weights
(void, crowd and padding pixels 0, thing pixels `thing_weight` in L_IAE), the weighted sums,
normalisation by the global valid-pixel count, L_CAE + alpha L_IAE (Eq. 10-12), chunking and the
gradients (autodiff of these functions). A function must be traceable by JAX (jnp / lax only, no
Python branch on array values) and give finite values and gradients for any similarity in
[-1, 1], also when only the own query is counted.

`REGISTRY` maps the names of `--config.loss.kind` to the shipped variants;
`ciae_jax.losses.registry` resolves a name or `module:function`.
"""
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from ciae_jax import ops

Array = jax.Array


def _own_mask(own: Array, num_queries: int) -> Array:
  """`[C, Q]` bool: query k is pixel i's own."""
  return own[:, None] == jnp.arange(num_queries, dtype=jnp.int32)[None, :]  # [C, Q]


def triplet_arguments(similarity: Array, own: Array, counted: Array, *, margin: float,
                      include_own: bool) -> tuple[Array, Array]:
  """The hinge argument `x = d_pos - d_neg + margin` of Eq. 7 and the queries it counts.

  `d = 1 - similarity` (Eq. 5), `d_pos` the distance to the own query and `d_neg = d` for every
  other query, 0 for the own one (Eq. 6: the own query counts with `x = d_pos + margin`, a pull
  that is always among the largest; `include_own=False` leaves it out). Returns `(x, counted)`,
  each `[C, Q]`.
  """
  is_own = _own_mask(own, similarity.shape[1])  # [C, Q]
  distance = 1.0 - similarity  # [C, Q]
  d_pos = jnp.sum(jnp.where(is_own, distance, 0.0), axis=1)  # [C]
  d_neg = jnp.where(is_own, 0.0, distance)  # [C, Q]
  x = d_pos[:, None] - d_neg + margin  # [C, Q]
  return x, (counted if include_own else counted & ~is_own)


def top_k_sum(key: Array, value_fn: Callable[[Array], Array], top_k: int) -> Array:
  """`[C]` sums of `value_fn(index)` over the `top_k` largest `key` entries of each row.

  `key` `[C, Q]` orders the entries (no gradient flows through the selection); `value_fn` maps
  the `[C, K]` selected indices to their `[C, K]` values (computed on `K` columns only), which are
  summed in descending order of the key. Ties go to the lower index (`lax.top_k`).
  """
  _, index = ops.top_k(jax.lax.stop_gradient(key), min(top_k, key.shape[1]))  # [C, K]
  return jnp.sum(value_fn(index), axis=1)  # [C]


def _take(a: Array, index: Array) -> Array:
  """`a[c, index[c, j]]`: `[C, Q]`, `[C, K]` -> `[C, K]`."""
  return jnp.take_along_axis(a, index, axis=1, mode="promise_in_bounds")


def ciae(similarity: Array, own: Array, counted: Array, *, margin: float = 0.15,
         top_k: int = 5, include_own: bool = True, eps: float = 1e-6) -> Array:
  """The paper's loss (Eq. 5-9): the `top_k` largest log-hinge terms of the pixel, summed.

  `l'_k = max(d_pos - d_neg_k + margin, 0)` (Eq. 7), `l_k = -log(1 - l'_k / (2 + margin))`
  (Eq. 8; the ratio capped at `1 - eps`, so `l_k <= -log(eps)`), and the sum of the `top_k`
  largest `l_k` over the counted queries (Eq. 9, `tau_K` read as top-K per pixel). Eq. 8 is
  increasing in the ratio, so the top K are selected on the ratio and the logarithm is taken on
  the K selected entries only. margin: Table IX; `include_own`: Eq. 6's own-query term.
  """
  if margin < 0 or top_k < 1 or not 0 < eps < 1:
    raise ValueError(f"ciae loss: need margin >= 0, top_k >= 1, 0 < eps < 1; got margin="
                     f"{margin}, top_k={top_k}, eps={eps}")
  x, counted = triplet_arguments(similarity, own, counted, margin=margin,
                                 include_own=include_own)
  ratio = jnp.minimum(jnp.maximum(x, 0.0) / (2.0 + margin), 1.0 - eps)  # [C, Q]
  key = jnp.where(counted, ratio, 0.0)  # [C, Q] zeros never change a top-K of values >= 0
  values = lambda index: jnp.where(_take(counted, index), -jnp.log1p(-_take(ratio, index)), 0.0)
  return top_k_sum(key, values, top_k)  # [C]


def hinge(similarity: Array, own: Array, counted: Array, *, margin: float = 0.15,
          top_k: int = 5, include_own: bool = True) -> Array:
  """Plain hinge triplet: the `top_k` largest `max(d_pos - d_neg_k + margin, 0)` (Eq. 7), summed.

  The paper's loss without Eq. 8's logarithm (the triplet loss of FaceNet, Schroff et al.,
  CVPR 2015, Eq. 1, with cosine distances and the hardest `top_k` negatives of each pixel).
  """
  if margin < 0 or top_k < 1:
    raise ValueError(f"hinge loss: need margin >= 0, top_k >= 1; got margin={margin}, "
                     f"top_k={top_k}")
  x, counted = triplet_arguments(similarity, own, counted, margin=margin,
                                 include_own=include_own)
  key = jnp.where(counted, jnp.maximum(x, 0.0), 0.0)  # [C, Q]
  values = lambda index: jnp.where(_take(counted, index), jnp.maximum(_take(x, index), 0.0), 0.0)
  return top_k_sum(key, values, top_k)  # [C]


def mean_negatives(similarity: Array, own: Array, counted: Array, *, margin: float = 0.15,
                   include_own: bool = True, eps: float = 1e-6) -> Array:
  """The paper's per-query terms `l_k` (Eq. 7-8) averaged over every counted query, not the top K.

  `sum_k l_k / max(n, 1)` over the `n` queries the paper's top-K would choose from (with
  `include_own`, the own query's `d_pos + margin` term is one of them).
  """
  if margin < 0 or not 0 < eps < 1:
    raise ValueError(f"mean_negatives loss: need margin >= 0, 0 < eps < 1; got margin="
                     f"{margin}, eps={eps}")
  x, counted = triplet_arguments(similarity, own, counted, margin=margin,
                                 include_own=include_own)
  ratio = jnp.minimum(jnp.maximum(x, 0.0) / (2.0 + margin), 1.0 - eps)  # [C, Q]
  per_query = jnp.where(counted, -jnp.log1p(-ratio), 0.0)  # [C, Q]
  count = jnp.sum(counted.astype(jnp.float32), axis=1)  # [C]
  return jnp.sum(per_query, axis=1) / jnp.maximum(count, 1.0)  # [C]


def infonce(similarity: Array, own: Array, counted: Array, *,
            temperature: float = 0.1) -> Array:
  """InfoNCE: softmax cross-entropy over the counted queries, the own query as the target.

  `l = -log(exp(s_own / t) / sum_{k counted} exp(s_k / t))` (Oord et al., "Representation
  Learning with Contrastive Predictive Coding", 2018, Eq. 4; the temperature as in MoCo / SimCLR).
  0 when the own query is the only one counted.
  """
  if temperature <= 0:
    raise ValueError(f"infonce loss: need temperature > 0, got {temperature}")
  logits = similarity / temperature  # [C, Q]
  is_own = _own_mask(own, similarity.shape[1])  # [C, Q]
  # The own query is always counted, so every row has a finite entry.
  log_norm = jax.nn.logsumexp(jnp.where(counted, logits, -jnp.inf), axis=1)  # [C]
  return log_norm - jnp.sum(jnp.where(is_own, logits, 0.0), axis=1)  # [C]


def multi_similarity(similarity: Array, own: Array, counted: Array, *, scale_pos: float = 2.0,
                     scale_neg: float = 50.0, threshold: float = 0.5) -> Array:
  """Multi-Similarity loss L_MS (Wang et al., CVPR 2019), the own query the only positive.

  `l = 1/a log(1 + exp(-a (s_own - lambda))) + 1/b log(1 + sum_{k != own, counted}
  exp(b (s_k - lambda)))` with `a = scale_pos`, `b = scale_neg`, `lambda = threshold` (the
  defaults of the authors' code); no pair mining (one positive per pixel).
  """
  if scale_pos <= 0 or scale_neg <= 0:
    raise ValueError(f"multi_similarity loss: need scale_pos, scale_neg > 0; got {scale_pos}, "
                     f"{scale_neg}")
  is_own = _own_mask(own, similarity.shape[1])  # [C, Q]
  s_own = jnp.sum(jnp.where(is_own, similarity, 0.0), axis=1)  # [C]
  positive = jax.nn.softplus(-scale_pos * (s_own - threshold)) / scale_pos  # [C]
  negatives = jnp.where(counted & ~is_own, scale_neg * (similarity - threshold), -jnp.inf)
  # log(1 + sum exp) as a logsumexp with a 0 entry: finite for any similarity.
  with_one = jnp.concatenate([jnp.zeros_like(s_own)[:, None], negatives], axis=1)  # [C, Q + 1]
  return positive + jax.nn.logsumexp(with_one, axis=1) / scale_neg  # [C]


REGISTRY: Dict[str, Callable[..., Array]] = {
    "ciae": ciae,
    "hinge": hinge,
    "mean_negatives": mean_negatives,
    "infonce": infonce,
    "multi_similarity": multi_similarity,
}
