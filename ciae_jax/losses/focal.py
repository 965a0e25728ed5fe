"""Sigmoid focal loss (Lin et al., RetinaNet), the FCOS classification loss."""
import jax
import jax.numpy as jnp

Array = jax.Array


def sigmoid_focal_loss(logits: Array,
                       labels: Array,
                       *,
                       alpha: float,
                       gamma: float) -> Array:
  """Elementwise `-alpha_t (1 - p_t)^gamma log(p_t)`, same shape as `logits`.

  Args:
    logits: `[..., C]` float logits.
    labels: binary (or soft) labels broadcastable to `logits`.
    alpha: weight of the positives (`1 - alpha` for the negatives); `None` or a negative value
      disables the weighting.
    gamma: focusing exponent.

  Returns:
    Loss per element, float32, shape of `logits`.
  """
  logits = jnp.asarray(logits, jnp.float32)  # [..., C]
  labels = jnp.asarray(labels, jnp.float32)  # [..., C]
  log_p = jax.nn.log_sigmoid(logits)  # [..., C] log p
  log_q = jax.nn.log_sigmoid(-logits)  # [..., C] log (1 - p)
  cross_entropy = -(labels * log_p + (1.0 - labels) * log_q)  # [..., C]
  # log(1 - p_t) in log space: stable for large |logits|.
  log_one_minus_pt = jnp.logaddexp(jnp.log1p(-labels) + log_p,
                                   jnp.log(labels) + log_q)  # [..., C]
  loss = jnp.exp(gamma * log_one_minus_pt) * cross_entropy  # [..., C]
  if alpha is not None and alpha >= 0:
    alpha_t = alpha * labels + (1.0 - alpha) * (1.0 - labels)  # [..., C]
    loss = alpha_t * loss  # [..., C]
  return loss


def sigmoid_focal_loss_sum(logits: Array,
                           labels: Array,
                           *,
                           alpha: float,
                           gamma: float) -> Array:
  """Sum of `sigmoid_focal_loss` over all elements (a scalar); the caller normalises."""
  return jnp.sum(sigmoid_focal_loss(logits, labels, alpha=alpha, gamma=gamma))
