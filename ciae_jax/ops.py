"""Small array operations shared by the model, the losses, the memory and inference."""
import jax
import jax.numpy as jnp

# Norms below this are treated as zero when normalising (empty sums stay zero, no NaN).
NORM_EPS = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1, eps: float = NORM_EPS) -> jax.Array:
  """`x / max(||x||, eps)` along `axis`; all-zero vectors stay zero, with a finite gradient.

  Computed as `x * rsqrt(max(||x||^2, eps^2))` in the dtype of `x`.
  """
  sq_norm = jnp.sum(jnp.square(x), axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq_norm, eps * eps))


def expand_boxes(boxes: jax.Array, factor: float) -> jax.Array:
  """Boxes `[..., 4]` (x0, y0, x1, y1) scaled `factor` times about their centres."""
  if factor == 1.0:
    return boxes
  centre = (boxes[..., :2] + boxes[..., 2:]) / 2  # [..., 2]
  half = (boxes[..., 2:] - boxes[..., :2]) * (factor / 2)  # [..., 2]
  return jnp.concatenate([centre - half, centre + half], axis=-1)  # [..., 4]
