"""Mixed precision: `model.dtype = "bfloat16"` computes in bfloat16, keeps float32 parameters,
outputs and losses, and agrees with the float32 model (the reference) within bfloat16's
precision, for the network outputs and for one train step.

bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 0.2% per operation); through the
tiny network the outputs move by 1-2% RMS of their scale (measured 1.0-1.9%, 0.3% for the
class logits; embedding cosines >= 0.9988) and the step's losses by <= 0.09%. The tolerances
below are ~3x and ~10x that; a model that ignored `dtype` fails the bfloat16-compute check,
one that cast an output, a metric or a parameter to bfloat16 fails the dtype checks, and one
that computed garbage in bfloat16 fails the agreement.
"""
import functools

import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from ciae_jax import parallel
from ciae_jax import targets as targets_lib
from ciae_jax.losses import ciae as ciae_losses
from ciae_jax.losses import fcos as fcos_lib
from ciae_jax.models import ciae as ciae_model
from ciae_jax.segments import Segments
import test_train_helpers as helpers

# Tolerances in bfloat16 units: the differences come from rounding values to 8 bits (2^-9
# relative) in every layer, the same on any CPU; the float32 accumulation orders that differ
# between machines move the results by ~1e-6, 1000x less (measured: bit-identical results
# with XLA_FLAGS=--xla_cpu_max_isa=AVX2).
OUTPUT_RMS_TOL = 0.05  # RMS(bf16 - f32) / RMS(f32) per output: ~25 roundings of 2^-9 in RMS
EMBEDDING_MIN_COSINE = 0.995  # per pixel, between the two unit embeddings (an angle of 6 deg)
LOSS_RTOL = 0.01  # losses: means over >= 1e4 terms, whose bfloat16 noise averages out
BATCH = 4
# The tiny test model, 64 FPN channels: GroupNorm then has 2 channels per group. With 16 (1 per
# group) a group on P7 of a 128 x 128 image holds one value, whose variance bfloat16 rounding
# turns from 0 into noise that the normalisation multiplies by 1/sqrt(eps); real models have
# 8 channels per group on maps of >= 7 x 11 cells.
TEST_MODEL = dict(helpers.TINY_MODEL, fpn_dim=64)


def numpy_variables(model: ciae_model.CIAE, seed: int = 0):
  """Every variable collection from NumPy: He-normal kernels, random frozen-BN statistics."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, *helpers.IMAGE_HW, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def init(path, leaf):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    last = name.split("/")[-1]
    if last == "kernel":
      fan_in = int(np.prod(leaf.shape[:-1]))
      return rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape).astype(np.float32)
    if name.endswith("cls_logits/bias"):
      return np.full(leaf.shape, -np.log(99.0), np.float32)
    if last == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if last == "scale" or last.startswith("scale_"):
      return rng.uniform(0.8, 1.2, leaf.shape).astype(np.float32)
    return rng.normal(0.0, 0.1, leaf.shape).astype(np.float32)  # biases, BN means
  return jax.tree_util.tree_map_with_path(init, shapes)


def _models(norm: str):
  config = dict(TEST_MODEL, norm=norm)
  return (ciae_model.build_model(config, helpers.NUM_THINGS),
          ciae_model.build_model(dict(config, dtype="bfloat16"), helpers.NUM_THINGS))


def _flat(tree) -> np.ndarray:
  return np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree.leaves(tree)])


def _conv_operand_dtypes(model, variables, images) -> set:
  """Dtypes of the operands of every convolution in the model's jaxpr."""
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x))(variables, images)
  found = set()

  def visit(jpr):
    for eqn in jpr.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        found.update(str(v.aval.dtype) for v in eqn.invars)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        visit(sub)
  visit(jaxpr.jaxpr)
  return found


def test_bfloat16_outputs_agree_with_float32():
  # Frozen BN as in the paper's backbone; the train-step test below covers GroupNorm.
  model_f32, model_bf16 = _models("frozen_bn")
  variables = numpy_variables(model_f32)
  images = jnp.asarray(helpers.make_batch(0, (2,))["image"])  # [2, 128, 128, 3]

  assert _conv_operand_dtypes(model_f32, variables, images) == {"float32"}
  assert _conv_operand_dtypes(model_bf16, variables, images) == {"bfloat16"}

  out_f32 = jax.jit(lambda v, x: model_f32.apply(v, x))(variables, images)
  out_bf16 = jax.jit(lambda v, x: model_bf16.apply(v, x))(variables, images)
  assert out_f32.keys() == out_bf16.keys()
  for key in out_f32:
    for leaf in jax.tree.leaves(out_bf16[key]):
      assert leaf.dtype == jnp.float32, f"output {key} is {leaf.dtype}, docs say float32"
    reference, got = _flat(out_f32[key]), _flat(out_bf16[key])
    assert np.all(np.isfinite(got)), key
    rms_error = np.sqrt(np.mean((got - reference) ** 2)) / np.sqrt(np.mean(reference ** 2))
    assert rms_error <= OUTPUT_RMS_TOL, (key, rms_error)
  # The cls logits are dominated by the prior bias: compare what the weights add to it.
  logits_f32 = _flat(out_f32["cls_logits"]) + np.log(99.0)
  logits_bf16 = _flat(out_bf16["cls_logits"]) + np.log(99.0)
  rms_error = np.sqrt(np.mean((logits_bf16 - logits_f32) ** 2) / np.mean(logits_f32 ** 2))
  assert rms_error <= OUTPUT_RMS_TOL, ("cls_logits minus bias", rms_error)
  cosine = np.sum(np.asarray(out_f32["embedding"]) * np.asarray(out_bf16["embedding"]), -1)
  assert cosine.min() >= EMBEDDING_MIN_COSINE, cosine.min()


@pytest.mark.slow
def test_bfloat16_train_step_keeps_float32_and_agrees():
  """One bfloat16 step vs the float32 losses of the same state and batch (paper composition).

  Step 1's metrics are the losses at the initial parameters against M_0; the reference
  composes them in float32 from the public pieces (as tests/test_train_step.py does), which
  costs one forward compilation instead of a second train step.
  """
  batch = helpers.make_batch(7, (1, BATCH))
  model_f32 = ciae_model.build_model(TEST_MODEL, helpers.NUM_THINGS)
  model_bf16 = ciae_model.build_model(dict(TEST_MODEL, dtype="bfloat16"), helpers.NUM_THINGS)
  start, step_fn = helpers.initial_state(model_bf16)
  devices = jax.devices()[:1]
  run_step = parallel.parallelize(step_fn, parallel="pmap", devices=devices)
  state, metrics = run_step(parallel.replicate(start, parallel="pmap", devices=devices), batch)
  end = parallel.unreplicate(state, parallel="pmap")
  metrics = jax.device_get(parallel.first_copy(metrics, parallel="pmap"))

  for name in ("params", "opt_state", "memory"):
    for leaf in jax.tree.leaves(getattr(end, name)):
      if jnp.issubdtype(leaf.dtype, jnp.floating):
        assert leaf.dtype == np.float32, f"{name} holds {leaf.dtype} after a bfloat16 step"
  for key, value in metrics.items():
    if jnp.issubdtype(np.asarray(value).dtype, jnp.floating):
      assert np.asarray(value).dtype == np.float32, f"metric {key} is {np.asarray(value).dtype}"
  assert np.isfinite(metrics["grad_norm"]) and metrics["grad_norm"] > 0
  moved = _flat(end.params) - _flat(start.params)
  assert np.all(np.isfinite(moved)) and np.abs(moved).max() > 0

  expected = jax.device_get(_reference_losses(model_f32, start.params, start.memory,
                                              {k: v[0] for k, v in batch.items()}))
  for key, value in expected.items():  # LOSS_RTOL: bfloat16 noise averaged (see its comment).
    np.testing.assert_allclose(metrics[key], value, rtol=LOSS_RTOL,
                               err_msg=f"{key}: bfloat16 step vs float32 reference")


@functools.partial(jax.jit, static_argnums=0)
def _reference_losses(model, params, memory, batch):
  """Float32 step-1 losses: FCOS losses over the batch's positives + CIAE loss against M_0."""
  hp = helpers.STEP_HPARAMS
  segments = Segments.from_batch(batch)
  outputs = model.apply({"params": params}, batch["image"])
  targets = jax.vmap(functools.partial(targets_lib.fcos_targets, num_stuff=helpers.NUM_STUFF,
                                       hp=hp.fcos))(segments)
  num_positives = jnp.sum(targets["positive"])
  centerness_sum = jnp.sum(targets["centerness_target"] * targets["positive"])
  fcos = fcos_lib.fcos_losses(ciae_model.flatten_levels(outputs["cls_logits"]),
                              ciae_model.flatten_levels(outputs["box_reg"]),
                              ciae_model.flatten_levels(outputs["centerness"]),
                              targets, num_positives, centerness_sum, hp.fcos)
  per_image = jax.vmap(lambda e, p, s: ciae_losses.ciae_loss(
      e, p, s, memory, hp.loss, num_stuff=helpers.NUM_STUFF))(
          outputs["embedding"], outputs["embedding_prenorm"], segments)
  ciae = ciae_losses.ciae_total(jax.tree.map(lambda x: jnp.sum(x, axis=0), per_image))
  losses = {**fcos, **ciae}
  losses["loss"] = (losses["loss_cls"] + losses["loss_reg"] + losses["loss_ctr"]
                    + losses["loss_ciae"])
  return losses
