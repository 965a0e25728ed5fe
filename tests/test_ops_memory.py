"""Operations rewritten to hold less memory in the train step, against what they replaced.

* `layers.GroupNorm` (written-out gradient) against `flax.linen.GroupNorm` (autodiff): the same
  parameter tree, the same values, gradients within float32 rounding, and against a float64
  formula of the GroupNorm gradient.
* The plain paths of `ops.group_norm` and `ops.l2_normalize` (autodiff, what programs for GPUs
  take) against the CPU fast paths of `fast_paths.norms` (written-out gradients).
(The segment sums: tests/test_segment_sums.py.)

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
from ciae_jax.fast_paths import norms
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


@pytest.mark.parametrize("case", range(len(CASES)))
def test_group_norm_plain_path_is_flax_and_agrees_with_the_fast_path(case):
  shape, groups, dtype, offset = CASES[case]
  ref, _, variables, x, weight = _norms_and_inputs(shape, groups, dtype, offset)
  params = variables["params"]
  ref_fn = lambda x, s, b: ref.apply({"params": {"scale": s, "bias": b}}, x)
  results = {}
  for name, fn in (("flax", ref_fn), ("plain", lambda *a: ops._group_norm(
      *a, groups, 1e-5, dtype)), ("fast", lambda *a: norms.group_norm(*a, groups, 1e-5, dtype))):
    loss = lambda x, s, b, fn=fn: jnp.sum(fn(x, s, b).astype(jnp.float32) * weight)
    results[name] = jax.device_get(jax.jit(lambda x, s, b, fn=fn, loss=loss: (
        fn(x, s, b), jax.grad(loss, argnums=(0, 1, 2))(x, s, b)))(
            x, params["scale"], params["bias"]))
  # plain vs flax: the same operations differentiated by autodiff; fast vs plain: the written
  # gradient's summation order (module docstring: 1e-5 of the gradient's scale; bfloat16 inputs
  # round the input gradient to 8 bits).
  rtol = 1e-5 if dtype == jnp.float32 else 2 ** -7
  for a, b in (("plain", "flax"), ("fast", "plain")):
    np.testing.assert_allclose(np.asarray(results[a][0], np.float32),
                               np.asarray(results[b][0], np.float32), rtol=1e-6, atol=1e-6)
    for g, g_ref in zip(results[a][1], results[b][1]):
      g, g_ref = np.asarray(g, np.float64), np.asarray(g_ref, np.float64)
      scale = np.abs(g_ref).max()
      np.testing.assert_allclose(g, g_ref, rtol=rtol, atol=rtol * scale, err_msg=f"{a} {b}")


@pytest.mark.parametrize("axis", [-1, 1])
def test_l2_normalize_fast_path_equals_the_plain_path(axis):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(4, 6, 32)).astype(np.float32)
  x[0, 0] = 0.0  # a zero vector stays zero, with a finite gradient
  weight = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  out = {}
  for name, fn in (("plain", ops._l2_normalize), ("fast", norms.l2_normalize)):
    f = lambda x, fn=fn: fn(x, axis % 3, ops.NORM_EPS)
    out[name] = jax.device_get(jax.jit(lambda x, f=f: (
        f(x), jax.grad(lambda x: jnp.sum(f(x) * weight))(x)))(jnp.asarray(x)))
  # The same forward operations; the written gradient r (dy - y sum(dy y)) sums D = 32 (or 6)
  # products in another order than autodiff: a few float32 roundings of the gradient's scale.
  np.testing.assert_array_equal(out["fast"][0], out["plain"][0])
  scale = np.abs(out["plain"][1]).max()
  np.testing.assert_allclose(out["fast"][1], out["plain"][1], rtol=1e-5, atol=1e-6 * scale)
  assert np.all(np.isfinite(out["fast"][1]))
