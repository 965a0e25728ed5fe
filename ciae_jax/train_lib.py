"""Training library entry point (what `train.py` calls); the pieces live in `ciae_jax.training`.

- `training.train_state`: `TrainState` (step, params, opt_state, memory, rng, model_state).
- `training.optim`: SGD + momentum, masked weight decay, warm-up / step schedule, frozen params.
- `training.step`: the per-device step (global normalisation, pmean grads, memory update).
- `training.parallel`: the "pmap" / "shard_map" switch around that one step.
- `training.checkpoint`, `training.metrics`: orbax checkpoints, clu metrics.
- `training.loop`: `train_and_evaluate(config, workdir)`.
"""
from ciae_jax.training.loop import default_evaluate_fn
from ciae_jax.training.loop import init_train_state
from ciae_jax.training.loop import make_train_step
from ciae_jax.training.loop import train_and_evaluate
from ciae_jax.training.train_state import TrainState

__all__ = ["TrainState", "default_evaluate_fn", "init_train_state", "make_train_step",
           "train_and_evaluate"]
