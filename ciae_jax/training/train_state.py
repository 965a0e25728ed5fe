"""The train state: everything a step reads and writes, one pytree (checkpointed as a whole)."""
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import optax

from ciae_jax import hparams
from ciae_jax import memory as memory_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.models import convert
from ciae_jax.training import optim


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


def init_train_state(hp: hparams.HParams, model: Any, *, num_stuff: int, num_things: int,
                     rng: jax.Array) -> tuple[TrainState, optax.GradientTransformation, Any]:
  """Step-0 host state, its optimizer and learning-rate schedule.

  The parameters come from `model.init` (the backbone from `hp.init_backbone` when set), the
  memory from random unit rows (M_0), the state rng from `rng`.
  """
  params_rng, memory_rng, state_rng = jax.random.split(rng, 3)
  variables = ciae_model.init_variables(model, params_rng)
  if hp.init_backbone:
    variables = convert.load_backbone_params(hp.init_backbone, variables)
    logging.info("Backbone initialised from %s", hp.init_backbone)
  params, model_state = ciae_model.split_variables(variables)
  optimizer, schedule = optim.create(hp.optimizer, params, batch_size=hp.batch_size)
  rows = memory_lib.num_memory(num_stuff, num_things, hp.loss.merge_things)
  memory = memory_lib.init_memory(memory_rng, rows, hp.model.embed_dim)  # [M, D]
  # One program, not one per distinct leaf shape (the optimizer's zeros, eagerly).
  create = jax.jit(lambda p, s, m, r: create_train_state(
      params=p, optimizer=optimizer, memory=m, rng=r, model_state=s))
  state = create(params, model_state, memory, state_rng)
  return jax.device_get(state), optimizer, schedule
