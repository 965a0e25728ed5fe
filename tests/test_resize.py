"""ciae_jax.models.resize.resize_bilinear gives jax.image.resize's bilinear values and gradients."""
import jax
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest

from ciae_jax.models import resize


def dense(x, size):
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bilinear",
                          antialias=False)


@pytest.mark.parametrize("in_hw,out_hw", [
    ((1, 1), (4, 4)),  # size-1 axes
    ((2, 3), (8, 12)),  # whole factors
    ((4, 6), (64, 96)),  # factor 16
    ((3, 3), (9, 9)),  # odd factor (a phase with offset 0)
    ((5, 5), (15, 10)),  # different factors per axis
    ((13, 21), (200, 336)),  # not whole: falls back to jax.image.resize
    ((7, 11), (7, 22)),  # one axis unchanged
    ((8, 8), (4, 4)),  # downsampling: fallback
])
def test_values_and_vjp_match_jax_image_resize(in_hw, out_hw):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, *in_hw, 3)), jnp.float32)
  cotangent = jnp.asarray(rng.standard_normal((2, *out_hw, 3)), jnp.float32)
  want, want_vjp = jax.vjp(lambda t: dense(t, out_hw), x)
  got, got_vjp = jax.vjp(lambda t: resize.resize_bilinear(t, out_hw), x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)
  np.testing.assert_allclose(got_vjp(cotangent)[0], want_vjp(cotangent)[0], atol=2e-5, rtol=0)


def test_reverse_mode_gradients_of_two_orders():
  x = jnp.asarray(np.random.default_rng(1).standard_normal((1, 2, 3, 2)), jnp.float32)
  check_grads(lambda t: resize.resize_bilinear(t, (8, 12)), (x,), order=2, modes=["rev"],
              eps=1e-2)


def test_bfloat16_stays_bfloat16():
  x = jnp.ones((1, 4, 4, 3), jnp.bfloat16)
  assert resize.resize_bilinear(x, (8, 8)).dtype == jnp.bfloat16
  grad = jax.grad(lambda t: jnp.sum(resize.resize_bilinear(t, (8, 8)).astype(jnp.float32)))(x)
  assert grad.dtype == jnp.bfloat16


def test_same_size_is_identity():
  x = jnp.arange(24.0).reshape(1, 2, 4, 3)
  assert resize.resize_bilinear(x, (2, 4)) is x
