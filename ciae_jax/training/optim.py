"""Optimizer: SGD with momentum, masked weight decay, warm-up + step schedule, frozen parameters.

Paper V-C (the RetinaNet recipe): SGD, momentum 0.9, weight decay 1e-4, lr 0.01 for a batch of
16 images, x0.1 at 60k and 80k of 90k iterations. Readings chosen where the paper is silent:
- warm-up: linear from `lr * warmup_factor` to `lr` over `warmup_steps` (Detectron's
  WarmupMultiStepLR: 1000 steps, factor 0.001);
- the learning rate scales linearly with the global batch, `lr = base_lr * batch_size / 16`,
  unless a direct `lr` is given;
- weight decay only on kernels (conv and dense weights): norm scales, biases and per-level FCOS
  scales take none;
- frozen parameters (regexes over '/'-joined parameter paths) get no update at all
  (`optax.set_to_zero`), so they keep no momentum either.
"""
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ciae_jax import hparams

REFERENCE_BATCH_SIZE = 16


def scaled_learning_rate(*, base_lr: float, batch_size: int, lr: Optional[float]) -> float:
  """Returns `lr` if given, else `base_lr` scaled linearly from a batch of 16 to `batch_size`."""
  if lr is not None:
    return float(lr)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  return base_lr * batch_size / REFERENCE_BATCH_SIZE


def learning_rate_schedule(*, lr: float, warmup_steps: int, warmup_factor: float,
                           decay_steps: Sequence[int],
                           decay_factor: float) -> Callable[[Any], jax.Array]:
  """Linear warm-up then multiplication by `decay_factor` at each of `decay_steps`.

  At step t: `lr * w(t) * decay_factor ** #{d in decay_steps : t >= d}` with
  `w(t) = warmup_factor + (1 - warmup_factor) * t / warmup_steps` for t < warmup_steps, else 1.
  """
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  boundaries = jnp.asarray(sorted(decay_steps), dtype=jnp.int32)  # [K]

  def schedule(step):
    step = jnp.asarray(step, jnp.int32)  # []
    num_decays = jnp.sum(step >= boundaries)  # []
    decay = jnp.asarray(decay_factor, jnp.float32) ** num_decays.astype(jnp.float32)  # []
    if warmup_steps > 0:
      alpha = jnp.minimum(step.astype(jnp.float32) / warmup_steps, 1.0)  # []
      warmup = warmup_factor * (1.0 - alpha) + alpha  # []
    else:
      warmup = jnp.float32(1.0)
    return jnp.float32(lr) * warmup * decay

  return schedule


def param_path_names(params: Any) -> Any:
  """A tree like `params` whose leaves are the '/'-joined key paths of its leaves."""
  def name(path, _):
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
                    for k in path)
  return jax.tree_util.tree_map_with_path(name, params)


def weight_decay_mask(params: Any) -> Any:
  """True for the leaves that take weight decay: kernels only (not norm scales, not biases)."""
  return jax.tree.map(lambda path: path.split("/")[-1] == "kernel", param_path_names(params))


def frozen_mask(params: Any, frozen_patterns: Sequence[str] = ()) -> Any:
  """True for the leaves whose path matches one of the regexes `frozen_patterns` (re.search)."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree.map(lambda path: any(c.search(path) for c in compiled),
                      param_path_names(params))


def build_optimizer(params: Any, *, learning_rate: Callable[[Any], jax.Array] | float,
                    momentum: float, weight_decay: float, grad_clip_norm: Optional[float],
                    frozen_patterns: Sequence[str]) -> optax.GradientTransformation:
  """SGD with momentum, weight decay on kernels only, optional clipping, frozen parameters.

  The chain matches PyTorch's `clip_grad_norm_` then `SGD(weight_decay=...)`: clip the raw
  gradient, add `weight_decay * w` on kernels, then momentum and the learning rate.
  `params` is used only for the masks (its tree structure and leaf paths).
  """
  chain = []
  if grad_clip_norm is not None and grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(grad_clip_norm))
  if weight_decay:
    chain.append(optax.add_decayed_weights(weight_decay, mask=weight_decay_mask(params)))
  chain.append(optax.sgd(learning_rate, momentum=momentum if momentum else None))
  trainable = optax.chain(*chain)
  frozen = frozen_mask(params, frozen_patterns)
  if not any(jax.tree.leaves(frozen)):
    return trainable
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)



def create(hp: hparams.OptimizerHParams, params: Any, *, batch_size: int
           ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """(optax optimizer, learning-rate schedule) of `hp` for a global batch of `batch_size`."""
  lr = scaled_learning_rate(base_lr=hp.base_lr, batch_size=batch_size, lr=hp.lr)
  schedule = learning_rate_schedule(lr=lr, warmup_steps=hp.warmup_steps,
                                    warmup_factor=hp.warmup_factor,
                                    decay_steps=tuple(hp.decay_steps),
                                    decay_factor=hp.decay_factor)
  optimizer = build_optimizer(params, learning_rate=schedule, momentum=hp.momentum,
                              weight_decay=hp.weight_decay, grad_clip_norm=hp.grad_clip_norm,
                              frozen_patterns=tuple(hp.frozen_patterns))
  return optimizer, schedule
