"""Optimizer: schedule, decay mask, frozen parameters, clipping, against NumPy loops.

Reference (PyTorch SGD semantics, paper V-C): g <- clip(g); g += wd * w on kernels only;
buf <- momentum * buf + g; w <- w - lr_t * buf; frozen parameters never move.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import hparams
from ciae_jax.training import optim


def _reference_lr(step, *, lr, warmup_steps, warmup_factor, decay_steps, decay_factor):
  if step < warmup_steps:
    alpha = step / warmup_steps
    factor = warmup_factor * (1 - alpha) + alpha
  else:
    factor = 1.0
  for boundary in decay_steps:
    if step >= boundary:
      factor *= decay_factor
  return lr * factor


def test_schedule_matches_warmup_and_steps():
  kwargs = dict(lr=0.02, warmup_steps=10, warmup_factor=0.001, decay_steps=(60, 80),
                decay_factor=0.1)
  schedule = optim.learning_rate_schedule(**kwargs)
  steps = np.arange(0, 100)
  got = np.asarray(jax.vmap(schedule)(jnp.asarray(steps)))
  want = [_reference_lr(int(s), **kwargs) for s in steps]
  # float32 schedule vs float64: lr, the factors and 0.1 rounded to float32 and ~6 float32
  # operations, each within half an ulp (2^-24 ~ 6e-8): < 5e-7; rtol 1e-6 (also pytest.approx's
  # default below).
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert got[0] == pytest.approx(0.02 * 0.001)
  assert got[59] == pytest.approx(0.02) and got[60] == pytest.approx(0.002)
  assert got[80] == pytest.approx(0.0002)


def test_paper_schedule_defaults():
  # lr 0.01 at batch 16, x0.1 at 60k and 80k.
  _, schedule = optim.create(hparams.OptimizerHParams(), PARAMS, batch_size=16)
  assert float(schedule(30_000)) == pytest.approx(0.01)
  assert float(schedule(70_000)) == pytest.approx(0.001)
  assert float(schedule(85_000)) == pytest.approx(0.0001)


def test_learning_rate_scales_with_batch():
  # Python float64 arithmetic: pytest.approx's 1e-6 is ~1e10 float64 ulps.
  assert optim.scaled_learning_rate(base_lr=0.01, batch_size=16, lr=None) == pytest.approx(0.01)
  assert optim.scaled_learning_rate(base_lr=0.01, batch_size=64, lr=None) == pytest.approx(0.04)
  assert optim.scaled_learning_rate(base_lr=0.01, batch_size=8, lr=0.3) == pytest.approx(0.3)
  with pytest.raises(ValueError, match="batch_size"):
    optim.scaled_learning_rate(base_lr=0.01, batch_size=0, lr=None)


PARAMS = {
    "backbone": {"conv1": {"kernel": np.full((3, 3, 2, 4), 0.5, np.float32)},
                 "bn1": {"scale": np.ones(4, np.float32), "bias": np.full(4, 0.2, np.float32)}},
    "head": {"cls": {"kernel": np.full((4, 3), -0.3, np.float32),
                     "bias": np.full(3, -4.0, np.float32)},
             "scale_p3": np.ones((), np.float32)},
}


def test_parameter_groups_follow_fcos():
  # fcos_core/solver/build.py: a name holding "bias" is a bias; every other parameter (kernels,
  # GroupNorm weights, the per-level scales) takes the weight decay.
  groups = jax.tree.map(optim.param_group, optim.param_path_names(PARAMS))
  assert groups["backbone"]["conv1"]["kernel"] == groups["head"]["cls"]["kernel"] == "kernel"
  assert groups["backbone"]["bn1"]["bias"] == groups["head"]["cls"]["bias"] == "bias"
  assert groups["backbone"]["bn1"]["scale"] == "norm"
  assert groups["head"]["scale_p3"] == "other"
  defaults = hparams.OptimizerHParams()
  assert (defaults.bias_lr_factor, defaults.weight_decay_bias) == (2.0, 0.0)
  assert defaults.weight_decay == defaults.weight_decay_norm == 1e-4


# Distinct values, so that a parameter in the wrong group fails the comparison below.
GROUP_HP = hparams.OptimizerHParams(lr=0.1, momentum=0.9, weight_decay=0.01,
                                    weight_decay_norm=0.003, weight_decay_bias=0.002,
                                    bias_lr_factor=2.0, warmup_steps=2, warmup_factor=0.25,
                                    decay_steps=(3,), decay_factor=0.1,
                                    frozen_patterns=("^backbone/conv1/",))
DECAY = {"kernel": 0.01, "other": 0.01, "norm": 0.003, "bias": 0.002}
LR_FACTOR = {"kernel": 1.0, "other": 1.0, "norm": 1.0, "bias": 2.0}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_sgd_momentum_decay_clip_frozen_match_numpy(clip):
  rng = np.random.default_rng(0)
  grads_seq = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), PARAMS)
               for _ in range(4)]
  tx, schedule = optim.create(GROUP_HP.replace(grad_clip_norm=clip), PARAMS, batch_size=16)
  params = jax.tree.map(jnp.asarray, PARAMS)
  opt_state = tx.init(params)
  update = jax.jit(tx.update)
  for step, grads in enumerate(grads_seq):
    updates, opt_state = update(grads, opt_state, params)
    params = optim.apply_updates(params, updates, schedule(step))

  # NumPy reference, leaf by leaf (PyTorch SGD with one parameter group per FCOS rule).
  flat_params = {"/".join(str(k.key) for k in path): np.array(v, np.float64)
                 for path, v in jax.tree_util.tree_flatten_with_path(PARAMS)[0]}
  buffers = {name: np.zeros_like(v) for name, v in flat_params.items()}
  trainable = [n for n in flat_params if not n.startswith("backbone/conv1/")]
  for t, grads in enumerate(grads_seq):
    flat_grads = {"/".join(str(k.key) for k in path): np.array(v, np.float64)
                  for path, v in jax.tree_util.tree_flatten_with_path(grads)[0]}
    norm = np.sqrt(sum(np.sum(flat_grads[n] ** 2) for n in trainable))
    factor = min(1.0, clip / norm) if clip else 1.0
    lr = _reference_lr(t, lr=0.1, warmup_steps=2, warmup_factor=0.25, decay_steps=(3,),
                       decay_factor=0.1)
    for name in trainable:
      group = optim.param_group(name)
      grad = flat_grads[name] * factor + DECAY[group] * flat_params[name]
      buffers[name] = 0.9 * buffers[name] + grad
      flat_params[name] = flat_params[name] - LR_FACTOR[group] * lr * buffers[name]

  # 4 float32 optimizer steps (clip norm over <= 100 squares, decay, momentum, update: ~6
  # roundings a step) vs float64 on parameters of magnitude 0.2-4: ~25 roundings of 6e-8,
  # < 2e-6 relative; rtol 1e-5, and atol 1e-6 for values that cancel towards 0.
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = "/".join(str(k.key) for k in path)
    np.testing.assert_allclose(value, flat_params[name], rtol=1e-5, atol=1e-6, err_msg=name)
  np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"],
                                PARAMS["backbone"]["conv1"]["kernel"])
