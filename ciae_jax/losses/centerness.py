"""Centerness loss: binary cross-entropy with logits (FCOS)."""
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array


def centerness_bce(logits: Array, targets: Array) -> Array:
  """Elementwise `-(y log sigmoid(x) + (1 - y) log(1 - sigmoid(x)))`, float32, shape of `logits`."""
  logits = jnp.asarray(logits, jnp.float32)  # [...]
  targets = jnp.asarray(targets, jnp.float32)  # [...]
  return -(targets * jax.nn.log_sigmoid(logits)
           + (1.0 - targets) * jax.nn.log_sigmoid(-logits))  # [...]


def centerness_loss_sum(logits: Array, targets: Array, weight: Optional[Array] = None) -> Array:
  """`sum_i weight_i * centerness_bce_i` (a scalar; weight 1 when None); the caller normalises."""
  losses = centerness_bce(logits, targets)  # [...]
  if weight is not None:
    losses = losses * jnp.asarray(weight, jnp.float32)  # [...]
  return jnp.sum(losses)
