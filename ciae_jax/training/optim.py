"""Optimizer: SGD with momentum, per-group weight decay and learning rate, warm-up + steps.

Paper V-C (the RetinaNet recipe): SGD, momentum 0.9, weight decay 1e-4, lr 0.01 for a batch of
16 images, x0.1 at 60k and 80k of 90k iterations. Where the paper is silent we follow FCOS's
reference code (`fcos_core/solver/build.py`, `make_optimizer`, with maskrcnn-benchmark's
`SOLVER.BIAS_LR_FACTOR = 2`, `SOLVER.WEIGHT_DECAY_BIAS = 0`), parameter by parameter:
- biases (conv and GroupNorm) train at `bias_lr_factor` x the learning rate (FCOS: 2) with
  weight decay `weight_decay_bias` (FCOS: 0);
- GroupNorm scales take `weight_decay_norm` (FCOS decays every parameter whose name holds no
  "bias", GroupNorm weights included: 1e-4; detectron2's recipe would be 0);
- kernels and the per-level FCOS scales take `weight_decay` (1e-4);
- frozen parameters (regexes over '/'-joined parameter paths) get no update at all
  (`optax.set_to_zero`), so they keep no momentum either;
- warm-up: linear from `lr * warmup_factor` to `lr` over `warmup_steps` (Detectron's
  WarmupMultiStepLR: 1000 steps, factor 0.001);
- the learning rate scales linearly with the global batch, `lr = base_lr * batch_size / 16`,
  unless a direct `lr` is given.

One clock: the optimizer built here has no step counter of its own. It gives the update for a
learning rate of 1; the train step multiplies it by `schedule(state.step)`. The schedule, the
memory momentum (Eq. 13) and the logged rate therefore read the same count, `state.step`, which
a skipped (non-finite) step advances too: decays come at the configured steps, skipped or not,
and the logged rate is the rate applied.
"""
import re
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import optax

from ciae_jax import hparams

REFERENCE_BATCH_SIZE = 16
# What a parameter is, by the name of its leaf (flax: conv / dense `kernel` and `bias`,
# GroupNorm `scale` and `bias`, the head's per-level `scale_p3` ..).
GROUPS = ("kernel", "bias", "norm", "other")


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


def param_group(path: str) -> str:
  """The group of a parameter path (`GROUPS`): its leaf name decides."""
  leaf = path.split("/")[-1]
  if leaf in ("kernel", "bias"):
    return leaf
  return "norm" if leaf == "scale" else "other"


def group_mask(params: Any, *groups: str) -> Any:
  """True for the leaves of `params` in one of `groups`."""
  return jax.tree.map(lambda path: param_group(path) in groups, param_path_names(params))


def frozen_mask(params: Any, frozen_patterns: Sequence[str] = ()) -> Any:
  """True for the leaves whose path matches one of the regexes `frozen_patterns` (re.search)."""
  compiled = [re.compile(p) for p in frozen_patterns]
  return jax.tree.map(lambda path: any(c.search(path) for c in compiled),
                      param_path_names(params))


def build_optimizer(params: Any, hp: hparams.OptimizerHParams) -> optax.GradientTransformation:
  """SGD with momentum for a learning rate of 1 (the step scales it): clipping, per-group
  weight decay and learning-rate factors, frozen parameters.

  The chain matches PyTorch's `clip_grad_norm_` then `SGD` with one parameter group per
  FCOS rule: clip the raw gradient, add `decay * w` (the group's decay), momentum, then the
  group's learning-rate factor. `params` is used only for the masks (tree structure, paths).
  """
  chain = []
  if hp.grad_clip_norm is not None and hp.grad_clip_norm > 0:
    chain.append(optax.clip_by_global_norm(hp.grad_clip_norm))
  for decay, groups in ((hp.weight_decay, ("kernel", "other")),
                        (hp.weight_decay_norm, ("norm",)),
                        (hp.weight_decay_bias, ("bias",))):
    if decay:
      chain.append(optax.add_decayed_weights(decay, mask=group_mask(params, *groups)))
  chain.append(optax.sgd(1.0, momentum=hp.momentum if hp.momentum else None))
  if hp.bias_lr_factor != 1.0:
    chain.append(optax.masked(optax.scale(hp.bias_lr_factor), group_mask(params, "bias")))
  trainable = optax.chain(*chain)
  frozen = frozen_mask(params, hp.frozen_patterns)
  if not any(jax.tree.leaves(frozen)):
    return trainable
  labels = jax.tree.map(lambda f: "frozen" if f else "trainable", frozen)
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)


def create(hp: hparams.OptimizerHParams, params: Any, *, batch_size: int
           ) -> tuple[optax.GradientTransformation, Callable[[Any], jax.Array]]:
  """(optax optimizer for a unit learning rate, learning-rate schedule of the step count)."""
  lr = scaled_learning_rate(base_lr=hp.base_lr, batch_size=batch_size, lr=hp.lr)
  schedule = learning_rate_schedule(lr=lr, warmup_steps=hp.warmup_steps,
                                    warmup_factor=hp.warmup_factor,
                                    decay_steps=tuple(hp.decay_steps),
                                    decay_factor=hp.decay_factor)
  return build_optimizer(params, hp), schedule


def apply_updates(params: Any, updates: Any, learning_rate: jax.Array) -> Any:
  """`params + learning_rate * updates` (the updates of `build_optimizer`)."""
  return jax.tree.map(lambda p, u: (p + learning_rate * u).astype(p.dtype), params, updates)
