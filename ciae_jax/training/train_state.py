"""The train state: everything a step reads and writes, one pytree (checkpointed as a whole)."""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Model parameters, optimizer state, category memory and rng of one training run.

  Attributes:
    step: [] int32, number of optimizer updates done so far.
    params: the model's 'params' collection (trained).
    opt_state: optax state of `params`.
    memory: [M, D] float32, unit-norm category memory embeddings (paper III-C); no gradient,
      updated by momentum after every step.
    rng: [2] uint32 raw PRNG key, split once per step (identical on every device).
    model_state: the model's other variable collections (e.g. frozen batch-norm statistics);
      read by the forward pass, never updated.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  memory: jax.Array
  rng: jax.Array
  model_state: Any


def create_train_state(*, params: Any, optimizer: optax.GradientTransformation,
                       memory: jax.Array, rng: jax.Array, model_state: Any = None) -> TrainState:
  """Step 0 state: fresh optimizer state, the given memory `[M, D]` and raw key `[2]`."""
  if jnp.ndim(memory) != 2:
    raise ValueError(f"memory must be [M, D], got shape {jnp.shape(memory)}")
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=optimizer.init(params), memory=jnp.asarray(memory, jnp.float32),
                    rng=jnp.asarray(rng, jnp.uint32),
                    model_state={} if model_state is None else model_state)


def split_variables(variables: Any) -> tuple[Any, Any]:
  """Splits flax variables into ('params', every other collection as a dict)."""
  variables = flax.core.unfreeze(variables)
  params = variables.pop("params")
  return params, variables
