"""Operations rewritten to hold less memory in the train step, against what they replaced.

* `layers.GroupNorm` (written-out gradient) against `flax.linen.GroupNorm` (autodiff): the same
  parameter tree, the same values, gradients within float32 rounding, and against a float64
  formula of the GroupNorm gradient.
* `ops.segment_sum_chunked` (a loop of in-place scatter-adds) against `jax.ops.segment_sum`:
  bit-identical sums and gradients.

Tolerances: the GroupNorm gradient is a sum of three terms per element (the direct term and the
two through the statistics); the written-out one adds them in another order than autodiff, and
computes `sum(dy * (x - mean))` as `sum(dy * x) - mean * sum(dy)`. Over groups of n elements
each such sum differs by about sqrt(n) roundings of 2^-24 relative to the sum of magnitudes
(Higham, sec. 4.2): ~1e-6 for n <= 10^4 when |mean| is comparable to the spread, hence 1e-5 of
the gradient's scale. Groups of two elements (GroupNorm over 1 x 1 maps) are ill-conditioned for
both: there both are compared with float64 instead.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import ops
from ciae_jax.models import layers

CASES = [  # (shape, groups, dtype, input offset)
    ((2, 7, 9, 64), 32, jnp.float32, 1.0),
    ((2, 3, 3, 8), 8, jnp.float32, -2.0),  # one channel per group
    ((1, 16, 12, 32), 4, jnp.float32, 5.0),  # mean 5x the spread
    ((3, 5, 4, 12), 4, jnp.bfloat16, 1.0),
]


def _norms_and_inputs(shape, groups, dtype, offset):
  kx, kw, kp = jax.random.split(jax.random.PRNGKey(sum(shape) + groups), 3)
  x = (jax.random.normal(kx, shape) + offset).astype(dtype)
  weight = jax.random.normal(kw, shape)  # the loss sum(y * weight)
  ref = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
  ours = layers.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=dtype)
  variables = ref.init(kp, x)
  # Parameters away from their init (ones, zeros), so that their gradients are exercised.
  variables = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(kp, a.shape), variables)
  return ref, ours, variables, x, weight


def _value_and_grads(module, variables, x, weight):
  loss = lambda v, x: jnp.sum(module.apply(v, x).astype(jnp.float32) * weight)
  return jax.device_get(jax.jit(lambda v, x: (module.apply(v, x), jax.grad(
      loss, argnums=(0, 1))(v, x)))(variables, x))


@pytest.mark.parametrize("case", range(len(CASES)))
def test_group_norm_matches_flax(case):
  shape, groups, dtype, offset = CASES[case]
  ref, ours, variables, x, weight = _norms_and_inputs(shape, groups, dtype, offset)
  assert (jax.tree.structure(ours.init(jax.random.PRNGKey(0), x))
          == jax.tree.structure(ref.init(jax.random.PRNGKey(0), x)))
  (y_ref, grads_ref), (y, grads) = (_value_and_grads(m, variables, x, weight)
                                    for m in (ref, ours))
  assert y.dtype == y_ref.dtype == dtype
  # The same float32 operations: equal but for a possible last-bit difference of a fused
  # multiply-add (XLA may contract differently in the two programs).
  np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32),
                             rtol=1e-6, atol=1e-6)
  # bfloat16: the input gradient is rounded to bfloat16 (8 bits, 2^-8 = 0.4% per element).
  rtol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  names = ["d bias", "d scale", "d x"]
  for name, g, g_ref in zip(names, jax.tree.leaves(grads), jax.tree.leaves(grads_ref)):
    g, g_ref = np.asarray(g, np.float64), np.asarray(g_ref, np.float64)
    scale = np.abs(g_ref).max()
    assert scale > 0, name
    np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * scale, err_msg=name)


def _group_norm_grad_float64(x, scale, dy, groups, eps):
  """d/dx of sum(dy * GroupNorm(x)) in float64 (the textbook formula, no fast variance)."""
  x, dy = np.asarray(x, np.float64), np.asarray(dy, np.float64)
  batch, channels = x.shape[0], x.shape[-1]
  xg = x.reshape(batch, -1, groups, channels // groups)  # [B, HW, G, c]
  mean = xg.mean(axis=(1, 3), keepdims=True)
  inv_std = 1.0 / np.sqrt(xg.var(axis=(1, 3), keepdims=True) + eps)
  x_hat = (xg - mean) * inv_std
  d_hat = (dy * np.asarray(scale, np.float64)).reshape(xg.shape)
  dx = inv_std * (d_hat - d_hat.mean(axis=(1, 3), keepdims=True)
                  - x_hat * (d_hat * x_hat).mean(axis=(1, 3), keepdims=True))
  return dx.reshape(x.shape)


@pytest.mark.parametrize("shape, groups", [((2, 6, 5, 32), 8), ((2, 1, 1, 16), 8)])
def test_group_norm_gradient_matches_float64(shape, groups):
  ref, ours, variables, x, weight = _norms_and_inputs(shape, groups, jnp.float32, 1.0)
  scale = variables["params"]["scale"]
  want = _group_norm_grad_float64(x, scale, weight, groups, 1e-5)
  errors = {}
  for name, module in (("flax", ref), ("ours", ours)):
    got = np.asarray(_value_and_grads(module, variables, x, weight)[1][1], np.float64)
    errors[name] = np.abs(got - want).max() / np.abs(want).max()
  if shape[1] * shape[2] * shape[3] // groups >= 8:
    assert errors["ours"] < 1e-5, errors
  # Two elements per group: both float32 gradients are far from float64 (cancellation in the
  # variance); ours is no further from it than autodiff's.
  assert errors["ours"] <= 2 * errors["flax"] + 1e-6, errors


@pytest.mark.parametrize("rows, chunk", [(1000, 64), (1000, 1000), (1000, 4096), (999, 100),
                                         (7, 3), (1, 16)])
def test_segment_sum_chunked_is_bit_identical(rows, chunk):
  rng = np.random.default_rng(rows + chunk)
  data = jnp.asarray(rng.normal(size=(rows, 5)).astype(np.float32) * 100)
  ids = rng.integers(-2, 14, rows).astype(np.int32)  # -2, -1, 12, 13: out of range, dropped
  cotangent = jnp.asarray(rng.normal(size=(12, 5)).astype(np.float32))

  def run(fn):
    sums, vjp = jax.vjp(lambda d: fn(d, jnp.asarray(ids)), data)
    return jax.device_get((sums, vjp(cotangent)[0]))

  got = jax.jit(lambda: run(lambda d, i: ops.segment_sum_chunked(d, i, 12, chunk)))()
  want = jax.jit(lambda: run(lambda d, i: jax.ops.segment_sum(d, i, num_segments=12)))()
  np.testing.assert_array_equal(got[0], want[0])  # the same additions in the same order
  np.testing.assert_array_equal(got[1], want[1])  # a gather of the cotangent, 0 where dropped
  dropped = (ids < 0) | (ids >= 12)
  assert not np.any(got[1][dropped]) and np.all(got[1][~dropped] != 0)


def test_segment_sum_chunked_under_vmap_and_empty():
  rng = np.random.default_rng(0)
  data = jnp.asarray(rng.normal(size=(3, 500, 4)).astype(np.float32))
  ids = jnp.asarray(rng.integers(0, 9, (3, 500)).astype(np.int32))
  got = jax.vmap(lambda d, i: ops.segment_sum_chunked(d, i, 9, 64))(data, ids)
  want = jax.vmap(lambda d, i: jax.ops.segment_sum(d, i, num_segments=9))(data, ids)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  empty = ops.segment_sum_chunked(jnp.zeros((0, 4)), jnp.zeros((0,), jnp.int32), 3)
  np.testing.assert_array_equal(np.asarray(empty), np.zeros((3, 4)))
